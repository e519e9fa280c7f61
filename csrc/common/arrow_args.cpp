#include "arrow_args.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "sign_convention.h"

namespace lora_ops {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

}  // namespace

ArrowRouteProblem prepare_arrow_route(const at::Tensor& x, const at::Tensor& prototypes, int64_t top_k,
                                      double temperature) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "arrow_route: x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(prototypes.scalar_type()),
                   "arrow_route: prototypes must be float32, float16, bfloat16 or float64, got ",
                   prototypes.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "arrow_route: x must have shape [..., d], got a 0-d tensor");
  TORCH_CHECK_VALUE(prototypes.dim() == 2 && prototypes.size(1) == x.size(-1),
                    "arrow_route: prototypes must have shape [N, d] with d = ", x.size(-1),
                    " (x.shape[-1]), got ", prototypes.sizes());
  TORCH_CHECK_VALUE(prototypes.device() == x.device(), "arrow_route: prototypes is on ", prototypes.device(),
                    " but x is on ", x.device());
  ArrowRouteProblem p;
  p.N = prototypes.size(0);
  p.d = x.size(-1);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= p.N, "arrow_route: top_k must be in [1, N] = [1, ", p.N,
                    "] (N = prototypes.shape[0]), got ", top_k);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "arrow_route: temperature must be a finite "
                    "number > 0, got ", temperature);
  p.k = top_k;
  p.temperature = temperature;
  p.acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  p.T = c10::multiply_integers(lead);
  p.x = x.reshape({p.T, p.d}).to(p.acc).contiguous();
  p.prototypes = prototypes.to(p.acc).contiguous();
  p.out_shape = lead.vec();
  p.out_shape.push_back(p.k);
  return p;
}

at::Tensor arrow_prototypes_impl(const at::Tensor& lora_a, const at::Tensor& lora_b) {
  TORCH_CHECK_TYPE(is_supported_float(lora_a.scalar_type()),
                   "arrow_prototypes: lora_a must be float32, float16, bfloat16 or float64, got ",
                   lora_a.scalar_type());
  TORCH_CHECK_TYPE(lora_b.scalar_type() == lora_a.scalar_type(), "arrow_prototypes: lora_b has dtype ",
                   lora_b.scalar_type(), " but lora_a has ", lora_a.scalar_type());
  TORCH_CHECK_VALUE(lora_a.dim() >= 3, "arrow_prototypes: lora_a must have shape [..., N, r, d_in], got ",
                    lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == lora_a.dim(), "arrow_prototypes: lora_b must have shape [..., N, d_out, r] "
                    "with the leading dims of lora_a ", lora_a.sizes(), ", got ", lora_b.sizes());
  const int64_t nd = lora_a.dim();
  const int64_t r = lora_a.size(nd - 2), d_in = lora_a.size(nd - 1);
  TORCH_CHECK_VALUE(lora_b.sizes().slice(0, nd - 2) == lora_a.sizes().slice(0, nd - 2) &&
                        lora_b.size(nd - 1) == r,
                    "arrow_prototypes: lora_b must have shape [..., N, d_out, r] = ", lora_a.sizes().slice(0, nd - 2),
                    " + [d_out, ", r, "] to match lora_a ", lora_a.sizes(), ", got ", lora_b.sizes());
  TORCH_CHECK_VALUE(lora_b.device() == lora_a.device(), "arrow_prototypes: lora_b is on ", lora_b.device(),
                    " but lora_a is on ", lora_a.device());
  TORCH_CHECK_VALUE(r >= 1 && d_in >= 1 && lora_b.size(nd - 2) >= 1,
                    "arrow_prototypes: rank, d_in and d_out must be >= 1 (a prototype of an empty adapter is "
                    "undefined), got lora_a ", lora_a.sizes(), " and lora_b ", lora_b.sizes());
  auto out_shape = lora_a.sizes().slice(0, nd - 2).vec();
  out_shape.push_back(d_in);
  if (lora_a.numel() == 0) return at::empty(out_shape, lora_a.options());

  const auto acc = lora_a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = lora_a.to(acc), b = lora_b.to(acc);
  // B A = (Q_b R_b)(Q_a R_a)^T = Q_b (R_b R_a^T) Q_a^T with orthonormal Q_a, Q_b, so the right singular vectors
  // of B A are Q_a times those of the small core R_b R_a^T: exact, and O((d_in + d_out) r^2) per adapter.
  // Householder QR (geqrf), not Cholesky QR: identical or collinear adapters are a real case.
  auto [q_a, r_a] = at::linalg_qr(a.transpose(-1, -2), "reduced");  // [..., d_in, m], [..., m, r]
  const at::Tensor r_b = std::get<1>(at::linalg_qr(b, "r"));        // [..., min(d_out, r), r]
  const at::Tensor core = at::matmul(r_b, r_a.transpose(-1, -2));   // [..., min(d_out, r), m]
  const at::Tensor vh = std::get<2>(at::linalg_svd(core, /*full_matrices=*/false));
  const at::Tensor v1 = vh.select(-2, 0);                          // [..., m], sorted by singular value
  at::Tensor proto = at::matmul(q_a, v1.unsqueeze(-1)).squeeze(-1);  // [..., d_in], unit norm
  proto = proto * pivot_sign(proto);  // the sign both backends agree on
  return proto.to(lora_a.scalar_type()).reshape(out_shape);
}

}  // namespace lora_ops
