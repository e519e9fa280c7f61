// grouped_lora on CPU.
//
// A batch of equal sequences with one valid adapter each (fp32 / fp64, cpu::equal_sequences: prefill and training
// batches of [B, S, d]) runs as two batched GEMMs over the sequences (sequences_bmm). Otherwise:
// Rows are grouped by adapter (a stable sort of the valid (row, slot) pairs), so each adapter's A and B are read
// once per group however the ids are spread. Two paths, chosen per group by its pair count:
// - long groups (>= cpu::kGemmPairs pairs: prefill sequences, training batches): two BLAS GEMMs through ATen,
//     h = f ⊙ (X_g A_iᵀ), Y_g += h B_iᵀ, on views of x and the output when the group is one run of consecutive
//     rows, else on gathered rows. They are called one group at a time from the serial loop, so BLAS threads each
//     GEMM itself, or (k = 1: disjoint rows) side by side through cpu::run_groups, which sets MKL sequential in
//     each thread (MKL's threaded path inside at::parallel_for hangs).
// - short groups (decode batches), pure loops under at::parallel_for:
//     shrink: h[p] = scale[id] * w[p] * (A[id] @ x[row(p)])   work items = (group, chunk of <= kChunk pairs)
//     expand: y[row(p)] += B[id] @ h[p]                        work items = tiles of kTile output columns
//   Expand tiles are disjoint, so top-k rows that several groups add into need no atomics or locks.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../common/grouped_lora_args.h"
#include "grouping.h"
#include "loops.h"

