// A register-blocked GEMM for the few-row products of small batches.
//
// MKL spends a fixed cost per call (it packs the whole of W each time): on
// this machine a [4, 128] x [128, 512] step GEMM takes 25 us against 67 us for
// 32 rows, so a ragged batch's late steps (a few sequences left) and small
// batches cost far more than their share of tokens. This kernel streams W once
// per group of four rows straight from cache, with the 4 x 16 block of C in
// registers, and writes C once. Plain C++ that the compiler vectorises (omp
// simd). Measured against MKL's sgemm_ (benchmarks/NOTES.md): 2.3-2.6x faster
// for 2 to 4 rows, 1.1-1.8x for 8, even at 16-32, slower for 1 row (MKL's
// GEMV), so it is used for float steps of kSmallGemmMinRows..kSmallGemmMaxRows rows.
#pragma once

#include <cstdint>

namespace fusedrnn {

constexpr int64_t kSmallGemmMinRows = 2;
constexpr int64_t kSmallGemmMaxRows = 8;

// Rows [0, MR) of C[:, n0:n0+NB] = A[:, :K] B[:K, n0:n0+NB] (+ bias) (+ C).
template <int MR, int NB>
inline void small_gemm_block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, const float* bias,
                             bool accumulate, float* C, int64_t ldc, int64_t n0) {
  float acc[MR][NB];
  for (int m = 0; m < MR; ++m) {
#pragma omp simd
    for (int j = 0; j < NB; ++j) {
      acc[m][j] = accumulate ? C[m * ldc + n0 + j] : (bias != nullptr ? bias[n0 + j] : 0.0f);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb + n0;
    for (int m = 0; m < MR; ++m) {
      const float a = A[m * lda + k];
#pragma omp simd
      for (int j = 0; j < NB; ++j) acc[m][j] += a * b[j];
    }
  }
  for (int m = 0; m < MR; ++m) {
#pragma omp simd
    for (int j = 0; j < NB; ++j) C[m * ldc + n0 + j] = acc[m][j];
  }
}

// The columns of MR rows: blocks of 16, then one column at a time.
template <int MR>
inline void small_gemm_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                            const float* bias, bool accumulate, float* C, int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + 16 <= N; n0 += 16) small_gemm_block<MR, 16>(K, A, lda, B, ldb, bias, accumulate, C, ldc, n0);
  for (; n0 < N; ++n0) small_gemm_block<MR, 1>(K, A, lda, B, ldb, bias, accumulate, C, ldc, n0);
}

// Row-major C[M, N] = A[M, K] B[K, N] (+ bias over rows) (+ C when accumulate).
inline void small_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                       const float* bias, bool accumulate, float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) small_gemm_rows<4>(N, K, A + m * lda, lda, B, ldb, bias, accumulate, C + m * ldc, ldc);
  switch (M - m) {
    case 3: small_gemm_rows<3>(N, K, A + m * lda, lda, B, ldb, bias, accumulate, C + m * ldc, ldc); break;
    case 2: small_gemm_rows<2>(N, K, A + m * lda, lda, B, ldb, bias, accumulate, C + m * ldc, ldc); break;
    case 1: small_gemm_rows<1>(N, K, A + m * lda, lda, B, ldb, bias, accumulate, C + m * ldc, ldc); break;
    default: break;
  }
}

}  // namespace fusedrnn
