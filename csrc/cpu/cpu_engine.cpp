// The engine's run-time switch: portable code (no AVX2 here), so that asking
// whether the engine can run is safe on any x86-64 CPU.
#include <unistd.h>

#include <cstdlib>

#include "cpu_engine.h"

namespace fusedrnn {
namespace cpu_engine {

// The small-call rule (use_small_path), set by measurement (benchmarks/NOTES.md, entry 15: the
// small path 1.4-1.8x faster at T=1 B=8 and T=20 B=1, 4-17% slower at T=20 B=8 and T=64 B=4..8,
// where packing W_hh once pays for itself over the steps).
constexpr int64_t kSmallMaxBatch = 8;
constexpr int64_t kSmallMaxTokens = 32;  // batch x steps

bool available() {
  static const bool cpu_has_avx2_fma = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (!cpu_has_avx2_fma) return false;
  // On by default: once the library was built with OpenMP (entry 11 of
  // benchmarks/NOTES.md: before that its thread split never ran), the engine
  // measured faster than the per-step path for every cell, inference and
  // training. FUSEDRNN_CPU_ENGINE=0 switches it off (to compare the paths).
  const char* v = std::getenv("FUSEDRNN_CPU_ENGINE");
  return v == nullptr || v[0] != '0';
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
  const int64_t weight_bytes = static_cast<int64_t>(gates) * hidden_size * (input_size + hidden_size) * 4;
  return 2 * weight_bytes <= l2_bytes;
}

bool use_small_path(int64_t batch, int64_t steps) {
  const char* force = std::getenv("FUSEDRNN_CPU_SMALL");
  if (force != nullptr && (force[0] == '0' || force[0] == '1')) return force[0] == '1';
  return batch <= kSmallMaxBatch && batch * steps <= kSmallMaxTokens;
}

}  // namespace cpu_engine
}  // namespace fusedrnn
