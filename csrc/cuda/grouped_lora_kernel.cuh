// grouped_lora kernels for CUDA: raw pointers and sizes only (no ATen), templated on the element type
// (float, double, __half, __nv_bfloat16), the accumulation type (float, or double for double) and the vector
// width VW of the global loads (16 bytes when the launcher found the rows aligned, else 1 element).
//
// Two launches per call, whatever the ids (CUDA-graph friendly, work grows with T and k, never with N):
//   shrink: h[s][p][q] = scale[id] * w[p] * <A[id][q][Ks], x[row(p)][Ks]>    p = row * k + slot, Ks = d_in chunk s
//   expand: y[t][o]    = sum_j sum_q (sum_s h[s][t * k + j][q]) * B[id(t, j)][o][q]
// Pairs whose id is outside [0, N) get h = 0 and are skipped by expand: invalid ids never address A or B.
// The d_in split (s) only exists so that small batches still fill the GPU; its partials are summed in a fixed
// order by expand, so results are deterministic (no atomics anywhere).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace lora_ops::cuda {

constexpr int kWarpSize = 32;

// shrink: 8 warps per block, a block owns kShrinkPairs consecutive (row, slot) pairs of one d_in chunk.
constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / kWarpSize;
constexpr int kShrinkPairs = 8;       // pairs per block: the register tile width when they share an adapter
constexpr int kShrinkRanks = 4;       // ranks per warp pass: one x load feeds this many dot products

// expand: one output column per thread, kExpandRows rows per block, h staged in shared memory by rank chunk.
constexpr int kExpandThreads = 128;
constexpr int kExpandRows = 8;
constexpr int kExpandRankChunk = 64;  // bounds shared memory for any rank; a multiple of every VW

// ---- element conversions (explicit intrinsics: torch builds with the implicit half conversions disabled) ----
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float v) {
  if constexpr (std::is_same_v<scalar_t, __half>) {
    return __float2half_rn(v);  // round to nearest even, as the CPU kernel's final copy_
  } else if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double v) {
  return v;
}

