#include "grouped_lora_args.h"

#include <c10/util/Exception.h>

namespace lora_ops {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "grouped_lora: ", name, " is on ", t.device(), " but x is on ",
                    x.device());
}

// scales / weights: any floating dtype, converted to the accumulation dtype.
at::Tensor as_accumulate(const at::Tensor& t, at::ScalarType acc, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "grouped_lora: ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(acc).contiguous();
}

}  // namespace

at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

GroupedLoraProblem prepare_grouped_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        const at::Tensor& adapter_ids, const std::optional<at::Tensor>& scales,
                                        const std::optional<at::Tensor>& weights, bool check_ids) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "grouped_lora: x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "grouped_lora: x must have shape [..., d_in], got a 0-d tensor");
  TORCH_CHECK_VALUE(lora_a.dim() == 3, "grouped_lora: lora_a must have shape [N, r, d_in], got ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == 3, "grouped_lora: lora_b must have shape [N, d_out, r], got ", lora_b.sizes());
  TORCH_CHECK_TYPE(lora_a.scalar_type() == x.scalar_type(), "grouped_lora: lora_a has dtype ", lora_a.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_TYPE(lora_b.scalar_type() == x.scalar_type(), "grouped_lora: lora_b has dtype ", lora_b.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_TYPE(adapter_ids.scalar_type() == at::kLong || adapter_ids.scalar_type() == at::kInt,
                   "grouped_lora: adapter_ids must be int32 or int64, got ", adapter_ids.scalar_type());
  check_same_device(lora_a, x, "lora_a");
  check_same_device(lora_b, x, "lora_b");
  check_same_device(adapter_ids, x, "adapter_ids");

  GroupedLoraProblem p;
  p.N = lora_a.size(0);
  p.r = lora_a.size(1);
  p.d_in = x.size(-1);
  p.d_out = lora_b.size(1);
  TORCH_CHECK_VALUE(lora_a.size(2) == p.d_in, "grouped_lora: lora_a must have shape [N, r, d_in] with d_in = ",
                    p.d_in, " (x.shape[-1]), got ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.size(0) == p.N && lora_b.size(2) == p.r,
                    "grouped_lora: lora_b must have shape [N, d_out, r] = [", p.N, ", d_out, ", p.r,
                    "] to match lora_a ", lora_a.sizes(), ", got ", lora_b.sizes());

  // adapter_ids: x.shape[:-1] (one adapter per row) or x.shape[:-1] + [k] (top-k mixture).
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const bool one_per_row = adapter_ids.dim() == x.dim() - 1 && adapter_ids.sizes() == lead;
  const bool top_k = adapter_ids.dim() == x.dim() && adapter_ids.sizes().slice(0, x.dim() - 1) == lead;
  TORCH_CHECK_VALUE(one_per_row || top_k, "grouped_lora: adapter_ids must have shape x.shape[:-1] = ", lead,
                    " or x.shape[:-1] + [k], got ", adapter_ids.sizes());
  p.k = one_per_row ? 1 : adapter_ids.size(-1);
  p.T = c10::multiply_integers(lead);

  const auto acc = accumulate_dtype(x.scalar_type());
  if (weights.has_value()) {
    check_same_device(*weights, x, "weights");
    TORCH_CHECK_VALUE(weights->sizes() == adapter_ids.sizes(), "grouped_lora: weights must have the shape of ",
                      "adapter_ids ", adapter_ids.sizes(), ", got ", weights->sizes());
    p.weights = as_accumulate(*weights, acc, "weights").view({p.T, p.k});
  }
  if (scales.has_value()) {
    check_same_device(*scales, x, "scales");
    TORCH_CHECK_VALUE(scales->dim() == 1 && scales->size(0) == p.N, "grouped_lora: scales must have shape [N] = [",
                      p.N, "], got ", scales->sizes());
    p.scales = as_accumulate(*scales, acc, "scales");
  }

  p.ids = adapter_ids.to(at::kLong).contiguous().view({p.T, p.k});
  if (check_ids && p.ids.numel() > 0) {
    // One pass for both bounds; .item() is the host sync that check_ids=False avoids.
    const auto bad = at::logical_or(p.ids.lt(-1), p.ids.ge(p.N));
    if (bad.any().item<bool>()) {
      const int64_t first = p.ids.masked_select(bad).select(0, 0).item<int64_t>();
      TORCH_CHECK_INDEX(false, "grouped_lora: adapter_ids contains ", first, ", outside [-1, ", p.N,
                        ") (N = lora_a.shape[0]; -1 means no adapter)");
    }
  }

  p.x = x.reshape({p.T, p.d_in}).contiguous();
  p.lora_a = lora_a.contiguous();
  p.lora_b = lora_b.contiguous();
  p.out_shape = lead.vec();
  p.out_shape.push_back(p.d_out);
  return p;
}

at::Tensor prepare_grad_out(const at::Tensor& grad_out, const GroupedLoraProblem& p) {
  TORCH_CHECK_VALUE(grad_out.device() == p.x.device(), "grouped_lora_backward: grad_out is on ", grad_out.device(),
                    " but x is on ", p.x.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == p.x.scalar_type(), "grouped_lora_backward: grad_out has dtype ",
                   grad_out.scalar_type(), " but x has ", p.x.scalar_type());
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(p.out_shape), "grouped_lora_backward: grad_out must have ",
                    "shape x.shape[:-1] + [d_out] = ", at::IntArrayRef(p.out_shape), ", got ", grad_out.sizes());
  return grad_out.reshape({p.T, p.d_out}).contiguous();
}

}  // namespace lora_ops
