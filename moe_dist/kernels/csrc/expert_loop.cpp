// CPU expert kernel: per local expert, the base GEMM with its LoRA adapters added in place,
// experts spread over the intra-op threads (one MKL thread per expert GEMM).
//
// Why: at ~128 rows per expert, a base GEMM gains little from a second thread and the rank-R
// products not at all, so running different experts on different cores beats running every
// small GEMM on all cores. Math and layout are those of moe_dist/moe/expert_loop.py (the
// Python loop, kept as the fallback and the reference): t^T = s A x^T, y[:, lo:hi] += t B^T;
// backward u^T = s B^T g^T, grad_x += u A, grad_A = u^T x, grad_B = (t^T g)^T.
//
// Adapters are flattened into entries; slot s owns entries [entry_ptr[s], entry_ptr[s+1]).
// Each slot's rows, outputs and adapter gradients are disjoint, so threads never share a write.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

// Slots grouped into one bin per thread, largest first onto the lightest bin (rows as cost).
std::vector<std::vector<int64_t>> bins_by_rows(const std::vector<int64_t>& counts, int64_t nbins) {
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
at::Tensor adapter_cols(const at::Tensor& rows, int64_t lo, int64_t hi) {
  return hi - lo == rows.size(1) ? rows : rows.narrow(1, lo, hi - lo);
}

std::vector<int64_t> starts_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> starts(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) starts[i + 1] = starts[i] + counts[i];
  return starts;
}

}  // namespace

// Returns [y_MO, tT_0, tT_1, ...] (one scaled t^T per entry).
std::vector<at::Tensor> loop_forward(const at::Tensor& x_MI, const at::Tensor& w_EOI,
                                     const std::vector<int64_t>& counts, const std::vector<int64_t>& entry_ptr,
                                     const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                                     const std::vector<int64_t>& lo, const std::vector<int64_t>& hi,
                                     const std::vector<double>& scale) {
  const int64_t O = w_EOI.size(1);
  auto y_MO = at::empty({x_MI.size(0), O}, x_MI.options());
  std::vector<at::Tensor> out(1 + A.size());
  out[0] = y_MO;
  auto starts = starts_of(counts);
  auto zero = at::zeros({}, x_MI.options());
  for_each_slot(counts, [&](int64_t s) {
    auto x_nI = x_MI.narrow(0, starts[s], counts[s]);
    auto y_nO = y_MO.narrow(0, starts[s], counts[s]);
    at::mm_out(y_nO, x_nI, w_EOI[s].t());
    for (int64_t j = entry_ptr[s]; j < entry_ptr[s + 1]; ++j) {
      auto tT_Rn = at::addmm(zero, A[j], x_nI.t(), /*beta=*/0, /*alpha=*/scale[j]);
      adapter_cols(y_nO, lo[j], hi[j]).addmm_(tT_Rn.t(), B[j].t());
      out[1 + j] = tT_Rn;
    }
  });
  return out;
}

// Returns [grad_x (undefined unless need_x), grad_A_0.., grad_B_0..] (undefined where not needed).
std::vector<at::Tensor> loop_backward(const at::Tensor& x_MI, const at::Tensor& w_EOI, const at::Tensor& g_MO,
                                      const std::vector<int64_t>& counts, const std::vector<int64_t>& entry_ptr,
                                      const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                                      const std::vector<at::Tensor>& tT, const std::vector<int64_t>& lo,
                                      const std::vector<int64_t>& hi, const std::vector<double>& scale,
                                      bool need_x, const std::vector<bool>& need_A, const std::vector<bool>& need_B) {
  const int64_t n_entries = static_cast<int64_t>(A.size());
  std::vector<at::Tensor> out(1 + 2 * n_entries);
  at::Tensor grad_x = need_x ? at::empty_like(x_MI) : at::Tensor();
  out[0] = grad_x;
  auto starts = starts_of(counts);
  auto zero = at::zeros({}, g_MO.options());
  for_each_slot(counts, [&](int64_t s) {
    auto x_nI = x_MI.narrow(0, starts[s], counts[s]);
    auto g_nO = g_MO.narrow(0, starts[s], counts[s]);
    at::Tensor gx_nI;
    if (need_x) {
      gx_nI = grad_x.narrow(0, starts[s], counts[s]);
      at::mm_out(gx_nI, g_nO, w_EOI[s]);
    }
    for (int64_t j = entry_ptr[s]; j < entry_ptr[s + 1]; ++j) {
      auto g_nP = adapter_cols(g_nO, lo[j], hi[j]);
      auto uT_Rn = at::addmm(zero, B[j].t(), g_nP.t(), /*beta=*/0, /*alpha=*/scale[j]);
      if (need_x) gx_nI.addmm_(uT_Rn.t(), A[j]);
      if (need_A[j]) out[1 + j] = at::mm(uT_Rn, x_nI);
      if (need_B[j]) out[1 + n_entries + j] = at::mm(tT[j], g_nP).t();
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("loop_forward", &loop_forward, "expert loop forward (CPU)");
  m.def("loop_backward", &loop_backward, "expert loop backward (CPU)");
}
