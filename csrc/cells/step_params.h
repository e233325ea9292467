// The parameters of one fused pointwise step: raw pointers into the layer's
// buffers for the rows that are active at this time step, plus sizes.
//
// One struct per direction of computation (forward / backward), shared by all
// cells; each cell reads only the fields it needs (documented per field).
// Every [rows, width] buffer here is row-major and contiguous; row b of a step
// buffer is batch element b of the (length-sorted) batch.
#pragma once

#include <cstdint>

#include "cell_common.h"  // FUSEDRNN_HOST_DEVICE

namespace fusedrnn {

template <typename T>
struct ForwardStepParams {
  int64_t batch = 0;   // active rows at this step (sequences still running)
  int64_t hidden = 0;  // H

  // [batch, G*H]  in: x_t W_ih^T + b_ih (the whole-sequence input projection)
  //              out: the activated gates, saved for backward.
  T* gates = nullptr;
  // [batch, G*H]  h_{t-1} W_hh^T + b_hh (this step's recurrent GEMM), or without
  // b_hh when hproj_bias is set.
  const T* hproj = nullptr;
  // [G*H]  b_hh, added to hproj by the step itself, or nullptr (b_hh already in
  // hproj, or no bias). Only the CUDA per-step kernel (cuda/pointwise_step.h) sets and
  // reads it: its recurrent GEMM then needs no bias copy first (one launch less per step).
  const T* hproj_bias = nullptr;
  // [B, H]  the running hidden state: read as h_{t-1}, written as h_t.
  // LSTM with projection: points at `out` (the driver updates the real state
  // after the projection GEMM).
  T* h_state = nullptr;
  // [B, H]  LSTM only: the running cell state, c_{t-1} in, c_t out.
  T* c_state = nullptr;
  // [batch, H]  this step's output rows: h_t; for LSTM with projection,
  // r_t = o * tanh(c_t), which the driver then projects with W_hr.
  T* out = nullptr;
  // [batch, H]  LSTM only: c_t, saved for backward.
  T* cells = nullptr;
  // [batch, H]  GRU only: W_hn h_{t-1} + b_hn, saved for backward.
  T* hn = nullptr;
};

template <typename T>
struct BackwardStepParams {
  int64_t batch = 0;
  int64_t hidden = 0;

  // [batch, G*H]  the activated gates saved by forward.
  const T* gates = nullptr;
  // [batch, H]  gradient arriving at this step's output h_t (r_t with projection).
  const T* grad_out = nullptr;
  // [B, H]  gradient of the running hidden state from later steps; added to
  // grad_out. nullptr when grad_out already holds the total (LSTM projection).
  // GRU writes z * dh here, the direct path to h_{t-1}; the driver then adds
  // the recurrent GEMM on top. LSTM/RNN leave it for the driver to overwrite.
  T* grad_h_state = nullptr;
  // [B, H]  LSTM only: dc_t in, dc_{t-1} out.
  T* grad_c_state = nullptr;
  const T* cells = nullptr;   // [batch, H] LSTM: c_t
  // [batch, H] LSTM: c_{t-1}; GRU: h_{t-1}. Read-only views of where forward
  // left those states (the previous step's rows of cells / output, or c0 / h0),
  // not a per-token copy (layer_backward.h: previous_block).
  const T* c_prev = nullptr;
  const T* h_prev = nullptr;
  const T* hn = nullptr;      // [batch, H] GRU: W_hn h_{t-1} + b_hn
  const T* out = nullptr;     // [batch, H] RNN: h_t
  // [batch, G*H]  gradient w.r.t. the pre-activations on the input side
  // (x W_ih^T + b_ih); for LSTM and RNN also the hidden side. RNN: may be the
  // same memory as grad_out (each element is read before it is written).
  T* grad_gates = nullptr;
  // [batch, 3H]  GRU only: gradient w.r.t. the hidden-side pre-activations
  // (h W_hh^T + b_hh); differs from grad_gates in the n gate (times r). A
  // buffer of one step's rows, consumed by that step's dh GEMM.
  T* grad_gates_h = nullptr;
  // [batch, H]  LSTM with projection: r_t = o * tanh(c_t), for grad of W_hr.
  T* r_out = nullptr;
};

// The cell's forward or backward step on element (b, j), chosen by the params
// type, so one loop (CPU) or one kernel (CUDA) serves both directions.
template <typename Cell, typename T>
FUSEDRNN_HOST_DEVICE void apply_cell(const ForwardStepParams<T>& p, int64_t b, int64_t j) {
  Cell::forward(p, b, j);
}
template <typename Cell, typename T>
FUSEDRNN_HOST_DEVICE void apply_cell(const BackwardStepParams<T>& p, int64_t b, int64_t j) {
  Cell::backward(p, b, j);
}

// The forward cell on one element held in registers (hidden = 1, element 0, so every index the
// cell computes is a constant and the arrays stay in registers): the CUDA per-step kernel's
// element (cuda/pointwise_step.h) and the persistent kernel's cell phase (persistent/
// persistent_forward.h) run the same per-element math as the CPU this way. xg: the input
// projection in, the activated gates out; hp: the recurrent product with its bias; h (and c for
// LSTM): the state in and out; out, cells, hn: what the step writes.
template <typename Cell, typename A>
FUSEDRNN_HOST_DEVICE void forward_in_registers(A (&xg)[Cell::kGates], A (&hp)[Cell::kGates], A& h, A& c, A& out,
                                               A& cells, A& hn) {
  ForwardStepParams<A> e;
  e.batch = 1;
  e.hidden = 1;
  e.gates = xg;
  e.hproj = hp;
  e.h_state = &h;
  e.c_state = &c;
  e.out = &out;
  e.cells = &cells;
  e.hn = &hn;
  Cell::forward(e, 0, 0);
}

}  // namespace fusedrnn
