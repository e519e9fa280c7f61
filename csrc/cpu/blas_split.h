// Independent pieces of batched BLAS / LAPACK work run side by side on ATen's threads, with MKL sequential in each.
//
// torch's CPU builds run MKL with dynamic threading off, so a BLAS / LAPACK call inside an at::parallel_for region
// opens MKL's own thread team there, which spins forever (issue 15). MKL opens no team when the calling thread's MKL
// count is 1: split_blas sets it (MKL_Set_Num_Threads_Local) in every thread of the region and restores it after,
// so each piece runs sequential BLAS while the pieces run side by side. That beats one threaded call after another
// where each call is too small for BLAS's threads (64 QRs of 512 x 26: MKL gains nothing from a second thread).
// This is the only place where BLAS runs inside at::parallel_for. With one thread, one piece, a caller already in
// a parallel region, or a BLAS whose per-thread count cannot be set (builds without MKL), fn(0, n) runs as one call
// on the calling thread, threaded by the library. (Running pieces on torch's inter-op pool instead measured worse:
// a second thread's OpenMP team makes libgomp throttle spin-waits, and later threaded calls slowed down 1.7x.)
#pragma once
#include <cstdint>
#include <functional>

#include "../common/lowrank.h"

namespace lora_ops::cpu {

// Whether split_blas can run pieces side by side here (MKL's per-thread control was found and > 1 thread is set).
bool can_split_blas();

// Calls fn(begin, end) on consecutive ranges covering [0, n), at most at::get_num_threads() of them, each range at
// least min_piece long; returns when all are done, rethrowing the first exception. Ranges must touch disjoint memory.
void split_blas(int64_t n, int64_t min_piece, const std::function<void(int64_t, int64_t)>& fn);

// Calls fn(i) for i in [0, n), items handed out one at a time to min(threads, n) threads (in index order: put the
// largest first). Items must touch disjoint memory.
void split_blas_items(int64_t n, const std::function<void(int64_t)>& fn);

// split_blas over the rows of a batch whose pieces return three tensors [rows, ...] (merge / rSVD factors): the
// pieces' results concatenated along dim 0 (fn(0, n) as is when it does not split).
Svd3 split_blas_rows(int64_t n, int64_t min_piece, const std::function<Svd3(int64_t, int64_t)>& fn);

}  // namespace lora_ops::cpu
