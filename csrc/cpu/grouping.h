// Pair grouping and dtype helpers shared by the CPU grouped_lora kernels (forward and backward).
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

namespace lora_ops::cpu {

struct Group {
  int64_t adapter, begin, end;  // [begin, end) indexes the sorted pair order
};

// Pairs p = row * k + slot whose id is a valid adapter (in [0, N)), stable-sorted by id into `order`, and their
// runs of equal ids into `groups`. Grouping is what lets every kernel read each adapter's A and B once per call.
void group_pairs(const int64_t* ids, int64_t P, int64_t N, std::vector<int64_t>& order, std::vector<Group>& groups);

// Pointer to `n` values of `src` in acc_t: the input itself when no conversion is needed, else `buf` filled.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

}  // namespace lora_ops::cpu
