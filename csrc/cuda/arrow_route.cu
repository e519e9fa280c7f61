// arrow_route on CUDA: shared argument checks, logits by cuBLAS (at::mm, the only O(T N d) work), then one
// selection + softmax launch (arrow_route_kernel.cuh) on the current stream. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "../common/arrow_args.h"
#include "arrow_route_kernel.cuh"

namespace lora_ops {
namespace {

template <typename acc_t>
void launch_arrow_route(const ArrowRouteProblem& p, const at::Tensor& logits, at::Tensor& ids, at::Tensor& weights) {
  const int64_t blocks = (p.T + cuda::kRouteWarps - 1) / cuda::kRouteWarps;
  TORCH_CHECK(blocks <= INT_MAX, "arrow_route: ", p.T, " rows are too many for one launch");
  cuda::arrow_route_kernel<acc_t><<<static_cast<unsigned>(blocks), cuda::kRouteThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
      logits.const_data_ptr<acc_t>(), p.T, p.N, p.k, static_cast<acc_t>(1.0 / p.temperature),
      ids.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> arrow_route_cuda(const at::Tensor& x, const at::Tensor& prototypes,
                                                    int64_t top_k, double temperature) {
  const c10::cuda::CUDAGuard guard(x.device());
  const ArrowRouteProblem p = prepare_arrow_route(x, prototypes, top_k, temperature);
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

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) { m.impl("arrow_route", &lora_ops::arrow_route_cuda); }
