// The CPU pointwise step: the shared per-element cell math in a loop over the
// active rows, split across threads by at::parallel_for when a step is large
// enough to pay for it. The inner loop over hidden units is a SIMD loop
// (`omp simd`, compiled with -fopenmp-simd: no OpenMP runtime involved); the
// float activations are written so that it vectorises (cells/cell_common.h). Each element is independent, so the result does not
// depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "../cells/step_params.h"

namespace fusedrnn {

struct CpuPointwise {
  // Nothing to select on the CPU (the CUDA policy switches to the input's device).
  struct DeviceGuard {
    explicit DeviceGuard(at::Device) {}
  };

  // Rows per task: about 16k elements, below which threading costs more than it saves.
  static int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden)); }

  template <typename Cell, typename T>
  static void forward(const ForwardStepParams<T>& p) {
    at::parallel_for(0, p.batch, grain(p.hidden), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const ForwardStepParams<T> q = p;  // a local copy: stores cannot alias its fields
#pragma omp simd
        for (int64_t j = 0; j < q.hidden; ++j) Cell::forward(q, b, j);
      }
    });
  }

  template <typename Cell, typename T>
  static void backward(const BackwardStepParams<T>& p) {
    at::parallel_for(0, p.batch, grain(p.hidden), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const BackwardStepParams<T> q = p;
#pragma omp simd
        for (int64_t j = 0; j < q.hidden; ++j) Cell::backward(q, b, j);
      }
    });
  }
};

}  // namespace fusedrnn
