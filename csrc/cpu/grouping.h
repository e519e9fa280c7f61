// Pair grouping, row gather/scatter and dtype helpers shared by the CPU grouped_lora kernels (forward and backward).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "../common/grouped_lora_args.h"

namespace lora_ops::cpu {

struct Group {
  int64_t adapter, begin, end;  // [begin, end) indexes the sorted pair order
};

// Pairs p = row * k + slot whose id is a valid adapter (in [0, N)), stable-sorted by id into `order`, and their
// runs of equal ids into `groups`. Grouping is what lets every kernel read each adapter's A and B once per call.
void group_pairs(const int64_t* ids, int64_t P, int64_t N, std::vector<int64_t>& order, std::vector<Group>& groups);

// Groups with at least this many pairs run as BLAS GEMMs through ATen; smaller groups use the loops of loops.h.
// Measured with one thread, r = 16, d = 2048: groups of 64 scattered rows ran 2x faster through BLAS (gathered),
// 2048-row runs 1.5-2x; decode groups of ~8 rows stay on the loops, which read A and B once and are memory-bound.
constexpr int64_t kGemmPairs = 32;

// Length of the blocks when the rows form G >= 2 equal blocks of >= kGemmPairs rows with one valid adapter each (a
// [B, S, d] batch with one adapter per sequence, k = 1) and the blocks' A and B copied take <= 8 MiB, else 0. The
// block length is the first run of equal ids. Such batches run as batched GEMMs over the blocks (forward and
// backward): with SmolLM2-135M's shapes (d 576 / 1536, 32 adapters) the LoRA cost of a 16 x 128 prefill went from
// 271 to 206 ms, of a 16 x 32 training step from 550 to 494 ms (paired runs, 2 threads).
int64_t equal_sequences(const GroupedLoraProblem& p);

// The operands of that path for blocks of L rows: each block's adapter id [G], its A [G, r, d_in] and B [G, d_out, r]
// (gathered), its scale [G, 1, 1] (ones without scales) and the per-row factor f = scale * weight [G, L, 1].
struct SequenceOperands {
  at::Tensor ids, a, b, scale, f;
};
SequenceOperands sequence_operands(const GroupedLoraProblem& p, int64_t L);

// Calls fn on every group. When the groups write disjoint memory (k = 1: each row is one pair), they run side by
// side, largest first, with sequential BLAS each (cpu::split_blas_items): small GEMMs gain little from BLAS's own
// threads and pay its fork / join on every call. Otherwise (top-k rows shared by groups) one after another, in order.
void run_groups(const std::vector<Group>& groups, bool disjoint, const std::function<void(const Group&)>& fn);

// dst[i] = src[rows[i]] converted to dst's dtype for i < rows.size() (a gather into a contiguous block); with
// `scatter`, dst[rows[i]] = src[i] instead (rows distinct). src and dst are contiguous 2-D tensors of equal width.
void copy_rows(const at::Tensor& src, const std::vector<int64_t>& rows, at::Tensor& dst, bool scatter);

// Zero-fills the rows i of the contiguous 2-D tensor t with !written[i] (all rows when written is all zeros).
void zero_rows(at::Tensor& t, const std::vector<char>& written);

// dst[rows[i]] += src[i] for i < rows.size(); rows may repeat (top-k rows with the same adapter in two slots).
// dst and src share a floating dtype.
void add_rows(const at::Tensor& src, const std::vector<int64_t>& rows, at::Tensor& dst);

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
