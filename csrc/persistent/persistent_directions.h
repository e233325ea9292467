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
template <typename K, typename Ctx, typename Params>
FUSEDRNN_HOST_DEVICE void run_directions(const Ctx& ctx, const Directions<Params>& l) {
  const int64_t block = ctx.block();
  const int d = block < l.first_ctas ? 0 : 1;
  K::run(ctx, l.dir[d], block - (d == 0 ? 0 : l.first_ctas));
}

// Blocks of one direction: the CTAs that cover `batch` rows, `rows_per_cta` each.
FUSEDRNN_HOST_DEVICE int64_t ctas_for(int64_t batch, int64_t rows_per_cta) {
  return (batch + rows_per_cta - 1) / rows_per_cta;
}

}  // namespace persistent
}  // namespace fusedrnn
