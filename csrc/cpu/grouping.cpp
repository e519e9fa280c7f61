#include "grouping.h"

#include <algorithm>

namespace lora_ops::cpu {

void group_pairs(const int64_t* ids, int64_t P, int64_t N, std::vector<int64_t>& order, std::vector<Group>& groups) {
  order.clear();
  for (int64_t p = 0; p < P; ++p) {
    if (ids[p] >= 0 && ids[p] < N) order.push_back(p);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  groups.clear();
  for (int64_t i = 0; i < static_cast<int64_t>(order.size());) {
    int64_t j = i + 1;
    while (j < static_cast<int64_t>(order.size()) && ids[order[j]] == ids[order[i]]) ++j;
    groups.push_back({ids[order[i]], i, j});
    i = j;
  }
}

}  // namespace lora_ops::cpu
