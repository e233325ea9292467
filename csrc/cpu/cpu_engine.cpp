// The engine's run-time switch: portable code (no AVX2 or AVX-512 here), so
// that asking whether the engine can run, and on which kernels, is safe on any
// x86-64 CPU.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "cpu_engine.h"
#include "engine_isa.h"

namespace fusedrnn {
namespace cpu_engine {

// The small-call rule (use_small_path), set by measurement (benchmarks/NOTES.md, entry 15: the
// small path 1.4-1.8x faster at T=1 B=8 and T=20 B=1, 4-17% slower at T=20 B=8 and T=64 B=4..8,
// where packing W_hh once pays for itself over the steps).
constexpr int64_t kSmallMaxBatch = 8;
constexpr int64_t kSmallMaxTokens = 32;  // batch x steps

Isa isa() {
  static const Isa widest = [] {
    __builtin_cpu_init();  // libgcc's checks include the OS's support for the wider registers (XCR0)
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kNone;
  }();
  const char* cap = std::getenv("FUSEDRNN_CPU_ISA");
  if (cap == nullptr || cap[0] == '\0') return widest;
  const std::string v(cap);
  TORCH_CHECK(v == "avx2" || v == "avx512", "fusedrnn: FUSEDRNN_CPU_ISA must be avx2 or avx512 (the widest "
              "instruction set the CPU engine may use), got '", v, "'");
  if (v == "avx2" && widest == Isa::kAvx512) return Isa::kAvx2;
  return widest;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNone: break;
  }
  return "none";
}

bool available() {
  if (isa() == Isa::kNone) return false;
  // On by default: once the library was built with OpenMP (entry 11 of
  // benchmarks/NOTES.md: before that its thread split never ran), the engine
  // measured faster than the per-step path for every cell, inference and
  // training. FUSEDRNN_CPU_ENGINE=0 switches it off (to compare the paths).
  const char* v = std::getenv("FUSEDRNN_CPU_ENGINE");
  return v == nullptr || v[0] != '0';
}

bool bf16_dot_products() {
  static const bool has = [] {
    __builtin_cpu_init();
    // engine_avx512_bf16.cpp's target (avx512bf16) implies AVX512BW, whose instructions it may use.
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  const char* v = std::getenv("FUSEDRNN_CPU_BF16_DOT");
  if (v != nullptr && v[0] != '\0') {
    TORCH_CHECK((v[0] == '0' || v[0] == '1') && v[1] == '\0',
                "fusedrnn: FUSEDRNN_CPU_BF16_DOT must be 0 (float32 products for bfloat16 layers) or 1, got '", v, "'");
    if (v[0] == '0') return false;
  }
  return has && isa() == Isa::kAvx512;
}

int split_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return -1;
  TORCH_CHECK((v[0] == '0' || v[0] == '1') && v[1] == '\0', "fusedrnn: ", name,
              " must be 0 (no unit split across threads) or 1 (always split), got '", v, "'");
  return v[0] - '0';
}

bool bf16_products_for_call(int64_t batch, int64_t steps, bool uniform) {
  if (!bf16_dot_products() || use_small_path(batch, steps)) return false;
  const int force = split_switch("FUSEDRNN_CPU_UNIT_SPLIT");
  const int threads = at::get_num_threads();
  const bool split = uniform && threads >= 2 && force != 0 &&
                     (force == 1 || batch <= kUnitSplitMaxRowsPerThread * threads);
  return !split;
}

void forward(const ForwardArgs& a) {
  if (a.bf16_products && !a.small && bf16_dot_products()) {
    avx512_bf16::forward(a);
    return;
  }
  ForwardArgs f = a;
  f.bf16_products = false;  // this CPU (or the switch) says float32 products
  if (isa() == Isa::kAvx512) {
    avx512::forward(f);
  } else {
    avx2::forward(f);
  }
}

void backward(const BackwardArgs& a) {
  if (isa() == Isa::kAvx512) {
    avx512::backward(a);
  } else {
    avx2::backward(a);
  }
}

bool fuse_input_projection(int gates, int64_t input_size, int64_t hidden_size) {
  // FUSEDRNN_CPU_FUSE_INPUT=1 / 0 forces the choice (tests run both ways).
  const char* force = std::getenv("FUSEDRNN_CPU_FUSE_INPUT");
  if (force != nullptr && (force[0] == '0' || force[0] == '1')) return force[0] == '1';
  static const int64_t l2_bytes = [] {
    long v = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE  // glibc; elsewhere assume the project machine's 512 KB
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t{512} * 1024;
  }();
  const int64_t hh_bytes = static_cast<int64_t>(gates) * hidden_size * hidden_size * 4;
  const int64_t weight_bytes = static_cast<int64_t>(gates) * hidden_size * (input_size + hidden_size) * 4;
  if (2 * weight_bytes <= l2_bytes) return true;  // both stay in L2 from step to step
  // W_hh alone leaves half the L2, so the recurrence streams it from L3 every step either way; fusing
  // adds W_ih to that stream at the same FLOPs per byte and saves the separate projection's round trip
  // of the gates buffer (T*B*G*H floats, 52 MB at fastrnns) through memory. Up to 16 MB of weights:
  // beyond that (LSTM H = I = 1024, 32 MB, this L3's size) it measured slower (entry 54).
  return 2 * hh_bytes > l2_bytes && weight_bytes <= kFuseInputMaxWeightBytes;
}

std::atomic<int64_t>& unit_split_calls() {
  static std::atomic<int64_t> calls{0};
  return calls;
}

std::atomic<int64_t>& bf16_forward_calls() {
  static std::atomic<int64_t> calls{0};
  return calls;
}

bool use_small_path(int64_t batch, int64_t steps) {
  const char* force = std::getenv("FUSEDRNN_CPU_SMALL");
  if (force != nullptr && (force[0] == '0' || force[0] == '1')) return force[0] == '1';
  return batch <= kSmallMaxBatch && batch * steps <= kSmallMaxTokens;
}

}  // namespace cpu_engine
}  // namespace fusedrnn

