// merge_lowrank on CPU: the factored merge of csrc/common/lowrank.cpp with LAPACK's SVD for the small core, as
// batched ATen calls. Not split over layers with at::parallel_for: LAPACK inside a parallel region makes MKL open
// its own thread team there, which spins forever (each batched call parallelises inside the library instead).
// lora_ops::_merge_lowrank_jacobi is the same merge with the CUDA backend's Jacobi core SVD: a test-only op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/lowrank.h"
#include "jacobi_svd.h"

namespace lora_ops {
namespace {

Svd3 lapack_svd(const at::Tensor& x) { return at::linalg_svd(x, /*full_matrices=*/false); }

Svd3 merge_with(const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& weights, int64_t rank,
                const SmallSvdFn& svd) {
  const auto p = prepare_merge_lowrank(lora_a, lora_b, weights, rank);
  auto [a, b, s] = merge_lowrank_rows(p, 0, p.a.size(0), svd);
  return finish_merge_lowrank(p, a, b, s);
}

Svd3 merge_lowrank_cpu(const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& weights,
                       int64_t rank) {
  return merge_with(lora_a, lora_b, weights, rank, lapack_svd);
}

Svd3 merge_lowrank_jacobi_cpu(const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& weights,
                              int64_t rank) {
  return merge_with(lora_a, lora_b, weights, rank, jacobi_svd_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) {
  m.impl("merge_lowrank", &merge_lowrank_cpu);
  m.impl("_merge_lowrank_jacobi", &merge_lowrank_jacobi_cpu);
}

}  // namespace lora_ops
