// The CPU kernels' entry points, defined in expert_loop.cpp, expert_mlp.cpp, packed_attention.cpp,
// rms_norm.cpp and host_sync.cpp, bound in bindings.cpp (each definition file includes this, so the compiler checks the
// signatures).
#pragma once
#include <ATen/ATen.h>

#include <vector>

std::vector<at::Tensor> loop_forward(const at::Tensor& x_MI, const at::Tensor& w_EOI,
                                     const std::vector<int64_t>& counts, const std::vector<int64_t>& entry_ptr,
                                     const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                                     const std::vector<int64_t>& lo, const std::vector<int64_t>& hi,
                                     const std::vector<double>& scale);
std::vector<at::Tensor> loop_backward(const at::Tensor& x_MI, const at::Tensor& w_EOI, const at::Tensor& g_MO,
                                      const std::vector<int64_t>& counts, const std::vector<int64_t>& entry_ptr,
                                      const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B,
                                      const std::vector<at::Tensor>& tT, const std::vector<int64_t>& lo,
                                      const std::vector<int64_t>& hi, const std::vector<double>& scale,
                                      bool need_x, const std::vector<bool>& need_A, const std::vector<bool>& need_B);
bool mlp_direct_blas();
std::vector<at::Tensor> mlp_forward(const at::Tensor& x_RD, const at::Tensor& row_Q, const at::Tensor& w_Q,
                                    const std::vector<int64_t>& counts, const at::Tensor& w_gu_E2FD,
                                    const at::Tensor& w_dn_EDF, const std::vector<int64_t>& ptr_gu,
                                    const std::vector<int64_t>& ptr_dn, const std::vector<at::Tensor>& A,
                                    const std::vector<at::Tensor>& B, const std::vector<int64_t>& lo,
                                    const std::vector<int64_t>& hi, const std::vector<double>& scale);
std::vector<at::Tensor> mlp_backward(const at::Tensor& g_RD, const at::Tensor& x_RD, const at::Tensor& row_Q,
                                     const at::Tensor& w_Q, const at::Tensor& gu_Q2F, const at::Tensor& y_QD,
                                     const std::vector<int64_t>& counts, const at::Tensor& w_gu_E2FD,
                                     const at::Tensor& w_dn_EDF, const std::vector<int64_t>& ptr_gu,
                                     const std::vector<int64_t>& ptr_dn, const std::vector<at::Tensor>& A,
                                     const std::vector<at::Tensor>& B, const std::vector<int64_t>& lo,
                                     const std::vector<int64_t>& hi, const std::vector<double>& scale, bool need_x,
                                     bool need_w, const std::vector<bool>& need_A, const std::vector<bool>& need_B);
std::vector<at::Tensor> packed_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& position_ids, double scale);
std::vector<at::Tensor> packed_attention_backward(const at::Tensor& g_o, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                                  const at::Tensor& position_ids, double scale);
void flag_store(const at::Tensor& flags, int64_t index, int64_t value);
int64_t flags_wait(const at::Tensor& flags, int64_t first, int64_t stride, int64_t count, int64_t skip, int64_t value,
                   double timeout_s);
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x_ND, const at::Tensor& w_D, double eps);
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& g_ND, const at::Tensor& x_ND, const at::Tensor& w_D,
                                          const at::Tensor& r_N, bool need_w);
