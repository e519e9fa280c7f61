// merge_lowrank and randomized_svd as ATen compositions shared by the CPU and CUDA backends. The backends differ
// only in the small dense SVD they plug in (LAPACK on CPU, batched one-sided Jacobi on CUDA) and in how they split
// the batch; argument checks live here so both raise the same errors, naming the argument.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <tuple>

namespace lora_ops {

using Svd3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// Reduced SVD of a batch [L, m, n] -> U [L, m, k], S [L, k], Vh [L, k, n], k = min(m, n), S descending.
using SmallSvdFn = std::function<Svd3(const at::Tensor&)>;

// A merge_lowrank call flattened to one batch dimension L, in the compute dtype (fp32, or fp64 for fp64 input).
struct MergeLowrankProblem {
  at::Tensor a;  // [L, N, r, d_in]
  at::Tensor b;  // [L, N, d_out, r]
  at::Tensor w;  // [L, N]
  int64_t rank = 0;
  std::vector<int64_t> lead;  // the leading batch shape of the inputs
  at::ScalarType out_dtype;
};

// Validates (ValueError/TypeError naming the argument) and flattens a merge_lowrank call.
MergeLowrankProblem prepare_merge_lowrank(const at::Tensor& lora_a, const at::Tensor& lora_b,
                                          const at::Tensor& weights, int64_t rank);

// Number of singular values merge_lowrank returns: min(d_out, d_in, N * r).
int64_t merge_lowrank_num_singular(int64_t n, int64_t r, int64_t d_in, int64_t d_out);

// The exact truncated SVD of sum_i w_i B_i A_i for rows [begin, end) of the flattened batch:
// (a [L', rank, d_in], b [L', d_out, rank], s [L', k]) in the compute dtype.
Svd3 merge_lowrank_rows(const MergeLowrankProblem& p, int64_t begin, int64_t end, const SmallSvdFn& svd);

// Reshapes the flattened results back to the caller's leading shape and dtype.
Svd3 finish_merge_lowrank(const MergeLowrankProblem& p, at::Tensor a, at::Tensor b, at::Tensor s);

// A randomized_svd call flattened to [L, M, N] in the compute dtype.
struct RandomizedSvdProblem {
  at::Tensor m;  // [L, M, N]
  int64_t rank = 0, sketch = 0, n_iter = 0;  // sketch = min(rank + oversample, M, N)
  std::vector<int64_t> lead;
  at::ScalarType out_dtype;
};

RandomizedSvdProblem prepare_randomized_svd(const at::Tensor& m, int64_t rank, int64_t oversample, int64_t n_iter);

// Halko-Martinsson-Tropp on rows [begin, end): Householder QR (at::linalg_qr) after every product with m or m^T.
// omega: the Gaussian test matrices [L', N, sketch] of these rows. Returns U [L', M, rank], S [L', rank],
// Vh [L', rank, N] in the compute dtype.
Svd3 randomized_svd_rows(const RandomizedSvdProblem& p, const at::Tensor& omega, int64_t begin, int64_t end,
                         const SmallSvdFn& svd);

Svd3 finish_randomized_svd(const RandomizedSvdProblem& p, at::Tensor u, at::Tensor s, at::Tensor vh);

}  // namespace lora_ops
