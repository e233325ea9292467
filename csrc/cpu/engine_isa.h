// The engine's entry points per instruction set, each compiled in its own
// translation unit for its target (engine_avx2.cpp, engine_avx512.cpp) from the
// same kernel source (engine_common.h, engine_forward.h, engine_backward.h).
// Called only by cpu_engine.cpp, after isa() has checked the CPU.
#pragma once

#include "cpu_engine.h"

namespace fusedrnn {
namespace cpu_engine {
namespace avx2 {
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);
}  // namespace avx2
namespace avx512 {
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);
}  // namespace avx512
// engine_avx512_bf16.cpp: the forward of calls with ForwardArgs::bf16_products, on CPUs with AVX512_BF16.
namespace avx512_bf16 {
void forward(const ForwardArgs& a);
}  // namespace avx512_bf16
}  // namespace cpu_engine
}  // namespace fusedrnn
