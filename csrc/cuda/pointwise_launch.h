// Launchers of the CUDA pointwise steps, callable from host C++ compiled by the
// ordinary C++ compiler: raw pointers and a stream in, an error code out. The
// kernels themselves (pointwise_kernels.cuh) are instantiated per cell and per
// direction in the .cu files next to this one, which include no torch headers
// beyond c10's Half/BFloat16, so nvcc stays fast and they build in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include "../cells/step_params.h"

namespace fusedrnn {

template <typename Cell, typename T>
cudaError_t launch_forward_step(const ForwardStepParams<T>& p, cudaStream_t stream);

template <typename Cell, typename T>
cudaError_t launch_backward_step(const BackwardStepParams<T>& p, cudaStream_t stream);

}  // namespace fusedrnn
