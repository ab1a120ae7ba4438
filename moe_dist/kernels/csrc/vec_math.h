// Elementwise math the compiler vectorises, for the CPU kernels (packed_attention.cpp,
// expert_mlp.cpp): a scalar std::exp per element cost as much as the GEMMs around it.
//
// (GCC if-converts the clamps into the vector loop only without trapping math, hence the
// attribute; it changes nothing for finite inputs.)
#pragma once
#include <cstdint>
#include <cstring>

namespace moe_dist_kernels {

// exp(x - shift) in place, for x - shift <= 88: Cephes' expf polynomial (~1 ulp). Below e^-87
// it gives ~1e-38, not less.
__attribute__((optimize("no-trapping-math"))) inline void exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j] - shift;
    v = v < -87.f ? -87.f : (v > 88.f ? 88.f : v);
    float fx = v * 1.44269504088896341f;
    fx = (fx + 12582912.f) - 12582912.f;  // round to nearest: v = fx ln2 + r, |r| <= ln2 / 2
    v = v - fx * 0.693359375f + fx * 2.12194440e-4f;
    float y = ((((1.9875691500e-4f * v + 1.3981999507e-3f) * v + 8.3334519073e-3f) * v + 4.1665795894e-2f) * v +
               1.6666665459e-1f) * v + 5.0000001201e-1f;
    y = y * (v * v) + v + 1.f;
    const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;  // 2^fx
    float two_fx;
    std::memcpy(&two_fx, &bits, sizeof(float));
    x[j] = y * two_fx;
  }
}

// The SiLU-gated product of one row: h = silu(g) u over F columns, and sig = sigmoid(g) (which
// the backward reuses). g, u, h, sig: F floats each.
inline void silu_glu_row(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ h,
                         float* __restrict__ sig, int64_t F) {
  for (int64_t c = 0; c < F; ++c) sig[c] = -g[c];
  exp_shifted(sig, F, 0.f);
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    sig[c] = 1.f / (1.f + sig[c]);
    h[c] = g[c] * sig[c] * u[c];
  }
}

// Its gradient for the output gradient gh: dg = gh u sig (1 + g (1 - sig)), du = gh g sig.
inline void silu_glu_row_backward(const float* __restrict__ g, const float* __restrict__ u,
                                  const float* __restrict__ sig, const float* __restrict__ gh, float* __restrict__ dg,
                                  float* __restrict__ du, int64_t F) {
#pragma omp simd
  for (int64_t c = 0; c < F; ++c) {
    const float s = sig[c], gs = gh[c] * s;
    du[c] = gs * g[c];
    dg[c] = gs * u[c] * (1.f + g[c] * (1.f - s));
  }
}

}  // namespace moe_dist_kernels
