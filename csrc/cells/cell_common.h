// Shared building blocks of the per-element cell math: the host/device marker,
// the accumulation type and the activations.
//
// This header (and the cell headers next to it) is framework-free on purpose:
// no ATen, no CUDA runtime. The same functions are compiled into the CPU loops
// (g++) and the CUDA kernels (nvcc), so the CPU tests exercise the exact math
// the GPU runs. Only indexing and launching differ between the devices.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDRNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HOST_DEVICE inline
#endif

namespace fusedrnn {

// Half and bfloat16 are stored as such but every cell computes in float;
// float64 computes in float64 so that gradcheck can run end to end.
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulateType<T>::type;

#if !defined(__CUDA_ARCH__)
// Host float32 activations that the compiler can vectorise (libm's expf and
// tanhf are opaque calls that stop the SIMD loop), accurate to a few ulp
// RELATIVE over the whole float range (tests/test_activations.py; measured over
// every float32 bit pattern: benchmarks/NOTES.md, entry 14). The AVX2 engine
// restates them with intrinsics (cpu/engine_common.h: exp_nonpos_n,
// sigmoid_n, tanh_n): the same operations in the same order, so both give bitwise the same
// results. Every multiply-add that the intrinsics fuse is written as fma_simd
// here, so the result does not depend on the compiler's contraction choices.
// (FUSEDRNN_TARGET_HAS_FMA: the AVX2 engine's translation units, compiled for FMA
// by a target pragma, which does not define __FMA__.)
inline float fma_simd(float a, float b, float c) {
#if defined(__FMA__) || defined(FUSEDRNN_TARGET_HAS_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;  // no FMA on the target (a portable build): two roundings
#endif
}

inline uint32_t float_bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  __builtin_memcpy(&x, &u, sizeof(x));
  return x;
}

