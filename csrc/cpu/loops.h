// Hot inner loops of the CPU kernels. Built for the baseline ISA and for AVX2+FMA, picked at run time from the
// CPU's features, so one wheel runs everywhere and uses 256-bit FMAs where it can.
#pragma once
#include <cstdint>

namespace lora_ops::cpu {

// Columns of one output tile in rank_update (the caller pads its transposed B tile to this width).
constexpr int64_t kTile = 64;

// out[j] = <a, xs[j]> for j < 4, over n elements. Reads `a` once for four rows.
void dot4(const float* a, const float* const* xs, int64_t n, float* out);
void dot4(const double* a, const double* const* xs, int64_t n, double* out);
// <a, x> over n elements.
float dot1(const float* a, const float* x, int64_t n);
double dot1(const double* a, const double* x, int64_t n);

// out[o] += sum_q h[q] * bt[q * kTile + o] for o < len (len <= kTile): one row's rank-r update of an output tile.
void rank_update(const float* h, const float* bt, int64_t r, int64_t len, float* out);
void rank_update(const double* h, const double* bt, int64_t r, int64_t len, double* out);

// bt[q * kTile + o] = b[o * r + q] for o < len, q < r; columns len..kTile of bt are zeroed.
void transpose_tile(const float* b, int64_t r, int64_t len, float* bt);
void transpose_tile(const double* b, int64_t r, int64_t len, double* bt);

}  // namespace lora_ops::cpu
