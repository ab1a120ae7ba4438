// CPU RMSNorm, forward and backward each in one pass over the rows (fp32):
//
//   y = w * (x * r),  r = 1 / sqrt(mean(x^2) + eps)
//   dx = r * (g w - x_hat * mean(g w x_hat)),  dw = sum_rows g x_hat,  x_hat = x r
//
// Shape legend: N rows, D features.
//
// Why: transformers' RMSNorm is six elementwise ATen ops forward and about as many backward,
// each a pass over N x D in memory with its own dispatch; a MoE layer has two to four norms,
// and on small hidden sizes they cost more than the attention projections. Saved for backward:
// x (the input, alive anyway) and r (N floats).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x_ND, const at::Tensor& w_D, double eps) {
  const int64_t N = x_ND.size(0), D = x_ND.size(1);
  auto y = at::empty_like(x_ND);
  auto r = at::empty({N}, x_ND.options());
  const float* x = x_ND.data_ptr<float>();
  const float* w = w_D.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = r.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = x + i * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < D; ++j) ss += xi[j] * xi[j];
      const float ri = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      rp[i] = ri;
      float* yi = yp + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) yi[j] = w[j] * (xi[j] * ri);
    }
  });
  return {y, r};
}

// {dx, dw (undefined unless need_w)}.
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& g_ND, const at::Tensor& x_ND, const at::Tensor& w_D,
                                          const at::Tensor& r_N, bool need_w) {
  const int64_t N = x_ND.size(0), D = x_ND.size(1);
  auto dx = at::empty_like(x_ND);
  const float* g = g_ND.data_ptr<float>();
  const float* x = x_ND.data_ptr<float>();
  const float* w = w_D.data_ptr<float>();
  const float* r = r_N.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  // dw: one partial sum per chunk of rows, added in chunk order (the same for any thread count)
  constexpr int64_t kChunk = 64;
  const int64_t chunks = need_w ? (N + kChunk - 1) / kChunk : 0;
  std::vector<float> partial(chunks * D, 0.f);
  at::parallel_for(0, (N + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t i = c * kChunk; i < std::min(N, (c + 1) * kChunk); ++i) {
        const float *gi = g + i * D, *xi = x + i * D;
        const float ri = r[i];
        float dot = 0.f;  // sum_j g w x_hat
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; ++j) dot += gi[j] * w[j] * (xi[j] * ri);
        const float mean = dot / static_cast<float>(D);
        float* dxi = dxp + i * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) dxi[j] = ri * (gi[j] * w[j] - (xi[j] * ri) * mean);
        if (need_w) {
          float* pw = partial.data() + c * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) pw[j] += gi[j] * (xi[j] * ri);
        }
      }
    }
  });
  at::Tensor dw;
  if (need_w) {
    dw = at::zeros({D}, x_ND.options());
    float* dwp = dw.data_ptr<float>();
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < D; ++j) dwp[j] += partial[c * D + j];
  }
  return {dx, dw};
}
