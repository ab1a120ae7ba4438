// CPU fused expert MLP: dispatch gather, gate_up + LoRA, SiLU-GLU, down + LoRA, gate weight and
// combine scatter-add, one local expert at a time, for rows gathered by index.
//
//   out[row[q]] += w[q] * y_q,  y_q = down(silu(g_q) * u_q),  [g_q | u_q] = gate_up(x[row[q]])
//
// Shape legend: R source rows (tokens, or rows received from other ranks), D hidden, F expert
// intermediate, Q computed slots (expert-major: slot s owns [start_s, start_s + n_s)), n rows
// of one expert, r adapter rank.
//
// Why: the unfused path (expert_loop.cpp between the dispatcher's gather and combine) streams
// every Q x D and Q x F intermediate through memory several times: the gathered copy of x,
// the activation and its product, the weighted outputs, and their mirrors in backward. Here an
// expert's n rows are gathered into an n x D block that stays in cache through both GEMMs, the
// activation and the weighted scatter-add. Saved for backward: the gate_up pre-activation
// (Q x 2F) and the unweighted outputs y (Q x D, for the gate weights' gradient); the gathered
// inputs, the activation and the adapters' rank-r products are recomputed (cheap next to the
// base GEMMs they sit between).
//
// Adapters as in expert_loop.cpp: flattened entries (A r x I, B O x r, output columns lo:hi,
// scale); slot s owns gate_up entries [ptr_gu[s], ptr_gu[s+1]) and down entries
// [ptr_dn[s], ptr_dn[s+1]) of the one list. With one thread, each expert adds into the output
// rows as it finishes; with several, experts run in parallel into slot-major buffers and one
// sequential index_add_ (slot order) follows. Both add a token's slots in the same order, so
// the result does not depend on the thread count.
#include "slots.h"

using namespace moe_dist_kernels;

namespace {

// y[:, lo:hi] += s (x A^T) B^T for the entries [begin, end), computed as t^T = s A x^T.
void lora_forward(at::Tensor& y, const at::Tensor& x, int64_t begin, int64_t end, const std::vector<at::Tensor>& A,
                  const std::vector<at::Tensor>& B, const std::vector<int64_t>& lo, const std::vector<int64_t>& hi,
                  const std::vector<double>& scale, const at::Tensor& zero) {
  for (int64_t j = begin; j < end; ++j) {
    auto tT_rn = at::addmm(zero, A[j], x.t(), /*beta=*/0, /*alpha=*/scale[j]);
    adapter_cols(y, lo[j], hi[j]).addmm_(tT_rn.t(), B[j].t());
  }
}

// Mirror of lora_forward for output gradient g: grad_in += u A (if defined), grad_A = u^T x,
// grad_B = (t^T g)^T, with u^T = s B^T g^T and t^T = s A x^T recomputed.
void lora_backward(at::Tensor& grad_in, const at::Tensor& g, const at::Tensor& x, int64_t begin, int64_t end,
                   const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                   const std::vector<int64_t>& lo, const std::vector<int64_t>& hi, const std::vector<double>& scale,
                   const std::vector<bool>& need_A, const std::vector<bool>& need_B, std::vector<at::Tensor>& out,
                   const at::Tensor& zero) {
  const int64_t n_entries = static_cast<int64_t>(A.size());
  for (int64_t j = begin; j < end; ++j) {
    auto g_nP = adapter_cols(g, lo[j], hi[j]);
    auto uT_rn = at::addmm(zero, B[j].t(), g_nP.t(), /*beta=*/0, /*alpha=*/scale[j]);
    if (grad_in.defined()) grad_in.addmm_(uT_rn.t(), A[j]);
    if (need_A[j]) out[j] = at::mm(uT_rn, x);
    if (need_B[j]) {
      auto tT_rn = at::addmm(zero, A[j], x.t(), /*beta=*/0, /*alpha=*/scale[j]);
      out[n_entries + j] = at::mm(tT_rn, g_nP).t();
    }
  }
}

bool one_at_a_time(const std::vector<int64_t>& counts) {
  return at::get_num_threads() <= 1 || counts.size() <= 1;  // for_each_slot's serial case
}

}  // namespace

