// The execution context of a kernel body on the GPU. A kernel's body is a
// template over its context `Ctx` and uses only what every context offers:
//
//   ctx.thread()               threadIdx.x
//   ctx.block()                blockIdx.x
//   ctx.block_dim()            blockDim.x
//   ctx.grid_dim()             gridDim.x
//                              (all unsigned, as CUDA's: the body's index arithmetic is then the
//                              same on both machines, and nvcc keeps its range facts about them;
//                              returning int cost the pointwise kernels up to 6 registers)
//   ctx.sync()                 __syncthreads()
//   ctx.shfl_xor(v, lane_mask) __shfl_xor_sync(0xffffffff, v, lane_mask): every lane of the warp
//   ctx.template shared<U>(byte_offset)
//                              a pointer into the block's dynamic shared memory, of type
//                              typename Ctx::template ptr<U> (U* here)
//
// The `__global__` wrapper builds a CudaBlock from its `extern __shared__` array and calls the
// body; the CPU runner (cpu_runner.h) instantiates the same body with a context that runs every
// thread of the block as a fiber and checks barriers, shuffles and shared-memory accesses.
// Everything here is force-inlined and non-virtual: a body compiles to the code it would be with
// the intrinsics written in place (tests/test_ptxas.py checks the resources).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../cells/cell_common.h"  // FUSEDRNN_HOST_DEVICE

namespace fusedrnn {
namespace exec {

// Pointer into shared memory as the body sees it: U* on the GPU, a checked pointer on the CPU runner.
template <typename Ctx, typename U>
using shared_ptr_t = typename Ctx::template ptr<U>;

#if defined(__CUDACC__)
struct CudaBlock {
  unsigned char* smem;  // the kernel's extern __shared__ array

  template <typename U>
  using ptr = U*;

  FUSEDRNN_HOST_DEVICE unsigned thread() const {
#if defined(__CUDA_ARCH__)
    return threadIdx.x;
#else
    return 0;
#endif
  }
  FUSEDRNN_HOST_DEVICE unsigned block() const {
#if defined(__CUDA_ARCH__)
    return blockIdx.x;
#else
    return 0;
#endif
  }
  FUSEDRNN_HOST_DEVICE unsigned block_dim() const {
#if defined(__CUDA_ARCH__)
    return blockDim.x;
#else
    return 0;
#endif
  }
  FUSEDRNN_HOST_DEVICE unsigned grid_dim() const {
#if defined(__CUDA_ARCH__)
    return gridDim.x;
#else
    return 0;
#endif
  }
  FUSEDRNN_HOST_DEVICE void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  template <typename V>
  FUSEDRNN_HOST_DEVICE V shfl_xor(V v, int lane_mask) const {
#if defined(__CUDA_ARCH__)
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#else
    (void)lane_mask;
    return v;
#endif
  }
  template <typename U>
  FUSEDRNN_HOST_DEVICE U* shared(size_t byte_offset) const {
    return reinterpret_cast<U*>(smem + byte_offset);
  }
};
#endif

}  // namespace exec
}  // namespace fusedrnn
