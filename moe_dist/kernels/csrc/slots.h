// Helpers shared by the CPU expert kernels (expert_loop.cpp, expert_mlp.cpp): slots spread
// over the intra-op threads, an adapter's output columns, row offsets of grouped rows.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace moe_dist_kernels {

// Slots grouped into one bin per thread, largest first onto the lightest bin (rows as cost).
inline std::vector<std::vector<int64_t>> bins_by_rows(const std::vector<int64_t>& counts, int64_t nbins) {
  std::vector<int64_t> order(counts.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  std::vector<std::vector<int64_t>> bins(nbins);
  std::vector<int64_t> load(nbins, 0);
  for (int64_t s : order) {
    int64_t b = std::min_element(load.begin(), load.end()) - load.begin();
    bins[b].push_back(s);
    load[b] += counts[s];
  }
  return bins;
}

template <typename F>
void for_each_slot(const std::vector<int64_t>& counts, F&& body) {
  int64_t nbins = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), counts.size()));
  if (nbins == 1) {  // one slot (attention) or one thread: plain loop, each GEMM keeps all threads
    at::NoGradGuard no_grad;
    for (int64_t s = 0; s < static_cast<int64_t>(counts.size()); ++s) body(s);
    return;
  }
  auto bins = bins_by_rows(counts, nbins);
  at::parallel_for(0, nbins, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    for (int64_t b = begin; b < end; ++b)
      for (int64_t s : bins[b]) body(s);
  });
}

// The output columns adapter j adds to (the whole row unless gate and up are adapted apart).
inline at::Tensor adapter_cols(const at::Tensor& rows, int64_t lo, int64_t hi) {
  return hi - lo == rows.size(1) ? rows : rows.narrow(1, lo, hi - lo);
}

inline std::vector<int64_t> starts_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> starts(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) starts[i + 1] = starts[i] + counts[i];
  return starts;
}

}  // namespace moe_dist_kernels
