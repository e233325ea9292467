// CPU implementations of every fusedrnn op: the device-generic layer drivers
// (csrc/layer/) with the CPU pointwise loop.
#include <torch/library.h>

#include "../layer/layer_ops.h"
#include "cpu_device.h"

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { fusedrnn::register_layer_ops<fusedrnn::CpuDevice>(m); }
