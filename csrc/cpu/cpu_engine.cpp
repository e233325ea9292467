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
  // Opt-in: on the project's 2-core EPYC, quiet, the per-step path (MKL step
  // GEMMs) measured 2-17% faster for LSTM and GRU, the engine ~8% faster for
  // RNN (benchmarks/NOTES.md, entry 10), so the measured-faster path is the default.
  const char* v = std::getenv("FUSEDRNN_CPU_ENGINE");
  return v != nullptr && v[0] == '1';
}

}  // namespace cpu_engine
}  // namespace fusedrnn
