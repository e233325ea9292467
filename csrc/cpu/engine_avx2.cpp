// The engine for CPUs with AVX2+FMA: the kernels of engine_common.h,
// engine_forward.h and engine_backward.h with 8-float vectors (__m256) and a
// 6-row micro-tile (12 of the 16 ymm registers accumulate).
//
// Everything that is not the engine's own code (the standard library, ATen) is
// included BEFORE the target switch, so that no inline or template function of
// theirs is compiled here for AVX2 and then merged by the linker with the copies
// that portable code calls (the ODR trap that PyTorch avoids with its
// CPU_CAPABILITY namespaces; GCC compiles a template with the target in force
// where it is defined, not where it is instantiated). The engine's own code and
// the cell math are in anonymous namespaces: internal linkage, never exported,
// never merged with another instruction set's copies.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_engine.h"
#include "engine_isa.h"
#include "large_gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// The shared per-element cell math, compiled here for AVX2. The target pragma
// enables FMA but (in C++, GCC 12) does not define __FMA__: tell cell_common.h,
// so that its fma_simd is one fused operation here too.
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
namespace {

namespace cells = fusedrnn_avx2::fusedrnn;

// The 8-lane vector the kernels are written against (engine_common.h).
struct Simd {
  using V = __m256;
  static constexpr int L = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  // Mask of the first n (0 < n < 8) lanes for maskload / maskstore.
  static __m256i first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_first(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }  // b where either is NaN
  static V min(V a, V b) { return _mm256_min_ps(a, b); }  // b where either is NaN
  static V or_(V a, V b) { return _mm256_or_ps(a, b); }
  static V and_(V a, V b) { return _mm256_and_ps(a, b); }
  static V andnot(V a, V b) { return _mm256_andnot_ps(a, b); }  // ~a & b
  // if_neg where x's sign bit is set, else otherwise.
  static V where_sign(V x, V if_neg, V otherwise) { return _mm256_blendv_ps(otherwise, if_neg, x); }
  // if_less where a < b (false for NaN), else otherwise.
  static V where_less(V a, V b, V if_less, V otherwise) {
    return _mm256_blendv_ps(otherwise, if_less, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  // The float whose bits are (bits(kr) + bias) << 23 (exp_nonpos_n's 2^(k+64)).
  static V shifted_exponent(V kr, int32_t bias) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(kr), _mm256_set1_epi32(bias)), 23));
  }
  // Lane r = the sum of the 8 lanes of a[r].
  static V sum_each(const V (&a)[L]) {
    const V t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const V t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const V u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
};

constexpr int kMR = 6;  // 6 x 2 accumulators + 2 B vectors + a broadcast of the 16 ymm

#define FUSEDRNN_ENGINE_SIMDLEN 8
#include "engine_common.h"
#include "engine_forward.h"
#include "engine_backward.h"
#include "large_gemm_kernel.h"
#undef FUSEDRNN_ENGINE_SIMDLEN

}  // namespace

void forward(const ForwardArgs& a) { run_forward(a); }
void backward(const BackwardArgs& a) { run_backward(a); }

}  // namespace avx2
}  // namespace cpu_engine

void large_gemm::avx2::run(const large_gemm::Args& a) { cpu_engine::avx2::run_large_gemm(a); }

}  // namespace fusedrnn

#pragma GCC pop_options
