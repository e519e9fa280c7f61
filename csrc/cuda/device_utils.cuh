// Device-side helpers shared by the kernels. Under the CPU execution harness (LORA_OPS_EMU, tests/cuda_emu) the
// harness header defines them instead, so the kernels' source runs unchanged on the CPU.
#pragma once

#ifndef LORA_OPS_EMU
namespace lora_ops::cuda {

// The block's dynamic shared memory (the launch's smem bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char lora_ops_dynamic_smem[];
  return reinterpret_cast<T*>(lora_ops_dynamic_smem);
}

}  // namespace lora_ops::cuda
#endif
