// The CPU expert kernels' Python bindings (one extension: expert_loop.cpp, expert_mlp.cpp).
#include <torch/extension.h>

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("loop_forward", &loop_forward, "expert loop forward (CPU)");
  m.def("loop_backward", &loop_backward, "expert loop backward (CPU)");
  m.def("mlp_forward", &mlp_forward, "fused expert MLP forward: gather, gate_up, SiLU-GLU, down, weighted scatter-add (CPU)");
  m.def("mlp_direct_blas", &mlp_direct_blas, "whether the fused expert MLP calls BLAS's sgemm directly");
  m.def("mlp_backward", &mlp_backward, "fused expert MLP backward (CPU)");
}
