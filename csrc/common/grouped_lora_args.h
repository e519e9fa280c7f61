// Argument checks and normalisation shared by the CPU and CUDA implementations of grouped_lora.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace lora_ops {

// A grouped_lora call reduced to flat, contiguous tensors. Kernels only ever see this.
struct GroupedLoraProblem {
  at::Tensor x;        // [T, d_in], x's dtype, contiguous
  at::Tensor lora_a;   // [N, r, d_in], contiguous
  at::Tensor lora_b;   // [N, d_out, r], contiguous
  at::Tensor ids;      // [T, k] int64, contiguous (ids outside [0, N) contribute nothing)
  at::Tensor scales;   // [N] in the accumulation dtype, or undefined (all ones)
  at::Tensor weights;  // [T, k] in the accumulation dtype, or undefined (all ones)
  int64_t T = 0, k = 1, N = 0, r = 0, d_in = 0, d_out = 0;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [d_out]
};

// The dtype kernels accumulate in: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.
at::ScalarType accumulate_dtype(at::ScalarType t);

// Validates every argument (raising ValueError/TypeError/IndexError that name it) and flattens them.
// With check_ids, ids outside [-1, N) raise IndexError (on CUDA this costs one reduction and a host sync).
GroupedLoraProblem prepare_grouped_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        const at::Tensor& adapter_ids, const std::optional<at::Tensor>& scales,
                                        const std::optional<at::Tensor>& weights, bool check_ids);

// grouped_lora_backward's grad_out checked against the forward problem `p` (x's dtype and device, shape
// x.shape[:-1] + [d_out]) and flattened to a contiguous [T, d_out].
at::Tensor prepare_grad_out(const at::Tensor& grad_out, const GroupedLoraProblem& p);

}  // namespace lora_ops
