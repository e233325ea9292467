// The ragged schedule of the persistent kernels, written on the device from the
// launch's own parameters (the body: persistent/persistent_schedule.h), so a
// CUDA graph that captured it replays it without any host memory.
#include "../exec/cuda_block.h"
#include "persistent_launch.h"

namespace fusedrnn {
namespace persistent {

__global__ void __launch_bounds__(kScheduleThreads) fill_schedule_kernel(const ScheduleChunk c) {
  FillSchedule::run(exec::CudaBlock{nullptr}, c);
}

cudaError_t launch_fill_schedule(const ScheduleChunk& c, cudaStream_t stream) {
  if (c.steps == 0) return cudaSuccess;
  fill_schedule_kernel<<<static_cast<unsigned>(FillSchedule::blocks(c.steps)), kScheduleThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

}  // namespace persistent
}  // namespace fusedrnn
