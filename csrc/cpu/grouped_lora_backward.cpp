// grouped_lora_backward on CPU.
//
// With h = A_i x_t, g = B_iᵀ dy_t and f = scale_i * w_tj for each valid (row t, slot j) pair using adapter i:
//   dx_t  = Σ_j f A_iᵀ g      dA_i = Σ_pairs f g x_tᵀ      dB_i = Σ_pairs f dy_t hᵀ      dw_tj = scale_i <g, h>
// Pairs are grouped by adapter exactly as in the forward (cpu::group_pairs). A group whose rows are one run of
// consecutive rows (a training sequence, k = 1) is used in place: views of x, dy and dx. Any other group gathers
// its x / dy rows into contiguous blocks (fp32 for half inputs) and scatters its dx rows back (added for top-k).
// Either way every product is one GEMM through ATen that reads A_i / B_i once: five GEMMs per group, no per-row
// copy of A or B. Groups run side by side through cpu::run_groups when k = 1 (MKL set sequential in each
// thread: its threaded path inside at::parallel_for spins forever), else one after another, BLAS-threaded.
// Every group writes disjoint memory (its rows of the sorted h / g buffers, dA_i, dB_i, its dx rows).
// Equal sequences with one valid adapter each (cpu::equal_sequences, fp32 / fp64) take batched GEMMs over the
// sequences instead, like the forward (sequences_backward).
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

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using cpu::copy_rows;