// For tests and benchmarks (read through ctypes, no op schema needed): the
// instruction set the engine would run a float32 layer on now, "avx512", "avx2"
// or "none" (no engine on this CPU, or FUSEDRNN_CPU_ENGINE=0); the error's
// message for a bad FUSEDRNN_CPU_ISA.
extern "C" __attribute__((visibility("default"))) const char* fusedrnn_cpu_engine_isa() {
  static thread_local std::string answer;
  try {
    answer = fusedrnn::cpu_engine::available() ? fusedrnn::cpu_engine::isa_name(fusedrnn::cpu_engine::isa()) : "none";
  } catch (const c10::Error& e) {
    answer = e.what_without_backtrace();
  }
  return answer.c_str();
}

// For tests (ctypes): whether a float32 layer of these sizes computes its input projection inside
// the forward tiles now (FUSEDRNN_CPU_FUSE_INPUT included).
extern "C" __attribute__((visibility("default"))) int fusedrnn_cpu_fuse_input_projection(int gates, int64_t input_size,
                                                                                       int64_t hidden_size) {
  return fusedrnn::cpu_engine::fuse_input_projection(gates, input_size, hidden_size) ? 1 : 0;
}

// For tests (ctypes): forward and backward calls that took the unit split so far (cpu_engine.h: unit_split_calls).
extern "C" __attribute__((visibility("default"))) int64_t fusedrnn_cpu_unit_split_calls() {
  return fusedrnn::cpu_engine::unit_split_calls().load();
}

// For tests (ctypes): whether a bfloat16 layer's forward runs on bf16 dot products now (cpu_engine.h:
// bf16_dot_products, FUSEDRNN_CPU_BF16_DOT included; -1 with a bad switch), and how many forward calls did.
extern "C" __attribute__((visibility("default"))) int fusedrnn_cpu_bf16_dot_products() {
  try {
    return fusedrnn::cpu_engine::bf16_dot_products() ? 1 : 0;
  } catch (const c10::Error&) {
    return -1;
  }
}
extern "C" __attribute__((visibility("default"))) int64_t fusedrnn_cpu_bf16_forward_calls() {
  return fusedrnn::cpu_engine::bf16_forward_calls().load();
}
