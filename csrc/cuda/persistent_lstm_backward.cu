// Persistent whole-sequence backward kernel of the lstm cell (the math: csrc/cells/lstm_cell.h,
// the logic: csrc/persistent/persistent_backward.h).
#include "../cells/lstm_cell.h"
#include "persistent_backward_kernel.cuh"

namespace fusedrnn {
namespace persistent {
FUSEDRNN_INSTANTIATE_PERSISTENT_BACKWARD(LstmCell)
}  // namespace persistent
}  // namespace fusedrnn
