// Persistent whole-sequence forward kernel of the gru cell (the math: csrc/cells/gru_cell.h,
// the logic: csrc/persistent/persistent_forward.h).
#include "../cells/gru_cell.h"
#include "persistent_kernel.cuh"

namespace fusedrnn {
namespace persistent {
FUSEDRNN_INSTANTIATE_PERSISTENT(GruCell)
}  // namespace persistent
}  // namespace fusedrnn
