// grouped_lora under torch.autocast: the cast policy nn.Linear gets (ATen's lower_precision_fp), registered for
// the AutocastCPU and AutocastCUDA dispatch keys. Device-independent, so CPU-only builds register both.
//
// x, lora_a and lora_b are cast to the autocast dtype read at call time (bf16 or fp16, whatever the enclosing
// torch.autocast chose), through ATen's cached_cast: fp64 and tensors of other devices are left alone, and fp32
// leaf parameters that require grad are cast once per autocast region, as for nn.Linear's weight. The casts are
// ordinary autograd ops, so fp32 master factors receive fp32 gradients (the op's backward runs in the cast dtype).
// scales and weights are not cast: the kernels fold them into the fp32 accumulator anyway, so casting would only
// round them, and a router's weights keep their own dtype for their gradient.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace lora_ops {
namespace {

template <c10::DeviceType device>
at::Tensor grouped_lora_autocast(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                 const at::Tensor& adapter_ids, const std::optional<at::Tensor>& scales,
                                 const std::optional<at::Tensor>& weights, bool check_ids) {
  // every Autocast key off below this point: the kernels' own ATen calls must not be autocast (other_ops.cpp)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::ScalarType to = at::autocast::get_lower_precision_fp_from_device_type(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lora_ops::grouped_lora", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool)>();
  return op.call(at::autocast::cached_cast(to, x, device), at::autocast::cached_cast(to, lora_a, device),
                 at::autocast::cached_cast(to, lora_b, device), adapter_ids, scales, weights, check_ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, AutocastCPU, m) {
  m.impl("grouped_lora", &grouped_lora_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lora_ops, AutocastCUDA, m) {
  m.impl("grouped_lora", &grouped_lora_autocast<c10::DeviceType::CUDA>);
}

}  // namespace lora_ops