// VW consecutive elements at p (16-byte aligned when VW > 1) converted to acc_t. The aligned struct makes nvcc
// emit one 128-bit load, the pattern of ATen's aligned_vector.
template <typename scalar_t, int VW>
struct alignas(sizeof(scalar_t) * VW) Pack {
  scalar_t v[VW];
};

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_acc(const scalar_t* p, acc_t (&out)[VW]) {
  const Pack<scalar_t, VW> pack = *reinterpret_cast<const Pack<scalar_t, VW>*>(p);
#pragma unroll
  for (int v = 0; v < VW; ++v) out[v] = to_acc(pack.v[v]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ bool valid_id(int64_t id, int64_t N) { return id >= 0 && id < N; }

// acc[u][i] = <a[u][k0:k1], xs[i][k0:k1]> summed over the warp: RANKS rows of A against NP rows of x, so every
// loaded vector is reused RANKS (x) or NP (A) times. (k1 - k0) and k0 are multiples of VW.
template <int VW, int RANKS, int NP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void warp_dots(const scalar_t* const (&a)[RANKS], const scalar_t* const (&xs)[NP],
                                          int64_t k0, int64_t k1, int lane, acc_t (&acc)[RANKS][NP]) {
#pragma unroll
  for (int u = 0; u < RANKS; ++u) {
#pragma unroll
    for (int i = 0; i < NP; ++i) acc[u][i] = acc_t(0);
  }
  for (int64_t e = k0 + static_cast<int64_t>(lane) * VW; e < k1; e += kWarpSize * VW) {
    acc_t av[RANKS][VW];
#pragma unroll
    for (int u = 0; u < RANKS; ++u) load_acc<VW>(a[u] + e, av[u]);
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      acc_t xv[VW];
      load_acc<VW>(xs[i] + e, xv);
#pragma unroll
      for (int u = 0; u < RANKS; ++u) {
#pragma unroll
        for (int v = 0; v < VW; ++v) acc[u][i] += av[u][v] * xv[v];
      }
    }
  }
#pragma unroll
  for (int u = 0; u < RANKS; ++u) {
#pragma unroll
    for (int i = 0; i < NP; ++i) acc[u][i] = warp_sum(acc[u][i]);
  }
}

// Grid (ceil(P / kShrinkPairs), splits), kShrinkThreads threads. h is [splits, P, r]; every element is written.
// scales ([N]) and weights ([P]) may be null (all ones).
template <typename scalar_t, typename acc_t, int VW>
__global__ void __launch_bounds__(kShrinkThreads)
    grouped_lora_shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
                               const int64_t* __restrict__ ids, const acc_t* __restrict__ scales,
                               const acc_t* __restrict__ weights, acc_t* __restrict__ h, int64_t P, int64_t k,
                               int64_t N, int64_t r, int64_t d_in, int64_t chunk) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kShrinkPairs;
  const int np = static_cast<int>(P - p0 < kShrinkPairs ? P - p0 : kShrinkPairs);
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t k1 = k0 + chunk < d_in ? k0 + chunk : d_in;
  acc_t* __restrict__ hs = h + static_cast<int64_t>(blockIdx.y) * P * r;
  const int64_t groups = (r + kShrinkRanks - 1) / kShrinkRanks;

  // Scale and mixture weight are folded into h here, so expand is a plain rank-r update (as on CPU: s * w).
  auto factor = [&](int64_t p, int64_t id) {
    const acc_t s = scales ? scales[id] : acc_t(1);
    return weights ? s * weights[p] : s;
  };

  // Every thread reads the block's few ids itself: the branch below is block-uniform without shared memory.
  const int64_t id0 = ids[p0];
  bool uniform = np > 1 && valid_id(id0, N);
  for (int i = 1; i < np; ++i) uniform = uniform && ids[p0 + i] == id0;

  if (uniform) {
    // All pairs share one adapter (sequence-level / prefill): each warp streams kShrinkRanks rows of A once and
    // dots them with all the block's x rows. Pairs past np repeat the last one (valid memory), never stored.
    const scalar_t* xs[kShrinkPairs];
#pragma unroll
    for (int i = 0; i < kShrinkPairs; ++i) xs[i] = x + ((p0 + (i < np ? i : np - 1)) / k) * d_in;
    for (int64_t g = warp; g < groups; g += kShrinkWarps) {
      const scalar_t* as[kShrinkRanks];
#pragma unroll
      for (int u = 0; u < kShrinkRanks; ++u) {
        const int64_t q = g * kShrinkRanks + u;
        as[u] = A + (id0 * r + (q < r ? q : r - 1)) * d_in;  // clamped rank: valid memory, result not stored
      }
      acc_t acc[kShrinkRanks][kShrinkPairs];
      warp_dots<VW>(as, xs, k0, k1, lane, acc);
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < kShrinkPairs; ++i) {
          if (i >= np) break;
          const acc_t f = factor(p0 + i, id0);
#pragma unroll
          for (int u = 0; u < kShrinkRanks; ++u) {
            const int64_t q = g * kShrinkRanks + u;
            if (q < r) hs[(p0 + i) * r + q] = acc[u][i] * f;
          }
        }
      }
    }
    return;
  }

  // Mixed adapters (decode, top-k): a warp work item is one pair and kShrinkRanks of its ranks.
  for (int64_t item = warp; item < np * groups; item += kShrinkWarps) {
    const int64_t p = p0 + item / groups, q0 = (item % groups) * kShrinkRanks;
    const int64_t id = ids[p];
    if (!valid_id(id, N)) {
      if (lane < kShrinkRanks && q0 + lane < r) hs[p * r + q0 + lane] = acc_t(0);
      continue;
    }
    const scalar_t* xs[1] = {x + (p / k) * d_in};
    const scalar_t* as[kShrinkRanks];
#pragma unroll
    for (int u = 0; u < kShrinkRanks; ++u) as[u] = A + (id * r + (q0 + u < r ? q0 + u : r - 1)) * d_in;
    acc_t acc[kShrinkRanks][1];
    warp_dots<VW>(as, xs, k0, k1, lane, acc);
    if (lane == 0) {
      const acc_t f = factor(p, id);
#pragma unroll
      for (int u = 0; u < kShrinkRanks; ++u) {
        if (q0 + u < r) hs[p * r + q0 + u] = acc[u][0] * f;
      }
    }
  }
}

