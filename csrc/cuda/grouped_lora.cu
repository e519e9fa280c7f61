// grouped_lora on CUDA: the shared argument checks, launch configuration and dtype dispatch; the kernels are in
// grouped_lora_kernel.cuh. Two launches per call on the current stream, no host synchronisation (except the id
// check inside prepare_grouped_lora when check_ids is set), so check_ids=False calls can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../common/grouped_lora_args.h"
#include "grouped_lora_kernel.cuh"
#include "launch_utils.h"

namespace lora_ops {
namespace {

// Splitting d_in gives small batches enough blocks; a chunk below kMinSplit elements is not worth a block.
constexpr int64_t kMinSplit = 512;
constexpr int64_t kMaxSplits = 32;

using cuda::ceil_div;
using cuda::CudaType;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
void launch_grouped_lora(const GroupedLoraProblem& p, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using cuda_t = typename CudaType<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);  // elements per 16-byte load
  const int64_t P = p.T * p.k;
  const auto* x = reinterpret_cast<const cuda_t*>(p.x.const_data_ptr<scalar_t>());
  const auto* A = reinterpret_cast<const cuda_t*>(p.lora_a.const_data_ptr<scalar_t>());
  const auto* B = reinterpret_cast<const cuda_t*>(p.lora_b.const_data_ptr<scalar_t>());
  auto* y = reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>());
  const int64_t* ids = p.ids.const_data_ptr<int64_t>();
  const acc_t* scales = p.scales.defined() ? p.scales.const_data_ptr<acc_t>() : nullptr;
  const acc_t* weights = p.weights.defined() ? p.weights.const_data_ptr<acc_t>() : nullptr;

  // 16-byte loads need every row start aligned: aligned bases and a row length that is a multiple of kVec
  // (views with a storage offset or odd d_in / r take the scalar kernels).
  const bool vec_x = p.d_in % kVec == 0 && aligned16(x) && aligned16(A);
  const bool vec_b = p.r % kVec == 0 && aligned16(B);
  const int64_t vw = vec_x ? kVec : 1;

  const int64_t pair_blocks = ceil_div(P, cuda::kShrinkPairs);
  const int64_t row_blocks = ceil_div(p.T, cuda::kExpandRows);
  TORCH_CHECK(pair_blocks <= INT_MAX && row_blocks <= INT_MAX, "grouped_lora: batch of ", p.T, " rows x ", p.k,
              " slots is too large for one launch");
  // Split d_in when the pair blocks alone leave SMs idle (decode). Chunks are multiples of vw so every chunk
  // start stays 16-byte aligned; the split count depends on shapes only (no sync, graph-safe).
  int64_t splits = 1, chunk = p.d_in;
  if (p.d_in > 0) {
    const int64_t target_blocks = 2 * cuda::sm_count();
    if (pair_blocks < target_blocks) {
      splits = std::min({ceil_div(target_blocks, pair_blocks), ceil_div(p.d_in, kMinSplit), kMaxSplits});
    }
    chunk = ceil_div(ceil_div(p.d_in, splits), vw) * vw;
    splits = ceil_div(p.d_in, chunk);
  }
  at::Tensor h = at::empty({splits, P, p.r}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));

  const cuda::Stream stream = cuda::current_stream();
  const auto shrink = vec_x ? cuda::grouped_lora_shrink_kernel<cuda_t, acc_t, kVec>
                            : cuda::grouped_lora_shrink_kernel<cuda_t, acc_t, 1>;
  cuda::launch(shrink, dim3(static_cast<unsigned>(pair_blocks), static_cast<unsigned>(splits)),
               dim3(cuda::kShrinkThreads), 0, stream, x, A, ids, scales, weights, h.mutable_data_ptr<acc_t>(), P, p.k,
               p.N, p.r, p.d_in, chunk);

  const int64_t tiles = std::min(ceil_div(p.d_out, cuda::kExpandThreads), cuda::kMaxGridYZ);  // kernel loops over the rest
  const auto expand = vec_b ? cuda::grouped_lora_expand_kernel<cuda_t, acc_t, kVec>
                            : cuda::grouped_lora_expand_kernel<cuda_t, acc_t, 1>;
  cuda::launch(expand, dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles)),
               dim3(cuda::kExpandThreads), 0, stream, B, ids, h.const_data_ptr<acc_t>(), y, p.T, p.k, p.N, p.r,
               p.d_out, static_cast<int>(splits));
}

at::Tensor grouped_lora_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& adapter_ids, const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& weights, bool check_ids) {
  // Checks first: they name the argument on another device, which a guard built from x could not.
  const GroupedLoraProblem p = prepare_grouped_lora(x, lora_a, lora_b, adapter_ids, scales, weights, check_ids);
  const cuda::DeviceGuard guard(p.x.device());
  at::Tensor out = at::empty({p.T, p.d_out}, p.x.options());
  if (out.numel() == 0) return out.view(p.out_shape);  // T = 0 or d_out = 0: nothing to launch
  if (p.k == 0 || p.r == 0 || p.N == 0) {
    out.zero_();  // no pair can contribute (N = 0 means every id is -1 or invalid)
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_lora_cuda",
                                    [&] { launch_grouped_lora<scalar_t>(p, out); });
  }
  return out.view(p.out_shape);
}

}  // namespace

LORA_OPS_CUDA_IMPL(m) { m.impl("grouped_lora", &grouped_lora_cuda); }

}  // namespace lora_ops
