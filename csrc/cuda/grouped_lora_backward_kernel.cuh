// grouped_lora_backward kernels for CUDA: raw pointers and sizes only (no ATen). Element conversions, warp_sum and
// valid_id come from the forward's header. The algorithm mirrors the CPU kernel (csrc/cpu/grouped_lora_backward.cpp),
// which the CPU tests validate:
//   pairs:   per valid pair p (row t, adapter i, f = scale_i * w_p):  h = A_i x_t, g = B_iᵀ dy_t,
//            hf[p] = f h, gf[p] = f g, dw[p] = scale_i <g, h>           (zeros for pairs with an invalid id)
//   dx:      dx[t] = Σ_j A_{id(t,j)}ᵀ gf[t k + j]                      (every element written once, no atomics)
//   segment: over pairs sorted by adapter (order, seg[N + 1] computed on the device):
//            dA_i = Σ_{p in seg i} gf[p] x_{row(p)}ᵀ,  dB_i = Σ_{p in seg i} dy_{row(p)} hf[p]ᵀ
//            (adapters without pairs get zeros). Each segment is cut into `splits` equal parts, one per block, so
//            few adapters with many tokens still fill the GPU; the parts' partial sums go to a buffer and
//            segment_reduce adds them in part order. Every output element is owned by one thread: deterministic.
// Fixed launch count, no host synchronisation: CUDA-graph friendly.
#pragma once
#include "grouped_lora_kernel.cuh"

namespace lora_ops::cuda {

constexpr int kBwdThreads = 256;                       // pair kernel: one block per pair
constexpr int kBwdWarps = kBwdThreads / kWarpSize;
constexpr int kBwdRanks = 16;                          // ranks per pass: accumulators per thread
constexpr int kColThreads = 128;                       // dx / segment kernels: one output column per thread

// out[u] = Σ_e M[u * su + e * se] * v[e] over e < n, for u < nu (<= kBwdRanks), reduced over the block.
// Threads stride over e; `red` is kBwdWarps * kBwdRanks shared scratch. Result valid in threads u < nu.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t block_matvec_chunk(const scalar_t* __restrict__ M, int64_t su, int64_t se,
                                                    const scalar_t* __restrict__ v, int64_t n, int nu,
                                                    acc_t* red) {
  acc_t acc[kBwdRanks];
#pragma unroll
  for (int u = 0; u < kBwdRanks; ++u) acc[u] = acc_t(0);
  for (int64_t e = threadIdx.x; e < n; e += kBwdThreads) {
    const acc_t ve = to_acc(v[e]);
#pragma unroll
    for (int u = 0; u < kBwdRanks; ++u) {
      if (u < nu) acc[u] += to_acc(M[u * su + e * se]) * ve;
    }
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int u = 0; u < kBwdRanks; ++u) {
    const acc_t s = warp_sum(acc[u]);
    if (lane == 0) red[warp * kBwdRanks + u] = s;
  }
  __syncthreads();
  acc_t total = acc_t(0);
  if (threadIdx.x < nu) {
    for (int w = 0; w < kBwdWarps; ++w) total += red[w * kBwdRanks + threadIdx.x];
  }
  __syncthreads();  // red is reused by the next call
  return total;
}

// Grid (P), kBwdThreads threads. hf, gf: [P, r]; dw: [P]; all fully written. scales [N] / weights [P] may be null.
// dy is [T, d_out]; x is [T, d_in]. A is [N, r, d_in], B is [N, d_out, r].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBwdThreads)
    grouped_lora_bwd_pairs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                                  const int64_t* __restrict__ ids, const acc_t* __restrict__ scales,
                                  const acc_t* __restrict__ weights, acc_t* __restrict__ hf, acc_t* __restrict__ gf,
                                  acc_t* __restrict__ dw, int64_t k, int64_t N, int64_t r, int64_t d_in,
                                  int64_t d_out) {
  __shared__ acc_t red[kBwdWarps * kBwdRanks];
  __shared__ acc_t dot_part[kBwdThreads];
  const int64_t p = blockIdx.x, row = p / k, id = ids[p];
  acc_t* __restrict__ h = hf + p * r;
  acc_t* __restrict__ g = gf + p * r;
  if (!valid_id(id, N)) {  // block-uniform
    for (int64_t q = threadIdx.x; q < r; q += kBwdThreads) h[q] = g[q] = acc_t(0);
    if (threadIdx.x == 0) dw[p] = acc_t(0);
    return;
  }
  const scalar_t* xr = x + row * d_in;
  const scalar_t* dyr = dy + row * d_out;
  for (int64_t q0 = 0; q0 < r; q0 += kBwdRanks) {
    const int nu = static_cast<int>(r - q0 < kBwdRanks ? r - q0 : kBwdRanks);
    // h[q] = <A_i[q, :], x_t>: rows of A are contiguous (coalesced over e).
    const acc_t hv = block_matvec_chunk<scalar_t, acc_t>(A + (id * r + q0) * d_in, d_in, 1, xr, d_in, nu, red);
    // g[q] = <B_i[:, q], dy_t>: a column of B (stride r); threads read r-strided but the rows of the chunk share
    // cache lines.
    const acc_t gv = block_matvec_chunk<scalar_t, acc_t>(B + id * d_out * r + q0, 1, r, dyr, d_out, nu, red);
    if (threadIdx.x < nu) {
      h[q0 + threadIdx.x] = hv;
      g[q0 + threadIdx.x] = gv;
    }
  }
  __syncthreads();  // h and g of this block are in global memory, visible to the block
  const acc_t s = scales ? scales[id] : acc_t(1);
  const acc_t f = weights ? s * weights[p] : s;
  acc_t part = acc_t(0);
  for (int64_t q = threadIdx.x; q < r; q += kBwdThreads) {
    const acc_t hq = h[q], gq = g[q];
    part += hq * gq;
    h[q] = f * hq;
    g[q] = f * gq;
  }
  dot_part[threadIdx.x] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t dot = acc_t(0);
    for (int i = 0; i < kBwdThreads; ++i) dot += dot_part[i];  // fixed order: deterministic
    dw[p] = s * dot;
  }
}

