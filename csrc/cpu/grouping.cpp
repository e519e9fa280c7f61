#include "grouping.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "blas_split.h"

namespace lora_ops::cpu {

void run_groups(const std::vector<Group>& groups, bool disjoint, const std::function<void(const Group&)>& fn) {
  if (!disjoint) {
    for (const Group& g : groups) fn(g);
    return;
  }
  std::vector<Group> by_size(groups);
  std::stable_sort(by_size.begin(), by_size.end(),
                   [](const Group& a, const Group& b) { return a.end - a.begin > b.end - b.begin; });
  split_blas_items(static_cast<int64_t>(by_size.size()), [&](int64_t i) { fn(by_size[i]); });
}

int64_t equal_sequences(const GroupedLoraProblem& p) {
  const int64_t* ids = p.ids.const_data_ptr<int64_t>();
  if (p.k != 1 || p.T < 2 * kGemmPairs) return 0;
  int64_t L = 1;
  while (L < p.T && ids[L] == ids[0]) ++L;
  if (L < kGemmPairs || p.T % L != 0 || p.T == L) return 0;
  // The batched path copies every sequence's A and B; past ~8 MiB of copies (d 2048, 64 sequences of 32 rows: 16
  // MiB) the per-group GEMMs, which read each adapter in place, measured faster (5.3 against 7.2 ms).
  if ((p.T / L) * p.r * (p.d_in + p.d_out) * p.lora_a.element_size() > (int64_t{8} << 20)) return 0;
  for (int64_t g = 0; g < p.T; g += L) {
    if (ids[g] < 0 || ids[g] >= p.N) return 0;  // an invalid block must stay exactly zero: the general path
    for (int64_t i = g + 1; i < g + L; ++i) {
      if (ids[i] != ids[g]) return 0;
    }
  }
  return L;
}

SequenceOperands sequence_operands(const GroupedLoraProblem& p, int64_t L) {
  const int64_t G = p.T / L;
  SequenceOperands o;
  o.ids = p.ids.view(-1).slice(0, 0, p.T, L).contiguous();
  o.a = p.lora_a.index_select(0, o.ids);
  o.b = p.lora_b.index_select(0, o.ids);
  o.scale = p.scales.defined() ? p.scales.index_select(0, o.ids).view({G, 1, 1}) : at::ones({G, 1, 1}, p.x.options());
  o.f = p.weights.defined() ? o.scale * p.weights.view({G, L, 1}) : o.scale;
  return o;
}

void group_pairs(const int64_t* ids, int64_t P, int64_t N, std::vector<int64_t>& order, std::vector<Group>& groups) {
  order.clear();
  for (int64_t p = 0; p < P; ++p) {
    if (ids[p] >= 0 && ids[p] < N) order.push_back(p);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  groups.clear();
  for (int64_t i = 0; i < static_cast<int64_t>(order.size());) {
    int64_t j = i + 1;
    while (j < static_cast<int64_t>(order.size()) && ids[order[j]] == ids[order[i]]) ++j;
    groups.push_back({ids[order[i]], i, j});
    i = j;
  }
}

// A profile showed index_select gathering at only ~4 GB/s here, hence these plain row loops.
void copy_rows(const at::Tensor& src, const std::vector<int64_t>& rows, at::Tensor& dst, bool scatter) {
  const int64_t d = src.size(1), n = static_cast<int64_t>(rows.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_rows_src", [&] {
    using src_t = scalar_t;
    const src_t* in = src.const_data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "copy_rows_dst", [&] {
      scalar_t* out = dst.mutable_data_ptr<scalar_t>();
      // Pure loop: rows are disjoint per thread.
      at::parallel_for(0, n, 16, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          const src_t* s = in + (scatter ? i : rows[i]) * d;
          scalar_t* o = out + (scatter ? rows[i] : i) * d;
          for (int64_t e = 0; e < d; ++e) o[e] = static_cast<scalar_t>(s[e]);
        }
      });
    });
  });
}

void zero_rows(at::Tensor& t, const std::vector<char>& written) {
  const int64_t n = t.size(0), bytes = t.size(1) * static_cast<int64_t>(t.element_size());
  char* base = static_cast<char*>(t.data_ptr());
  // Pure loop: rows are disjoint per thread.
  at::parallel_for(0, n, 64, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      if (!written[i]) std::memset(base + i * bytes, 0, bytes);
    }
  });
}

void add_rows(const at::Tensor& src, const std::vector<int64_t>& rows, at::Tensor& dst) {
  const int64_t d = src.size(1), n = static_cast<int64_t>(rows.size());
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "add_rows", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    constexpr int64_t kCols = 256;
    // Pure loop over disjoint column blocks: a repeated row is added to by one thread, in row order.
    at::parallel_for(0, (d + kCols - 1) / kCols, 1, [&](int64_t first, int64_t last) {
      const int64_t c0 = first * kCols, c1 = std::min(d, last * kCols);
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* s = in + i * d;
        scalar_t* o = out + rows[i] * d;
        for (int64_t c = c0; c < c1; ++c) o[c] += s[c];
      }
    });
  });
}

}  // namespace lora_ops::cpu
