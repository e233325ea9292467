// Building blocks shared by the AVX2+FMA engine's forward and backward
// (avx2_engine_forward.cpp, avx2_engine_backward.cpp; design in cpu_engine.h):
// the register micro-kernel, masked loads and stores, and the split of the batch
// rows across threads.
//
// Include this header ONLY from the engine's translation units, and last: it
// switches the compiler to AVX2+FMA for the rest of the file (the entry points
// are called only after available() has checked the CPU at run time). The cell
// math is included into a namespace of its own, so the AVX2 copies of the
// shared inline functions (Cell::forward, tanh_simd, ...) are distinct symbols:
// the linker cannot hand them to the portable code in other translation units
// (the ODR trap that PyTorch avoids with its CPU_CAPABILITY namespaces). Each
// including file closes the target with `#pragma GCC pop_options`.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_engine.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// The shared per-element cell math, compiled here for AVX2 (see the top), in an
// anonymous namespace: internal linkage, so these copies are neither exported
// nor merged with the portable ones (and are called directly, not through the PLT).
// <cmath> and <cstdint> are already included, so only the cell code lands here.
// The target pragma enables FMA but (in C++, GCC 12) does not define __FMA__:
// tell cell_common.h, so that its fma_simd is one fused operation here too.
#define FUSEDRNN_TARGET_HAS_FMA 1
namespace {
namespace fusedrnn_avx2 {
#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
}  // namespace fusedrnn_avx2
}  // namespace
#undef FUSEDRNN_TARGET_HAS_FMA

namespace fusedrnn {
namespace cpu_engine {
namespace avx2 {
// Internal linkage: each engine file gets its own copy (nothing here is
// exported, nothing is merged with code built for other CPUs).
namespace {

namespace cells = fusedrnn_avx2::fusedrnn;

// Micro-tile: kMR rows x 16 columns (two 8-float vectors) of C in 12 ymm
// registers, the shape of BLIS's Haswell sgemm kernel. Per k: two loads of B,
// kMR broadcasts of A, 2*kMR FMAs: each B element loaded is used kMR times,
// and 12 independent accumulators cover the FMA latency (4 cycles x 2 ports).
constexpr int kMR = 6;
constexpr int kVec = 8;          // floats per ymm
constexpr int kPanel = 2 * kVec;  // columns per micro-kernel call

// acc[m][v] += sum_k A[m * lda + k] * Bp[k * ldb + v * 8 .. + 8] for m < MR.
template <int MR>
__attribute__((always_inline)) inline void micro_kernel(int64_t K, const float* A, int64_t lda, const float* Bp,
                                                        int64_t ldb, __m256 (&acc)[kMR][2]) {
  __m256 c[MR][2];
  for (int m = 0; m < MR; ++m) {
    c[m][0] = acc[m][0];
    c[m][1] = acc[m][1];
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp);
    const __m256 b1 = _mm256_loadu_ps(Bp + kVec);
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(A + m * lda + k);
      c[m][0] = _mm256_fmadd_ps(a, b0, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(a, b1, c[m][1]);
    }
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = c[m][0];
    acc[m][1] = c[m][1];
  }
}

// Mask of the first `valid` lanes (0..8) for maskload/maskstore.
inline __m256i lane_mask(int64_t valid) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(valid, kVec))), lanes);
}

// Stores the first `valid` floats of v (all 8 when valid >= 8, none when <= 0).
inline void store_partial(float* dst, __m256 v, int64_t valid) {
  if (valid >= kVec) {
    _mm256_storeu_ps(dst, v);
  } else if (valid > 0) {
    _mm256_maskstore_ps(dst, lane_mask(valid), v);
  }
}
inline __m256 load_partial(const float* src, int64_t valid) {
  if (valid >= kVec) return _mm256_loadu_ps(src);
  if (valid > 0) return _mm256_maskload_ps(src, lane_mask(valid));
  return _mm256_setzero_ps();
}

