// The GPU's small-SVD algorithm (csrc/cuda/jacobi_svd_kernel.cuh) run on the CPU, so it is tested without a GPU.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>

#include "../common/lowrank.h"
#include "../cuda/jacobi_svd_kernel.cuh"

namespace lora_ops {

// Reduced SVD of [L, m, n] (fp32 or fp64) by one-sided Jacobi, one matrix per task of at::parallel_for, or by
// LAPACK when min(m, n) > jacobi::kJacobiMaxN (as the CUDA backend falls back to cuSOLVER): the core SVD of
// _merge_lowrank_jacobi.
Svd3 jacobi_svd_cpu(const at::Tensor& x);

// The argument checks of _jacobi_svd, shared with the CUDA backend (ValueError/TypeError naming the argument).
inline void check_jacobi_svd_args(const at::Tensor& x, int64_t max_sweeps) {
  TORCH_CHECK_VALUE(x.dim() == 3, "_jacobi_svd: m must have shape [L, M, N], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "_jacobi_svd: m must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(std::min(x.size(1), x.size(2)) <= jacobi::kJacobiMaxN, "_jacobi_svd: min(M, N) must be <= ",
                    jacobi::kJacobiMaxN, " (larger matrices use LAPACK / cuSOLVER), got m of shape ", x.sizes());
  TORCH_CHECK_VALUE(max_sweeps >= 1 && max_sweeps <= jacobi::kMaxSweeps, "_jacobi_svd: max_sweeps must be in [1, ",
                    jacobi::kMaxSweeps, "], got ", max_sweeps);
}

}  // namespace lora_ops
