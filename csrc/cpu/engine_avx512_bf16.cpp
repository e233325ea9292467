// The engine's forward with bfloat16 dot products, for bfloat16 layers on CPUs with AVX512_BF16 (Zen 4
// and later, Intel Cooper Lake and Sapphire Rapids and later): the kernels of engine_common.h and
// engine_forward.h once more, with the AVX-512 vector of engine_simd_avx512.h, compiled with
// FUSEDRNN_ENGINE_BF16_PRODUCTS so that forward_impl's bf16 branch exists (engine_forward.h:
// forward_tile on bf16 operands, micro_kernel's vdpbf16ps form), and the large GEMM on bf16 operands
// (large_gemm_kernel.h: run_large_gemm<Bf16>, a bfloat16 layer's backward GEMMs). A translation unit of its own so that
// engine_avx512.cpp stays AVX-512F only (Skylake-X has no BF16); cpu_engine.cpp calls this one only for
// a call that asks for bf16 products (ForwardArgs::bf16_products) on a CPU that has them. Everything
// else here is the float32 engine: a call without bf16_products would compute exactly what
// engine_avx512.cpp computes (not reached: the dispatcher sends those there).
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
#pragma GCC target("avx512f,fma,avx512bf16")
// As engine_avx512.cpp: GCC 12's masked AVX-512 builtins trip -Wuninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FUSEDRNN_TARGET_HAS_FMA 1
namespace {
namespace fusedrnn_avx512_bf16 {
#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
}  // namespace fusedrnn_avx512_bf16
}  // namespace
#undef FUSEDRNN_TARGET_HAS_FMA

namespace fusedrnn {
namespace cpu_engine {
namespace avx512_bf16 {
namespace {

namespace cells = fusedrnn_avx512_bf16::fusedrnn;

#include "engine_simd_avx512.h"

#define FUSEDRNN_ENGINE_SIMDLEN 16
#define FUSEDRNN_ENGINE_BF16_PRODUCTS 1
#include "engine_common.h"
#include "engine_forward.h"
#include "large_gemm_kernel.h"
#undef FUSEDRNN_ENGINE_BF16_PRODUCTS
#undef FUSEDRNN_ENGINE_SIMDLEN

}  // namespace

void forward(const ForwardArgs& a) { run_forward(a); }

}  // namespace avx512_bf16
}  // namespace cpu_engine

void large_gemm::avx512_bf16::run(const large_gemm::Args& a) {
  cpu_engine::avx512_bf16::run_large_gemm<cpu_engine::avx512_bf16::Bf16>(a);
}

}  // namespace fusedrnn

#pragma GCC diagnostic pop
#pragma GCC pop_options
