// Every lora_ops op except grouped_lora (csrc/autocast/grouped_lora.cpp) under torch.autocast: run as called, with
// autocast off inside. The kernels call ATen themselves (GEMMs on fp32 accumulation buffers, QR, SVD); left to the
// default fallthrough, those inner calls would be autocast too, in the middle of a kernel: bf16 GEMMs on fp32
// buffers (measured for fp32 inputs: grouped_lora_backward's lora_b gradient off by 3e-3 of its largest entry,
// merge_lowrank's factors by 2e-2) or a dtype the kernel does not expect (arrow_route raised). No casts: these ops pick their compute dtype
// themselves (fp32 for half inputs), and grouped_lora_backward must see the dtypes grouped_lora's forward saved.
// A new op with ATen calls inside belongs in kOps (tests/test_autocast.py checks that every op is covered).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lora_ops {
namespace {

void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kOps[] = {"grouped_lora_backward", "arrow_prototypes", "arrow_route",  "merge_lowrank",
                                "randomized_svd",        "_jacobi_svd",      "_merge_lowrank_jacobi"};

void register_all(torch::Library& m) {
  for (const char* op : kOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, AutocastCPU, m) { register_all(m); }
TORCH_LIBRARY_IMPL(lora_ops, AutocastCUDA, m) { register_all(m); }

}  // namespace lora_ops
