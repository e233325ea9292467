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

FUSEDRNN_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
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
  return std::tanh(x);
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
