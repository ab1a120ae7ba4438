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
// [ptr_dn[s], ptr_dn[s+1]) of the one list.
//
// At ~100 rows per expert an ATen call's fixed cost (dispatch, checks, views, allocation) is
// a fair share of its work, so the products call BLAS's sgemm directly on row-major pointers
// (the one torch links: MKL or OpenBLAS; through at::mm where it exports none) and the gathers,
// the gate weighting and the scatter-adds are plain loops; only the activation stays in ATen.
// fp32 only (the Python side routes other dtypes to the loop kernel). With one thread, each expert adds into the output
// rows as it finishes; with several, experts run in parallel into slot-major buffers and one
// sequential index_add_ (slot order) follows. Both add a token's slots in the same order, so
// the result does not depend on the thread count.
#include "blas.h"
#include "kernels.h"
#include "slots.h"

using namespace moe_dist_kernels;

namespace {

// A row-major block of floats: element (i, j) at p[i * ld + j].
struct Rows {
  float* p;
  int64_t ld;
  float* row(int64_t i) const { return p + i * ld; }
};

Rows rows_of(const at::Tensor& t, int64_t row0 = 0) { return {t.data_ptr<float>() + row0 * t.stride(0), t.stride(0)}; }

// Expert s's matrix of a contiguous E x O x I weight.
const float* expert_weight(const at::Tensor& w_EOI, int64_t s) { return w_EOI.data_ptr<float>() + s * w_EOI.stride(0); }

struct Adapters {  // the flattened entries of one call
  const std::vector<at::Tensor>& A;
  const std::vector<at::Tensor>& B;
  const std::vector<int64_t>& lo;
  const std::vector<int64_t>& hi;
  const std::vector<double>& scale;
  int64_t rank(int64_t j) const { return A[j].size(0); }
  const float* a(int64_t j) const { return A[j].data_ptr<float>(); }
  const float* b(int64_t j) const { return B[j].data_ptr<float>(); }
};

// y[:, lo:hi] += s (x A^T) B^T for the entries [begin, end) over n rows of in-features I.
void lora_forward(Rows y, Rows x, int64_t n, int64_t I, int64_t begin, int64_t end, const Adapters& ad) {
  std::vector<float> tT;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t r = ad.rank(j), P = ad.hi[j] - ad.lo[j];
    tT.resize(r * n);
    gemm(false, true, r, n, I, static_cast<float>(ad.scale[j]), ad.a(j), I, x.p, x.ld, 0.f, tT.data(), n);  // s A x^T
    gemm(true, true, n, P, r, 1.f, tT.data(), n, ad.b(j), r, 1.f, y.p + ad.lo[j], y.ld);
  }
}

// Mirror of lora_forward for the output gradient g: grad_in += u A (when grad_in.p), grad_A =
// u^T x, grad_B = (t^T g)^T, with u^T = s B^T g^T and t^T = s A x^T recomputed.
void lora_backward(Rows grad_in, Rows g, Rows x, int64_t n, int64_t I, int64_t begin, int64_t end,
                   const Adapters& ad, const std::vector<bool>& need_A, const std::vector<bool>& need_B,
                   std::vector<at::Tensor>& out) {
  const int64_t n_entries = static_cast<int64_t>(ad.A.size());
  std::vector<float> uT, tT;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t r = ad.rank(j), P = ad.hi[j] - ad.lo[j];
    const float s = static_cast<float>(ad.scale[j]);
    const float* gP = g.p + ad.lo[j];
    if (grad_in.p != nullptr || need_A[j]) {
      uT.resize(r * n);
      gemm(true, true, r, n, P, s, ad.b(j), r, gP, g.ld, 0.f, uT.data(), n);
      if (grad_in.p != nullptr) gemm(true, false, n, I, r, 1.f, uT.data(), n, ad.a(j), I, 1.f, grad_in.p, grad_in.ld);
      if (need_A[j]) {
        out[j] = at::empty({r, I}, ad.A[j].options());
        gemm(false, false, r, I, n, 1.f, uT.data(), n, x.p, x.ld, 0.f, out[j].data_ptr<float>(), I);
      }
    }
    if (need_B[j]) {
      tT.resize(r * n);
      gemm(false, true, r, n, I, s, ad.a(j), I, x.p, x.ld, 0.f, tT.data(), n);
      // as (t^T g)^T: r rows, the orientation BLAS runs fastest at small r (see expert_loop.cpp)
      auto gradT_rP = at::empty({r, P}, ad.B[j].options());
      gemm(false, false, r, P, n, 1.f, tT.data(), n, gP, g.ld, 0.f, gradT_rP.data_ptr<float>(), P);
      out[n_entries + j] = gradT_rP.t();
    }
  }
}

