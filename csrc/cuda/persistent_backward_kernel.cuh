// The persistent whole-sequence backward kernel: one launch per layer and
// direction; each CTA runs its rows backwards through every time step with W_hh
// in registers and shared memory. The body is Backward<Cell, T>::run in
// csrc/persistent/persistent_backward.h, written against an execution context;
// this wrapper gives it CUDA's (exec::CudaBlock), the CPU tests run the same
// body through the CPU runner (csrc/exec/cpu_runner.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "persistent_backward_launch.h"

namespace fusedrnn {
namespace persistent {

template <typename Cell, typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const Directions<BackwardParams<T>> l) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  run_directions<Backward<Cell, T>>(exec::CudaBlock{shared_raw}, l);
}

template <typename Cell, typename T>
cudaError_t launch_backward(const Directions<BackwardParams<T>>& l, int64_t grid, int64_t shared_bytes, cudaStream_t stream) {
  if (grid == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(backward_kernel<Cell, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared_bytes));
  if (err != cudaSuccess) return err;
  backward_kernel<Cell, T><<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(shared_bytes), stream>>>(l);
  return cudaGetLastError();
}

template <typename Cell, typename T>
cudaError_t backward_attributes(cudaFuncAttributes* attributes) {
  return cudaFuncGetAttributes(attributes, backward_kernel<Cell, T>);
}

// float64 is not instantiated: it runs on the per-step path (persistent_plan.h).
#define FUSEDRNN_INSTANTIATE_PERSISTENT_BACKWARD(Cell)                                                         \
  template cudaError_t launch_backward<Cell, float>(const Directions<BackwardParams<float>>&, int64_t, int64_t,             \
                                                    cudaStream_t);                                             \
  template cudaError_t launch_backward<Cell, c10::Half>(const Directions<BackwardParams<c10::Half>>&, int64_t, int64_t,     \
                                                        cudaStream_t);                                         \
  template cudaError_t launch_backward<Cell, c10::BFloat16>(const Directions<BackwardParams<c10::BFloat16>>&, int64_t,      \
                                                            int64_t, cudaStream_t);                            \
  template cudaError_t backward_attributes<Cell, float>(cudaFuncAttributes*);                                  \
  template cudaError_t backward_attributes<Cell, c10::Half>(cudaFuncAttributes*);                              \
  template cudaError_t backward_attributes<Cell, c10::BFloat16>(cudaFuncAttributes*);

}  // namespace persistent
}  // namespace fusedrnn
