// grouped_lora_backward on CPU.
//
// With h = A_i x_t, g = B_iᵀ dy_t and f = scale_i * w_tj for each valid (row t, slot j) pair using adapter i:
//   dx_t  = Σ_j f A_iᵀ g      dA_i = Σ_pairs f g x_tᵀ      dB_i = Σ_pairs f dy_t hᵀ      dw_tj = scale_i <g, h>
// Pairs are grouped by adapter exactly as in the forward (cpu::group_pairs), then x and dy rows are gathered once
// in sorted pair order, so every group is a contiguous block of rows and every product is one GEMM (at::mm_out)
// that reads A_i / B_i once: five GEMMs per group, no per-row copy of A or B. The backward has three of its five
// products with a d-long output (dA, dB, dx), where blocked GEMMs beat dot/rank-update loops; measured one
// per-group GEMM of the shapes here at ~0.03-0.05 ms (32 rows, r=16, d=2048, one thread). Groups run concurrently
// (see kRowBlock).
// Every group writes disjoint memory (its rows of the sorted buffers, dA_i, dB_i); dx is scattered back once at
// the end (index_add_ when top-k rows receive several groups), so nothing races.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../common/grouped_lora_args.h"
#include "grouping.h"

namespace lora_ops {
namespace {

// Work items run concurrently, one thread each with single-threaded GEMMs: rows of a group in blocks of
// kRowBlock (h, g, dx), then dA_i and dB_i whole, except that a group holding more than one thread's share of the
// pairs (a Zipf head) has its dA_i columns / dB_i rows split so the threads stay balanced. Splitting one small
// GEMM across threads instead pays a barrier per call, which on a busy machine costs a scheduler slice (measured:
// a 1024-row N=8 backward went from 7 ms to 690 ms with other jobs running). Column blocks of ~128 for every
// group measured no faster than whole dA_i / dB_i.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColAlign = 64;

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// dst[i] = src[rows[i]] (converted to dst's dtype) for i < rows.size(): the per-row gather/scatter behind the
// sorted blocks, as a parallel row copy (a profile showed index_select gathering at only ~4 GB/s here).
// With `scatter`, dst[rows[i]] = src[i] instead (rows must be distinct).
void copy_rows(const at::Tensor& src, const std::vector<int64_t>& rows, at::Tensor& dst, bool scatter) {
  const int64_t d = src.size(1), n = static_cast<int64_t>(rows.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "copy_rows_src", [&] {
    using src_t = scalar_t;
    const src_t* in = src.const_data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "copy_rows_dst", [&] {
      scalar_t* out = dst.mutable_data_ptr<scalar_t>();
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

Grads grouped_lora_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                                const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& weights,
                                std::array<bool, 4> output_mask) {
  // The ATen calls below are this kernel's internals: keep autograd out of them (inputs may require grad).
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  // The forward already validated the ids (or was told not to): invalid ones simply contribute nothing here.
  const GroupedLoraProblem p = prepare_grouped_lora(x, lora_a, lora_b, adapter_ids, scales, weights, false);
  const at::Tensor dy = prepare_grad_out(grad_out, p);
  const bool need_x = output_mask[0], need_a = output_mask[1], need_b = output_mask[2];
  const bool need_w = output_mask[3] && weights.has_value();
  const auto acc = at::TensorOptions().dtype(accumulate_dtype(x.scalar_type())).device(x.device());

  // Gradients accumulate in the accumulation dtype and are converted once at the end.
  at::Tensor gx;  // allocated below, once it is known whether every row receives a value
  at::Tensor ga = need_a ? at::zeros(lora_a.sizes(), acc) : at::Tensor();
  at::Tensor gb = need_b ? at::zeros(lora_b.sizes(), acc) : at::Tensor();
  at::Tensor gw = need_w ? at::zeros({p.T * p.k}, acc) : at::Tensor();

  std::vector<int64_t> order;
  std::vector<cpu::Group> groups;
  group_pairs(p.ids.const_data_ptr<int64_t>(), p.T * p.k, p.N, order, groups);
  if (need_x) {
    // k = 1 with every id valid (the usual training batch): the scatter below writes every row, no zero fill.
    const bool every_row_written = p.k == 1 && static_cast<int64_t>(order.size()) == p.T && p.r > 0;
    gx = every_row_written ? at::empty({p.T, p.d_in}, acc) : at::zeros({p.T, p.d_in}, acc);
  }
  if (!groups.empty() && p.r > 0 && (need_x || need_a || need_b || need_w)) {
    const int64_t n_valid = static_cast<int64_t>(order.size());
    const at::Tensor pairs = at::tensor(order, at::kLong);  // sorted pair order
    std::vector<int64_t> row_of(order);
    for (int64_t& v : row_of) v /= p.k;
    const at::Tensor sorted_ids = p.ids.view(-1).index_select(0, pairs);
    // f = scale_i * w_p per sorted pair; the scale alone is what dw needs.
    const at::Tensor scale = p.scales.defined() ? p.scales.index_select(0, sorted_ids) : at::ones({n_valid}, acc);
    const at::Tensor f = p.weights.defined() ? scale * p.weights.view(-1).index_select(0, pairs) : scale;
    const at::Tensor f_col = f.unsqueeze(1);

    const bool need_h = need_b || need_w, need_g = need_x || need_a || need_w;
    at::Tensor xs, dys;
    if (need_h || need_a) {
      xs = at::empty({n_valid, p.d_in}, acc);
      copy_rows(p.x, row_of, xs, false);
    }
    if (need_g || need_b) {
      dys = at::empty({n_valid, p.d_out}, acc);
      copy_rows(dy, row_of, dys, false);
    }
    at::Tensor hs = need_h ? at::empty({n_valid, p.r}, acc) : at::Tensor();
    at::Tensor gs = need_g ? at::empty({n_valid, p.r}, acc) : at::Tensor();
    at::Tensor dxs = need_x ? at::empty({n_valid, p.d_in}, acc) : at::Tensor();

    at::Tensor hfs = need_b ? at::empty({n_valid, p.r}, acc) : at::Tensor();  // f * h
    at::Tensor gfs = (need_x || need_a) ? at::empty({n_valid, p.r}, acc) : at::Tensor();  // f * g
    // Adapter i's factors in acc_t, converted once per group for fp16/bf16 (views for fp32/fp64).
    std::vector<at::Tensor> a_acc(groups.size()), b_acc(groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
      a_acc[g] = p.lora_a.select(0, groups[g].adapter).to(acc.dtype());  // [r, d_in]
      b_acc[g] = p.lora_b.select(0, groups[g].adapter).to(acc.dtype());  // [d_out, r]
    }
    const auto run_items = [](int64_t n_items, const auto& fn) {
      at::parallel_for(0, n_items, 1, [&](int64_t first, int64_t last) {
        const at::AutoDispatchBelowADInplaceOrView worker_no_autograd;  // dispatch state is per thread
        for (int64_t it = first; it < last; ++it) fn(it);
      });
    };

    // Phase 1, per row block of a group (rows disjoint): h, g, their scaled copies and dx.
    std::vector<std::array<int64_t, 3>> row_items;  // (group, begin, n)
    for (size_t g = 0; g < groups.size(); ++g) {
      for (int64_t b = groups[g].begin; b < groups[g].end; b += kRowBlock) {
        row_items.push_back({static_cast<int64_t>(g), b, std::min(kRowBlock, groups[g].end - b)});
      }
    }
    run_items(static_cast<int64_t>(row_items.size()), [&](int64_t it) {
      const auto [g, b, n] = row_items[it];
      const at::Tensor f_blk = f_col.narrow(0, b, n);
      if (need_h) {
        at::Tensor h = hs.narrow(0, b, n);
        at::mm_out(h, xs.narrow(0, b, n), a_acc[g].t());
        if (need_b) {
          at::Tensor hf = hfs.narrow(0, b, n);
          at::mul_out(hf, h, f_blk);
        }
      }
      if (need_g) {
        at::Tensor gr = gs.narrow(0, b, n);
        at::mm_out(gr, dys.narrow(0, b, n), b_acc[g]);
        if (need_x || need_a) {
          at::Tensor gf = gfs.narrow(0, b, n);
          at::mul_out(gf, gr, f_blk);
          if (need_x) {
            at::Tensor dx = dxs.narrow(0, b, n);
            at::mm_out(dx, gf, a_acc[g]);
          }
        }
      }
    });

    // Phase 2, per column block of dA_i / row block of dB_i (outputs disjoint): reductions over the group's rows.
    const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
    std::vector<std::array<int64_t, 4>> col_items;  // (group, which: 0 = dA / 1 = dB, c0, len)
    for (size_t g = 0; g < groups.size(); ++g) {
      const int64_t n = groups[g].end - groups[g].begin;
      const int64_t parts = std::clamp<int64_t>(n * threads / n_valid, 1, threads);
      for (int64_t which = 0; which < 2; ++which) {
        if (which == 0 ? !need_a : !need_b) continue;
        const int64_t cols = which == 0 ? p.d_in : p.d_out;
        const int64_t width = std::max<int64_t>((cols + parts - 1) / parts + kColAlign - 1, 1) / kColAlign * kColAlign;
        for (int64_t c = 0; c < cols; c += width) {
          col_items.push_back({static_cast<int64_t>(g), which, c, std::min(width, cols - c)});
        }
      }
    }
    run_items(static_cast<int64_t>(col_items.size()), [&](int64_t it) {
      const auto [g, which, c, len] = col_items[it];
      const int64_t i = groups[g].adapter, b = groups[g].begin, n = groups[g].end - b;
      if (which == 0) {
        at::Tensor da = ga.select(0, i).narrow(1, c, len);  // [r, len] with row stride d_in
        at::mm_out(da, gfs.narrow(0, b, n).t(), xs.narrow(0, b, n).narrow(1, c, len));
      } else {
        at::Tensor db = gb.select(0, i).narrow(0, c, len);  // [len, r]
        at::mm_out(db, dys.narrow(0, b, n).narrow(1, c, len).t(), hfs.narrow(0, b, n));
      }
    });

    if (need_w) gw.index_copy_(0, pairs, (gs * hs).sum(1) * scale);
    if (need_x) {
      // k = 1: every row is one pair, so a copy; top-k rows sum their slots' contributions.
      if (p.k == 1) {
        copy_rows(dxs, row_of, gx, true);
      } else {
        gx.index_add_(0, at::tensor(row_of, at::kLong), dxs);
      }
    }
  }

  // Not-requested gradients are empty tensors of shape [0] (a schema return cannot be None), one per output:
  // outputs must not alias each other.
  auto none = [&] { return at::empty({0}, x.options()); };
  return {need_x ? gx.to(x.scalar_type()).view(x.sizes()) : none(),
          need_a ? ga.to(lora_a.scalar_type()) : none(),
          need_b ? gb.to(lora_b.scalar_type()) : none(),
          need_w ? gw.to(weights->scalar_type()).view(weights->sizes()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("grouped_lora_backward", &grouped_lora_backward_cpu); }

}  // namespace lora_ops
