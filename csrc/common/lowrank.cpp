#include "lowrank.h"

#include <c10/util/Exception.h>

#include <vector>

#include "sign_convention.h"

namespace lora_ops {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor pad_last(const at::Tensor& t, int64_t size) {
  const int64_t have = t.size(-1);
  if (have == size) return t;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = size - have;
  return at::cat({t, at::zeros(shape, t.options())}, -1);
}

}  // namespace

int64_t merge_lowrank_num_singular(int64_t n, int64_t r, int64_t d_in, int64_t d_out) {
  return std::min(std::min(d_in, d_out), n * r);
}

MergeLowrankProblem prepare_merge_lowrank(const at::Tensor& lora_a, const at::Tensor& lora_b,
                                          const at::Tensor& weights, int64_t rank) {
  TORCH_CHECK_TYPE(is_supported_float(lora_a.scalar_type()),
                   "merge_lowrank: lora_a must be float32, float16, bfloat16 or float64, got ", lora_a.scalar_type());
  TORCH_CHECK_TYPE(lora_b.scalar_type() == lora_a.scalar_type(), "merge_lowrank: lora_b has dtype ",
                   lora_b.scalar_type(), " but lora_a has ", lora_a.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()),
                   "merge_lowrank: weights must be a floating-point tensor, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(lora_a.dim() >= 3, "merge_lowrank: lora_a must have shape [..., N, r, d_in], got ",
                    lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == lora_a.dim(), "merge_lowrank: lora_b must have shape [..., N, d_out, r] with ",
                    "lora_a's leading dims, got lora_b ", lora_b.sizes(), " and lora_a ", lora_a.sizes());
  const int64_t nd = lora_a.dim();
  const int64_t n = lora_a.size(nd - 3), r = lora_a.size(nd - 2), d_in = lora_a.size(nd - 1);
  const int64_t d_out = lora_b.size(nd - 2);
  TORCH_CHECK_VALUE(lora_b.size(nd - 3) == n && lora_b.size(nd - 1) == r &&
                        lora_b.sizes().slice(0, nd - 3) == lora_a.sizes().slice(0, nd - 3),
                    "merge_lowrank: lora_b must have shape [..., N, d_out, r] matching lora_a ", lora_a.sizes(),
                    " (N = ", n, ", r = ", r, "), got ", lora_b.sizes());
  TORCH_CHECK_VALUE(weights.dim() >= 1 && weights.size(-1) == n,
                    "merge_lowrank: weights must have shape [N] or [..., N] with N = ", n, ", got ", weights.sizes());
  TORCH_CHECK_VALUE(rank >= 1, "merge_lowrank: rank must be >= 1, got ", rank);
  TORCH_CHECK_VALUE(lora_b.device() == lora_a.device(), "merge_lowrank: lora_b is on ", lora_b.device(),
                    " but lora_a is on ", lora_a.device());
  TORCH_CHECK_VALUE(weights.device() == lora_a.device(), "merge_lowrank: weights is on ", weights.device(),
                    " but lora_a is on ", lora_a.device());

  MergeLowrankProblem p;
  p.lead.assign(lora_a.sizes().begin(), lora_a.sizes().begin() + (nd - 3));
  std::vector<int64_t> w_shape = p.lead;
  w_shape.push_back(n);
  TORCH_CHECK_VALUE(weights.dim() <= static_cast<int64_t>(w_shape.size()),
                    "merge_lowrank: weights must have shape [N] or [..., N] broadcastable to ", w_shape, ", got ",
                    weights.sizes());
  for (int64_t i = 1; i <= weights.dim(); ++i) {
    const int64_t have = weights.size(-i), want = w_shape[w_shape.size() - i];
    TORCH_CHECK_VALUE(have == want || have == 1, "merge_lowrank: weights must have shape [N] or [..., N] ",
                      "broadcastable to ", w_shape, ", got ", weights.sizes());
  }
  int64_t L = 1;
  for (int64_t s : p.lead) L *= s;
  const auto dt = compute_dtype(lora_a.scalar_type());
  p.a = lora_a.to(dt).reshape({L, n, r, d_in});
  p.b = lora_b.to(dt).reshape({L, n, d_out, r});
  p.w = weights.to(dt).expand(w_shape).reshape({L, n});
  p.rank = rank;
  p.out_dtype = lora_a.scalar_type();
  return p;
}

