// CUDA pointwise forward step of the LSTM cell (the math: csrc/cells/lstm_cell.h).
#include "../cells/lstm_cell.h"
#include "pointwise_kernels.cuh"

namespace fusedrnn {
FUSEDRNN_INSTANTIATE_STEP(launch_forward_step, ForwardStepParams, LstmCell)
}  // namespace fusedrnn
