// CUDA pointwise forward step of the RNN cell (the math: csrc/cells/rnn_cell.h).
#include "../cells/rnn_cell.h"
#include "pointwise_kernels.cuh"

namespace fusedrnn {
FUSEDRNN_INSTANTIATE_STEP(launch_forward_step, ForwardStepParams, RnnTanhCell)
FUSEDRNN_INSTANTIATE_STEP(launch_forward_step, ForwardStepParams, RnnReluCell)
}  // namespace fusedrnn
