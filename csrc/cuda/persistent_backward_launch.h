// Launchers of the persistent whole-sequence backward kernels, callable from
// host C++ compiled by the ordinary C++ compiler (register_cuda.cpp). Instantiated
// per cell in csrc/cuda/persistent_<cell>_backward.cu for float, half and bfloat16.
#pragma once

#include <cuda_runtime_api.h>

#include "../persistent/persistent_backward.h"

namespace fusedrnn {
namespace persistent {

template <typename Cell, typename T>
cudaError_t launch_backward(const Directions<BackwardParams<T>>& l, int64_t grid, int64_t shared_bytes, cudaStream_t stream);

// The compiled kernel's resources, for the host-side plan.
template <typename Cell, typename T>
cudaError_t backward_attributes(cudaFuncAttributes* attributes);

}  // namespace persistent
}  // namespace fusedrnn
