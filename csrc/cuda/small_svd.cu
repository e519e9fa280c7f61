// merge_lowrank, randomized_svd and _jacobi_svd on CUDA.
//
// The big products and the tall-skinny Householder QRs are ATen calls on the current stream (cuBLAS, and
// cuSOLVER's geqrf/orgqr for linalg_qr, which enqueue without a host sync). The small dense SVD that
// torch.linalg.svd would do with a host sync per call is the batched one-sided Jacobi of jacobi_svd_kernel.cuh:
// one thread block per matrix, all matrices (e.g. every layer of a model) in one launch. Above kJacobiMaxN
// columns Jacobi's O(n^3) sweeps lose to cuSOLVER, so those cores fall back to at::linalg_svd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/lowrank.h"
#include "../cpu/jacobi_svd.h"
#include "jacobi_svd_kernel.cuh"
#include "launch_utils.h"

namespace lora_ops {
namespace {

constexpr int kThreads = 256;  // 8 warps: up to 8 column pairs of a round at once

// Checked by the callers (check_jacobi_svd_args or small_svd_cuda's size test).
Svd3 jacobi_svd_run(const at::Tensor& x, int64_t max_sweeps) {
  if (x.size(1) < x.size(2)) {  // the kernel wants m >= n: svd(X^T) = V S U^T
    auto [u, s, vh] = jacobi_svd_run(x.transpose(1, 2), max_sweeps);
    return {vh.transpose(1, 2).contiguous(), s, u.transpose(1, 2).contiguous()};
  }
  const int64_t L = x.size(0), m = x.size(1), n = x.size(2);
  const cuda::DeviceGuard guard(x.device());
  auto g = x.transpose(1, 2).clone(at::MemoryFormat::Contiguous);  // a copy: the kernel works in place
  auto v = at::eye(n, x.options()).expand({L, n, n}).contiguous();
  auto u = at::zeros({L, m, n}, x.options());
  auto s = at::zeros({L, n}, x.options());
  auto vh = at::zeros({L, n, n}, x.options());
  if (L == 0 || n == 0) return {u, s, vh};
  TORCH_CHECK(L <= INT32_MAX, "_jacobi_svd: batch too large");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_jacobi_svd", [&] {
    cuda::launch(jacobi::jacobi_svd_block<scalar_t>, dim3(static_cast<unsigned>(L)), dim3(kThreads),
                 n * sizeof(scalar_t), cuda::current_stream(), g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                 static_cast<int>(m), static_cast<int>(n), u.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                 vh.data_ptr<scalar_t>(), static_cast<int>(max_sweeps));
  });
  return {u, s, vh};
}

Svd3 jacobi_svd_cuda(const at::Tensor& x, int64_t max_sweeps) {
  check_jacobi_svd_args(x, max_sweeps);
  return jacobi_svd_run(x, max_sweeps);
}

Svd3 small_svd_cuda(const at::Tensor& x) {
  if (std::min(x.size(1), x.size(2)) <= jacobi::kJacobiMaxN) return jacobi_svd_run(x, jacobi::kMaxSweeps);
  return at::linalg_svd(x, /*full_matrices=*/false);
}

// Checks first (in prepare_*): they name the argument on another device, which a guard could not.
Svd3 merge_lowrank_cuda(const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& weights,
                        int64_t rank) {
  const auto p = prepare_merge_lowrank(lora_a, lora_b, weights, rank);
  const cuda::DeviceGuard guard(lora_a.device());
  auto [a, b, s] = merge_lowrank_rows(p, 0, p.a.size(0), small_svd_cuda);
  return finish_merge_lowrank(p, a, b, s);
}

Svd3 randomized_svd_cuda(const at::Tensor& m, int64_t rank, int64_t oversample, int64_t n_iter, int64_t seed) {
  const auto p = prepare_randomized_svd(m, rank, oversample, n_iter);
  const cuda::DeviceGuard guard(m.device());
  const auto gen = cuda::seeded_generator(m.device(), static_cast<uint64_t>(seed));
  const auto omega = at::randn({p.m.size(0), p.m.size(2), p.sketch}, gen, p.m.options());
  auto [u, s, vh] = randomized_svd_rows(p, omega, 0, p.m.size(0), small_svd_cuda);
  return finish_randomized_svd(p, u, s, vh);
}

}  // namespace

LORA_OPS_CUDA_IMPL(m) {
  m.impl("merge_lowrank", &merge_lowrank_cuda);
  m.impl("randomized_svd", &randomized_svd_cuda);
  m.impl("_jacobi_svd", &jacobi_svd_cuda);
}

}  // namespace lora_ops
