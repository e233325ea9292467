// CUDA pointwise backward step of the RNN cell (the math: csrc/cells/rnn_cell.h).
#include "../cells/rnn_cell.h"
#include "pointwise_kernels.cuh"

namespace fusedrnn {
FUSEDRNN_INSTANTIATE_STEP(launch_backward_step, BackwardStepParams, RnnTanhCell)
FUSEDRNN_INSTANTIATE_STEP(launch_backward_step, BackwardStepParams, RnnReluCell)
}  // namespace fusedrnn
