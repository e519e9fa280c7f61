// lora_ops::_jacobi_svd on CPU: a test-only op exposing the Jacobi SVD the CUDA backend uses for small matrices.
#include "jacobi_svd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace lora_ops {

namespace {

Svd3 jacobi_svd_run(const at::Tensor& x, int64_t max_sweeps) {
  if (x.size(1) < x.size(2)) {  // the kernel wants m >= n: svd(X^T) = V S U^T
    auto [u, s, vh] = jacobi_svd_run(x.transpose(1, 2), max_sweeps);
    return {vh.transpose(1, 2).contiguous(), s, u.transpose(1, 2).contiguous()};
  }
  const int64_t L = x.size(0), m = x.size(1), n = x.size(2);
  auto g = x.transpose(1, 2).clone(at::MemoryFormat::Contiguous);  // a copy (the kernel works in place); column j of matrix b at g[b, j, :]
  auto v = at::eye(n, x.options()).expand({L, n, n}).contiguous();
  auto u = at::zeros({L, m, n}, x.options());
  auto s = at::zeros({L, n}, x.options());
  auto vh = at::zeros({L, n, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_jacobi_svd", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* vhp = vh.data_ptr<scalar_t>();
    // The serial Jacobi kernel only (no ATen/LAPACK call in the region; the LAPACK fallback of jacobi_svd_cpu
    // runs outside it).
    at::parallel_for(0, L, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> sigma(n);
      for (int64_t b = b0; b < b1; ++b) {
        jacobi::jacobi_svd_serial<scalar_t>(gp + b * m * n, vp + b * n * n, static_cast<int>(m),
                                            static_cast<int>(n), sigma.data(), up + b * m * n, sp + b * n,
                                            vhp + b * n * n, static_cast<int>(max_sweeps));
      }
    });
  });
  return {u, s, vh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_op(const at::Tensor& m, int64_t max_sweeps) {
  check_jacobi_svd_args(m, max_sweeps);
  return jacobi_svd_run(m, max_sweeps);
}

}  // namespace

Svd3 jacobi_svd_cpu(const at::Tensor& x) {
  if (std::min(x.size(1), x.size(2)) > jacobi::kJacobiMaxN) return at::linalg_svd(x, /*full_matrices=*/false);
  return jacobi_svd_run(x, jacobi::kMaxSweeps);
}

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("_jacobi_svd", &jacobi_svd_op); }

}  // namespace lora_ops
