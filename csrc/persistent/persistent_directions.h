// One launch of a persistent kernel over one direction of a layer, or over both
// directions of a bidirectional layer: blocks [0, first_ctas) run dir[0], the
// blocks after them dir[1] (each direction fills about 32 of an H100's 132 SMs
// at the sentiment shape, so the two together still fit one wave, and a
// bidirectional layer is one launch instead of two). The CTAs of the two
// directions share nothing, so each computes exactly what its own launch would.
// Framework-free: the `__global__` wrappers (csrc/cuda/persistent_*kernel.cuh)
// and the CPU runner (csrc/cpu/persistent_emulation.cpp) dispatch through it.
#pragma once

#include <cstdint>

#include "../cells/cell_common.h"  // FUSEDRNN_HOST_DEVICE

namespace fusedrnn {
namespace persistent {

template <typename Params>
struct Directions {
  Params dir[2];
  int64_t first_ctas = 0;  // CTAs of dir[0]; a one-direction launch has no others
};

// Kernel K's body for the direction this block belongs to, with the block's index within it.
// Two calls, each with a constant parameter set, not one call on l.dir[d]: indexing the kernel's
// parameters by d made every parameter load register-addressed and cost up to 20 registers
// (RNN 76 -> 96, GRU 111 -> 122, LSTM float32 120 -> 127 of 128); with the branch the body is
// inlined twice, each copy compiled as the one-direction kernel was (ptxas: within 0-14
// registers of it, no spills; benchmarks/NOTES.md, entry 25).
template <typename K, typename Ctx, typename Params>
FUSEDRNN_HOST_DEVICE void run_directions(const Ctx& ctx, const Directions<Params>& l) {
  const int64_t block = ctx.block();
  if (block < l.first_ctas) {
    K::run(ctx, l.dir[0], block);
  } else {
    K::run(ctx, l.dir[1], block - l.first_ctas);
  }
}

// Blocks of one direction: the CTAs that cover `batch` rows, `rows_per_cta` each.
FUSEDRNN_HOST_DEVICE int64_t ctas_for(int64_t batch, int64_t rows_per_cta) {
  return (batch + rows_per_cta - 1) / rows_per_cta;
}

}  // namespace persistent
}  // namespace fusedrnn
