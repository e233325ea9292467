// The engine's run-time switch: portable code (no AVX2 here), so that asking
// whether the engine can run is safe on any x86-64 CPU.
#include <cstdlib>

#include "cpu_engine.h"

namespace fusedrnn {
namespace cpu_engine {

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

}  // namespace cpu_engine
}  // namespace fusedrnn
