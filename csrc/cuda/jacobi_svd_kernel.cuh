// One-sided (Hestenes) Jacobi SVD of small matrices, free of ATen types.
//
// The same routines run on the GPU (one thread block per matrix, a warp per column pair, see
// jacobi_svd_block below) and on the CPU (jacobi_svd_serial: one thread walks the identical pair schedule), so the
// algorithm the GPU runs is tested on machines without one (`lora_ops::_jacobi_svd` on CPU, checked against LAPACK).
//
// Layout: the matrix G (m x n, m >= n) is stored column by column: column j is g + j * m (an ATen [n, m] tensor).
// V (n x n) likewise: column j is v + j * n, initialised to the identity by the caller. Rotations orthogonalise
// the columns of G in place; at convergence G = U * diag(S) and the input equals G * V^T. A sweep visits every pair
// once in round-robin order (n/2 disjoint pairs per round, so a round's pairs can run in parallel).
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define LORA_OPS_HD __host__ __device__ __forceinline__
#else
#define LORA_OPS_HD inline
#endif

namespace lora_ops {
namespace jacobi {

// Sweeps after which the iteration stops even if a pair is still above tolerance (fp32 converges in < 15 for the
// sizes we use; the cap only bounds the time on pathological input). A matrix still rotating after the last sweep
// is reported by NaN singular values (no host synchronisation needed on the GPU, and the NaN reaches whatever is
// built from them instead of silently inaccurate factors).
constexpr int kMaxSweeps = 40;

// Largest min(m, n) the Jacobi SVD accepts: above it O(n^3) sweeps lose to cuSOLVER (small_svd.cu falls back to
// it), and the GPU kernel's shared memory stays a few KB.
constexpr int kJacobiMaxN = 256;

template <typename T>
struct Eps;
template <>
struct Eps<float> {
  static constexpr float value = 1.1920929e-07f;
};
template <>
struct Eps<double> {
  static constexpr double value = 2.220446049250313e-16;
};

// Columns of round `round` in the round-robin tournament over `ne` (even) players: pair k of ne/2.
// Player ne-1 stays fixed; the others rotate, so every pair meets exactly once in ne-1 rounds.
LORA_OPS_HD void round_robin_pair(int round, int k, int ne, int* p, int* q) {
  int a, b;
  if (k == 0) {
    a = round;
    b = ne - 1;
  } else {
    a = (round + k) % (ne - 1);
    b = (round - k + ne - 1) % (ne - 1);
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// The rotation that zeroes the off-diagonal gamma of the 2x2 Gram matrix [[alpha, gamma], [gamma, beta]].
// Returns false (no rotation) when the pair is already orthogonal to working precision: relative to the pair
// (keeps tiny or zero columns of rank-deficient input from being rotated forever), or absolutely, below
// `floor` = eps^2 * |G|_F^2: such a pair cannot move any singular value by more than eps * |G|_F, the accuracy
// any SVD has, while rotating columns whose entries are near T's denormals never reaches the relative test
// (seen: a merge whose weights cancel, core entries ~1e-27 in fp32).
template <typename T>
LORA_OPS_HD bool rotation(double alpha, double beta, double gamma, double tol, double floor_, T* c, T* s) {
  if (gamma == 0.0 || fabs(gamma) <= floor_ || fabs(gamma) <= tol * sqrt(alpha) * sqrt(beta)) return false;
  const double zeta = (beta - alpha) / (2.0 * gamma);
  const double t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
  const double cd = 1.0 / sqrt(1.0 + t * t);
  *c = static_cast<T>(cd);
  *s = static_cast<T>(cd * t);
  return true;
}

// x <- c x - s y, y <- s x + c y over elements start, start + stride, ... < len.
template <typename T>
LORA_OPS_HD void rotate(T* x, T* y, T c, T s, int start, int stride, int len) {
  for (int i = start; i < len; i += stride) {
    const T xi = x[i], yi = y[i];
    x[i] = c * xi - s * yi;
    y[i] = s * xi + c * yi;
  }
}

// Partial sums (|x|^2, |y|^2, x.y) over elements start, start + stride, ... < len, accumulated in double: the
// rotation angle comes from these three numbers, and fp32 sums would leave the columns only sqrt(m)*eps orthogonal.
template <typename T>
LORA_OPS_HD void gram(const T* x, const T* y, int start, int stride, int len, double* xx, double* yy, double* xy) {
  double a = 0, b = 0, g = 0;
  for (int i = start; i < len; i += stride) {
    const double xi = x[i], yi = y[i];  // widened before multiplying: fp32 products overflow / underflow
    a += xi * xi;
    b += yi * yi;
    g += xi * yi;
  }
  *xx = a;
  *yy = b;
  *xy = g;
}

// Tolerance of the orthogonality test: a few ulps of T scaled by sqrt(m) (what rounding the rotated columns to T
// can leave).
template <typename T>
LORA_OPS_HD double tolerance(int m) {
  return 2.0 * Eps<T>::value * sqrt(double(m > 1 ? m : 1));
}

// The absolute floor of the orthogonality test from |G|_F^2 (rotations keep it): eps^2 * |G|_F^2.
template <typename T>
LORA_OPS_HD double gamma_floor(double frobenius2) {
  return Eps<T>::value * Eps<T>::value * frobenius2;
}

// True when column i comes before column j in the output: larger singular value first, NaN before any number,
// ties by column order. A strict total order, so positions are a permutation whatever the values.
template <typename T>
LORA_OPS_HD bool sorts_before(const T* sigma, int i, int j) {
  const bool nan_i = sigma[i] != sigma[i], nan_j = sigma[j] != sigma[j];
  if (nan_i != nan_j) return nan_i;
  if (!nan_i && sigma[i] != sigma[j]) return sigma[i] > sigma[j];
  return i < j;
}

// Position of column j when singular values are sorted descending.
template <typename T>
LORA_OPS_HD int sorted_position(const T* sigma, int n, int j) {
  int pos = 0;
  for (int i = 0; i < n; ++i) pos += sorts_before(sigma, i, j);
  return pos;
}

// Writes U (m x n, row-major), S (n) and Vh (n x n, row-major) sorted by descending singular value, from the
// converged G and V, for column j. sigma holds the column norms of G.
template <typename T>
LORA_OPS_HD void write_column(const T* g, const T* v, const T* sigma, int m, int n, int j, T* u_out, T* s_out,
                              T* vh_out) {
  const int pos = sorted_position(sigma, n, j);
  const T sj = sigma[j];
  const T inv = sj == T(0) ? T(0) : T(1) / sj;  // a zero column has no direction: complete_u fills it
  for (int i = 0; i < m; ++i) u_out[(int64_t)i * n + pos] = g[(int64_t)j * m + i] * inv;
  s_out[pos] = sj;
  for (int i = 0; i < n; ++i) vh_out[(int64_t)pos * n + i] = v[(int64_t)j * n + i];
}

// Replaces the U columns of zero singular values (positions first .. n-1, left zero by write_column) by unit
// vectors orthogonal to all columns before them, as LAPACK returns. Candidates e_0, e_1, ... are orthogonalised
// against those columns (classical Gram-Schmidt, twice); the first whose residual has |.|^2 > 0.5 / m is kept (the
// residuals of the unused candidates sum to at least m - n + 0.5 > 0, so one always exists). U is row-major m x n;
// rows are split over lanes (start, stride) and `sum` totals a lane's partial over the lanes, so each lane only
// touches its own rows.
template <typename T, typename Sum>
LORA_OPS_HD void complete_u(T* u, int m, int n, int first, int start, int stride, Sum sum) {
  int cand = 0;
  for (int c = first; c < n; ++c) {
    for (; cand < m; ++cand) {
      for (int i = start; i < m; i += stride) u[(int64_t)i * n + c] = T(i == cand ? 1 : 0);
      for (int pass = 0; pass < 2; ++pass) {
        for (int j = 0; j < c; ++j) {
          double d = 0;
          for (int i = start; i < m; i += stride) d += double(u[(int64_t)i * n + j]) * double(u[(int64_t)i * n + c]);
          const T dt = static_cast<T>(sum(d));
          for (int i = start; i < m; i += stride) u[(int64_t)i * n + c] -= dt * u[(int64_t)i * n + j];
        }
      }
      double nn = 0;
      for (int i = start; i < m; i += stride) nn += double(u[(int64_t)i * n + c]) * double(u[(int64_t)i * n + c]);
      nn = sum(nn);
      if (nn > 0.5 / m) {
        const T inv = static_cast<T>(1.0 / sqrt(nn));
        for (int i = start; i < m; i += stride) u[(int64_t)i * n + c] *= inv;
        ++cand;
        break;
      }
    }
  }
}

// Number of nonzero (or NaN) singular values: the output positions before the zero ones.
template <typename T>
LORA_OPS_HD int count_nonzero(const T* sigma, int n) {
  int c = 0;
  for (int j = 0; j < n; ++j) c += !(sigma[j] == T(0));
  return c;
}

// The whole algorithm on one thread: the CPU twin of jacobi_svd_block. sigma is scratch of n elements.
// Returns the number of sweeps used; a matrix not converged after max_sweeps gets NaN singular values.
template <typename T>
inline int jacobi_svd_serial(T* g, T* v, int m, int n, T* sigma, T* u_out, T* s_out, T* vh_out,
                             int max_sweeps = kMaxSweeps) {
  const int ne = n + (n & 1);
  const double tol = tolerance<T>(m);
  double fro2 = 0;
  for (int j = 0; j < n; ++j) {
    double xx, yy, xy;
    gram(g + (int64_t)j * m, g + (int64_t)j * m, 0, 1, m, &xx, &yy, &xy);
    fro2 += xx;
  }
  const double gfloor = gamma_floor<T>(fro2);
  bool converged = n <= 1;
  int sweep = 0;
  for (; sweep < max_sweeps && !converged; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < ne - 1; ++round) {
      for (int k = 0; k < ne / 2; ++k) {
        int p, q;
        round_robin_pair(round, k, ne, &p, &q);
        if (q >= n) continue;  // the padding player of an odd n
        double alpha, beta, gamma;
        T c, s;
        gram(g + (int64_t)p * m, g + (int64_t)q * m, 0, 1, m, &alpha, &beta, &gamma);
        if (!rotation(alpha, beta, gamma, tol, gfloor, &c, &s)) continue;
        rotated = true;
        rotate(g + (int64_t)p * m, g + (int64_t)q * m, c, s, 0, 1, m);
        rotate(v + (int64_t)p * n, v + (int64_t)q * n, c, s, 0, 1, n);
      }
    }
    converged = !rotated;
  }
  for (int j = 0; j < n; ++j) {
    double xx, yy, xy;
    gram(g + (int64_t)j * m, g + (int64_t)j * m, 0, 1, m, &xx, &yy, &xy);
    sigma[j] = static_cast<T>(sqrt(xx));
  }
  for (int j = 0; j < n; ++j) write_column(g, v, sigma, m, n, j, u_out, s_out, vh_out);
  complete_u(u_out, m, n, count_nonzero(sigma, n), 0, 1, [](double x) { return x; });
  if (!converged) {
    for (int j = 0; j < n; ++j) s_out[j] = static_cast<T>(NAN);
  }
  return sweep;
}

}  // namespace jacobi
}  // namespace lora_ops

#if defined(__CUDACC__) || defined(LORA_OPS_EMU)
#include "device_utils.cuh"

namespace lora_ops {
namespace jacobi {

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// One block per matrix (blockIdx.x = batch index); each warp takes pairs k = warp, warp + nwarps, ... of a round,
// its lanes striding over rows (coalesced) and reducing with shuffles. Dynamic shared memory: n values of sigma.
// g, v: per-matrix workspaces (m*n and n*n elements, V preset to I); outputs as in write_column.
template <typename T>
__global__ void jacobi_svd_block(T* g_all, T* v_all, int m, int n, T* u_all, T* s_all, T* vh_all, int max_sweeps) {
  T* sigma = cuda::dynamic_smem<T>();
  __shared__ int rotated;
  __shared__ double fro_part[32];  // per warp: |G|_F^2 summed in warp order (deterministic)
  const int64_t b = blockIdx.x;
  T* g = g_all + b * (int64_t)m * n;
  T* v = v_all + b * (int64_t)n * n;
  T* u_out = u_all + b * (int64_t)m * n;
  T* s_out = s_all + b * (int64_t)n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int ne = n + (n & 1);
  const double tol = tolerance<T>(m);
  double fro2 = 0;
  for (int j = warp; j < n; j += nwarps) {
    double xx, yy, xy;
    gram(g + (int64_t)j * m, g + (int64_t)j * m, lane, 32, m, &xx, &yy, &xy);
    fro2 += warp_sum(xx);
  }
  if (lane == 0) fro_part[warp] = fro2;
  __syncthreads();
  fro2 = 0;
  for (int w = 0; w < nwarps; ++w) fro2 += fro_part[w];
  const double gfloor = gamma_floor<T>(fro2);
  bool converged = n <= 1;
  for (int sweep = 0; sweep < max_sweeps && !converged; ++sweep) {
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int round = 0; round < ne - 1; ++round) {
      for (int k = warp; k < ne / 2; k += nwarps) {
        int p, q;
        round_robin_pair(round, k, ne, &p, &q);
        if (q >= n) continue;
        double alpha, beta, gamma;
        T c, s;
        gram(g + (int64_t)p * m, g + (int64_t)q * m, lane, 32, m, &alpha, &beta, &gamma);
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        if (!rotation(alpha, beta, gamma, tol, gfloor, &c, &s)) continue;  // same decision in every lane
        if (lane == 0) rotated = 1;
        rotate(g + (int64_t)p * m, g + (int64_t)q * m, c, s, lane, 32, m);
        rotate(v + (int64_t)p * n, v + (int64_t)q * n, c, s, lane, 32, n);
      }
      __syncthreads();  // the next round's pairs touch columns this round rotated
    }
    converged = !rotated;
    __syncthreads();  // everyone has read the flag before thread 0 clears it
  }
  for (int j = warp; j < n; j += nwarps) {
    double xx, yy, xy;
    gram(g + (int64_t)j * m, g + (int64_t)j * m, lane, 32, m, &xx, &yy, &xy);
    xx = warp_sum(xx);
    if (lane == 0) sigma[j] = static_cast<T>(sqrt(xx));
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    write_column(g, v, sigma, m, n, j, u_out, s_out, vh_all + b * (int64_t)n * n);
  }
  __syncthreads();  // U columns written by other threads are read below
  if (warp == 0) complete_u(u_out, m, n, count_nonzero(sigma, n), lane, 32, [](double x) { return warp_sum(x); });
  if (!converged) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) s_out[j] = static_cast<T>(NAN);
  }
}
}  // namespace jacobi
}  // namespace lora_ops
#endif
