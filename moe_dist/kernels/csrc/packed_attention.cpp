// CPU causal attention over packed documents: each row of the batch holds several documents
// back to back (position ids restart at each), and a token attends only to the earlier tokens
// of its own document.
//
//   o_i = sum_{j <= i, doc(j) = doc(i)} softmax_j(scale q_i . k_j) v_j
//
// Shape legend: B batch rows, H query heads, G query heads per key/value head (GQA), S tokens
// per row, Dq query/key head dim, Dv value head dim, n tokens of one document, m query rows of
// one block.
//
// Why: transformers' sdpa path gives these documents as a dense B x 1 x S x S mask, and the CPU
// flash kernel computes every S x S score and masks most of them away: with ~50-token documents
// in 128-token rows, ~85% of its work is discarded. Here each document is its own causal
// attention, so the work is sum(n^2 / 2) per row instead of S^2, and no mask is built.
//
// Documents start where a position id is not the previous one plus one (transformers'
// find_packed_sequence_indices). Queries go in blocks of at most kBlock rows, each against the
// keys up to its last row, so scratch stays kBlock x n whatever the document length. Forward
// saves the softmax's log-sum-exp per query row; backward recomputes the probabilities from it.
// Work is spread over (batch row, key/value head) units: a unit owns its key/value gradients,
// so the G query heads that share them accumulate without a race.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "blas.h"
#include "kernels.h"

using namespace moe_dist_kernels;

namespace {

constexpr int64_t kBlock = 128;  // query rows per block

struct Doc {
  int64_t start, end;
};

// Each batch row's documents, from position ids [B or 1, S] (int64, contiguous).
std::vector<std::vector<Doc>> documents(const at::Tensor& pos, int64_t B, int64_t S) {
  const int64_t* p = pos.data_ptr<int64_t>();
  std::vector<std::vector<Doc>> docs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* r = p + (pos.size(0) == 1 ? 0 : b) * S;
    int64_t s0 = 0;
    for (int64_t s = 1; s < S; ++s) {
      if (r[s] != r[s - 1] + 1) {
        docs[b].push_back({s0, s});
        s0 = s;
      }
    }
    docs[b].push_back({s0, S});
  }
  return docs;
}

// A 4-d tensor's element (i0, i1, i2, 0) pointer, and its row stride (dim 2).
struct View4 {
  float* p;
  int64_t s0, s1, s2;
  float* at(int64_t i0, int64_t i1, int64_t i2) const { return p + i0 * s0 + i1 * s1 + i2 * s2; }
};

View4 view(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

// exp(x - shift) in place, for x <= shift (scores less their row's max or log-sum-exp):
// Cephes' expf polynomial (~1 ulp), written so the compiler vectorises it (a scalar std::exp
// per score cost as much as the GEMMs around it). Below e^-87 it gives ~1e-38, not less.
// (GCC if-converts the clamp into the vector loop only without trapping math.)
__attribute__((optimize("no-trapping-math"))) void exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j] - shift;
    v = v < -87.f ? -87.f : v;
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

// Rows [i0, i0 + m) of a document against keys [0, i0 + m): scores (scaled) into P (m x kv,
// row-major), turned into causal probabilities in place. lse: the rows' log-sum-exp, written
// (forward) or read (backward). (Without trapping math, as exp_shifted: the row max vectorises.)
__attribute__((optimize("no-trapping-math"))) void probabilities(const float* Q, int64_t ldq, const float* K,
                                                                 int64_t ldk, int64_t Dq, float scale, int64_t i0,
                                                                 int64_t m, float* P, float* lse, bool have_lse) {
  const int64_t kv = i0 + m;
  gemm(false, true, m, kv, Dq, scale, Q + i0 * ldq, ldq, K, ldk, 0.f, P, kv);
  for (int64_t r = 0; r < m; ++r) {
    float* row = P + r * kv;
    const int64_t valid = i0 + r + 1;  // keys 0 .. i0 + r
    std::fill(row + valid, row + kv, 0.f);
    if (have_lse) {
      exp_shifted(row, valid, lse[i0 + r]);
      continue;
    }
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < valid; ++j) mx = row[j] > mx ? row[j] : mx;
    exp_shifted(row, valid, mx);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < valid; ++j) sum += row[j];
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
    lse[i0 + r] = mx + std::log(sum);
  }
}

}  // namespace

