// Persistent whole-sequence backward kernel of the gru cell (the math: csrc/cells/gru_cell.h,
// the logic: csrc/persistent/persistent_backward.h).
#include "../cells/gru_cell.h"
#include "persistent_backward_kernel.cuh"

namespace fusedrnn {
namespace persistent {
FUSEDRNN_INSTANTIATE_PERSISTENT_BACKWARD(GruCell)
}  // namespace persistent
}  // namespace fusedrnn
