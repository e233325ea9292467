// The per-step pointwise kernel's body, framework-free and host+device: one
// thread per (active row, hidden unit) element, each calling the cell's shared
// per-element math (csrc/cells/), in a grid-stride loop so any batch x hidden
// size fits a bounded grid. Written against an execution context
// (csrc/exec/cuda_block.h): the `__global__` wrapper (pointwise_kernels.cuh)
// runs it with CUDA's indices, the CPU runner (csrc/exec/cpu_runner.h) runs the
// same source on the host (tests/test_pointwise_runner.py).
#pragma once

#include <cstdint>

#include "../cells/step_params.h"

// Loops over the element's register arrays unrolled on the device (a run-time index would put
// them in local memory), as in persistent/persistent_forward.h.
#if !defined(FUSEDRNN_UNROLL)
#if defined(__CUDA_ARCH__)
#define FUSEDRNN_UNROLL _Pragma("unroll")
#else
#define FUSEDRNN_UNROLL
#endif
#endif

namespace fusedrnn {

constexpr int kPointwiseThreads = 256;

inline int64_t pointwise_blocks(int64_t elements) {
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  const int64_t blocks = (elements + kPointwiseThreads - 1) / kPointwiseThreads;
  return blocks < 4096 ? blocks : 4096;
}

// The forward cell on element (b, j) with its inputs and outputs in registers, as the persistent
// kernel's cell phase runs it (hidden = 1, element 0 of local arrays): the recurrent product gets
// b_hh (p.hproj_bias) added here, in the accumulation type, so the step's GEMM needs no bias copy
// into its output first (one launch less per step; for half types also one rounding less than
// the GEMM writing x + b_hh in half). Without hproj_bias, hproj already holds b_hh (or no bias).
template <typename Cell, typename T>
FUSEDRNN_HOST_DEVICE void forward_element(const ForwardStepParams<T>& p, int64_t b, int64_t j) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates;
  const int64_t H = p.hidden, k = b * H + j;
  T* gates = p.gates + b * G * H;
  const T* hproj = p.hproj + b * G * H;
  A xg[G], hp[G];
  FUSEDRNN_UNROLL
  for (int g = 0; g < G; ++g) {
    xg[g] = A(gates[g * H + j]);
    hp[g] = A(hproj[g * H + j]);
    if (p.hproj_bias != nullptr) hp[g] += A(p.hproj_bias[g * H + j]);
  }
  A h = A(p.h_state[k]), c = G == 4 ? A(p.c_state[k]) : A(0), out = A(0), cells = A(0), hn = A(0);
  forward_in_registers<Cell>(xg, hp, h, c, out, cells, hn);
  if constexpr (G > 1) {  // LSTM and GRU save the activated gates; RNN leaves its buffer alone
    FUSEDRNN_UNROLL
    for (int g = 0; g < G; ++g) gates[g * H + j] = T(xg[g]);
  }
  if constexpr (G == 4) {
    p.c_state[k] = T(c);
    p.cells[k] = T(c);
  }
  if constexpr (G == 3) p.hn[k] = T(hn);
  p.out[k] = T(out);  // with LSTM projection out == h_state: the same value twice
  p.h_state[k] = T(h);
}

template <typename Cell, typename T>
FUSEDRNN_HOST_DEVICE void step_element(const ForwardStepParams<T>& p, int64_t b, int64_t j) {
  forward_element<Cell>(p, b, j);
}
template <typename Cell, typename T>
FUSEDRNN_HOST_DEVICE void step_element(const BackwardStepParams<T>& p, int64_t b, int64_t j) {
  Cell::backward(p, b, j);  // b_hh does not enter a backward step (its gradient is a column sum)
}

template <typename Cell>
struct PointwiseStep {
  // Params: ForwardStepParams<T> or BackwardStepParams<T> (step_element picks the direction).
  template <typename Ctx, typename Params>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const Params& p) {
    const int64_t n = p.batch * p.hidden;
    for (int64_t i = ctx.block() * int64_t(ctx.block_dim()) + ctx.thread(); i < n;
         i += int64_t(ctx.grid_dim()) * ctx.block_dim()) {
      step_element<Cell>(p, i / p.hidden, i % p.hidden);
    }
  }
};

}  // namespace fusedrnn