namespace lora_ops {
namespace {

using cpu::as_acc;
using cpu::kGemmPairs;
using cpu::Group;
using cpu::group_pairs;
using cpu::kTile;
constexpr int64_t kChunk = 16;  // pairs per shrink work item: splits one long group over threads

// One long group through two BLAS GEMMs in acc_t (fp16/bf16 rows are converted while gathered). Called from the
// serial loop or side by side through cpu::run_groups (groups with disjoint output rows only).
template <typename scalar_t>
void gemm_group(const GroupedLoraProblem& p, const int64_t* pairs, int64_t n, int64_t adapter,
                const at::opmath_type<scalar_t>* scales, const at::opmath_type<scalar_t>* weights, at::Tensor& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k, r = p.r;
  bool run = true;  // consecutive rows of one slot (a prefill sequence): x and the output are used in place
  for (int64_t j = 1; j < n && run; ++j) run = pairs[j] == pairs[0] + j * k;
  std::vector<int64_t> rows(n);
  for (int64_t j = 0; j < n; ++j) rows[j] = pairs[j] / k;
  at::Tensor xg;
  if (run && std::is_same_v<scalar_t, acc_t>) {
    xg = p.x.narrow(0, rows[0], n);
  } else {
    xg = at::empty({n, p.d_in}, acc.options());
    cpu::copy_rows(p.x, rows, xg, false);
  }
  const at::Tensor a = p.lora_a.select(0, adapter).to(acc.scalar_type());  // [r, d_in], a view for fp32/fp64
  const at::Tensor b = p.lora_b.select(0, adapter).to(acc.scalar_type());  // [d_out, r]
  at::Tensor h = at::mm(xg, a.t());                                         // [n, r]
  acc_t* hp = h.mutable_data_ptr<acc_t>();
  const acc_t s = scales ? scales[adapter] : acc_t(1);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t f = weights ? s * weights[pairs[j]] : s;
    for (int64_t q = 0; q < r; ++q) hp[j * r + q] *= f;
  }
  if (!run && k == 1) {
    cpu::copy_rows(at::mm(h, b.t()), rows, acc, true);  // rows of no other group: written, not added
  } else if (!run) {
    cpu::add_rows(at::mm(h, b.t()), rows, acc);
  } else if (k == 1) {
    at::Tensor yg = acc.narrow(0, rows[0], n);  // only this group writes these rows: no accumulation needed
    at::mm_out(yg, h, b.t());
  } else {
    acc.narrow(0, rows[0], n).addmm_(h, b.t());
  }
}

// Equal sequences (cpu::equal_sequences) through two batched GEMMs over the G blocks, each block's A and B gathered
// (G·r·(d_in + d_out) values, small next to x): BLAS threads the batch. Run as G separate small GEMM pairs, the set-up
// of each small GEMM decided the speed at model sizes (16 x 128 rows, d 576: 0.6-1.9 ms against 0.5 ms for bmm).
void sequences_bmm(const GroupedLoraProblem& p, int64_t L, at::Tensor& out) {
  const int64_t G = p.T / L;
  const cpu::SequenceOperands o = cpu::sequence_operands(p, L);
  // scale and mixture weight on the [.., r] result, as the other paths do (r / d_out of the work on the output)
  const at::Tensor h = at::bmm(p.x.view({G, L, p.d_in}), o.a.transpose(1, 2)).mul_(o.f);  // [G, L, r]
  at::Tensor y = out.view({G, L, p.d_out});
  at::bmm_out(y, h, o.b.transpose(1, 2));
}

template <typename scalar_t>
void grouped_lora_kernel(const GroupedLoraProblem& p, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = p.T * p.k, r = p.r, d_in = p.d_in, d_out = p.d_out, k = p.k;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* A = p.lora_a.const_data_ptr<scalar_t>();
  const scalar_t* B = p.lora_b.const_data_ptr<scalar_t>();
  const int64_t* ids = p.ids.const_data_ptr<int64_t>();
  const acc_t* scales = p.scales.defined() ? p.scales.const_data_ptr<acc_t>() : nullptr;
  const acc_t* weights = p.weights.defined() ? p.weights.const_data_ptr<acc_t>() : nullptr;

  if constexpr (std::is_same_v<scalar_t, acc_t>) {  // fp16/bf16 rows need converting: the general path does it
    if (const int64_t L = r > 0 ? cpu::equal_sequences(p) : 0) {
      sequences_bmm(p, L, out);
      return;
    }
  }
  std::vector<int64_t> order;
  std::vector<Group> all_groups;
  group_pairs(ids, P, p.N, order, all_groups);
  if (r == 0) all_groups.clear();
  std::vector<Group> groups, longs;  // short ones for the loops below, long ones for BLAS
  for (const Group& g : all_groups) (g.end - g.begin >= kGemmPairs ? longs : groups).push_back(g);

  // fp32/fp64 accumulate straight into the (uninitialised) output; fp16/bf16 into an fp32 buffer converted at the
  // end. Rows that a k = 1 long group writes whole are not zero-filled first: at prefill and training shapes that
  // fill was one more pass over the whole output (~15 % of the op's time at d 4096, 4 x 512 rows).
  at::Tensor acc = std::is_same_v<scalar_t, acc_t> ? out : at::empty({p.T, d_out}, out.options().dtype(
                                                                                          c10::CppTypeToScalarType<acc_t>::value));
  std::vector<char> written(p.T, 0);
  if (k == 1) {
    for (const Group& g : longs) {
      for (int64_t i = g.begin; i < g.end; ++i) written[order[i]] = 1;
    }
  }
  cpu::zero_rows(acc, written);
  acc_t* y = acc.mutable_data_ptr<acc_t>();

  // ---- long groups: BLAS ----
  // k = 1: every row is one pair, so the groups write disjoint rows and run side by side
  cpu::run_groups(longs, k == 1, [&](const Group& g) {
    gemm_group<scalar_t>(p, order.data() + g.begin, g.end - g.begin, g.adapter, scales, weights, acc);
  });
  if (groups.empty()) {
    if (!acc.is_same(out)) out.copy_(acc);
    return;
  }

  // ---- shrink ----
  struct Item {
    int64_t group, begin, end;
  };
  std::vector<Item> items;
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()); ++g) {
    for (int64_t b = groups[g].begin; b < groups[g].end; b += kChunk) {
      items.push_back({g, b, std::min(b + kChunk, groups[g].end)});
    }
  }
  std::vector<acc_t> h(P * r);  // only short groups' pairs' rows are written and read
  // Pure loops (dot4 / dot1): items write disjoint rows of h.
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
    constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> xbuf(convert ? kChunk * d_in : 0), abuf(convert ? d_in : 0);
    std::vector<const acc_t*> xs(kChunk);
    for (int64_t it = first; it < last; ++it) {
      const Item& item = items[it];
      const int64_t adapter = groups[item.group].adapter, n = item.end - item.begin;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t row = order[item.begin + j] / k;
        xs[j] = as_acc(x + row * d_in, d_in, convert ? xbuf.data() + j * d_in : nullptr);
      }
      for (int64_t q = 0; q < r; ++q) {
        const acc_t* a = as_acc(A + (adapter * r + q) * d_in, d_in, abuf.data());
        acc_t dots[4];
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
          cpu::dot4(a, xs.data() + j, d_in, dots);
          for (int64_t u = 0; u < 4; ++u) h[order[item.begin + j + u] * r + q] = dots[u];
        }
        for (; j < n; ++j) h[order[item.begin + j] * r + q] = cpu::dot1(a, xs[j], d_in);
      }
      // Fold scale and mixture weight into h, so expand is a plain rank-r update.
      const acc_t s = scales ? scales[adapter] : acc_t(1);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pair = order[item.begin + j];
        const acc_t f = weights ? s * weights[pair] : s;
        for (int64_t q = 0; q < r; ++q) h[pair * r + q] *= f;
      }
    }
  });

  // ---- expand ----
  const int64_t n_tiles = (d_out + kTile - 1) / kTile;
  // Pure loops (transpose_tile / rank_update): threads own disjoint output column tiles.
  at::parallel_for(0, n_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> bt(r * kTile);  // B tile transposed to [r, kTile], zero-padded past d_out
    std::vector<acc_t> bbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kTile * r);
    // Groups outside, tiles inside: each thread streams its contiguous slice of every B[adapter].
    for (const Group& g : groups) {
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t o0 = tile * kTile, len = std::min(kTile, d_out - o0);
        const acc_t* b = as_acc(B + (g.adapter * d_out + o0) * r, len * r, bbuf.data());
        cpu::transpose_tile(b, r, len, bt.data());
        for (int64_t i = g.begin; i < g.end; ++i) {
          const int64_t pair = order[i];
          cpu::rank_update(h.data() + pair * r, bt.data(), r, len, y + (pair / k) * d_out + o0);
        }
      }
    }
  });
  if (!acc.is_same(out)) out.copy_(acc);
}

at::Tensor grouped_lora_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& adapter_ids, const std::optional<at::Tensor>& scales,
                            const std::optional<at::Tensor>& weights, bool check_ids) {
  // The ATen calls of the GEMM path are this kernel's internals: keep autograd out of them.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const GroupedLoraProblem p = prepare_grouped_lora(x, lora_a, lora_b, adapter_ids, scales, weights, check_ids);
  at::Tensor out = at::empty({p.T, p.d_out}, x.options());  // the kernel zero-fills the rows no group writes
  if (p.T > 0 && p.d_out > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_lora_cpu",
                                    [&] { grouped_lora_kernel<scalar_t>(p, out); });
  }
  return out.view(p.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("grouped_lora", &grouped_lora_cpu); }

}  // namespace lora_ops
