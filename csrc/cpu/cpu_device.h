// The CPU device policy of the layer drivers (csrc/layer/):
// - the per-step GEMM (matmul): few float rows in our small-GEMM kernel,
//   otherwise straight to BLAS, otherwise ATen (see benchmarks/NOTES.md);
// - the pointwise step: the shared per-element cell math in a loop over the
//   active rows, split across threads by at::parallel_for when a step is large
//   enough to pay for it. The inner loop over hidden units is a SIMD loop
//   (`omp simd`, compiled with -fopenmp-simd: no OpenMP runtime involved); the
//   float activations are written so that it vectorises (cells/cell_common.h).
//   Each element is independent, so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "../cells/step_params.h"
#include "../layer/layer_forward.h"
#include "cpu_blas.h"
#include "small_gemm.h"

namespace fusedrnn {

struct CpuDevice {
  // Nothing to select on the CPU (the CUDA policy switches to the input's device).
  struct DeviceGuard {
    explicit DeviceGuard(at::Device) {}
  };

  // The per-step GEMM: a few float rows in our small-GEMM kernel (small_gemm.h),
  // otherwise straight to BLAS for float and double (cpu_blas.h), else ATen.
  template <typename T>
  static void matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                     bool accumulate) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const bool row_major = out.stride(1) == 1 && a.stride(1) == 1 && b.stride(1) == 1 &&
                             (!bias.defined() || bias.is_contiguous());
      if constexpr (std::is_same_v<T, float>) {
        if (row_major && a.size(0) >= kSmallGemmMinRows && a.size(0) <= kSmallGemmMaxRows) {
          small_gemm(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0),
                     b.const_data_ptr<float>(), b.stride(0), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                     accumulate, out.data_ptr<float>(), out.stride(0));
          return;
        }
      }
      if (row_major && blas_matmul<T>(a.size(0), b.size(1), a.size(1), a.template const_data_ptr<T>(), a.stride(0),
                                      b.template const_data_ptr<T>(), b.stride(0),
                                      bias.defined() ? bias.template const_data_ptr<T>() : nullptr, accumulate,
                                      out.template data_ptr<T>(), out.stride(0))) {
        return;
      }
    }
    aten_matmul(out, a, b, bias, accumulate);
  }

  // The drivers' other GEMMs (input projection, projection, weight gradients): ATen.
  static void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   bool accumulate) {
    aten_matmul(out, a, b, bias, accumulate);
  }

  // Rows per task: about 16k elements, below which threading costs more than it saves.
  static int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden)); }

  // One step over the active rows, forward or backward (apply_cell picks by the params type).
  template <typename Cell, typename Params>
  static void run_step(const Params& p) {
    at::parallel_for(0, p.batch, grain(p.hidden), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Params q = p;  // a local copy: stores cannot alias its fields
#pragma omp simd
        for (int64_t j = 0; j < q.hidden; ++j) apply_cell<Cell>(q, b, j);
      }
    });
  }

  template <typename Cell, typename T>
  static void forward(const ForwardStepParams<T>& p) {
    run_step<Cell>(p);
  }

  template <typename Cell, typename T>
  static void backward(const BackwardStepParams<T>& p) {
    run_step<Cell>(p);
  }
};

}  // namespace fusedrnn
