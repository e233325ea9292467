// The per-step pointwise kernels' own body (csrc/cuda/pointwise_step.h) on the CPU runner, for
// tests/test_pointwise_runner.py (through ctypes): the grid the CUDA launcher would use
// (pointwise_blocks, kPointwiseThreads) or a given one, every thread of every block as a fiber.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "cells/gru_cell.h"
#include "cells/lstm_cell.h"
#include "cells/rnn_cell.h"
#include "cuda/pointwise_step.h"
#include "exec/cpu_runner.h"

namespace {

using namespace fusedrnn;

template <typename Cell, typename Params>
void run_step(const Params& p, int64_t grid) {
  exec::LaunchConfig c;
  c.grid = grid > 0 ? grid : pointwise_blocks(p.batch * p.hidden);
  c.threads = kPointwiseThreads;
  if (p.batch * p.hidden == 0) return;  // as launch_step: no launch
  exec::run_kernel(c, [&p](const exec::CpuThread& ctx) { PointwiseStep<Cell>::run(ctx, p); });
}

// ptrs, forward:  gates, hproj, h_state, c_state, out, cells, hn, hproj_bias
//       backward: gates, grad_out, grad_h_state, grad_c_state, cells, c_prev, h_prev, hn, out,
//                 grad_gates, grad_gates_h, r_out
template <typename Cell, typename T>
void dispatch_direction(bool backward, int64_t batch, int64_t hidden, int64_t grid, void** q) {
  if (!backward) {
    ForwardStepParams<T> p;
    p.batch = batch;
    p.hidden = hidden;
    p.gates = static_cast<T*>(q[0]);
    p.hproj = static_cast<const T*>(q[1]);
    p.h_state = static_cast<T*>(q[2]);
    p.c_state = static_cast<T*>(q[3]);
    p.out = static_cast<T*>(q[4]);
    p.cells = static_cast<T*>(q[5]);
    p.hn = static_cast<T*>(q[6]);
    p.hproj_bias = static_cast<const T*>(q[7]);
    run_step<Cell>(p, grid);
  } else {
    BackwardStepParams<T> p;
    p.batch = batch;
    p.hidden = hidden;
    p.gates = static_cast<const T*>(q[0]);
    p.grad_out = static_cast<const T*>(q[1]);
    p.grad_h_state = static_cast<T*>(q[2]);
    p.grad_c_state = static_cast<T*>(q[3]);
    p.cells = static_cast<const T*>(q[4]);
    p.c_prev = static_cast<const T*>(q[5]);
    p.h_prev = static_cast<const T*>(q[6]);
    p.hn = static_cast<const T*>(q[7]);
    p.out = static_cast<const T*>(q[8]);
    p.grad_gates = static_cast<T*>(q[9]);
    p.grad_gates_h = static_cast<T*>(q[10]);
    p.r_out = static_cast<T*>(q[11]);
    run_step<Cell>(p, grid);
  }
}

template <typename Cell>
bool dispatch_dtype(int dtype, bool backward, int64_t batch, int64_t hidden, int64_t grid, void** q) {
  switch (dtype) {
    case 0: dispatch_direction<Cell, double>(backward, batch, hidden, grid, q); return true;
    case 1: dispatch_direction<Cell, float>(backward, batch, hidden, grid, q); return true;
    case 2: dispatch_direction<Cell, c10::Half>(backward, batch, hidden, grid, q); return true;
    case 3: dispatch_direction<Cell, c10::BFloat16>(backward, batch, hidden, grid, q); return true;
    default: return false;
  }
}

}  // namespace

extern "C" {

// cell: lstm, gru, rnn_tanh, rnn_relu; dtype: 0 float64, 1 float32, 2 float16, 3 bfloat16;
// grid <= 0: the CUDA launcher's grid. 0 = ran, 1 = a runner check failed, 2 = other error, 3 = bad
// cell or dtype.
int runner_pointwise(const char* cell, int dtype, int backward, int64_t batch, int64_t hidden, int64_t grid,
                     void** ptrs, char* message, int capacity) {
  try {
    const std::string c = cell;
    bool ok;
    if (c == "lstm") ok = dispatch_dtype<LstmCell>(dtype, backward, batch, hidden, grid, ptrs);
    else if (c == "gru") ok = dispatch_dtype<GruCell>(dtype, backward, batch, hidden, grid, ptrs);
    else if (c == "rnn_tanh") ok = dispatch_dtype<RnnTanhCell>(dtype, backward, batch, hidden, grid, ptrs);
    else if (c == "rnn_relu") ok = dispatch_dtype<RnnReluCell>(dtype, backward, batch, hidden, grid, ptrs);
    else ok = false;
    return ok ? 0 : 3;
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

// The grid the CUDA launcher uses for `elements` (pointwise_blocks), and its block size.
int64_t runner_pointwise_blocks(int64_t elements) { return pointwise_blocks(elements); }
int runner_pointwise_threads() { return kPointwiseThreads; }

}  // extern "C"
