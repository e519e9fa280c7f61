// CPU execution harness for the CUDA kernels (test-only; see docs/architecture.md, "Running the CUDA source on a
// CPU"). Included first by the emulated translation unit (LORA_OPS_EMU), it gives the kernel headers what nvcc
// would: threadIdx & co., __shared__, __syncthreads, the warp collectives, atomics, dynamic shared memory, and
// csrc/cuda/launch_utils.h's launch / device guard / SM count / stream, so csrc/cuda/*.cu compile with g++ as they
// are. Every thread of a block is a fiber; barriers and warp collectives are its scheduling points, so the
// kernels' own index arithmetic, tails, splits and guards run on the CPU (and, built with -fsanitize=address,
// undefined, every out-of-bounds global or dynamic-shared access and misaligned vector load is reported).
// __half / __nv_bfloat16 are the CUDA toolkit's own host implementations.
#pragma once
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <torch/library.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// The toolkit's host headers define __shared__ as nothing; here it is one instance per OS thread, and a block's
// fibers all run on the OS thread that runs the block (blocks run one after another): exactly per-block storage.
#undef __shared__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define threadIdx (::lora_ops::emu::thread_index())
#define blockIdx (::lora_ops::emu::block_index())
#define blockDim (::lora_ops::emu::block_dim())
#define gridDim (::lora_ops::emu::grid_dim())
#define __syncthreads() ::lora_ops::emu::syncthreads(__FILE__, __LINE__)

namespace lora_ops::emu {

enum class Op : int { kSyncWarp, kShflXor, kShfl, kShflDown, kShflUp, kBallot, kAny, kAll };

const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads(const char* file, int line);
// A warp collective: blocks until every lane of `mask` has called the same op with the same mask, then returns
// this lane's result (the source lane's value, or the ballot / vote).
uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg, int width);
void* dynamic_smem();

struct Config {
  int64_t sm_count = 132;  // what sm_count() reports to the launchers (H100 SXM: 132)
  bool reverse = false;    // run blocks and fibers in reverse order (exposes order dependences)
};
Config& config();

// Runs `body` (the kernel call) for every thread of every block of the grid; raises c10::Error (RuntimeError)
// for an invalid launch configuration, a barrier not every thread of the block reaches, or a warp collective
// whose mask disagrees with the lanes that call it.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp collectives move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace lora_ops::emu

// ---- the CUDA intrinsics the kernels use (global namespace, as CUDA's) ----
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using lora_ops::emu::Op;
  return lora_ops::emu::from_bits<T>(lora_ops::emu::warp_op(Op::kShflXor, mask, lora_ops::emu::to_bits(v), lane_mask, width));
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using lora_ops::emu::Op;
  return lora_ops::emu::from_bits<T>(lora_ops::emu::warp_op(Op::kShfl, mask, lora_ops::emu::to_bits(v), src_lane, width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using lora_ops::emu::Op;
  return lora_ops::emu::from_bits<T>(
      lora_ops::emu::warp_op(Op::kShflDown, mask, lora_ops::emu::to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using lora_ops::emu::Op;
  return lora_ops::emu::from_bits<T>(
      lora_ops::emu::warp_op(Op::kShflUp, mask, lora_ops::emu::to_bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(lora_ops::emu::warp_op(lora_ops::emu::Op::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(lora_ops::emu::warp_op(lora_ops::emu::Op::kAny, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(lora_ops::emu::warp_op(lora_ops::emu::Op::kAll, mask, pred != 0, 0, 32));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  lora_ops::emu::warp_op(lora_ops::emu::Op::kSyncWarp, mask, 0, 0, 32);
}
// Fibers switch only at barriers and collectives, so a plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
inline void __threadfence() {}

// ---- launch_utils.h's device-side and launch interface ----
namespace lora_ops::cuda {

template <typename T>
T* dynamic_smem() {
  return static_cast<T*>(emu::dynamic_smem());
}

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
using Stream = void*;
inline Stream current_stream() { return nullptr; }
inline int64_t sm_count() { return emu::config().sm_count; }
inline at::Generator seeded_generator(const at::Device&, uint64_t seed) { return at::detail::createCPUGenerator(seed); }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream, Args&&... args) {
  std::tuple<Params...> params(static_cast<Params>(std::forward<Args>(args))...);
  emu::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); });
}

// The emulated ops register for CPU tensors in their own namespace, with the real ops' schemas.
#define LORA_OPS_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(lora_ops_emu, CPU, m)

}  // namespace lora_ops::cuda
