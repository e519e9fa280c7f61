// Argument checks shared by the CPU and CUDA implementations of the Arrow ops, and the device-generic
// arrow_prototypes (a one-off computation on tiny r x r cores, written with ATen linalg for both backends).
#pragma once
#include <ATen/ATen.h>

namespace lora_ops {

// arrow_route reduced to flat tensors: logits are computed as at::mm(x, prototypes^T) in the accumulation dtype.
struct ArrowRouteProblem {
  at::Tensor x;           // [T, d] in acc dtype, contiguous
  at::Tensor prototypes;  // [N, d] in acc dtype, contiguous
  int64_t T = 0, N = 0, d = 0, k = 1;
  double temperature = 1.0;
  at::ScalarType acc = at::kFloat;   // dtype of the logits and of the returned weights
  std::vector<int64_t> out_shape;    // x.shape[:-1] + [k]
};

// Validates (ValueError / TypeError naming the argument) and flattens the arguments of arrow_route.
ArrowRouteProblem prepare_arrow_route(const at::Tensor& x, const at::Tensor& prototypes, int64_t top_k,
                                      double temperature);

// [..., N, d_in] unit prototypes in lora_a's dtype (computed in fp32, fp64 for fp64), sign fixed so the
// component of largest magnitude is positive. Works on any device ATen linalg supports.
at::Tensor arrow_prototypes_impl(const at::Tensor& lora_a, const at::Tensor& lora_b);

}  // namespace lora_ops
