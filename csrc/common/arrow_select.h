// The candidate order Arrow routing selects by, shared by the CPU and CUDA kernels so both pick the same ids.
// Free of ATen types: the CUDA kernel header includes it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LORA_OPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORA_OPS_HOST_DEVICE inline
#endif

namespace lora_ops::arrow {

// True when logit a (of expert ia) is ranked before logit b (of expert ib): larger first, equal logits by lower
// index (deterministic ties), NaN before any number (as torch.topk does, so a NaN input is visible in the
// output weights instead of silently routed somewhere).
template <typename T>
LORA_OPS_HOST_DEVICE bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  const bool nan_a = a != a, nan_b = b != b;
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && a != b) return a > b;
  return ia < ib;
}

}  // namespace lora_ops::arrow