// Returns [out_RD, gate_up_Q2F (pre-activation), y_QD (unweighted expert outputs)].
std::vector<at::Tensor> mlp_forward(const at::Tensor& x_RD, const at::Tensor& row_Q, const at::Tensor& w_Q,
                                    const std::vector<int64_t>& counts, const at::Tensor& w_gu_E2FD,
                                    const at::Tensor& w_dn_EDF, const std::vector<int64_t>& ptr_gu,
                                    const std::vector<int64_t>& ptr_dn, const std::vector<at::Tensor>& A,
                                    const std::vector<at::Tensor>& B, const std::vector<int64_t>& lo,
                                    const std::vector<int64_t>& hi, const std::vector<double>& scale) {
  const int64_t Q = row_Q.size(0), D = x_RD.size(1), F = w_dn_EDF.size(2);
  auto gu_Q2F = at::empty({Q, 2 * F}, x_RD.options());
  auto y_QD = at::empty({Q, D}, x_RD.options());
  auto out_RD = at::zeros({x_RD.size(0), D}, x_RD.options());
  auto starts = starts_of(counts);
  auto zero = at::zeros({}, x_RD.options());
  const bool serial = one_at_a_time(counts);
  for_each_slot(counts, [&](int64_t s) {
    const int64_t n = counts[s];
    if (n == 0) return;
    auto row_n = row_Q.narrow(0, starts[s], n);
    auto x_nD = x_RD.index_select(0, row_n);
    auto gu_n2F = gu_Q2F.narrow(0, starts[s], n);
    at::mm_out(gu_n2F, x_nD, w_gu_E2FD[s].t());
    lora_forward(gu_n2F, x_nD, ptr_gu[s], ptr_gu[s + 1], A, B, lo, hi, scale, zero);
    auto h_nF = at::silu(gu_n2F.narrow(1, 0, F)).mul_(gu_n2F.narrow(1, F, F));
    auto y_nD = y_QD.narrow(0, starts[s], n);
    at::mm_out(y_nD, h_nF, w_dn_EDF[s].t());
    lora_forward(y_nD, h_nF, ptr_dn[s], ptr_dn[s + 1], A, B, lo, hi, scale, zero);
    if (serial) out_RD.index_add_(0, row_n, y_nD * w_Q.narrow(0, starts[s], n).unsqueeze(1));
  });
  if (!serial) out_RD.index_add_(0, row_Q, y_QD * w_Q.unsqueeze(1));
  return {out_RD, gu_Q2F, y_QD};
}

// Returns [grad_x (undefined unless need_x), grad_w (undefined unless need_w), grad_A_0..,
// grad_B_0..] (undefined where not needed or where the slot had no rows).
std::vector<at::Tensor> mlp_backward(const at::Tensor& g_RD, const at::Tensor& x_RD, const at::Tensor& row_Q,
                                     const at::Tensor& w_Q, const at::Tensor& gu_Q2F, const at::Tensor& y_QD,
                                     const std::vector<int64_t>& counts, const at::Tensor& w_gu_E2FD,
                                     const at::Tensor& w_dn_EDF, const std::vector<int64_t>& ptr_gu,
                                     const std::vector<int64_t>& ptr_dn, const std::vector<at::Tensor>& A,
                                     const std::vector<at::Tensor>& B, const std::vector<int64_t>& lo,
                                     const std::vector<int64_t>& hi, const std::vector<double>& scale, bool need_x,
                                     bool need_w, const std::vector<bool>& need_A, const std::vector<bool>& need_B) {
  const int64_t Q = row_Q.size(0), D = x_RD.size(1), F = w_dn_EDF.size(2);
  std::vector<at::Tensor> grads(2 * A.size());
  at::Tensor grad_x = need_x ? at::zeros_like(x_RD) : at::Tensor();
  at::Tensor grad_w = need_w ? at::empty({Q}, w_Q.options()) : at::Tensor();
  const bool serial = one_at_a_time(counts);
  at::Tensor gx_QD = need_x && !serial ? at::empty({Q, D}, x_RD.options()) : at::Tensor();
  auto starts = starts_of(counts);
  auto zero = at::zeros({}, x_RD.options());
  for_each_slot(counts, [&](int64_t s) {
    const int64_t n = counts[s];
    if (n == 0) return;
    auto row_n = row_Q.narrow(0, starts[s], n);
    auto x_nD = x_RD.index_select(0, row_n);
    auto g_nD = g_RD.index_select(0, row_n);  // gradient of w * y, then of y (in place)
    if (need_w) {
      auto grad_w_n = grad_w.narrow(0, starts[s], n);
      at::sum_out(grad_w_n, y_QD.narrow(0, starts[s], n) * g_nD, {1});
    }
    g_nD.mul_(w_Q.narrow(0, starts[s], n).unsqueeze(1));
    auto gu_n2F = gu_Q2F.narrow(0, starts[s], n);
    auto gate_nF = gu_n2F.narrow(1, 0, F), up_nF = gu_n2F.narrow(1, F, F);
    auto silu_nF = at::silu(gate_nF);
    auto h_nF = silu_nF * up_nF;
    auto gh_nF = at::mm(g_nD, w_dn_EDF[s]);
    lora_backward(gh_nF, g_nD, h_nF, ptr_dn[s], ptr_dn[s + 1], A, B, lo, hi, scale, need_A, need_B, grads, zero);
    auto ggu_n2F = at::empty({n, 2 * F}, x_RD.options());
    auto g_gate_nF = ggu_n2F.narrow(1, 0, F), g_up_nF = ggu_n2F.narrow(1, F, F);
    at::mul_out(g_up_nF, gh_nF, silu_nF);
    at::silu_backward_out(g_gate_nF, gh_nF.mul_(up_nF), gate_nF);
    at::Tensor gx_nD;
    if (need_x) {
      gx_nD = serial ? at::empty({n, D}, x_RD.options()) : gx_QD.narrow(0, starts[s], n);
      at::mm_out(gx_nD, ggu_n2F, w_gu_E2FD[s]);
    }
    lora_backward(gx_nD, ggu_n2F, x_nD, ptr_gu[s], ptr_gu[s + 1], A, B, lo, hi, scale, need_A, need_B, grads, zero);
    if (need_x && serial) grad_x.index_add_(0, row_n, gx_nD);
  });
  if (need_x && !serial) grad_x.index_add_(0, row_Q, gx_QD);
  std::vector<at::Tensor> out{grad_x, grad_w};
  out.insert(out.end(), grads.begin(), grads.end());
  return out;
}
