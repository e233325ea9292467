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

namespace fusedrnn {

constexpr int kPointwiseThreads = 256;

inline int64_t pointwise_blocks(int64_t elements) {
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  const int64_t blocks = (elements + kPointwiseThreads - 1) / kPointwiseThreads;
  return blocks < 4096 ? blocks : 4096;
}

template <typename Cell>
struct PointwiseStep {
  // Params: ForwardStepParams<T> or BackwardStepParams<T> (apply_cell picks the direction).
  template <typename Ctx, typename Params>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const Params& p) {
    const int64_t n = p.batch * p.hidden;
    for (int64_t i = ctx.block() * int64_t(ctx.block_dim()) + ctx.thread(); i < n;
         i += int64_t(ctx.grid_dim()) * ctx.block_dim()) {
      apply_cell<Cell>(p, i / p.hidden, i % p.hidden);
    }
  }
};

}  // namespace fusedrnn
