// Persistent whole-sequence forward kernel of the rnn_tanh cell (the math: csrc/cells/rnn_cell.h,
// the logic: csrc/persistent/persistent_forward.h).
#include "../cells/rnn_cell.h"
#include "persistent_kernel.cuh"

namespace fusedrnn {
namespace persistent {
FUSEDRNN_INSTANTIATE_PERSISTENT(RnnTanhCell)
}  // namespace persistent
}  // namespace fusedrnn