// q [B, H, S, Dq], k [B, H/G, S, Dq], v [B, H/G, S, Dv] (any strides with unit last stride),
// position ids [B or 1, S]. Returns {o [B, S, H, Dv] contiguous (the layout transformers'
// attention functions return), lse [B, H, S]}.
std::vector<at::Tensor> packed_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& position_ids, double scale) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), Dq = q.size(3), KV = k.size(1), Dv = v.size(3);
  const int64_t G = H / KV;
  auto o = at::empty({B, S, H, Dv}, q.options());
  auto lse = at::empty({B, H, S}, q.options());
  const auto docs = documents(position_ids, B, S);
  const View4 Qv = view(q), Kv = view(k), Vv = view(v);
  float* O = o.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const int64_t ldo = H * Dv;
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / KV, kvh = unit % KV;
      for (const Doc& d : docs[b]) {
        const int64_t n = d.end - d.start;
        P.resize(std::min(n, kBlock) * n);
        const float* K = Kv.at(b, kvh, d.start);
        const float* V = Vv.at(b, kvh, d.start);
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          const float* Q = Qv.at(b, h, d.start);
          float* Od = O + (b * S + d.start) * ldo + h * Dv;
          float* Ld = L + (b * H + h) * S + d.start;
          for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
            const int64_t m = std::min(kBlock, n - i0), kv = i0 + m;
            probabilities(Q, Qv.s2, K, Kv.s2, Dq, static_cast<float>(scale), i0, m, P.data(), Ld, false);
            gemm(false, false, m, Dv, kv, 1.f, P.data(), kv, V, Vv.s2, 0.f, Od + i0 * ldo, ldo);
          }
        }
      }
    }
  });
  return {o, lse};
}

// Gradients of q, k, v (contiguous, shaped as q, k, v) from the output's gradient g_o
// [B, S, H, Dv] (contiguous), the output o and the saved lse.
std::vector<at::Tensor> packed_attention_backward(const at::Tensor& g_o, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                                  const at::Tensor& position_ids, double scale) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), Dq = q.size(3), KV = k.size(1), Dv = v.size(3);
  const int64_t G = H / KV;
  auto dq = at::empty({B, H, S, Dq}, q.options());
  auto dk = at::zeros({B, KV, S, Dq}, q.options());
  auto dv = at::zeros({B, KV, S, Dv}, q.options());
  const auto docs = documents(position_ids, B, S);
  const View4 Qv = view(q), Kv = view(k), Vv = view(v), dQv = view(dq), dKv = view(dk), dVv = view(dv);
  const float* GO = g_o.data_ptr<float>();
  const float* O = o.data_ptr<float>();
  const float* L = lse.data_ptr<float>();
  const int64_t ldo = H * Dv;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P, dP, Di;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / KV, kvh = unit % KV;
      for (const Doc& d : docs[b]) {
        const int64_t n = d.end - d.start;
        P.resize(std::min(n, kBlock) * n);
        dP.resize(P.size());
        Di.resize(n);
        const float* K = Kv.at(b, kvh, d.start);
        const float* V = Vv.at(b, kvh, d.start);
        float* dK = dKv.at(b, kvh, d.start);
        float* dV = dVv.at(b, kvh, d.start);
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          const float* Q = Qv.at(b, h, d.start);
          float* dQ = dQv.at(b, h, d.start);
          const float* GOd = GO + (b * S + d.start) * ldo + h * Dv;
          const float* Od = O + (b * S + d.start) * ldo + h * Dv;
          float* Ld = const_cast<float*>(L) + (b * H + h) * S + d.start;  // read only (have_lse)
          for (int64_t i = 0; i < n; ++i) {  // D_i = dO_i . O_i: the softmax's backward row term
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < Dv; ++c) acc += GOd[i * ldo + c] * Od[i * ldo + c];
            Di[i] = acc;
          }
          for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
            const int64_t m = std::min(kBlock, n - i0), kv = i0 + m;
            probabilities(Q, Qv.s2, K, Kv.s2, Dq, sc, i0, m, P.data(), Ld, true);
            // dV[0:kv] += P^T dO;  dP = dO V^T;  dS = P (dP - D);  dQ = s dS K;  dK[0:kv] += s dS^T Q
            gemm(true, false, kv, Dv, m, 1.f, P.data(), kv, GOd + i0 * ldo, ldo, 1.f, dV, dVv.s2);
            gemm(false, true, m, kv, Dv, 1.f, GOd + i0 * ldo, ldo, V, Vv.s2, 0.f, dP.data(), kv);
            for (int64_t r = 0; r < m; ++r) {
              float* p = P.data() + r * kv;
              const float* dp = dP.data() + r * kv;
              const float di = Di[i0 + r];
#pragma omp simd
              for (int64_t j = 0; j <= i0 + r; ++j) p[j] *= dp[j] - di;  // masked entries stay 0
            }
            gemm(false, false, m, Dq, kv, sc, P.data(), kv, K, Kv.s2, 0.f, dQ + i0 * dQv.s2, dQv.s2);
            gemm(true, false, kv, Dq, m, sc, P.data(), kv, Q + i0 * Qv.s2, Qv.s2, 1.f, dK, dKv.s2);
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}