// dst row i = src row index[i] (n rows of D floats).
void gather(Rows dst, Rows src, const int64_t* index, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) std::copy_n(src.row(index[i]), D, dst.row(i));
}

// dst row index[i] += w[i] * src row i (w null: 1), in row order.
void scatter_add(Rows dst, Rows src, const int64_t* index, const float* w, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    float* __restrict__ d = dst.row(index[i]);
    const float* __restrict__ v = src.row(i);
    const float wi = w != nullptr ? w[i] : 1.f;
    for (int64_t c = 0; c < D; ++c) d[c] += wi * v[c];
  }
}

// <a, b> over D floats, in 8 interleaved partial sums (so the compiler can vectorize it).
float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= D; c += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[c + l] * b[c + l];
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; c < D; ++c) sum += a[c] * b[c];
  return sum;
}

bool one_at_a_time(const std::vector<int64_t>& counts) {
  return at::get_num_threads() <= 1 || counts.size() <= 1;  // for_each_slot's serial case
}

void check_inputs(const at::Tensor& x_RD, const at::Tensor& row_Q, const at::Tensor& w_Q, const at::Tensor& w_gu,
                  const at::Tensor& w_dn, const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B) {
  for (const at::Tensor* t : {&x_RD, &w_Q, &w_gu, &w_dn})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "expert_mlp: fp32 contiguous inputs only");
  TORCH_CHECK(row_Q.scalar_type() == at::kLong && row_Q.is_contiguous(), "expert_mlp: int64 row index");
  for (const auto* ts : {&A, &B})
    for (const auto& t : *ts)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "expert_mlp: fp32 contiguous adapters only");
}

}  // namespace

// Whether the products call BLAS directly (false: through at::mm, where torch exports no sgemm).
bool mlp_direct_blas() { return direct_blas(); }

