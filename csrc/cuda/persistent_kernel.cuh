// The persistent whole-sequence forward kernel: one launch per layer and
// direction; each CTA runs its rows through every time step with W_hh in
// registers and shared memory. The body is Forward<Cell, T>::run in
// csrc/persistent/persistent_forward.h, written against an execution context:
// this wrapper gives it CUDA's (exec::CudaBlock: threadIdx, __syncthreads,
// __shfl_xor_sync, the dynamic shared memory); the CPU tests run the same body
// through the CPU runner (csrc/exec/cpu_runner.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "persistent_launch.h"

namespace fusedrnn {
namespace persistent {

template <typename Cell, typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const Directions<ForwardParams<T>> l) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  run_directions<Forward<Cell, T>>(exec::CudaBlock{shared_raw}, l);
}

template <typename Cell, typename T>
cudaError_t launch_forward(const Directions<ForwardParams<T>>& l, int64_t grid, int64_t shared_bytes, cudaStream_t stream) {
  if (grid == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<Cell, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared_bytes));
  if (err != cudaSuccess) return err;
  forward_kernel<Cell, T><<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(shared_bytes), stream>>>(l);
  return cudaGetLastError();
}

template <typename Cell, typename T>
cudaError_t forward_attributes(cudaFuncAttributes* attributes) {
  return cudaFuncGetAttributes(attributes, forward_kernel<Cell, T>);
}

// float64 is not instantiated: it runs on the per-step path (persistent_plan.h).
#define FUSEDRNN_INSTANTIATE_PERSISTENT(Cell)                                                                   \
  template cudaError_t launch_forward<Cell, float>(const Directions<ForwardParams<float>>&, int64_t, int64_t, cudaStream_t); \
  template cudaError_t launch_forward<Cell, c10::Half>(const Directions<ForwardParams<c10::Half>>&, int64_t, int64_t,        \
                                                       cudaStream_t);                                           \
  template cudaError_t launch_forward<Cell, c10::BFloat16>(const Directions<ForwardParams<c10::BFloat16>>&, int64_t, int64_t, \
                                                           cudaStream_t);                                       \
  template cudaError_t forward_attributes<Cell, float>(cudaFuncAttributes*);                                    \
  template cudaError_t forward_attributes<Cell, c10::Half>(cudaFuncAttributes*);                                \
  template cudaError_t forward_attributes<Cell, c10::BFloat16>(cudaFuncAttributes*);

}  // namespace persistent
}  // namespace fusedrnn
