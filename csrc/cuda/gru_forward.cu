// CUDA pointwise forward step of the GRU cell (the math: csrc/cells/gru_cell.h).
#include "../cells/gru_cell.h"
#include "pointwise_kernels.cuh"

namespace fusedrnn {
FUSEDRNN_INSTANTIATE_STEP(launch_forward_step, ForwardStepParams, GruCell)
}  // namespace fusedrnn
