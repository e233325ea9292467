// The CPU device's large float32 GEMM: C = A B (+ bias) (+ C) for the layer drivers' one-shot
// products (the input projection over all tokens, dX = dG W_ih, dW_ih = dG^T X, dW_hh = dG^T H),
// blocked BLIS-style around the engine's register micro-kernel (engine_common.h: micro_kernel).
//
// Why: torch's MKL runs its generic ("def"/zen) kernels on AMD CPUs and reached 55-65% of this AVX2
// machine's FMA peak on these shapes, while the engine's 6 x 16 micro-kernel runs at the peak when its
// operands are in L1 (benchmarks/NOTES.md, entry 8). Measured (entry 44): this GEMM beat MKL only on
// shallow products (K <= 256: the sentiment layers' input projections); on the deep ones both ran at
// ~70% of peak on a loaded machine and the layers were faster with MKL, so on AVX2 worth() sends only
// the shallow ones here. On AVX-512 (entry 51, an AMD Zen 5 host, 1 thread) the 16-lane kernels ran
// the deep ones at ~2x MKL and the LSTM training step 1.4-1.7x faster, so there they come here too
// (on AMD CPUs only: on Intel's, MKL runs its own AVX-512 kernels, not measured against these).
//
// Every element of C is the same chain whatever the blocking, the thread split or the vector width:
// its start value (C, the bias or 0), then one fused multiply-add per k in order (the accumulators
// are stored to C and reloaded between k blocks, which is exact). So results are bitwise the same
// for any thread count and on either instruction set (tests/test_large_gemm.py checks both).
//
// Portable header: plain pointers and sizes; the kernels are compiled per instruction set inside
// engine_avx2.cpp / engine_avx512.cpp (large_gemm_kernel.h) and chosen by cpu_engine::isa().
#pragma once

#include <cstdint>

namespace fusedrnn {
namespace large_gemm {

// C[i, j] (row-major, row stride ldc) = (accumulate ? C[i, j] : bias ? bias[j] : 0)
//   + sum_k A[i * a_rs + k * a_cs] * B[k * b_rs + j * b_cs].
// A and B may be transposed views (any strides); bias is ignored when accumulating (as ATen's
// addmm_ and cpu_blas.h's blas_matmul). mc / kc: row and depth blocks, 0 for the defaults (tests
// set small ones to run every edge of the loops on small matrices).
struct Args {
  int64_t M = 0, N = 0, K = 0;
  const float* A = nullptr;
  int64_t a_rs = 0, a_cs = 1;
  const float* B = nullptr;
  int64_t b_rs = 0, b_cs = 1;
  const float* bias = nullptr;
  bool accumulate = false;
  float* C = nullptr;
  int64_t ldc = 0;
  int64_t mc = 0, kc = 0;
};

// Whether float32 products go through this GEMM: the engine's CPU check (cpu_engine::isa() is
// not kNone) and FUSEDRNN_CPU_GEMM, read on every call (a benchmark or a test compares both in one
// process): unset, empty or "own": this GEMM where worth() says so; "mkl": ATen (MKL) for every
// product, as before. Any other value is an error (c10::Error: RuntimeError).
bool enabled();

// The measured rule (benchmarks/NOTES.md, entries 44 and 51; large_gemm.cpp): at least 128 rows, 16
// columns and a depth of 16; on AVX2 only depths up to 256 (where this GEMM beat MKL on the Zen 3
// machine), on AVX-512 every depth where the CPU is AMD's (its 16-lane kernels ran the deep products at
// ~2x MKL on a Zen 5 host). Everything else stays with MKL.
bool worth(int64_t M, int64_t N, int64_t K);

// Runs on isa()'s kernels; call only when enabled(). Threads (at::parallel_for) split C's blocks.
void run(const Args& a);

// The same GEMM on bf16 dot products (vdpbf16ps: float32 sums), both operands rounded to bf16 while they
// are packed: for a bfloat16 layer's backward (cpu_device.h: gemm), on a CPU where
// cpu_engine::bf16_dot_products() (the caller checks). Its rounding of the operands aside, the same
// properties: one chain per element, bitwise the same for any thread count.
void run_bf16(const Args& a);

namespace avx2 {
void run(const Args& a);
}
namespace avx512 {
void run(const Args& a);
}
namespace avx512_bf16 {
void run(const Args& a);
}

}  // namespace large_gemm
}  // namespace fusedrnn
