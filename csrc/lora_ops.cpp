// Every lora_ops schema, declared once. Backends register implementations in cpu/ and cuda/.
#include <torch/library.h>

#ifdef LORA_OPS_PYTHON_MODULE
#include <Python.h>
// An empty Python module so that `import lora_ops._C` loads this library (and runs the registrations below).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(lora_ops, m) {
  // y[t] = sum_j weights[t, j] * scales[id] * B[id] @ (A[id] @ x[t]),  id = adapter_ids[t, j], skipped when -1.
  // adapter_ids has x's leading shape (one adapter per row) or that shape + [k] (top-k mixture).
  m.def(
      "grouped_lora(Tensor x, Tensor lora_a, Tensor lora_b, Tensor adapter_ids, Tensor? scales=None, "
      "Tensor? weights=None, bool check_ids=True) -> Tensor");
  // Gradients of grouped_lora for output_mask = (x, lora_a, lora_b, weights): (grad_x, grad_lora_a, grad_lora_b,
  // grad_weights) shaped (and typed) like x, lora_a, lora_b, weights. An output not asked for (or grad_weights when
  // weights is None) is an empty tensor of shape [0]. Ids outside [0, N) contribute nothing (no id check here:
  // the forward did it). No gradient for adapter_ids or scales.
  m.def(
      "grouped_lora_backward(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor adapter_ids, "
      "Tensor? scales, Tensor? weights, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(lora_ops, m) {
  // Arrow (arXiv 2405.11157). Prototype of adapter i = unit top right singular vector of B_i @ A_i, computed
  // exactly from the factors; leading dims of lora_a [..., N, r, d_in] / lora_b [..., N, d_out, r] are batched.
  m.def("arrow_prototypes(Tensor lora_a, Tensor lora_b) -> Tensor");
  // logits |x . v_i|, top_k per row (ties: lowest index first), softmax over the chosen k with temperature.
  // Returns (ids [..., k] int64, weights [..., k] fp32, fp64 for fp64 x).
  m.def("arrow_route(Tensor x, Tensor prototypes, int top_k, float temperature=1.0) -> (Tensor, Tensor)");
}

// Merging and low-rank factorisation (csrc/common/lowrank.cpp). Neither op is differentiable.
TORCH_LIBRARY_FRAGMENT(lora_ops, m) {
  // Exact truncated SVD of sum_i weights[..., i] * lora_b[..., i] @ lora_a[..., i], from the factors alone.
  // lora_a [..., N, r, d_in], lora_b [..., N, d_out, r], weights [N] or [..., N] ->
  // (a [..., rank, d_in], b [..., d_out, rank], s [..., min(d_out, d_in, N*r)]): b @ a is the rank-`rank`
  // truncation with sqrt(s) in each factor; s holds every singular value of the merge (descending).
  m.def("merge_lowrank(Tensor lora_a, Tensor lora_b, Tensor weights, int rank) -> (Tensor, Tensor, Tensor)");
  // Randomized SVD of m [..., M, N]: (U [..., M, rank], S [..., rank], Vh [..., rank, N]); Gaussian sketch from a
  // generator seeded with `seed`, n_iter power iterations with Householder re-orthonormalisation.
  m.def("randomized_svd(Tensor m, int rank, int oversample=10, int n_iter=2, int seed=0) -> (Tensor, Tensor, Tensor)");
  // Test-only: the CUDA backend's Jacobi SVD (min(M, N) <= 256; NaN singular values when not converged after
  // max_sweeps) and merge_lowrank with it, runnable on CPU.
  m.def("_jacobi_svd(Tensor m, int max_sweeps=40) -> (Tensor, Tensor, Tensor)");
  m.def("_merge_lowrank_jacobi(Tensor lora_a, Tensor lora_b, Tensor weights, int rank) -> (Tensor, Tensor, Tensor)");
}
