#include "loops.h"

// Lane-wise accumulators let the compiler vectorise the reductions without -ffast-math. Each loop is compiled
// for the baseline ISA and, on x86-64, again for AVX2+FMA; the CPU's features pick one at run time.
#define LORA_OPS_INLINE __attribute__((always_inline)) inline
#if defined(__x86_64__) && defined(__GNUC__)
#define LORA_OPS_HAS_AVX2_CLONE 1
#define LORA_OPS_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#endif

namespace lora_ops::cpu {
namespace {

constexpr int64_t kLanes = 16;

template <typename T>
LORA_OPS_INLINE void dot4_impl(const T* a, const T* const* xs, int64_t n, T* out) {
  const T* __restrict x0 = xs[0];
  const T* __restrict x1 = xs[1];
  const T* __restrict x2 = xs[2];
  const T* __restrict x3 = xs[3];
  T acc0[kLanes] = {}, acc1[kLanes] = {}, acc2[kLanes] = {}, acc3[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T av = a[i + l];
      acc0[l] += av * x0[i + l];
      acc1[l] += av * x1[i + l];
      acc2[l] += av * x2[i + l];
      acc3[l] += av * x3[i + l];
    }
  }
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    s0 += acc0[l];
    s1 += acc1[l];
    s2 += acc2[l];
    s3 += acc3[l];
  }
  for (; i < n; ++i) {
    s0 += a[i] * x0[i];
    s1 += a[i] * x1[i];
    s2 += a[i] * x2[i];
    s3 += a[i] * x3[i];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <typename T>
LORA_OPS_INLINE T dot1_impl(const T* __restrict a, const T* __restrict x, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * x[i + l];
  }
  T s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * x[i];
  return s;
}

template <typename T>
LORA_OPS_INLINE void rank_update_impl(const T* __restrict h, const T* __restrict bt, int64_t r, int64_t len,
                             T* __restrict out) {
  T acc[kTile] = {};
  for (int64_t q = 0; q < r; ++q) {
    const T hv = h[q];
    const T* __restrict row = bt + q * kTile;
    for (int64_t o = 0; o < kTile; ++o) acc[o] += hv * row[o];
  }
  for (int64_t o = 0; o < len; ++o) out[o] += acc[o];
}

// Fixed 8x8 blocks give the compiler a shuffle-based transpose; edges fall back to scalar copies.
template <typename T>
LORA_OPS_INLINE void transpose_tile_impl(const T* __restrict b, int64_t r, int64_t len, T* __restrict bt) {
  constexpr int64_t kB = 8;
  const int64_t len8 = len - len % kB, r8 = r - r % kB;
  for (int64_t o = 0; o < len8; o += kB) {
    for (int64_t q = 0; q < r8; q += kB) {
      T blk[kB][kB];
      for (int64_t i = 0; i < kB; ++i)
        for (int64_t j = 0; j < kB; ++j) blk[j][i] = b[(o + i) * r + q + j];
      for (int64_t j = 0; j < kB; ++j)
        for (int64_t i = 0; i < kB; ++i) bt[(q + j) * kTile + o + i] = blk[j][i];
    }
    for (int64_t q = r8; q < r; ++q)
      for (int64_t i = 0; i < kB; ++i) bt[q * kTile + o + i] = b[(o + i) * r + q];
  }
  for (int64_t q = 0; q < r; ++q) {
    for (int64_t o = len8; o < len; ++o) bt[q * kTile + o] = b[o * r + q];
    for (int64_t o = len; o < kTile; ++o) bt[q * kTile + o] = T(0);
  }
}

}  // namespace

#ifdef LORA_OPS_HAS_AVX2_CLONE
namespace {
// GCC does not turn the generic transpose into shuffles, and in the expand step of decode batches (few rows per
// adapter) the transpose costs as much as the FMAs: an 8x8 in-register transpose makes it ~3x cheaper.
LORA_OPS_AVX2 inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

LORA_OPS_AVX2 void transpose_tile_avx2_f32(const float* b, int64_t r, int64_t len, float* bt) {
  const int64_t len8 = len - len % 8, r8 = r - r % 8;
  for (int64_t o = 0; o < len8; o += 8) {
    for (int64_t q = 0; q < r8; q += 8) transpose8x8(b + o * r + q, r, bt + q * kTile + o, kTile);
  }
  for (int64_t q = 0; q < r; ++q) {
    if (q >= r8) {
      for (int64_t o = 0; o < len8; ++o) bt[q * kTile + o] = b[o * r + q];
    }
    for (int64_t o = len8; o < len; ++o) bt[q * kTile + o] = b[o * r + q];
    for (int64_t o = len; o < kTile; ++o) bt[q * kTile + o] = 0.f;
  }
}
}  // namespace

static bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
// NAME(PARAMS) runs NAME_impl(ARGS) compiled for AVX2+FMA when the CPU has them, else the baseline build.
#define LORA_OPS_DISPATCH(RET, NAME, PARAMS, ARGS)                  \
  namespace {                                                       \
  LORA_OPS_AVX2 RET NAME##_avx2 PARAMS { return NAME##_impl ARGS; } \
  }                                                                 \
  RET NAME PARAMS { return use_avx2() ? NAME##_avx2 ARGS : NAME##_impl ARGS; }
#else
#define LORA_OPS_DISPATCH(RET, NAME, PARAMS, ARGS) \
  RET NAME PARAMS { return NAME##_impl ARGS; }
#endif

LORA_OPS_DISPATCH(void, dot4, (const float* a, const float* const* xs, int64_t n, float* out), (a, xs, n, out))
LORA_OPS_DISPATCH(void, dot4, (const double* a, const double* const* xs, int64_t n, double* out), (a, xs, n, out))
LORA_OPS_DISPATCH(float, dot1, (const float* a, const float* x, int64_t n), (a, x, n))
LORA_OPS_DISPATCH(double, dot1, (const double* a, const double* x, int64_t n), (a, x, n))
LORA_OPS_DISPATCH(void, rank_update, (const float* h, const float* bt, int64_t r, int64_t len, float* out),
                  (h, bt, r, len, out))
LORA_OPS_DISPATCH(void, rank_update, (const double* h, const double* bt, int64_t r, int64_t len, double* out),
                  (h, bt, r, len, out))
#ifdef LORA_OPS_HAS_AVX2_CLONE
void transpose_tile(const float* b, int64_t r, int64_t len, float* bt) {
  return use_avx2() ? transpose_tile_avx2_f32(b, r, len, bt) : transpose_tile_impl(b, r, len, bt);
}
#else
LORA_OPS_DISPATCH(void, transpose_tile, (const float* b, int64_t r, int64_t len, float* bt), (b, r, len, bt))
#endif
LORA_OPS_DISPATCH(void, transpose_tile, (const double* b, int64_t r, int64_t len, double* bt), (b, r, len, bt))

}  // namespace lora_ops::cpu