// exp(x) for x <= 0 (the only exp that sigmoid and tanh below need), about
// 1 ulp relative down to the smallest denormal (2^-149, x = -103.3) and 0 below
// exp(-103.97) = 2^-150 (torch.exp rounds the same way). Cephes' expf: Cody-Waite
// reduction x = k ln2 + r, |r| <= ln2/2, and a degree-6 polynomial; 2^k is
// applied as 2^(k+64) * 2^-64 so that k down to -150 needs no branch: the first
// product is exact, the second rounds once (into the denormals, or not at all).
// NaN passes the clamp (the comparison is false) and propagates.
inline float exp_nonpos_simd(float x) {
  x = x < -104.0f ? -104.0f : x;
  // k = round(x / ln2) without floor() (not in SSE2): the 1.5 * 2^23 trick;
  // the low mantissa bits of kr then hold k in two's complement.
  const float kr = fma_simd(x, 1.44269504088896341f, 12582912.0f);
  const float k = kr - 12582912.0f;
  const float r = fma_simd(k, 2.12194440e-4f, fma_simd(k, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = fma_simd(p, r, 1.3981999507e-3f);
  p = fma_simd(p, r, 8.3334519073e-3f);
  p = fma_simd(p, r, 4.1665795894e-2f);
  p = fma_simd(p, r, 1.6666665459e-1f);
  p = fma_simd(p, r, 5.0000001201e-1f);
  p = fma_simd(p, r * r, r) + 1.0f;
  // 2^(k+64) in the exponent field: k + 64 + 127 is in [41, 191] for k in [-150, 0].
  const float scale = bits_float((float_bits(kr) - float_bits(12582912.0f) + 191u) << 23);
  return (p * scale) * 0x1p-64f;
}

// sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, e = exp(-|x|)
// in (0, 1]: no overflow and no cancellation, at most 2.4 ulp from the true
// value for any float32 x. For x < -87.3 the result is a denormal, down to 2^-149
// at x = -103.3. torch.sigmoid computes 1 / (1 + exp(-x)), whose exp overflows
// below -88.72, and returns 0 there (nn.LSTM's cell already below about -86.5):
// a difference below 2^-124, and the value here is the true one rounded; being
// more accurate than nn costs nothing. sigmoid(+-inf) = 1, 0; NaN -> NaN.
inline float sigmoid_simd(float x) {
  const float e = exp_nonpos_simd(-__builtin_fabsf(x));
  return (x < 0.0f ? e : 1.0f) / (1.0f + e);
}

// tanh(x) = sign(x) * t(|x|), both branches computed and one selected (no branch
// in the SIMD loop):
//   |x| <  0.625: |x| + |x|^3 P(x^2), Cephes' tanhf polynomial: no cancellation
//                 near 0 (tanh(1e-8) = 1e-8; the sign of -0 is kept);
//   |x| >= 0.625: (1 - e) / (1 + e), e = exp(-2|x|) <= 0.287: no cancellation.
// |x| is capped at 9.5 first (tanh rounds to 1 in float32 from |x| = 9.01 on), so
// e is never a denormal. tanh(+-inf) = +-1; NaN -> NaN (the cap keeps NaN).
// At most 1.5 ulp from the true value for any float32 x (0.7 on the polynomial).
inline float tanh_simd(float x) {
  const float a = __builtin_fabsf(x);
  const float z = a * a;
  float p = -5.70498872745e-3f;
  p = fma_simd(p, z, 2.06390887954e-2f);
  p = fma_simd(p, z, -5.37397155531e-2f);
  p = fma_simd(p, z, 1.33314422036e-1f);
  p = fma_simd(p, z, -3.33332819422e-1f);
  const float small = fma_simd(p * z, a, a);
  const float e = exp_nonpos_simd(-2.0f * (a > 9.5f ? 9.5f : a));
  const float big = (1.0f - e) / (1.0f + e);
  return __builtin_copysignf(a < 0.625f ? small : big, x);
}
#endif

// float: CUDA's expf/tanhf on the device (CUDA documents both within 2 ulp over
// the whole range; nothing is built with fast-math flags), the vectorisable
// versions above on the host. double: the C library (accuracy first; float64 is
// for checking). sigmoid has sigmoid_simd's formula on every device and dtype:
// exp of -|x| only, so the negative side keeps its relative accuracy (with
// 1 / (1 + exp(-x)) it follows exp's, then drops to 0 where exp overflows).
FUSEDRNN_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return tanh_simd(x);
#endif
}
FUSEDRNN_HOST_DEVICE double tanh_(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}
FUSEDRNN_HOST_DEVICE float sigmoid_(float x) {
#if defined(__CUDA_ARCH__)
  const float e = ::expf(-::fabsf(x));
  return (x < 0.0f ? e : 1.0f) / (1.0f + e);
#else
  return sigmoid_simd(x);
#endif
}
FUSEDRNN_HOST_DEVICE double sigmoid_(double x) {
#if defined(__CUDA_ARCH__)
  const double e = ::exp(-::fabs(x));
#else
  const double e = std::exp(-std::fabs(x));
#endif
  return (x < 0.0 ? e : 1.0) / (1.0 + e);
}

// a * b + c in one rounding (where the host target has FMA; float64 on the host
// leaves it to the compiler). The cells write their multiply-adds with it where
// the AVX2 engine's epilogues use _mm256_fmadd_ps, so the two compute the same
// bits: `a * b + c * d` left to the compiler's contraction fuses whichever
// product its heuristics pick, and they changed with unrelated edits.
FUSEDRNN_HOST_DEVICE float fma_(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return ::fmaf(a, b, c);
#else
  return fma_simd(a, b, c);
#endif
}
FUSEDRNN_HOST_DEVICE double fma_(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// relu that lets NaN through, as torch.relu does (std::max would turn NaN into 0).
template <typename A>
FUSEDRNN_HOST_DEVICE A relu_(A x) {
  return x < A(0) ? A(0) : x;
}

}  // namespace fusedrnn
