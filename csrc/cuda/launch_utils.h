// Host-side helpers shared by the CUDA launchers: ATen element type -> CUDA type, grid arithmetic, and the one
// place that launches kernels, guards the device and asks for the SM count and the stream. Under the CPU
// execution harness (LORA_OPS_EMU, tests/cuda_emu/harness/emu.h) those four come from the harness instead, so the
// launchers' own code -- grid sizing, d_in splits, the vectorised-load choice -- runs on the CPU unchanged.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <utility>

#ifdef LORA_OPS_EMU
#include "emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace lora_ops::cuda {

// The CUDA type with the layout of each ATen element type: the kernels know no ATen types.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest gridDim.y / gridDim.z; kernels loop over what lies beyond.
constexpr int64_t kMaxGridYZ = 65535;

#ifndef LORA_OPS_EMU
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;

inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// A generator of the device's kind seeded with `seed` (randomized_svd's test matrices).
inline at::Generator seeded_generator(const at::Device& device, uint64_t seed) {
  auto gen = at::cuda::detail::createCUDAGenerator(device.index());
  gen.set_current_seed(seed);
  return gen;
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch check. Dynamic shared memory above the default
// 48 KB needs the kernel's opt-in first (the launch fails without it).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream, Args&&... args) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(std::forward<Args>(args))...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backend the launchers register their ops for.
#define LORA_OPS_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(lora_ops, CUDA, m)
#endif

}  // namespace lora_ops::cuda
