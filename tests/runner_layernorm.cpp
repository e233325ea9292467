// The layer-normalised cells' CUDA per-step kernels' own bodies (csrc/cuda/layernorm_step.h) on the
// CPU runner, for tests/test_layernorm_cuda_runner.py (through ctypes): one block per row as the CUDA
// launcher (layernorm_kernels.cuh: launch_rows) with its block size (lncuda::row_threads) and shared
// memory (Body::shared_bytes), or a given block size; every thread of every block as a fiber.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "cuda/layernorm_step.h"
#include "exec/cpu_runner.h"

namespace {

using namespace fusedrnn;
using namespace fusedrnn::lncuda;

template <typename Body, typename Params>
void run_rows(const Params& p, int threads) {
  if (p.rows == 0) return;  // as launch_rows: no launch
  exec::LaunchConfig c;
  c.grid = p.rows;
  c.threads = threads > 0 ? threads : row_threads(p.hidden);
  c.shared_bytes = Body::shared_bytes(c.threads, p.hidden);
  exec::run_kernel(c, [&p](const exec::CpuThread& ctx) { Body::run(ctx, p); });
}

template <typename T>
T* at(void** q, int i) {
  return static_cast<T*>(q[i]);
}

// Pointer order of each kernel: its params struct's members, in declaration order (the scalars
// rows, hidden, eps come as arguments). S = storage type, A = accumulation type.
template <typename S>
void dispatch(int kernel, int64_t rows, int64_t hidden, double eps, int threads, void** q) {
  using A = acc_t<S>;
  switch (kernel) {
    case 0: {  // LSTM forward
      LnLstmForwardParams<S> p;
      p.rows = rows; p.hidden = hidden; p.eps = A(eps);
      p.norm_x = at<S>(q, 0); p.norm_h = at<S>(q, 1); p.gates = at<S>(q, 2); p.h_state = at<S>(q, 3);
      p.c_state = at<S>(q, 4); p.out = at<S>(q, 5); p.cells = at<S>(q, 6); p.norm_c = at<S>(q, 7);
      p.rstd = at<A>(q, 8); p.zoneout_h = at<S>(q, 9); p.zoneout_c = at<S>(q, 10);
      p.gain_x = at<A>(q, 11); p.gain_h = at<A>(q, 12); p.bias = at<A>(q, 13); p.gain_c = at<A>(q, 14);
      p.shift_c = at<A>(q, 15);
      run_rows<LnLstmForward<S>>(p, threads);
      return;
    }
    case 1: {  // LSTM backward
      LnLstmBackwardParams<S> p;
      p.rows = rows; p.hidden = hidden;
      p.grad_out = at<S>(q, 0); p.grad_h_state = at<S>(q, 1); p.grad_c_state = at<S>(q, 2); p.gates = at<S>(q, 3);
      p.norm_c = at<S>(q, 4); p.c_prev = at<S>(q, 5); p.norm_x = at<S>(q, 6); p.norm_h = at<S>(q, 7);
      p.rstd = at<A>(q, 8); p.zoneout_h = at<S>(q, 9); p.zoneout_c = at<S>(q, 10); p.gain_x = at<A>(q, 11);
      p.gain_h = at<A>(q, 12); p.gain_c = at<A>(q, 13); p.shift_c = at<A>(q, 14); p.grad_gates = at<A>(q, 15);
      p.grad_y = at<A>(q, 16); p.grad_x = at<S>(q, 17); p.grad_hh = at<S>(q, 18);
      run_rows<LnLstmBackward<S>>(p, threads);
      return;
    }
    case 2: {  // GRU forward
      LnGruForwardParams<S> p;
      p.rows = rows; p.hidden = hidden; p.eps = A(eps);
      p.norm_x = at<S>(q, 0); p.norm_h = at<S>(q, 1); p.gates = at<S>(q, 2); p.h_state = at<S>(q, 3);
      p.out = at<S>(q, 4); p.rstd = at<A>(q, 5); p.zoneout_h = at<S>(q, 6); p.gain_x = at<A>(q, 7);
      p.gain_h = at<A>(q, 8); p.bias_x = at<A>(q, 9); p.bias_h = at<A>(q, 10);
      run_rows<LnGruForward<S>>(p, threads);
      return;
    }
    case 3: {  // GRU backward
      LnGruBackwardParams<S> p;
      p.rows = rows; p.hidden = hidden;
      p.grad_out = at<S>(q, 0); p.grad_h_state = at<S>(q, 1); p.gates = at<S>(q, 2); p.h_prev = at<S>(q, 3);
      p.norm_x = at<S>(q, 4); p.norm_h = at<S>(q, 5); p.rstd = at<A>(q, 6); p.zoneout_h = at<S>(q, 7);
      p.gain_x = at<A>(q, 8); p.gain_h = at<A>(q, 9); p.bias_h = at<A>(q, 10); p.grad_gates_x = at<A>(q, 11);
      p.grad_gates_h = at<A>(q, 12); p.grad_x = at<S>(q, 13); p.grad_hh = at<S>(q, 14);
      run_rows<LnGruBackward<S>>(p, threads);
      return;
    }
    default:
      throw std::invalid_argument("unknown kernel " + std::to_string(kernel));
  }
}

}  // namespace

extern "C" {

// kernel: 0 LSTM forward, 1 LSTM backward, 2 GRU forward, 3 GRU backward; dtype: 0 float64,
// 1 float32, 2 float16, 3 bfloat16; threads <= 0: the CUDA launcher's block size.
// 0 = ran, 1 = a runner check failed, 2 = other error.
int runner_layernorm(int kernel, int dtype, int64_t rows, int64_t hidden, double eps, int threads, void** ptrs,
                     char* message, int capacity) {
  try {
    switch (dtype) {
      case 0: dispatch<double>(kernel, rows, hidden, eps, threads, ptrs); break;
      case 1: dispatch<float>(kernel, rows, hidden, eps, threads, ptrs); break;
      case 2: dispatch<c10::Half>(kernel, rows, hidden, eps, threads, ptrs); break;
      case 3: dispatch<c10::BFloat16>(kernel, rows, hidden, eps, threads, ptrs); break;
      default: throw std::invalid_argument("unknown dtype " + std::to_string(dtype));
    }
    return 0;
  } catch (const exec::KernelCheckError& e) {
    std::strncpy(message, e.what(), size_t(capacity) - 1);
    message[capacity - 1] = '\0';
    return 1;
  } catch (const std::exception& e) {
    std::strncpy(message, e.what(), size_t(capacity) - 1);
    message[capacity - 1] = '\0';
    return 2;
  }
}

// The CUDA launcher's block size for `hidden` and the shared memory of each kernel (for the tests).
int runner_layernorm_threads(int64_t hidden) { return row_threads(hidden); }

}  // extern "C"
