// Persistent whole-sequence forward kernel of the lstm cell (the math: csrc/cells/lstm_cell.h,
// the logic: csrc/persistent/persistent_forward.h).
#include "../cells/lstm_cell.h"
#include "persistent_kernel.cuh"

namespace fusedrnn {
namespace persistent {
FUSEDRNN_INSTANTIATE_PERSISTENT(LstmCell)
}  // namespace persistent
}  // namespace fusedrnn
