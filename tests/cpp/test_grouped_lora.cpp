// Calls lora_ops::grouped_lora through the dispatcher, as a C++ consumer would, and checks it against a naive loop.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <optional>

using GroupedLora = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool);

static at::Tensor naive(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& ids,
                        const at::Tensor& scales, const at::Tensor& weights) {
  const int64_t T = x.size(0), k = ids.size(1), N = a.size(0);
  at::Tensor y = at::zeros({T, b.size(1)}, x.options().dtype(at::kDouble));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = ids[t][j].item<int64_t>();
      if (id < 0 || id >= N) continue;
      const double f = scales[id].item<double>() * weights[t][j].item<double>();
      y[t] += f * at::mv(b[id].to(at::kDouble), at::mv(a[id].to(at::kDouble), x[t].to(at::kDouble)));
    }
  }
  return y;
}

static int failures = 0;
#define EXPECT(cond, ...)                  \
  do {                                     \
    if (!(cond)) {                         \
      std::printf("FAIL: " __VA_ARGS__);   \
      std::printf("\n");                   \
      ++failures;                          \
    }                                      \
  } while (0)

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lora_ops::grouped_lora", "").typed<GroupedLora>();
  at::manual_seed(0);
  const int64_t T = 45, k = 2, N = 5, r = 7, d_in = 37, d_out = 29;
  at::Tensor x = at::randn({T, d_in});
  at::Tensor a = at::randn({N, r, d_in});
  at::Tensor b = at::randn({N, d_out, r});
  at::Tensor ids = at::randint(-1, N, {T, k}, at::kLong);
  at::Tensor scales = at::rand({N});
  at::Tensor weights = at::rand({T, k});

  at::Tensor y = op.call(x, a, b, ids, scales, weights, true);
  const double err = (y.to(at::kDouble) - naive(x, a, b, ids, scales, weights)).abs().max().item<double>();
  EXPECT(err < 1e-4, "max error %g", err);
  EXPECT(y.sizes() == at::IntArrayRef({T, d_out}), "output shape");

  // Out-of-range ids raise c10::IndexError (Python IndexError) before any work.
  bool raised = false;
  try {
    op.call(x, a, b, at::full({T, k}, N, at::kLong), scales, weights, true);
  } catch (const c10::IndexError& e) {
    raised = std::string(e.what()).find("adapter_ids") != std::string::npos;
  }
  EXPECT(raised, "IndexError naming adapter_ids");

  // Unchecked invalid ids contribute nothing.
  at::Tensor unchecked = op.call(x, a, b, at::full({T, k}, N + 3, at::kLong), scales, weights, false);
  EXPECT(unchecked.abs().max().item<double>() == 0.0, "invalid ids must contribute nothing");

  std::printf("%s\n", failures == 0 ? "1 passed, 0 failed" : "0 passed, 1 failed");
  return failures == 0 ? 0 : 1;
}