// Returns [out_RD, gate_up_Q2F (pre-activation), y_QD (unweighted expert outputs)].
std::vector<at::Tensor> mlp_forward(const at::Tensor& x_RD, const at::Tensor& row_Q, const at::Tensor& w_Q,
                                    const std::vector<int64_t>& counts, const at::Tensor& w_gu_E2FD,
                                    const at::Tensor& w_dn_EDF, const std::vector<int64_t>& ptr_gu,
                                    const std::vector<int64_t>& ptr_dn, const std::vector<at::Tensor>& A,
                                    const std::vector<at::Tensor>& B, const std::vector<int64_t>& lo,
                                    const std::vector<int64_t>& hi, const std::vector<double>& scale) {
  check_inputs(x_RD, row_Q, w_Q, w_gu_E2FD, w_dn_EDF, A, B);
  const int64_t Q = row_Q.size(0), D = x_RD.size(1), F = w_dn_EDF.size(2);
  auto gu_Q2F = at::empty({Q, 2 * F}, x_RD.options());
  auto y_QD = at::empty({Q, D}, x_RD.options());
  auto out_RD = at::zeros({x_RD.size(0), D}, x_RD.options());
  const Adapters ad{A, B, lo, hi, scale};
  const int64_t* row = row_Q.data_ptr<int64_t>();
  const float* w = w_Q.data_ptr<float>();
  const Rows x = rows_of(x_RD), out = rows_of(out_RD);
  auto starts = starts_of(counts);
  const bool serial = one_at_a_time(counts);
  for_each_slot(counts, [&](int64_t s) {
    const int64_t n = counts[s], q0 = starts[s];
    if (n == 0) return;
    auto x_nD = at::empty({n, D}, x_RD.options());
    const Rows xn = rows_of(x_nD), gu = rows_of(gu_Q2F, q0), y = rows_of(y_QD, q0);
    gather(xn, x, row + q0, n, D);
    gemm(false, true, n, 2 * F, D, 1.f, xn.p, D, expert_weight(w_gu_E2FD, s), D, 0.f, gu.p, gu.ld);
    lora_forward(gu, xn, n, D, ptr_gu[s], ptr_gu[s + 1], ad);
    auto gu_n2F = gu_Q2F.narrow(0, q0, n);
    auto h_nF = at::silu(gu_n2F.narrow(1, 0, F)).mul_(gu_n2F.narrow(1, F, F));
    const Rows h = rows_of(h_nF);
    gemm(false, true, n, D, F, 1.f, h.p, F, expert_weight(w_dn_EDF, s), F, 0.f, y.p, y.ld);
    lora_forward(y, h, n, F, ptr_dn[s], ptr_dn[s + 1], ad);
    if (serial) scatter_add(out, y, row + q0, w + q0, n, D);
  });
  if (!serial) scatter_add(out, rows_of(y_QD), row, w, Q, D);
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
  check_inputs(x_RD, row_Q, w_Q, w_gu_E2FD, w_dn_EDF, A, B);
  TORCH_CHECK(g_RD.scalar_type() == at::kFloat && g_RD.is_contiguous(), "expert_mlp: fp32 contiguous gradient");
  const int64_t Q = row_Q.size(0), D = x_RD.size(1), F = w_dn_EDF.size(2);
  std::vector<at::Tensor> grads(2 * A.size());
  at::Tensor grad_x = need_x ? at::zeros_like(x_RD) : at::Tensor();
  at::Tensor grad_w = need_w ? at::empty({Q}, w_Q.options()) : at::Tensor();
  const bool serial = one_at_a_time(counts);
  at::Tensor gx_QD = need_x && !serial ? at::empty({Q, D}, x_RD.options()) : at::Tensor();
  const Adapters ad{A, B, lo, hi, scale};
  const int64_t* row = row_Q.data_ptr<int64_t>();
  const float* w = w_Q.data_ptr<float>();
  const Rows x = rows_of(x_RD), g = rows_of(g_RD);
  float* grad_w_Q = need_w ? grad_w.data_ptr<float>() : nullptr;
  auto starts = starts_of(counts);
  for_each_slot(counts, [&](int64_t s) {
    const int64_t n = counts[s], q0 = starts[s];
    if (n == 0) return;
    auto x_nD = at::empty({n, D}, x_RD.options()), gy_nD = at::empty({n, D}, x_RD.options());
    const Rows xn = rows_of(x_nD), gy = rows_of(gy_nD), y = rows_of(y_QD, q0);
    gather(xn, x, row + q0, n, D);
    for (int64_t i = 0; i < n; ++i) {  // gradient of w * y: w's is <y, g>, y's is w g
      const float* __restrict__ gi = g.row(row[q0 + i]);
      const float* __restrict__ yi = y.row(i);
      float* __restrict__ gyi = gy.row(i);
      const float wi = w[q0 + i];
      for (int64_t c = 0; c < D; ++c) gyi[c] = wi * gi[c];
      if (grad_w_Q != nullptr) grad_w_Q[q0 + i] = dot(yi, gi, D);
    }
    auto gu_n2F = gu_Q2F.narrow(0, q0, n);
    auto gate_nF = gu_n2F.narrow(1, 0, F), up_nF = gu_n2F.narrow(1, F, F);
    auto silu_nF = at::silu(gate_nF);
    auto h_nF = silu_nF * up_nF;
    auto gh_nF = at::empty({n, F}, x_RD.options());
    gemm(false, false, n, F, D, 1.f, gy.p, D, expert_weight(w_dn_EDF, s), F, 0.f, gh_nF.data_ptr<float>(), F);
    lora_backward(rows_of(gh_nF), gy, rows_of(h_nF), n, F, ptr_dn[s], ptr_dn[s + 1], ad, need_A, need_B, grads);
    auto ggu_n2F = at::empty({n, 2 * F}, x_RD.options());
    auto g_gate_nF = ggu_n2F.narrow(1, 0, F), g_up_nF = ggu_n2F.narrow(1, F, F);
    at::mul_out(g_up_nF, gh_nF, silu_nF);
    at::silu_backward_out(g_gate_nF, gh_nF.mul_(up_nF), gate_nF);
    Rows gx{nullptr, D};
    at::Tensor gx_nD;
    if (need_x) {
      gx_nD = serial ? at::empty({n, D}, x_RD.options()) : gx_QD.narrow(0, q0, n);
      gx = rows_of(gx_nD);
      gemm(false, false, n, D, 2 * F, 1.f, ggu_n2F.data_ptr<float>(), 2 * F, expert_weight(w_gu_E2FD, s), D, 0.f,
           gx.p, gx.ld);
    }
    lora_backward(gx, rows_of(ggu_n2F), xn, n, D, ptr_gu[s], ptr_gu[s + 1], ad, need_A, need_B, grads);
    if (need_x && serial) scatter_add(rows_of(grad_x), gx, row + q0, nullptr, n, D);
  });
  if (need_x && !serial) scatter_add(rows_of(grad_x), rows_of(gx_QD), row, nullptr, Q, D);
  std::vector<at::Tensor> out{grad_x, grad_w};
  out.insert(out.end(), grads.begin(), grads.end());
  return out;
}
