// Kernels with the bugs the harness must report (and one without), run by tests/cuda_emu/test_harness.py through
// lora_ops_emu::_selftest(out, case): out[t] receives each thread's result.
#include "emu.h"

// Kernels outside an anonymous namespace: exported, so the launch log can name them.
namespace lora_ops::emu_selftest {

// case 0: correct. A block-wide barrier, a full-warp xor reduction and a ballot; out[t] = block sum of t (via
// shared memory) + warp sum of lane ids + ballot of odd lanes.
__global__ void good_kernel(float* out) {
  __shared__ float part[64];
  const int t = threadIdx.x;
  part[t] = static_cast<float>(t);
  __syncthreads();
  float block_sum = 0;
  for (int i = 0; i < 64; ++i) block_sum += part[i];
  float lane = static_cast<float>(t % 32);
  for (int off = 16; off > 0; off >>= 1) lane += __shfl_xor_sync(0xffffffffu, lane, off);
  const unsigned odd = __ballot_sync(0xffffffffu, t & 1);
  out[blockIdx.x * 64 + t] = block_sum + lane + static_cast<float>(odd == 0xaaaaaaaau);
}

// case 1: half of the block returns before a barrier the other half waits at.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// case 2: a full-mask shuffle after half of the warp returned.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// case 3: lanes disagree about the mask.
__global__ void mask_mismatch_kernel(float* out) {
  const unsigned mask = threadIdx.x % 32 < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, 1.0f, 1);
}

// case 4: reads one element past the buffer (a report from ASan when built with sanitizers).
__global__ void out_of_bounds_kernel(float* out) { out[threadIdx.x] = out[threadIdx.x + 1]; }

}  // namespace lora_ops::emu_selftest

namespace {

void selftest(at::Tensor out, int64_t which) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.numel() >= 128, "_selftest: out");
  float* o = out.data_ptr<float>();
  using lora_ops::cuda::launch;
  using namespace lora_ops::emu_selftest;
  switch (which) {
    case 0: launch(good_kernel, dim3(2), dim3(64), 0, nullptr, o); break;
    case 1: launch(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr, o); break;
    case 2: launch(exited_lane_kernel, dim3(1), dim3(64), 0, nullptr, o); break;
    case 3: launch(mask_mismatch_kernel, dim3(1), dim3(64), 0, nullptr, o); break;
    case 4: launch(out_of_bounds_kernel, dim3(1), dim3(static_cast<unsigned>(out.numel())), 0, nullptr, o); break;
    default: TORCH_CHECK(false, "_selftest: no case ", which);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops_emu, CPU, m) { m.impl("_selftest", &selftest); }