Svd3 merge_lowrank_rows(const MergeLowrankProblem& p, int64_t begin, int64_t end, const SmallSvdFn& svd) {
  const int64_t L = end - begin, n = p.a.size(1), r = p.a.size(2), d_in = p.a.size(3), d_out = p.b.size(2);
  const int64_t k = merge_lowrank_num_singular(n, r, d_in, d_out);
  const auto opts = p.a.options();
  if (L == 0 || k == 0) {
    return {at::zeros({L, p.rank, d_in}, opts), at::zeros({L, d_out, p.rank}, opts), at::zeros({L, k}, opts)};
  }
  // sum_i w_i B_i A_i = Bs As with Bs = [w_1 B_1 ... w_N B_N] (d_out x Nr) and As = [A_1; ...; A_N] (Nr x d_in).
  const auto a = p.a.slice(0, begin, end), b = p.b.slice(0, begin, end), w = p.w.slice(0, begin, end);
  const auto bs = (b * w.unsqueeze(-1).unsqueeze(-1)).permute({0, 2, 1, 3}).reshape({L, d_out, n * r});
  const auto as_t = a.reshape({L, n * r, d_in}).transpose(1, 2);
  // Householder QR of both tall-skinny factors (stable for identical or collinear adapters, unlike Cholesky QR).
  // geqrf keeps Q as reflectors: only R is needed for the core, and Q is applied once, to the rank-t result
  // (ormqr, O(d r t)), instead of being formed (orgqr, O(d r^2)).
  const int64_t kb = std::min(d_out, n * r), ka = std::min(d_in, n * r);
  auto [pb, tau_b] = at::geqrf(bs);    // R_b in the upper triangle of pb's first kb rows
  auto [pa, tau_a] = at::geqrf(as_t);  // R_a likewise (running the two side by side measured slower: BLAS inside
                                       // geqrf already uses the threads)
  const auto rb = pb.narrow(1, 0, kb).triu();  // [L, kb, Nr]
  const auto ra = pa.narrow(1, 0, ka).triu();  // [L, ka, Nr]
  const auto core = at::matmul(rb, ra.transpose(1, 2));  // [L, kb, ka]: Bs As = Q_b core Q_a^T
  auto [u, s, vh] = svd(core);                            // u [L, kb, k], s [L, k], vh [L, k, ka]
  const int64_t t = std::min(p.rank, k);
  // sqrt(S) into each factor keeps A and B on the same scale (what training would produce).
  const auto root = s.narrow(1, 0, t).sqrt();
  auto rows_to = [](const at::Tensor& x, int64_t rows) {  // [L, h, t] -> [L, rows, t], zero rows appended
    return rows == x.size(1) ? x.contiguous() : at::cat({x, at::zeros({x.size(0), rows - x.size(1), x.size(2)},
                                                                       x.options())}, 1);
  };
  auto b_out = at::ormqr(pb, tau_b, rows_to(u.narrow(2, 0, t) * root.unsqueeze(1), d_out));  // Q_b U_t sqrt(S)
  auto a_out = at::ormqr(pa, tau_a, rows_to((vh.narrow(1, 0, t) * root.unsqueeze(2)).transpose(1, 2), d_in))
                   .transpose(1, 2);  // (Q_a V_t sqrt(S))^T: [L, t, d_in]
  if (t < p.rank) {  // the exact merge, padded with zero components
    b_out = pad_last(b_out, p.rank);
    a_out = pad_last(a_out.transpose(1, 2), p.rank).transpose(1, 2);
  }
  const auto sign = pivot_sign(b_out.transpose(1, 2));  // [L, rank, 1]: b's columns pivot-positive on every backend
  return {a_out * sign, b_out * sign.transpose(1, 2), pad_last(s, k)};
}

