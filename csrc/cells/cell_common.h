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
// Host float32 exp that the compiler can vectorise (libm's expf is an opaque
// call that stops the SIMD loop). Cephes' expf: Cody-Waite reduction to
// |r| <= ln2/2 and a degree-6 polynomial, about 1 ulp on the clamped range.
// Comparisons are false for NaN, so NaN passes the clamps and the result is NaN.
inline float exp_simd(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  // Round x / ln2 to nearest without floor() (not in SSE2): the 1.5 * 2^23 trick.
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^k built in the exponent field; k is in [-126, 127] after the clamps.
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(x) = 2 / (1 + exp(-2x)) - 1: one exp and one division, and saturates
// cleanly at both ends. Near zero its absolute error is about 1e-7 (the
// subtraction cancels), far inside the float32 tolerances.
inline float tanh_simd(float x) { return 2.0f / (1.0f + exp_simd(-2.0f * x)) - 1.0f; }
#endif

// float: CUDA's expf/tanhf on the device, the vectorisable versions above on
// the host. double: the C library (accuracy first; float64 is for checking).
FUSEDRNN_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_simd(x);
#endif
}
FUSEDRNN_HOST_DEVICE double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
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

template <typename A>
FUSEDRNN_HOST_DEVICE A sigmoid_(A x) {
  return A(1) / (A(1) + exp_(-x));
}

// relu that lets NaN through, as torch.relu does (std::max would turn NaN into 0).
template <typename A>
FUSEDRNN_HOST_DEVICE A relu_(A x) {
  return x < A(0) ? A(0) : x;
}

}  // namespace fusedrnn
