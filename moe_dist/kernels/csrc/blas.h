// Row-major GEMM on raw pointers for the CPU kernels (expert_mlp.cpp, packed_attention.cpp).
//
// At ~100 rows per product an ATen call's fixed cost (dispatch, checks, views, allocation) is a
// fair share of the work, so the kernels call BLAS's sgemm directly: the one torch links (MKL or
// OpenBLAS) exports it as a weak symbol; where it exports none, the product goes through at::mm.
#pragma once
#include <ATen/ATen.h>

namespace moe_dist_kernels {

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n; `ta`/`tb`: the
// operand is stored transposed. BLAS is column-major, so it computes C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
    sgemm_(&opb, &opa, &N, &M, &K, &alpha, B, &LDB, A, &LDA, &beta, C, &LDC);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto a = ta ? at::from_blob(const_cast<float*>(A), {k, m}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<float*>(B), {n, k}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<float*>(B), {k, n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  auto prod = at::mm(a, b);
  if (beta == 0.f) {  // C may hold garbage (scratch): never read it
    c.copy_(prod.mul_(alpha));
  } else {
    c.mul_(beta).add_(prod, alpha);
  }
}

// Whether gemm() calls BLAS directly (false: through at::mm).
inline bool direct_blas() { return sgemm_ != nullptr; }

}  // namespace moe_dist_kernels
