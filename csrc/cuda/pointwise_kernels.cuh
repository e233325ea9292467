// The CUDA pointwise steps: one thread per (active row, hidden unit) element,
// each calling the cell's shared per-element math (csrc/cells/). Grid-stride
// loops so any batch x hidden size fits a bounded grid.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "pointwise_launch.h"

namespace fusedrnn {

constexpr int kPointwiseThreads = 256;

inline int64_t pointwise_blocks(int64_t elements) {
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  return std::min<int64_t>((elements + kPointwiseThreads - 1) / kPointwiseThreads, 4096);
}

template <typename Cell, typename Params>
__global__ void __launch_bounds__(kPointwiseThreads) step_kernel(const Params p) {
  const int64_t n = p.batch * p.hidden;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    apply_cell<Cell>(p, i / p.hidden, i % p.hidden);
  }
}

template <typename Cell, typename Params>
cudaError_t launch_step(const Params& p, cudaStream_t stream) {
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return cudaSuccess;
  step_kernel<Cell, Params><<<pointwise_blocks(n), kPointwiseThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Cell, typename T>
cudaError_t launch_forward_step(const ForwardStepParams<T>& p, cudaStream_t stream) {
  return launch_step<Cell>(p, stream);
}

template <typename Cell, typename T>
cudaError_t launch_backward_step(const BackwardStepParams<T>& p, cudaStream_t stream) {
  return launch_step<Cell>(p, stream);
}

// Explicit instantiations for every dtype the ops dispatch on.
#define FUSEDRNN_INSTANTIATE_STEP(launcher, Params, Cell)                                      \
  template cudaError_t launcher<Cell, float>(const Params<float>&, cudaStream_t);             \
  template cudaError_t launcher<Cell, double>(const Params<double>&, cudaStream_t);           \
  template cudaError_t launcher<Cell, c10::Half>(const Params<c10::Half>&, cudaStream_t);     \
  template cudaError_t launcher<Cell, c10::BFloat16>(const Params<c10::BFloat16>&, cudaStream_t);

}  // namespace fusedrnn
