// arrow_route selection kernel for CUDA: raw pointers and sizes only (no ATen). The logits x @ prototypes^T come
// from cuBLAS; this kernel does the rest of the route in one launch: |logit|, top-k in the candidate order shared
// with the CPU kernel (common/arrow_select.h: larger first, ties by lower index), softmax over the k chosen.
//
// One warp per row. Selection is k passes over the row, each a warp-wide argmin in that order over the
// candidates ranked after the previous pick: no scratch memory, any k <= N, and the same ids as the CPU's
// partial sort because the order is strict (no two candidates compare equal).
#pragma once
#include <cstdint>

#include "../common/arrow_select.h"

namespace lora_ops::cuda {

constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;

__device__ __forceinline__ float abs_acc(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_acc(double v) { return fabs(v); }
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// logits [T, N], ids [T, k], weights [T, k]; acc_t is float or double.
template <typename acc_t>
__global__ void __launch_bounds__(kRouteThreads)
    arrow_route_kernel(const acc_t* __restrict__ logits, int64_t T, int64_t N, int64_t k, acc_t inv_temp,
                       int64_t* __restrict__ ids, acc_t* __restrict__ weights) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (row >= T) return;  // whole warps leave together: the shuffles below always see a full warp
  const acc_t* lg = logits + row * N;
  int64_t* row_ids = ids + row * k;
  acc_t* row_w = weights + row * k;

  acc_t prev_v = 0, top_v = 0;
  long long prev_i = -1;
  for (int64_t j = 0; j < k; ++j) {
    acc_t best_v = 0;
    long long best_i = -1;
    for (int64_t i = lane; i < N; i += 32) {
      const acc_t v = abs_acc(lg[i]);
      if (prev_i >= 0 && !arrow::ranks_before<acc_t>(prev_v, prev_i, v, i)) continue;  // picked already
      if (best_i < 0 || arrow::ranks_before<acc_t>(v, i, best_v, best_i)) {
        best_v = v;
        best_i = i;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const acc_t other_v = __shfl_xor_sync(kFull, best_v, offset);
      const long long other_i = __shfl_xor_sync(kFull, best_i, offset);
      if (other_i >= 0 && (best_i < 0 || arrow::ranks_before<acc_t>(other_v, other_i, best_v, best_i))) {
        best_v = other_v;
        best_i = other_i;
      }
    }
    // xor reduction: every lane holds the same winner (k <= N guarantees one exists)
    if (j == 0) top_v = best_v;
    if (lane == 0) {
      row_ids[j] = best_i;
      row_w[j] = best_v;
    }
    prev_v = best_v;
    prev_i = best_i;
  }
  __syncwarp();
  // softmax over the k chosen; the first pick is the largest logit, so exp() stays in range
  acc_t sum = 0;
  for (int64_t j = lane; j < k; j += 32) {
    const acc_t e = exp_acc((row_w[j] - top_v) * inv_temp);
    row_w[j] = e;
    sum += e;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFull, sum, offset);
  for (int64_t j = lane; j < k; j += 32) row_w[j] /= sum;
}

}  // namespace lora_ops::cuda
