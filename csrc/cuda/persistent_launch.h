// Launchers of the persistent whole-sequence forward kernels, callable from
// host C++ compiled by the ordinary C++ compiler (register_cuda.cpp): params,
// grid and shared memory in, an error code out. Instantiated per cell in
// csrc/cuda/persistent_<cell>_forward.cu for float, half and bfloat16.
#pragma once

#include <cuda_runtime_api.h>

#include "../persistent/persistent_forward.h"
#include "../persistent/persistent_schedule.h"

namespace fusedrnn {
namespace persistent {

template <typename Cell, typename T>
cudaError_t launch_forward(const Directions<ForwardParams<T>>& l, int64_t grid, int64_t shared_bytes, cudaStream_t stream);

// The compiled kernel's resources (registers, thread limit, static shared
// memory) for the host-side plan, read before anything is launched.
template <typename Cell, typename T>
cudaError_t forward_attributes(cudaFuncAttributes* attributes);

// One chunk of a ragged batch's schedule written on the device (csrc/cuda/step_schedule.cu).
cudaError_t launch_fill_schedule(const ScheduleChunk& chunk, cudaStream_t stream);

}  // namespace persistent
}  // namespace fusedrnn
