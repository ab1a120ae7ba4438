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
#include "kernels.h"
#include "slots.h"

using namespace moe_dist_kernels;

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