// Grid (T, min(ceil(d_in / kColThreads), 65535)), kColThreads threads; blocks loop over the column tiles beyond.
// dx [T, d_in] fully written (zeros for rows without a valid adapter): dx[t][e] = Σ_j Σ_q gf[t k + j][q] * A[id][q][e].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColThreads)
    grouped_lora_bwd_dx_kernel(const scalar_t* __restrict__ A, const int64_t* __restrict__ ids,
                               const acc_t* __restrict__ gf, scalar_t* __restrict__ dx, int64_t k, int64_t N,
                               int64_t r, int64_t d_in) {
  const int64_t t = blockIdx.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x; e < d_in;
       e += static_cast<int64_t>(gridDim.y) * kColThreads) {
    acc_t acc = acc_t(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = t * k + j, id = ids[p];
      if (!valid_id(id, N)) continue;
      const scalar_t* a = A + id * r * d_in + e;
      const acc_t* gp = gf + p * r;
      for (int64_t q = 0; q < r; ++q) acc += gp[q] * to_acc(a[q * d_in]);
    }
    dx[t * d_in + e] = from_acc<scalar_t>(acc);
  }
}

// Grid (N * splits, min(ceil(cols / kColThreads), 65535), min(ceil(r / kBwdRanks), 65535)), kColThreads threads;
// blocks loop over the column tiles and rank chunks beyond. The segment reduction behind both dA and dB: block
// (i, part) sums, for adapter i, its part-th share of the segment [seg[i], seg[i+1]):
//   Σ_{s in part} coef[p_s][q] * src[row(p_s)][c],  p_s = order[s],
// for columns c and ranks q. dA: src = x (cols d_in), coef = gf, out [N, r, d_in]; dB: src = dy (cols d_out),
// coef = hf, out [N, d_out, r]. With one part the sum is out[i * out_stride_n + q * out_stride_q + c * out_stride_c];
// with several it is partial[((part * N + i) * r + q) * cols + c] (acc_t), which segment_reduce adds up.
// Adapters without pairs get zeros.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColThreads)
    grouped_lora_bwd_segment_kernel(const scalar_t* __restrict__ src, const acc_t* __restrict__ coef,
                                    const int64_t* __restrict__ order, const int64_t* __restrict__ seg,
                                    scalar_t* __restrict__ out, acc_t* __restrict__ partial, int64_t N, int splits,
                                    int64_t k, int64_t r, int64_t cols, int64_t out_stride_n, int64_t out_stride_q,
                                    int64_t out_stride_c) {
  const int64_t i = blockIdx.x / splits, part = blockIdx.x % splits;
  const int64_t len = seg[i + 1] - seg[i];
  const int64_t s0 = seg[i] + len * part / splits, s1 = seg[i] + len * (part + 1) / splits;
  for (int64_t q0 = static_cast<int64_t>(blockIdx.z) * kBwdRanks; q0 < r;
       q0 += static_cast<int64_t>(gridDim.z) * kBwdRanks) {
    const int nu = static_cast<int>(r - q0 < kBwdRanks ? r - q0 : kBwdRanks);
    for (int64_t c = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.y) * kColThreads) {
      acc_t acc[kBwdRanks];
#pragma unroll
      for (int u = 0; u < kBwdRanks; ++u) acc[u] = acc_t(0);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t p = order[s];
        const acc_t v = to_acc(src[(p / k) * cols + c]);
        const acc_t* cp = coef + p * r + q0;
#pragma unroll
        for (int u = 0; u < kBwdRanks; ++u) {
          if (u < nu) acc[u] += cp[u] * v;
        }
      }
      if (splits == 1) {
        scalar_t* o = out + i * out_stride_n + q0 * out_stride_q + c * out_stride_c;
#pragma unroll
        for (int u = 0; u < kBwdRanks; ++u) {
          if (u < nu) o[u * out_stride_q] = from_acc<scalar_t>(acc[u]);
        }
      } else {
        acc_t* o = partial + ((part * N + i) * r + q0) * cols + c;
#pragma unroll
        for (int u = 0; u < kBwdRanks; ++u) {
          if (u < nu) o[u * cols] = acc[u];
        }
      }
    }
  }
}

// 1-D grid-stride over the N * r * cols outputs of a split segment reduction: the parts' partial sums added in
// part order (deterministic), written with the output's strides.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColThreads)
    grouped_lora_bwd_segment_reduce_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out, int64_t N,
                                           int splits, int64_t r, int64_t cols, int64_t out_stride_n,
                                           int64_t out_stride_q, int64_t out_stride_c) {
  const int64_t total = N * r * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kColThreads) {
    acc_t acc = acc_t(0);
    for (int part = 0; part < splits; ++part) acc += partial[part * total + e];
    const int64_t c = e % cols, q = (e / cols) % r, i = e / (cols * r);
    out[i * out_stride_n + q * out_stride_q + c * out_stride_c] = from_acc<scalar_t>(acc);
  }
}

}  // namespace lora_ops::cuda
