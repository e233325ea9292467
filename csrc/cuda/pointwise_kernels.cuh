// The CUDA pointwise steps: the `__global__` wrapper of the body in
// pointwise_step.h (one thread per element, grid-stride), instantiated with
// CUDA's indices (exec::CudaBlock); the CPU tests run the same body on the CPU
// runner.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../exec/cuda_block.h"
#include "pointwise_launch.h"
#include "pointwise_step.h"

namespace fusedrnn {

template <typename Cell, typename Params>
__global__ void __launch_bounds__(kPointwiseThreads) step_kernel(const Params p) {
  PointwiseStep<Cell>::run(exec::CudaBlock{nullptr}, p);
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