// ---------------------------------------------------------------------------
// Activations on arrays of 8-float vectors
// ---------------------------------------------------------------------------
// cells/cell_common.h's exp_nonpos_simd, sigmoid_simd and tanh_simd (formulas,
// accuracy and special values explained there), restated with intrinsics: the
// same operations in the same order, so the engine's forward computes bitwise
// what the per-step path's cells compute (tests/test_activations.py checks it
// over a sweep of float32 inputs). Why intrinsics, measured on the engine's
// forward tile (benchmarks/NOTES.md, entry 12): GCC compiles the NaN-safe
// clamps `x < -104 ? -104 : x` to compare + blend pairs (it may only use min/max
// under -ffinite-math-only; _mm256_max_ps(-104, x) returns x when x is NaN, the
// same result), and a cell written per element runs one 8-lane vector through
// a ~40-cycle chain of dependent operations at a time. Here every operation is
// applied to N independent vectors in turn, so the chains overlap.
template <int N>
using Vecs = __m256[N];

// x = exp(x) for x <= 0 (or NaN).
template <int N>
inline void exp_nonpos_n(Vecs<N>& x) {
  const __m256 lo = _mm256_set1_ps(-104.0f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), round = _mm256_set1_ps(12582912.0f);
  const __m256 minus_ln2_hi = _mm256_set1_ps(-0.693359375f), ln2_lo = _mm256_set1_ps(2.12194440e-4f);
  __m256 kr[N], r[N], p[N];
  for (int i = 0; i < N; ++i) x[i] = _mm256_max_ps(lo, x[i]);  // NaN passes
  for (int i = 0; i < N; ++i) kr[i] = _mm256_fmadd_ps(x[i], log2e, round);
  for (int i = 0; i < N; ++i) {
    const __m256 k = _mm256_sub_ps(kr[i], round);
    r[i] = _mm256_fmadd_ps(k, ln2_lo, _mm256_fmadd_ps(k, minus_ln2_hi, x[i]));
  }
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r[i], _mm256_set1_ps(1.3981999507e-3f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(8.3334519073e-3f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(4.1665795894e-2f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(1.6666665459e-1f));
  for (int i = 0; i < N; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(5.0000001201e-1f));
  for (int i = 0; i < N; ++i) {
    p[i] = _mm256_add_ps(_mm256_fmadd_ps(p[i], _mm256_mul_ps(r[i], r[i]), r[i]), _mm256_set1_ps(1.0f));
  }
  // 2^(k+64) in the exponent field (k from kr's low bits), then 2^-64.
  const __m256i bias = _mm256_set1_epi32(191 - 0x4B400000);  // + 191 - bits(1.5 * 2^23), modulo 2^32
  for (int i = 0; i < N; ++i) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(kr[i]), bias), 23);
    x[i] = _mm256_mul_ps(_mm256_mul_ps(p[i], _mm256_castsi256_ps(bits)), _mm256_set1_ps(0x1p-64f));
  }
}

// x = (x < 0 ? e : 1) / (1 + e), e = exp(-|x|)
template <int N>
inline void sigmoid_n(Vecs<N>& x) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  Vecs<N> e;
  for (int i = 0; i < N; ++i) e[i] = _mm256_or_ps(x[i], sign);  // -|x|
  exp_nonpos_n<N>(e);
  // blendv picks e where x's sign bit is set: also for x = -0, where e = 1 (the same result).
  for (int i = 0; i < N; ++i) x[i] = _mm256_div_ps(_mm256_blendv_ps(one, e[i], x[i]), _mm256_add_ps(one, e[i]));
}

// x = copysign(|x| < 0.625 ? |x| + |x|^3 P(x^2) : (1 - e) / (1 + e), x), e = exp(-2 min(|x|, 9.5)),
// for N <= kTanhGroup vectors.
template <int N>
inline void tanh_group(__m256* x) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  Vecs<N> a, small, e;
  for (int i = 0; i < N; ++i) a[i] = _mm256_andnot_ps(sign, x[i]);
  for (int i = 0; i < N; ++i) {
    const __m256 z = _mm256_mul_ps(a[i], a[i]);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(-5.70498872745e-3f), z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    small[i] = _mm256_fmadd_ps(_mm256_mul_ps(p, z), a[i], a[i]);
  }
  for (int i = 0; i < N; ++i) e[i] = _mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_min_ps(_mm256_set1_ps(9.5f), a[i]));
  exp_nonpos_n<N>(e);
  for (int i = 0; i < N; ++i) {
    const __m256 big = _mm256_div_ps(_mm256_sub_ps(one, e[i]), _mm256_add_ps(one, e[i]));
    const __m256 t = _mm256_blendv_ps(big, small[i], _mm256_cmp_ps(a[i], _mm256_set1_ps(0.625f), _CMP_LT_OQ));
    x[i] = _mm256_or_ps(t, _mm256_and_ps(x[i], sign));
  }
}

