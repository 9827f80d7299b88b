// Host twin of the top-k selection: one bounded heap per query row, rows in parallel.
#include <algorithm>
#include <utility>
#include <vector>

#include "host_kernels.h"
#include "topk_order.h"

namespace fi {

template <typename T>
void topk_merge_host(const T* S, int64_t Q, int64_t n, int64_t lds, int64_t index_offset,
                     const T* prev_values, const int64_t* prev_indices, int64_t kp,
                     int64_t k_out, T* values, int64_t* indices, int num_threads) {
  using Entry = std::pair<T, int64_t>;
  // Heap order: the entry that comes last in the top-k sits on top, ready to be evicted.
  const auto before = [](const Entry& a, const Entry& b) {
    return topk_before(a.first, a.second, b.first, b.second);
  };
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t q = 0; q < Q; ++q) {
    std::vector<Entry> heap;
    heap.reserve(static_cast<size_t>(k_out));
    const auto offer = [&](T v, int64_t i) {
      if (static_cast<int64_t>(heap.size()) < k_out) {
        heap.emplace_back(v, i);
        std::push_heap(heap.begin(), heap.end(), before);
      } else if (topk_before(v, i, heap.front().first, heap.front().second)) {
        std::pop_heap(heap.begin(), heap.end(), before);
        heap.back() = Entry(v, i);
        std::push_heap(heap.begin(), heap.end(), before);
      }
    };
    for (int64_t c = 0; c < kp; ++c) offer(prev_values[q * kp + c], prev_indices[q * kp + c]);
    const T* row = S + q * lds;
    for (int64_t c = 0; c < n; ++c) offer(row[c], index_offset + c);
    std::sort_heap(heap.begin(), heap.end(), before);
    for (int64_t c = 0; c < k_out; ++c) {
      values[q * k_out + c] = heap[c].first;
      indices[q * k_out + c] = heap[c].second;
    }
  }
}

template void topk_merge_host<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                     const float*, const int64_t*, int64_t, int64_t, float*,
                                     int64_t*, int);
template void topk_merge_host<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                      const double*, const int64_t*, int64_t, int64_t, double*,
                                      int64_t*, int);

}  // namespace fi
