// CUDA pointwise backward step of the GRU cell (the math: csrc/cells/gru_cell.h).
#include "../cells/gru_cell.h"
#include "pointwise_kernels.cuh"

namespace fusedrnn {
FUSEDRNN_INSTANTIATE_STEP(launch_backward_step, BackwardStepParams, GruCell)
}  // namespace fusedrnn