// The backward of the forward's batched-sequence path (cpu::equal_sequences, same-dtype inputs): the products as
// batched GEMMs over the G sequences, each with its adapter's A and B gathered; dA / dB of sequences that share an
// adapter are summed into it. Undefined gradient tensors are not requested.
void sequences_backward(const GroupedLoraProblem& p, const at::Tensor& dy, int64_t L, at::Tensor& gx, at::Tensor& ga,
                        at::Tensor& gb, at::Tensor& gw) {
  const int64_t G = p.T / L;
  const cpu::SequenceOperands o = cpu::sequence_operands(p, L);
  const at::Tensor &seq = o.ids, &a = o.a, &b = o.b, &f = o.f;
  const at::Tensor xs = p.x.view({G, L, p.d_in}), dys = dy.reshape({G, L, p.d_out});
  const at::Tensor h = gb.defined() || gw.defined() ? at::bmm(xs, a.transpose(1, 2)) : at::Tensor();  // [G, L, r]
  const at::Tensor g = gx.defined() || ga.defined() || gw.defined() ? at::bmm(dys, b) : at::Tensor();  // [G, L, r]
  // dB as [r, L] x [L, d_out] per sequence, the faster shape here (see the group path below), then transposed
  if (gb.defined()) gb.index_add_(0, seq, at::bmm((h * f).transpose(1, 2), dys).transpose(1, 2));
  if (gx.defined() || ga.defined()) {
    const at::Tensor gf = g * f;
    if (gx.defined()) {
      at::Tensor dx = gx.view({G, L, p.d_in});  // every row is written
      at::bmm_out(dx, gf, a);
    }
    if (ga.defined()) ga.index_add_(0, seq, at::bmm(gf.transpose(1, 2), xs));
  }
  if (gw.defined()) gw.copy_(((g * h).sum(2) * o.scale.view({G, 1})).view(-1));
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

  const int64_t seq_len = x.dtype() == acc.dtype() && p.r > 0 ? cpu::equal_sequences(p) : 0;
  std::vector<int64_t> order;
  std::vector<cpu::Group> groups;
  if (seq_len == 0) group_pairs(p.ids.const_data_ptr<int64_t>(), p.T * p.k, p.N, order, groups);
  if (need_x) {
    // k = 1 with every id valid (the usual training batch; equal sequences always are): every row is written
    // below, no zero fill.
    const bool every_row_written =
        seq_len > 0 || (p.k == 1 && static_cast<int64_t>(order.size()) == p.T && p.r > 0);
    gx = every_row_written ? at::empty({p.T, p.d_in}, acc) : at::zeros({p.T, p.d_in}, acc);
  }
  if (seq_len > 0) {
    sequences_backward(p, dy, seq_len, gx, ga, gb, gw);
  } else if (!groups.empty() && p.r > 0 && (need_x || need_a || need_b || need_w)) {
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
    const bool need_xs = need_h || need_a, need_dys = need_g || need_b;
    const bool same_dtype = x.dtype() == acc.dtype();
    at::Tensor hs = need_h ? at::empty({n_valid, p.r}, acc) : at::Tensor();
    at::Tensor gs = need_g ? at::empty({n_valid, p.r}, acc) : at::Tensor();
    at::Tensor hfs = need_b ? at::empty({n_valid, p.r}, acc) : at::Tensor();  // f * h
    at::Tensor gfs = (need_x || need_a) ? at::empty({n_valid, p.r}, acc) : at::Tensor();  // f * g
    // Each group's five products are whole-group BLAS GEMMs. Outputs are disjoint per group when k = 1, so groups
    // run side by side (largest first, sequential BLAS each, cpu::run_groups); top-k groups share dx rows and
    // run one at a time, BLAS threading each GEMM.
    auto run_group = [&](const cpu::Group& grp) {
      const int64_t i = grp.adapter, b = grp.begin, n = grp.end - b;
      const std::vector<int64_t> rows(row_of.begin() + b, row_of.begin() + grp.end);
      // A run of consecutive rows (a training sequence, k = 1) is used in place: views of x, dy and dx. Any other
      // group gathers its x / dy rows (fp32 for half inputs) and scatters its dx rows back.
      bool run = p.k == 1 && same_dtype;
      for (int64_t j = 1; j < n && run; ++j) run = rows[j] == rows[0] + j;
      at::Tensor xs_g, dys_g;
      if (need_xs) {
        xs_g = run ? p.x.narrow(0, rows[0], n) : at::empty({n, p.d_in}, acc);
        if (!run) copy_rows(p.x, rows, xs_g, false);
      }
      if (need_dys) {
        dys_g = run ? dy.narrow(0, rows[0], n) : at::empty({n, p.d_out}, acc);
        if (!run) copy_rows(dy, rows, dys_g, false);
      }
      const at::Tensor a_i = p.lora_a.select(0, i).to(acc.dtype());  // [r, d_in], a view for fp32/fp64
      const at::Tensor b_i = p.lora_b.select(0, i).to(acc.dtype());  // [d_out, r]
      const at::Tensor f_blk = f_col.narrow(0, b, n);
      if (need_h) {
        at::Tensor h = hs.narrow(0, b, n);
        at::mm_out(h, xs_g, a_i.t());
        if (need_b) {
          at::Tensor hf = hfs.narrow(0, b, n);
          at::mul_out(hf, h, f_blk);
          // dB_i = DYᵀ (f h), computed transposed ([r, n] x [n, d_out], the shape BLAS runs ~2x faster here
          // than [d_out, n] x [n, r]) and copied into place.
          gb.select(0, i).copy_(at::mm(hf.t(), dys_g).t());
        }
      }
      if (need_g) {
        at::Tensor gr = gs.narrow(0, b, n);
        at::mm_out(gr, dys_g, b_i);
        if (need_x || need_a) {
          at::Tensor gf = gfs.narrow(0, b, n);
          at::mul_out(gf, gr, f_blk);
          if (need_x) {
            if (run) {
              at::Tensor dx = gx.narrow(0, rows[0], n);  // k = 1: only this group writes these rows
              at::mm_out(dx, gf, a_i);
            } else if (p.k == 1) {
              copy_rows(at::mm(gf, a_i), rows, gx, true);
            } else {
              cpu::add_rows(at::mm(gf, a_i), rows, gx);  // top-k rows sum their slots' contributions
            }
          }
          if (need_a) {
            at::Tensor da = ga.select(0, i);
            at::mm_out(da, gf.t(), xs_g);
          }
        }
      }
    };
    cpu::run_groups(groups, p.k == 1, run_group);

    if (need_w) gw.index_copy_(0, pairs, (gs * hs).sum(1) * scale);
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
