#include "blas_split.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

// MKL's C entry point for the calling thread's thread count (returns the previous one, 0 = the global setting). Weak:
// resolved from libtorch's statically linked MKL where there is one, null elsewhere. (The lower-case
// mkl_set_num_threads_local exported beside it is the Fortran entry, which takes a pointer.)
#if defined(__GNUC__) && defined(__linux__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define LORA_OPS_MKL_LOCAL MKL_Set_Num_Threads_Local
#else
#define LORA_OPS_MKL_LOCAL nullptr
#endif

namespace lora_ops::cpu {
namespace {

using SetLocal = int (*)(int);
const SetLocal kSetLocal = LORA_OPS_MKL_LOCAL;

// MKL sequential on this thread while it lives; the previous per-thread count is restored on exit.
class SequentialMkl {
 public:
  SequentialMkl() : previous_(kSetLocal(1)) {}
  ~SequentialMkl() { kSetLocal(previous_); }
  SequentialMkl(const SequentialMkl&) = delete;
  SequentialMkl& operator=(const SequentialMkl&) = delete;

 private:
  int previous_;
};

}  // namespace

bool can_split_blas() { return kSetLocal != nullptr && at::get_num_threads() > 1 && !at::in_parallel_region(); }

void split_blas(int64_t n, int64_t min_piece, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t pieces = std::min<int64_t>(at::get_num_threads(), n / std::max<int64_t>(min_piece, 1));
  if (pieces < 2 || !can_split_blas()) {
    if (n > 0) fn(0, n);
    return;
  }
  // One piece per thread of ATen's team (grain 1 over `pieces` indices), with the caller's thread-local state
  // (dispatch keys excluded by the kernel, grad mode), which ATen's OpenMP team does not carry over.
  const at::ThreadLocalState state;
  at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard caller(state);
    const SequentialMkl sequential;
    fn(n * first / pieces, n * last / pieces);
  });
}

void split_blas_items(int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads < 2 || !can_split_blas()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  // Every thread of the team takes the next item until none is left (items come largest first).
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard caller(state);
    const SequentialMkl sequential;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

Svd3 split_blas_rows(int64_t n, int64_t min_piece, const std::function<Svd3(int64_t, int64_t)>& fn) {
  if (n < 2 * std::max<int64_t>(min_piece, 1) || !can_split_blas()) return fn(0, n);  // also n = 0: empty results
  std::mutex mutex;
  std::vector<std::pair<int64_t, Svd3>> parts;
  split_blas(n, min_piece, [&](int64_t begin, int64_t end) {
    Svd3 part = fn(begin, end);
    std::lock_guard<std::mutex> lock(mutex);
    parts.emplace_back(begin, std::move(part));
  });
  if (parts.size() == 1) return parts[0].second;
  std::sort(parts.begin(), parts.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<at::Tensor> u, s, v;
  for (auto& [begin, part] : parts) {
    u.push_back(std::get<0>(part));
    s.push_back(std::get<1>(part));
    v.push_back(std::get<2>(part));
  }
  return {at::cat(u), at::cat(s), at::cat(v)};
}

}  // namespace lora_ops::cpu
