// Direct BLAS calls for the CPU's per-step GEMMs.
//
// Each time step does one small GEMM (a [32, 128] x [128, 512] one takes about
// 50 us here); going through at::addmm_out adds dispatch, a bias broadcast copy
// and a transposed-operand path that together cost 10-20% of that (measured:
// benchmarks/NOTES.md). libtorch_cpu exports the Fortran BLAS entry points of
// the BLAS it was built with (MKL on x86); we declare them weak, so a torch
// without them still loads and the callers fall back to ATen.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL (its C interface; the lower-case symbol is the Fortran one, taking int*):
// this thread's thread count for MKL calls (0 = back to the global setting).
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));
}

namespace fusedrnn {

template <typename T>
struct Blas {
  static bool available() { return false; }
  static void gemm(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                   const T*, const int*, const T*, T*, const int*) {}
};
template <>
struct Blas<float> {
  static bool available() { return sgemm_ != nullptr; }
  static constexpr auto gemm = [](auto... args) { sgemm_(args...); };
};
template <>
struct Blas<double> {
  static bool available() { return dgemm_ != nullptr; }
  static constexpr auto gemm = [](auto... args) { dgemm_(args...); };
};

// Row-major C[M, N] = A[M, K] B[K, N] (+ bias broadcast over rows) (+ C when
// accumulate), every matrix with unit column stride and the given row strides.
// Returns false (having done nothing) when no BLAS is linked for T or a size
// does not fit BLAS's 32-bit integers.
template <typename T>
bool blas_matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias,
                 bool accumulate, T* C, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (!Blas<T>::available() || M > kMax || N > kMax || K > kMax || lda > kMax || ldb > kMax || ldc > kMax) {
    return false;
  }
  if (M == 0 || N == 0) return true;
  if (bias != nullptr && !accumulate) {
    for (int64_t r = 0; r < M; ++r) std::memcpy(C + r * ldc, bias, N * sizeof(T));
  }
  // A step GEMM below ~1M multiply-adds runs faster on one thread: MKL's thread
  // start and barrier cost more than the half of the work they move. Measured
  // on 2 cores (benchmarks/NOTES.md): RNN 128 ([32,128]x[128,128], 0.5M) trains
  // 14% faster single-threaded; GRU (1.5M) and LSTM (2M) 0-14% slower.
  const bool single_thread = MKL_Set_Num_Threads_Local != nullptr && M * N * K < (int64_t(1) << 20);
  const int previous_threads = single_thread ? MKL_Set_Num_Threads_Local(1) : 0;
  const T one = 1, beta = (accumulate || bias != nullptr) ? T(1) : T(0);
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int a_ld = static_cast<int>(ldb), b_ld = static_cast<int>(lda), c_ld = static_cast<int>(ldc);
  // Column-major BLAS computes C^T = B^T A^T: row-major matrices are their own
  // transposes in column-major terms, so no operand is copied.
  Blas<T>::gemm("N", "N", &m, &n, &k, &one, B, &a_ld, A, &b_ld, &beta, C, &c_ld);
  if (single_thread) MKL_Set_Num_Threads_Local(previous_threads);
  return true;
}

}  // namespace fusedrnn
