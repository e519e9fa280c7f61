// merge_lowrank on CPU: the factored merge of csrc/common/lowrank.cpp with LAPACK's SVD for the small core, as
// batched ATen calls. A batch of layers is split over threads by cpu::split_blas, which sets MKL sequential in each
// thread first (plain LAPACK inside at::parallel_for makes MKL open its own thread team there, which spins forever).
// lora_ops::_merge_lowrank_jacobi is the same merge with the CUDA backend's Jacobi core SVD: a test-only op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/lowrank.h"
#include "blas_split.h"
#include "jacobi_svd.h"

namespace lora_ops {
namespace {

Svd3 lapack_svd(const at::Tensor& x) { return at::linalg_svd(x, /*full_matrices=*/false); }

Svd3 merge_with(const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& weights, int64_t rank,
                const SmallSvdFn& svd) {
  const auto p = prepare_merge_lowrank(lora_a, lora_b, weights, rank);
  auto [a, b, s] = cpu::split_blas_rows(p.a.size(0), 1, [&](int64_t begin, int64_t end) {
    return merge_lowrank_rows(p, begin, end, svd);
  });
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
