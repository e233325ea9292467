// The engine for CPUs with AVX-512F: the kernels of engine_common.h,
// engine_forward.h and engine_backward.h with 16-float vectors (__m512) and an
// 8-row micro-tile (16 of the 32 zmm registers accumulate, so that a thread's
// 16 rows of a batch of 32 are two full tiles). Only AVX-512F instructions
// (Skylake-X, Zen 4 and later all have them): the bitwise operations go through
// the integer forms, which are F, not DQ.
//
// As in engine_avx2.cpp: nothing but the engine's own code and the cell math is
// compiled after the target switch, and those live in anonymous namespaces, so
// no AVX-512 code can be merged into what other CPUs run.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_engine.h"
#include "engine_isa.h"
#include "large_gemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the unused source of
// their masked builtins, which -Wall reports as "used uninitialized" at every use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FUSEDRNN_TARGET_HAS_FMA 1
namespace {
namespace fusedrnn_avx512 {
#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
}  // namespace fusedrnn_avx512
}  // namespace
#undef FUSEDRNN_TARGET_HAS_FMA

namespace fusedrnn {
namespace cpu_engine {
namespace avx512 {
namespace {

namespace cells = fusedrnn_avx512::fusedrnn;

#include "engine_simd_avx512.h"

#define FUSEDRNN_ENGINE_SIMDLEN 16
#include "engine_common.h"
#include "engine_forward.h"
#include "engine_backward.h"
#include "large_gemm_kernel.h"
#undef FUSEDRNN_ENGINE_SIMDLEN

}  // namespace

void forward(const ForwardArgs& a) { run_forward(a); }
void backward(const BackwardArgs& a) { run_backward(a); }

}  // namespace avx512
}  // namespace cpu_engine

void large_gemm::avx512::run(const large_gemm::Args& a) { cpu_engine::avx512::run_large_gemm(a); }

}  // namespace fusedrnn

#pragma GCC diagnostic pop
#pragma GCC pop_options
