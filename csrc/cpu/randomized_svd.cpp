// randomized_svd on CPU: csrc/common/lowrank.cpp's sketch + power iterations with Householder QR as batched ATen
// calls, a batch split over threads by cpu::split_blas (MKL sequential per thread: see merge_lowrank.cpp); the
// test matrices come from a CPU generator seeded with `seed` before the split, so a seed fixes the result.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include "../common/lowrank.h"
#include "blas_split.h"

namespace lora_ops {
namespace {

Svd3 randomized_svd_cpu(const at::Tensor& m, int64_t rank, int64_t oversample, int64_t n_iter, int64_t seed) {
  const auto p = prepare_randomized_svd(m, rank, oversample, n_iter);
  const int64_t L = p.m.size(0);
  auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  const auto omega = at::randn({L, p.m.size(2), p.sketch}, gen, p.m.options());
  auto [u, s, vh] = cpu::split_blas_rows(L, 1, [&](int64_t begin, int64_t end) {
    return randomized_svd_rows(p, omega.slice(0, begin, end), begin, end, [](const at::Tensor& x) {
      return at::linalg_svd(x, /*full_matrices=*/false);
    });
  });
  return finish_randomized_svd(p, u, s, vh);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("randomized_svd", &randomized_svd_cpu); }

}  // namespace lora_ops
