// arrow_route on CPU: logits = x @ prototypes^T by at::mm (BLAS; the d-long dot products are the only O(T N d)
// work), then one fused pass per row: |logit|, top-k by partial sort in the shared candidate order
// (common/arrow_select.h), softmax over the k chosen. Rows are split over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../common/arrow_args.h"
#include "../common/arrow_select.h"

namespace lora_ops {
namespace {

template <typename acc_t>
void select_and_softmax(const ArrowRouteProblem& p, const at::Tensor& logits, at::Tensor& ids, at::Tensor& weights) {
  const int64_t N = p.N, k = p.k;
  const acc_t inv_temp = static_cast<acc_t>(1.0 / p.temperature);
  acc_t* lg = logits.mutable_data_ptr<acc_t>();
  int64_t* out_ids = ids.mutable_data_ptr<int64_t>();
  acc_t* out_w = weights.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  // Plain loops only in the region (no ATen/BLAS call): the logits GEMM ran before it, on the calling thread.
  at::parallel_for(0, p.T, grain, [&](int64_t first, int64_t last) {
    std::vector<int64_t> order(N);  // one buffer per work item, never per row
    for (int64_t t = first; t < last; ++t) {
      acc_t* row = lg + t * N;
      for (int64_t i = 0; i < N; ++i) row[i] = std::abs(row[i]);
      std::iota(order.begin(), order.end(), int64_t{0});
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t a, int64_t b) {
        return arrow::ranks_before(row[a], a, row[b], b);
      });
      // The first chosen logit is the largest: subtracting it keeps exp() in range.
      const acc_t top = row[order[0]];
      acc_t sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        const acc_t e = std::exp((row[order[j]] - top) * inv_temp);
        out_w[t * k + j] = e;
        out_ids[t * k + j] = order[j];
        sum += e;
      }
      for (int64_t j = 0; j < k; ++j) out_w[t * k + j] /= sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> arrow_route_cpu(const at::Tensor& x, const at::Tensor& prototypes,
                                                   int64_t top_k, double temperature) {
  const ArrowRouteProblem p = prepare_arrow_route(x, prototypes, top_k, temperature);
  at::Tensor ids = at::empty({p.T, p.k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({p.T, p.k}, x.options().dtype(p.acc));
  if (p.T > 0) {
    at::Tensor logits = at::mm(p.x, p.prototypes.t());  // [T, N], fresh and contiguous: reused in place
    if (p.acc == at::kDouble) {
      select_and_softmax<double>(p, logits, ids, weights);
    } else {
      select_and_softmax<float>(p, logits, ids, weights);
    }
  }
  return {ids.view(p.out_shape), weights.view(p.out_shape)};
}

}  // namespace
}  // namespace lora_ops

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("arrow_route", &lora_ops::arrow_route_cpu); }
