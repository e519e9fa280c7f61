// grouped_lora_backward on CUDA: shared argument checks, the device-side sort of pairs by adapter, launches of the
// kernels in grouped_lora_backward_kernel.cuh. A fixed number of launches on the current stream and no host
// synchronisation (the backward never checks ids: the forward did), so a training step can be graph-captured.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <tuple>

#include "../common/grouped_lora_args.h"
#include "grouped_lora_backward_kernel.cuh"
#include "launch_utils.h"

namespace lora_ops {
namespace {

using cuda::ceil_div;
using cuda::CudaType;
using cuda::kMaxGridYZ;

// The segment reduction cuts each adapter's segment into parts of about kSegmentPart pairs (one block each), so
// its parallelism grows with the tokens instead of stopping at N blocks (N = 1, T = 8192: 64 parts). At most
// kMaxSegmentSplits parts, and at most kPartialBudget acc_t elements of partial sums.
constexpr int64_t kSegmentPart = 128;
constexpr int64_t kMaxSegmentSplits = 64;
constexpr int64_t kPartialBudget = int64_t(1) << 26;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
using cuda_t = typename CudaType<scalar_t>::type;

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

template <typename scalar_t>
void launch_backward(const GroupedLoraProblem& p, const at::Tensor& dy, const std::array<bool, 4>& need,
                     at::Tensor& gx, at::Tensor& ga, at::Tensor& gb, at::Tensor& gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = p.T * p.k;
  const auto acc_opts = p.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const cuda::Stream stream = cuda::current_stream();
  const int64_t* ids = p.ids.const_data_ptr<int64_t>();
  TORCH_CHECK(P <= INT_MAX && p.T <= INT_MAX, "grouped_lora_backward: batch of ", p.T, " rows x ", p.k,
              " slots is too large for one launch");

  at::Tensor hf = at::empty({P, p.r}, acc_opts), gf = at::empty({P, p.r}, acc_opts), dw = at::empty({P}, acc_opts);
  cuda::launch(cuda::grouped_lora_bwd_pairs_kernel<cuda_t<scalar_t>, acc_t>, dim3(static_cast<unsigned>(P)),
               dim3(cuda::kBwdThreads), 0, stream, cuda_ptr<scalar_t>(p.x), cuda_ptr<scalar_t>(dy),
               cuda_ptr<scalar_t>(p.lora_a), cuda_ptr<scalar_t>(p.lora_b), ids,
               p.scales.defined() ? p.scales.const_data_ptr<acc_t>() : nullptr,
               p.weights.defined() ? p.weights.const_data_ptr<acc_t>() : nullptr, hf.mutable_data_ptr<acc_t>(),
               gf.mutable_data_ptr<acc_t>(), dw.mutable_data_ptr<acc_t>(), p.k, p.N, p.r, p.d_in, p.d_out);
  if (need[3]) gw.copy_(dw.view(gw.sizes()));

  if (need[0] && p.d_in > 0) {
    const dim3 grid(static_cast<unsigned>(p.T),
                    static_cast<unsigned>(std::min(ceil_div(p.d_in, cuda::kColThreads), kMaxGridYZ)));
    cuda::launch(cuda::grouped_lora_bwd_dx_kernel<cuda_t<scalar_t>, acc_t>, grid, dim3(cuda::kColThreads), 0, stream,
                 cuda_ptr<scalar_t>(p.lora_a), ids, gf.const_data_ptr<acc_t>(), cuda_mut_ptr<scalar_t>(gx), p.k, p.N,
                 p.r, p.d_in);
  }
  if (!need[1] && !need[2]) return;

  // Pairs sorted by adapter on the device: invalid ids get key N and sort past every segment. seg[i] is the first
  // sorted position with key >= i, so adapter i owns [seg[i], seg[i + 1]).
  const at::Tensor flat = p.ids.view(-1);
  const at::Tensor keys = at::where(flat.ge(0).logical_and(flat.lt(p.N)), flat, at::full_like(flat, p.N));
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& order = std::get<1>(sorted);
  const at::Tensor seg = at::searchsorted(std::get<0>(sorted), at::arange(p.N + 1, flat.options()));
  const unsigned rank_chunks = static_cast<unsigned>(std::min(ceil_div(p.r, cuda::kBwdRanks), kMaxGridYZ));
  auto segment = [&](const at::Tensor& src, const at::Tensor& coef, at::Tensor& out, int64_t cols, int64_t sq,
                     int64_t sc) {
    if (cols == 0) return;
    int64_t splits = std::clamp(ceil_div(P, p.N * kSegmentPart), int64_t(1), kMaxSegmentSplits);
    splits = std::max(int64_t(1), std::min(splits, kPartialBudget / (p.N * p.r * cols)));
    TORCH_CHECK(p.N * splits <= INT_MAX, "grouped_lora_backward: ", p.N, " adapters are too many for one launch");
    const at::Tensor partial = splits > 1 ? at::empty({splits, p.N, p.r, cols}, acc_opts) : at::Tensor();
    const dim3 grid(static_cast<unsigned>(p.N * splits),
                    static_cast<unsigned>(std::min(ceil_div(cols, cuda::kColThreads), kMaxGridYZ)), rank_chunks);
    cuda::launch(cuda::grouped_lora_bwd_segment_kernel<cuda_t<scalar_t>, acc_t>, grid, dim3(cuda::kColThreads), 0,
                 stream, cuda_ptr<scalar_t>(src), coef.const_data_ptr<acc_t>(), order.const_data_ptr<int64_t>(),
                 seg.const_data_ptr<int64_t>(), cuda_mut_ptr<scalar_t>(out),
                 splits > 1 ? partial.data_ptr<acc_t>() : nullptr, p.N, static_cast<int>(splits), p.k, p.r, cols,
                 p.r * cols, sq, sc);
    if (splits == 1) return;
    const int64_t blocks = std::min(ceil_div(p.N * p.r * cols, cuda::kColThreads), int64_t(1) << 20);
    cuda::launch(cuda::grouped_lora_bwd_segment_reduce_kernel<cuda_t<scalar_t>, acc_t>,
                 dim3(static_cast<unsigned>(blocks)), dim3(cuda::kColThreads), 0, stream,
                 partial.const_data_ptr<acc_t>(), cuda_mut_ptr<scalar_t>(out), p.N, static_cast<int>(splits), p.r,
                 cols, p.r * cols, sq, sc);
  };
  if (need[1]) segment(p.x, gf, ga, p.d_in, p.d_in, 1);   // dA [N, r, d_in]
  if (need[2]) segment(dy, hf, gb, p.d_out, 1, p.r);      // dB [N, d_out, r]
}

Grads grouped_lora_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                                 const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& weights,
                                 std::array<bool, 4> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // inputs may require grad; these ops are internals
  const GroupedLoraProblem p = prepare_grouped_lora(x, lora_a, lora_b, adapter_ids, scales, weights, false);
  const at::Tensor dy = prepare_grad_out(grad_out, p);
  const cuda::DeviceGuard guard(p.x.device());
  std::array<bool, 4> need = output_mask;
  need[3] = need[3] && weights.has_value();

  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need[0] ? at::empty({p.T, p.d_in}, p.x.options()) : none();
  at::Tensor ga = need[1] ? at::empty(lora_a.sizes(), p.lora_a.options()) : none();
  at::Tensor gb = need[2] ? at::empty(lora_b.sizes(), p.lora_b.options()) : none();
  at::Tensor gw = need[3] ? at::empty({p.T, p.k}, weights->options()) : none();
  if (p.T * p.k == 0 || p.r == 0 || p.N == 0) {
    for (at::Tensor* t : {&gx, &ga, &gb, &gw}) t->zero_();  // no pair contributes
  } else if (need[0] || need[1] || need[2] || need[3]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_lora_backward_cuda",
                                    [&] { launch_backward<scalar_t>(p, dy, need, gx, ga, gb, gw); });
  }
  return {need[0] ? gx.view(x.sizes()) : gx, ga, gb, need[3] ? gw.view(weights->sizes()) : gw};
}

}  // namespace

LORA_OPS_CUDA_IMPL(m) { m.impl("grouped_lora_backward", &grouped_lora_backward_cuda); }

}  // namespace lora_ops
