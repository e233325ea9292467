// The `__global__` wrappers of the layer-normalised cells' per-step kernels (bodies:
// layernorm_step.h), instantiated with CUDA's indices (exec::CudaBlock) and their launchers
// (layernorm_launch.h). Included only by csrc/layernorm/ln_*_kernels.cu, which include no torch
// header beyond c10's Half/BFloat16, so nvcc stays fast.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../exec/cuda_block.h"
#include "layernorm_launch.h"
#include "layernorm_step.h"

namespace fusedrnn {
namespace lncuda {

template <typename Body, typename Params>
__global__ void __launch_bounds__(kMaxThreads) ln_row_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char ln_shared[];
  Body::run(exec::CudaBlock{ln_shared}, p);
}

template <typename Body, typename Params>
cudaError_t launch_rows(const Params& p, size_t shared_optin_bytes, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const int threads = row_threads(p.hidden);
  const size_t shared = Body::shared_bytes(threads, p.hidden);
  if (shared > shared_optin_bytes) return cudaErrorInvalidConfiguration;
  constexpr size_t kDefaultShared = 48 * 1024;  // above it a kernel must opt in
  if (shared > kDefaultShared) {
    const cudaError_t err = cudaFuncSetAttribute(ln_row_kernel<Body, Params>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (err != cudaSuccess) return err;
  }
  ln_row_kernel<Body, Params><<<static_cast<unsigned>(p.rows), threads, shared, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lncuda
}  // namespace fusedrnn

// Explicit instantiations of one launcher for every dtype the ops dispatch on.
#define FUSEDRNN_LN_INSTANTIATE(launcher, Params, Body)                                                        \
  namespace fusedrnn {                                                                                        \
  namespace lncuda {                                                                                          \
  template <typename S>                                                                                       \
  cudaError_t launcher(const Params<S>& p, size_t shared_optin_bytes, cudaStream_t stream) {                  \
    return launch_rows<Body<S>>(p, shared_optin_bytes, stream);                                               \
  }                                                                                                           \
  template cudaError_t launcher<float>(const Params<float>&, size_t, cudaStream_t);                           \
  template cudaError_t launcher<double>(const Params<double>&, size_t, cudaStream_t);                         \
  template cudaError_t launcher<c10::Half>(const Params<c10::Half>&, size_t, cudaStream_t);                   \
  template cudaError_t launcher<c10::BFloat16>(const Params<c10::BFloat16>&, size_t, cudaStream_t);           \
  }                                                                                                           \
  }