// Grid (ceil(T / kExpandRows), min(ceil(d_out / kExpandThreads), 65535)), kExpandThreads threads. Writes every
// y[t][o] exactly once (zeros for rows without a valid adapter), so y needs no initialisation. A thread owns one
// output column of kExpandRows rows and sums all k slots and r ranks itself: no atomics. B rows (id, o) are
// r contiguous elements; VW > 1 requires r % VW == 0 and an aligned B.
// (At least 4 resident blocks: ptxas otherwise picks a register budget that spills the row accumulators.)
template <typename scalar_t, typename acc_t, int VW>
__global__ void __launch_bounds__(kExpandThreads, 4)
    grouped_lora_expand_kernel(const scalar_t* __restrict__ B, const int64_t* __restrict__ ids,
                               const acc_t* __restrict__ h, scalar_t* __restrict__ y, int64_t T, int64_t k,
                               int64_t N, int64_t r, int64_t d_out, int splits) {
  __shared__ __align__(16) acc_t sh[kExpandRows][kExpandRankChunk];  // h of the block's rows, one slot, one chunk
  __shared__ int64_t sid[kExpandRows];                             // their adapter, -1 when none / invalid
  const int tid = threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kExpandRows;
  const int nrows = static_cast<int>(T - t0 < kExpandRows ? T - t0 : kExpandRows);
  const int64_t P = T * k;
  const int64_t n_tiles = (d_out + kExpandThreads - 1) / kExpandThreads;

  for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
    const int64_t o = tile * kExpandThreads + tid;
    const bool active = o < d_out;
    acc_t acc[kExpandRows];
#pragma unroll
    for (int i = 0; i < kExpandRows; ++i) acc[i] = acc_t(0);

    for (int64_t j = 0; j < k; ++j) {
      __syncthreads();  // the previous slot's readers are done with sid / sh
      if (tid < kExpandRows) {
        int64_t id = -1;
        if (tid < nrows) {
          id = ids[(t0 + tid) * k + j];
          if (!valid_id(id, N)) id = -1;
        }
        sid[tid] = id;
      }
      __syncthreads();
      // One adapter for all rows (sequence-level batches): load each B vector once for every row.
      const int64_t id0 = sid[0];
      bool uniform = id0 >= 0, any = false;
#pragma unroll
      for (int i = 0; i < kExpandRows; ++i) {
        any = any || sid[i] >= 0;
        if (i < nrows) uniform = uniform && sid[i] == id0;
      }
      if (!any) continue;  // block-uniform

      for (int64_t qc = 0; qc < r; qc += kExpandRankChunk) {
        const int qn = static_cast<int>(r - qc < kExpandRankChunk ? r - qc : kExpandRankChunk);
        __syncthreads();  // readers of the previous chunk are done
        for (int e = tid; e < kExpandRows * kExpandRankChunk; e += kExpandThreads) {
          const int i = e / kExpandRankChunk, q = e % kExpandRankChunk;
          acc_t v = acc_t(0);  // rows without an adapter (and past T) stay zero: harmless in the uniform path
          if (q < qn && sid[i] >= 0) {
            const int64_t pair = (t0 + i) * k + j;
            for (int s = 0; s < splits; ++s) v += h[(s * P + pair) * r + qc + q];
          }
          sh[i][q] = v;
        }
        __syncthreads();
        if (!active) continue;
        if (uniform) {
          const scalar_t* b = B + (id0 * d_out + o) * r + qc;
          for (int q = 0; q < qn; q += VW) {
            acc_t bv[VW];
            load_acc<VW>(b + q, bv);
#pragma unroll
            for (int v = 0; v < VW; ++v) {
#pragma unroll
              for (int i = 0; i < kExpandRows; ++i) acc[i] += sh[i][q + v] * bv[v];
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < kExpandRows; ++i) {
            if (sid[i] < 0) continue;
            const scalar_t* b = B + (sid[i] * d_out + o) * r + qc;
            for (int q = 0; q < qn; q += VW) {
              acc_t bv[VW];
              load_acc<VW>(b + q, bv);
#pragma unroll
              for (int v = 0; v < VW; ++v) acc[i] += sh[i][q + v] * bv[v];
            }
          }
        }
      }
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < kExpandRows; ++i) {
        if (i < nrows) y[(t0 + i) * d_out + o] = from_acc<scalar_t>(acc[i]);
      }
    }
  }
}

}  // namespace lora_ops::cuda
