// The CPU kernels' Python bindings (one extension: expert_loop.cpp, expert_mlp.cpp, packed_attention.cpp,
// rms_norm.cpp, host_sync.cpp).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("loop_forward", &loop_forward, "expert loop forward (CPU)");
  m.def("loop_backward", &loop_backward, "expert loop backward (CPU)");
  m.def("mlp_forward", &mlp_forward, "fused expert MLP forward: gather, gate_up, SiLU-GLU, down, weighted scatter-add (CPU)");
  m.def("mlp_direct_blas", &mlp_direct_blas, "whether the fused expert MLP calls BLAS's sgemm directly");
  m.def("mlp_backward", &mlp_backward, "fused expert MLP backward (CPU)");
  m.def("packed_attention_forward", &packed_attention_forward, "causal attention over packed documents (CPU)");
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm forward (CPU)");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm backward (CPU)");
  m.def("flag_store", &flag_store, "release-store of one int64 flag in shared memory");
  m.def("flags_wait", &flags_wait, "acquire-wait for peers' int64 flags in shared memory (GIL released)",
        py::call_guard<py::gil_scoped_release>());
  m.def("packed_attention_backward", &packed_attention_backward, "packed-document attention backward (CPU)");
}