Svd3 finish_merge_lowrank(const MergeLowrankProblem& p, at::Tensor a, at::Tensor b, at::Tensor s) {
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> v = p.lead;
    v.insert(v.end(), tail);
    return v;
  };
  return {a.reshape(shape({a.size(1), a.size(2)})).to(p.out_dtype).contiguous(),
          b.reshape(shape({b.size(1), b.size(2)})).to(p.out_dtype).contiguous(),
          s.reshape(shape({s.size(1)})).to(p.out_dtype).contiguous()};
}

RandomizedSvdProblem prepare_randomized_svd(const at::Tensor& m, int64_t rank, int64_t oversample, int64_t n_iter) {
  TORCH_CHECK_TYPE(is_supported_float(m.scalar_type()),
                   "randomized_svd: m must be float32, float16, bfloat16 or float64, got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() >= 2, "randomized_svd: m must have shape [..., M, N], got ", m.sizes());
  const int64_t rows = m.size(-2), cols = m.size(-1);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(rows, cols), "randomized_svd: rank must be in [1, min(M, N)] = [1, ",
                    std::min(rows, cols), "] for m of shape ", m.sizes(), ", got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0, "randomized_svd: oversample must be >= 0, got ", oversample);
  TORCH_CHECK_VALUE(n_iter >= 0, "randomized_svd: n_iter must be >= 0, got ", n_iter);
  RandomizedSvdProblem p;
  p.lead.assign(m.sizes().begin(), m.sizes().end() - 2);
  int64_t L = 1;
  for (int64_t s : p.lead) L *= s;
  p.m = m.to(compute_dtype(m.scalar_type())).reshape({L, rows, cols});
  p.rank = rank;
  p.sketch = std::min(rank + oversample, std::min(rows, cols));
  p.n_iter = n_iter;
  p.out_dtype = m.scalar_type();
  return p;
}

Svd3 randomized_svd_rows(const RandomizedSvdProblem& p, const at::Tensor& omega, int64_t begin, int64_t end,
                         const SmallSvdFn& svd) {
  const auto m = p.m.slice(0, begin, end);
  const auto mt = m.transpose(1, 2);
  auto orth = [](const at::Tensor& y) { return std::get<0>(at::linalg_qr(y, "reduced")); };
  auto q = orth(at::matmul(m, omega));  // [L', M, l]
  for (int64_t it = 0; it < p.n_iter; ++it) {
    // Re-orthonormalising after both products keeps the small singular directions from being lost to rounding.
    q = orth(at::matmul(mt, q));  // [L', N, l]
    q = orth(at::matmul(m, q));   // [L', M, l]
  }
  const auto small = at::matmul(q.transpose(1, 2), m);  // [L', l, N], wide
  // SVD of the wide l x N matrix through the QR of its transpose: small^T = Q2 R2, so small = R2^T Q2^T and
  // svd(R2^T) = U S W gives Vh = W Q2^T. The dense SVD then only sees l x l (cheaper than LAPACK's
  // gesdd on the l x N matrix, and on CUDA it keeps the Jacobi kernel's matrices small).
  auto [q2, r2] = at::linalg_qr(small.transpose(1, 2), "reduced");  // q2 [L', N, l], r2 [L', l, l]
  auto [u, s, w] = svd(r2.transpose(1, 2));
  const auto vh = at::matmul(w.narrow(1, 0, p.rank), q2.transpose(1, 2));  // [L', rank, N]
  return {at::matmul(q, u.narrow(2, 0, p.rank)), s.narrow(1, 0, p.rank), vh};
}

Svd3 finish_randomized_svd(const RandomizedSvdProblem& p, at::Tensor u, at::Tensor s, at::Tensor vh) {
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> v = p.lead;
    v.insert(v.end(), tail);
    return v;
  };
  return {u.reshape(shape({u.size(1), u.size(2)})).to(p.out_dtype).contiguous(),
          s.reshape(shape({s.size(1)})).to(p.out_dtype).contiguous(),
          vh.reshape(shape({vh.size(1), vh.size(2)})).to(p.out_dtype).contiguous()};
}

}  // namespace lora_ops
