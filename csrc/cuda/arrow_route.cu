// arrow_route on CUDA: shared argument checks, logits by cuBLAS (at::mm, the only O(T N d) work), then one
// selection + softmax launch (arrow_route_kernel.cuh) on the current stream. No host synchronisation.
// The fp32 logits follow torch's matmul precision setting like any torch matmul: full fp32 by default, TF32 after
// torch.backends.cuda.matmul.allow_tf32 = True or set_float32_matmul_precision("high") (ids may then differ from
// the CPU's where two logits are within TF32's ~1e-3 relative rounding; see docs/architecture.md).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "../common/arrow_args.h"
#include "arrow_route_kernel.cuh"
#include "launch_utils.h"

namespace lora_ops {
namespace {

template <typename acc_t>
void launch_arrow_route(const ArrowRouteProblem& p, const at::Tensor& logits, at::Tensor& ids, at::Tensor& weights) {
  const int64_t blocks = (p.T + cuda::kRouteWarps - 1) / cuda::kRouteWarps;
  TORCH_CHECK(blocks <= INT_MAX, "arrow_route: ", p.T, " rows are too many for one launch");
  cuda::launch(cuda::arrow_route_kernel<acc_t>, dim3(static_cast<unsigned>(blocks)), dim3(cuda::kRouteThreads), 0,
               cuda::current_stream(), logits.const_data_ptr<acc_t>(), p.T, p.N, p.k,
               static_cast<acc_t>(1.0 / p.temperature), ids.mutable_data_ptr<int64_t>(),
               weights.mutable_data_ptr<acc_t>());
}

std::tuple<at::Tensor, at::Tensor> arrow_route_cuda(const at::Tensor& x, const at::Tensor& prototypes,
                                                    int64_t top_k, double temperature) {
  // Checks first: they name the argument on another device, which a guard built from x could not.
  const ArrowRouteProblem p = prepare_arrow_route(x, prototypes, top_k, temperature);
  const cuda::DeviceGuard guard(x.device());
  at::Tensor ids = at::empty({p.T, p.k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({p.T, p.k}, x.options().dtype(p.acc));
  if (p.T > 0) {
    const at::Tensor logits = at::mm(p.x, p.prototypes.t());  // [T, N] contiguous
    if (p.acc == at::kDouble) {
      launch_arrow_route<double>(p, logits, ids, weights);
    } else {
      launch_arrow_route<float>(p, logits, ids, weights);
    }
  }
  return {ids.view(p.out_shape), weights.view(p.out_shape)};
}

}  // namespace
}  // namespace lora_ops

LORA_OPS_CUDA_IMPL(m) { m.impl("arrow_route", &lora_ops::arrow_route_cuda); }
