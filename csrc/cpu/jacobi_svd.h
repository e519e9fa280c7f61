// The GPU's small-SVD algorithm (csrc/cuda/jacobi_svd_kernel.cuh) run on the CPU, so it is tested without a GPU.
#pragma once
#include "../common/lowrank.h"

namespace lora_ops {

// Reduced SVD of [L, m, n] (fp32 or fp64) by one-sided Jacobi, one matrix per task of at::parallel_for.
Svd3 jacobi_svd_cpu(const at::Tensor& x);

}  // namespace lora_ops
