// The persistent whole-sequence forward kernel: one launch per layer and
// direction; each CTA runs its rows through every time step with W_hh in
// registers and shared memory. All the logic is in the phase functions of
// csrc/persistent/persistent_forward.h (also run, thread by thread, by the CPU
// tests); this file only supplies the barriers and the warp shuffles between
// them, in the same order as the CPU driver (csrc/cpu/persistent_emulation.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "persistent_launch.h"

namespace fusedrnn {
namespace persistent {

template <typename Cell, typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardParams<T> p) {
  using K = Forward<Cell, T>;
  using A = typename K::A;
  constexpr int G = K::G;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const Shared<T, A> s = K::carve(shared_raw, p.rows_per_cta);
  const int64_t cta = blockIdx.x;
  const int tid = threadIdx.x;
  typename K::Thread th;
  K::stage(p, s, 0, tid);
  __syncthreads();
  K::template take<0>(s, th, tid);
  __syncthreads();
  if constexpr (K::kRegGates > 1) {
    K::stage(p, s, 1, tid);
    __syncthreads();
    K::template take<1>(s, th, tid);
    __syncthreads();
  }
  for (int g = K::kRegGates; g < G; ++g) K::stage(p, s, g, tid);
  K::load_state(p, s, cta, tid);
  __syncthreads();
  const int64_t steps = K::cta_steps(p, cta);
  int parity = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t t = K::time_of(p, steps, i);
    for (int64_t r = 0; r < p.rows_per_cta; ++r) {
      const bool active = K::row_active(p, cta, r, t);  // the same for every thread of the CTA
      A acc[G], xin[G];
      if (active) {
        K::fetch_input(p, cta, tid, r, t, xin);
        K::partial(p, s, th, tid, r, parity, acc);
#pragma unroll
        for (int round = 0; round < kShuffleRounds; ++round) {
          A partner[G];
#pragma unroll
          for (int g = 0; g < G; ++g) partner[g] = __shfl_xor_sync(0xffffffffu, acc[g], 1 << round);
          K::add_shuffled(acc, partner);
        }
      }
      K::cell(p, s, th, cta, tid, r, t, parity, active, acc, xin);
    }
    parity = 1 - parity;
    __syncthreads();
  }
  K::store_final(p, s, cta, tid, parity);
}

template <typename Cell, typename T>
cudaError_t launch_forward(const ForwardParams<T>& p, int64_t grid, int64_t shared_bytes, cudaStream_t stream) {
  if (grid == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<Cell, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared_bytes));
  if (err != cudaSuccess) return err;
  forward_kernel<Cell, T><<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(shared_bytes), stream>>>(p);
  return cudaGetLastError();
}

template <typename Cell, typename T>
cudaError_t forward_attributes(cudaFuncAttributes* attributes) {
  return cudaFuncGetAttributes(attributes, forward_kernel<Cell, T>);
}

// float64 is not instantiated: it runs on the per-step path (persistent_plan.h).
#define FUSEDRNN_INSTANTIATE_PERSISTENT(Cell)                                                                   \
  template cudaError_t launch_forward<Cell, float>(const ForwardParams<float>&, int64_t, int64_t, cudaStream_t); \
  template cudaError_t launch_forward<Cell, c10::Half>(const ForwardParams<c10::Half>&, int64_t, int64_t,        \
                                                       cudaStream_t);                                           \
  template cudaError_t launch_forward<Cell, c10::BFloat16>(const ForwardParams<c10::BFloat16>&, int64_t, int64_t, \
                                                           cudaStream_t);                                       \
  template cudaError_t forward_attributes<Cell, float>(cudaFuncAttributes*);                                    \
  template cudaError_t forward_attributes<Cell, c10::Half>(cudaFuncAttributes*);                                \
  template cudaError_t forward_attributes<Cell, c10::BFloat16>(cudaFuncAttributes*);

}  // namespace persistent
}  // namespace fusedrnn
