// Persistent whole-sequence backward kernel of the rnn_tanh cell (the math: csrc/cells/rnn_cell.h,
// the logic: csrc/persistent/persistent_backward.h).
#include "../cells/rnn_cell.h"
#include "persistent_backward_kernel.cuh"

namespace fusedrnn {
namespace persistent {
FUSEDRNN_INSTANTIATE_PERSISTENT_BACKWARD(RnnTanhCell)
}  // namespace persistent
}  // namespace fusedrnn
