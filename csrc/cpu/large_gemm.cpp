// The large GEMM's run-time switch (large_gemm.h): portable code, no AVX2 or AVX-512 here.
#include "large_gemm.h"

#include <c10/util/Exception.h>

#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu_engine.h"

namespace fusedrnn {
namespace large_gemm {

bool enabled() {
  const char* v = std::getenv("FUSEDRNN_CPU_GEMM");
  if (v != nullptr && v[0] != '\0') {
    const std::string s(v);
    TORCH_CHECK(s == "own" || s == "mkl", "fusedrnn: FUSEDRNN_CPU_GEMM must be own or mkl (the CPU's large float32 "
                "GEMMs: the blocked GEMM around the engine's micro-kernel, or ATen's MKL), got '", s, "'");
    if (s == "mkl") return false;
  }
  return cpu_engine::isa() != cpu_engine::Isa::kNone;
}

// Measured on the AVX2 machine (AMD EPYC Zen 3, benchmarks/NOTES.md entry 44, 1 thread, CPU time,
// loaded): this GEMM beat MKL's sgemm_ by 5-30% on the shallow products (K <= 128: the sentiment
// layers' input projections, 3200 x 512 x 100), matched it within the machine's noise on the deep
// ones (K = 512 .. 6400: fastrnns' projections and every weight gradient), and the fastrnns LSTM
// layer ran 5-9% slower with it there; below ~128 rows MKL (and its packing-free small kernels) won.
// So only shallow products of many rows come here.
// On AVX-512 (measured on an AMD Zen 5 host, entry 51) the 16-lane kernels ran the deep products too
// (dX, dW_ih, dW_hh, fastrnns' projections) at about twice MKL's rate on one thread, so there every
// product of at least 128 rows and a depth of 16 comes here: the LSTM training step 1.44x faster at the
// sentiment shape, 1.62x at fastrnns (2 threads, quiet, entry 51). Only on AMD's Zen 5 and later (family
// 26 up): MKL runs generic kernels on AMD CPUs and its own AVX-512 ones on Intel's, where this was not
// measured, so Intel keeps MKL for them; Zen 4 (family 25) double-pumps its 512-bit FMAs, so its AVX-512
// peak is its AVX2 one, where the deep products measured level with MKL (entry 44, and entry 51 with the
// Zen 5 capped at AVX2), and it was not measured with this rule: it keeps MKL too. So on AMD AVX-512 CPUs
// FUSEDRNN_CPU_ISA=avx2 and the default differ in the deep products' rounding (MKL's sums against these).
bool worth(int64_t M, int64_t N, int64_t K) {
  if (M < 128 || N < 16 || K < 16) return false;
  if (K <= 256) return true;
  static const bool deep_products_here = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_is("amd")) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    unsigned family = (eax >> 8) & 0xf;
    if (family == 0xf) family += (eax >> 20) & 0xff;  // the extended family
    return family >= 26;
  }();
  return deep_products_here && cpu_engine::isa() == cpu_engine::Isa::kAvx512;
}

// Calls of run(), for tests: that a layer's products took this GEMM (a relaxed increment per product).
std::atomic<int64_t> g_calls{0};

void run_bf16(const Args& a) {
  TORCH_CHECK(cpu_engine::bf16_dot_products(), "fusedrnn: the bf16 large GEMM needs a CPU with AVX512_BF16");
  g_calls.fetch_add(1, std::memory_order_relaxed);
  avx512_bf16::run(a);
}

void run(const Args& a) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  if (cpu_engine::isa() == cpu_engine::Isa::kAvx512) {
    avx512::run(a);
  } else {
    avx2::run(a);
  }
}

}  // namespace large_gemm
}  // namespace fusedrnn

// For tests and benchmarks (ctypes, no op schema): the large GEMM on raw float32 pointers, on the
// instruction set isa() picks now (FUSEDRNN_CPU_ISA caps it), whatever FUSEDRNN_CPU_GEMM says.
// Returns 0, 1 where this CPU has no engine, 2 for a bad FUSEDRNN_CPU_ISA (nothing done). mc / kc: 0 for the defaults.
namespace {
fusedrnn::large_gemm::Args ctypes_args(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
                                       const float* B, int64_t b_rs, int64_t b_cs, const float* bias, int accumulate,
                                       float* C, int64_t ldc, int64_t mc, int64_t kc) {
  fusedrnn::large_gemm::Args a;
  a.M = M; a.N = N; a.K = K;
  a.A = A; a.a_rs = a_rs; a.a_cs = a_cs;
  a.B = B; a.b_rs = b_rs; a.b_cs = b_cs;
  a.bias = bias; a.accumulate = accumulate != 0;
  a.C = C; a.ldc = ldc; a.mc = mc; a.kc = kc;
  return a;
}
}  // namespace

extern "C" __attribute__((visibility("default"))) int fusedrnn_large_gemm(
    int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t b_rs,
    int64_t b_cs, const float* bias, int accumulate, float* C, int64_t ldc, int64_t mc, int64_t kc) {
  const fusedrnn::large_gemm::Args a =
      ctypes_args(M, N, K, A, a_rs, a_cs, B, b_rs, b_cs, bias, accumulate, C, ldc, mc, kc);
  try {
    if (fusedrnn::cpu_engine::isa() == fusedrnn::cpu_engine::Isa::kNone) return 1;
    fusedrnn::large_gemm::run(a);
  } catch (const c10::Error&) {
    return 2;  // a bad FUSEDRNN_CPU_ISA: no exception may cross into ctypes
  }
  return 0;
}

// For tests (ctypes): the same on bf16 dot products (run_bf16: both operands rounded to bf16). Returns 0,
// or 3 where cpu_engine::bf16_dot_products() says no (nothing done).
extern "C" __attribute__((visibility("default"))) int fusedrnn_large_gemm_bf16(
    int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t b_rs,
    int64_t b_cs, const float* bias, int accumulate, float* C, int64_t ldc, int64_t mc, int64_t kc) {
  const fusedrnn::large_gemm::Args a =
      ctypes_args(M, N, K, A, a_rs, a_cs, B, b_rs, b_cs, bias, accumulate, C, ldc, mc, kc);
  try {
    if (!fusedrnn::cpu_engine::bf16_dot_products()) return 3;
    fusedrnn::large_gemm::run_bf16(a);
  } catch (const c10::Error&) {
    return 2;
  }
  return 0;
}

// For tests (ctypes): how many products run() (and run_bf16()) have computed in this process.
extern "C" __attribute__((visibility("default"))) int64_t fusedrnn_large_gemm_calls() {
  return fusedrnn::large_gemm::g_calls.load(std::memory_order_relaxed);
}