// In groups of at most 6 vectors: tanh keeps |x|, the polynomial and e live across its exp, and
// the GRU and RNN epilogues' 12 at once spilled more: 4.7 ns per 8 floats against 4.2 in groups
// (the old formula: 3.4; L1-resident micro-benchmark, benchmarks/NOTES.md entry 14).
constexpr int kTanhGroup = 6;
template <int N>
inline void tanh_n(Vecs<N>& x) {
  constexpr int full = N / kTanhGroup * kTanhGroup;
  for (int g = 0; g < full; g += kTanhGroup) tanh_group<kTanhGroup>(x + g);
  if constexpr (full < N) tanh_group<N - full>(x + full);
}

// x = x < 0 ? 0 : x, NaN kept (as torch.relu): max(0, x) returns x when x is NaN.
template <int N>
inline void relu_n(Vecs<N>& x) {
  for (int i = 0; i < N; ++i) x[i] = _mm256_max_ps(_mm256_setzero_ps(), x[i]);
}

// ---------------------------------------------------------------------------
// From run-time values to the compile-time ones the kernels are built for
// ---------------------------------------------------------------------------

// f(std::integral_constant<int, MR>{}) for a block of `rows` (1..kMR) rows.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
  static_assert(kMR == 6, "with_rows lists the row counts up to kMR");
}

// f(Cell{}) for the cell a layer runs.
template <typename F>
inline void with_cell(CellKind kind, F&& f) {
  switch (kind) {
    case CellKind::kLstm: f(cells::LstmCell{}); break;
    case CellKind::kGru: f(cells::GruCell{}); break;
    case CellKind::kRnnTanh: f(cells::RnnTanhCell{}); break;
    case CellKind::kRnnRelu: f(cells::RnnReluCell{}); break;
  }
}

// ---------------------------------------------------------------------------
// Splitting the batch rows across threads
// ---------------------------------------------------------------------------

// Contiguous row ranges, one per thread, with about equal numbers of tokens
// (a ragged batch's first rows are its longest sequences). Depends only on the
// schedule and the thread count, so the work split is the same run to run.
std::vector<int64_t> split_rows(const Schedule& s, int64_t B, int threads) {
  const std::vector<int64_t>& batch = *s.batch;
  // length of row b = number of steps with batch[t] > b (batch is non-increasing)
  std::vector<int64_t> length(B, 0);
  for (int64_t bs : batch) {
    for (int64_t b = 0; b < bs; ++b) ++length[b];
  }
  int64_t total = 0;
  for (int64_t l : length) total += l;
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, B)));
  std::vector<int64_t> bounds(n + 1, B);
  bounds[0] = 0;
  int64_t row = 0, seen = 0;
  for (int i = 1; i < n; ++i) {
    const int64_t target = (total * i + n - 1) / n;
    // at least one row for each thread, and leave one for each later thread
    while (row < B - (n - i) && (seen < target || row < bounds[i - 1] + 1)) seen += length[row++];
    bounds[i] = row;
  }
  return bounds;
}

// Rows [lo, end) in blocks of at most kMR rows, as even as possible (32 rows:
// 6,6,5,5,5,5 rather than 6,6,6,6,6,2): a thin block runs its micro-kernel with
// few accumulators, latency-bound at a fraction of the FMA rate.
template <typename Body>
void for_each_row_block(int64_t lo, int64_t end, const Body& body) {
  const int64_t n = end - lo;
  if (n <= 0) return;
  const int64_t blocks = (n + kMR - 1) / kMR;
  const int64_t base = n / blocks, extra = n % blocks;
  int64_t m0 = lo;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t mr = base + (i < extra ? 1 : 0);
    body(m0, mr);
    m0 += mr;
  }
}

// Runs body(row_begin, row_end) once per thread on its rows, for the whole
// sequence: one parallel region per call, no synchronisation between steps.
template <typename Body>
void for_each_thread_rows(const Schedule& s, int64_t B, const Body& body) {
  const std::vector<int64_t> bounds = split_rows(s, B, at::get_num_threads());
  const int64_t n = static_cast<int64_t>(bounds.size()) - 1;
  if (n == 1) {
    body(bounds[0], bounds[1]);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(bounds[i], bounds[i + 1]);
  });
}

}  // namespace
}  // namespace avx2
}  // namespace cpu_engine
}  // namespace fusedrnn
