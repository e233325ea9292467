// Backward of one layer, one direction: backpropagation through time in the
// reverse of the forward's processing order.
//
//   per step: one fused pointwise backward (Cell::backward) that turns the
//             incoming dh (and dc) into gate gradients, then one GEMM
//             dh_{t-1} = dgates W_hh  for the active rows
//             [LSTM proj_size > 0: dr_t = dh_t W_hr before the pointwise step]
//   after the loop, the parameter and input gradients as a few large GEMMs
//   over all tokens at once:
//             dX = dgates W_ih (when asked for),  dW_ih = dgates^T X,  dW_hh = dgates_h^T H_prev,
//             db = column sums,  dW_hr = dH^T R.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "../cells/step_params.h"
#include "checks.h"
#include "layer_forward.h"
#include "layer_tensors.h"

namespace fusedrnn {

// The state each token's step started from, gathered into one [N, S] tensor:
// rows of step t come from the previously processed step's rows in `all`
// (the sequences that were already running) or from `init` (those that start
// at t, which only happens in the reverse direction of a ragged batch).
inline at::Tensor gather_previous_states(const at::Tensor& all, const at::Tensor& init, const StepSchedule& s,
                                         bool reverse) {
  at::Tensor prev = new_buffer(all.sizes(), all.options());
  const int64_t T = s.steps();
  if (T == 0) return prev;
  const int64_t B = s.batch[0];
  if (s.uniform) {  // two copies instead of T
    const int64_t N = all.size(0);
    const int64_t first = reverse ? N - B : 0;  // rows of the first processed step
    rows(prev, first, B).copy_(init);
    if (N > B) {
      if (reverse) {
        rows(prev, 0, N - B).copy_(rows(all, B, N - B));
      } else {
        rows(prev, B, N - B).copy_(rows(all, 0, N - B));
      }
    }
    return prev;
  }
  // How many of step t's rows continue sequences that were running at `src`
  // (the previously processed step); the rest start from `init`.
  auto carried_rows = [&](int64_t t, int64_t src) -> int64_t {
    return (src < 0 || src >= T) ? 0 : std::min(s.batch[t], s.batch[src]);
  };
  if (!all.device().is_cpu()) {
    // On a GPU the index would be a host-to-device copy, which a CUDA graph
    // capture forbids: copy step by step instead (two small copies per step).
    for (int64_t t = 0; t < T; ++t) {
      const int64_t src = reverse ? t + 1 : t - 1;
      const int64_t bs = s.batch[t];
      const int64_t carried = carried_rows(t, src);
      if (carried > 0) rows(prev, s.offset[t], carried).copy_(rows(all, s.offset[src], carried));
      if (carried < bs) rows(prev, s.offset[t] + carried, bs - carried).copy_(rows(init, carried, bs - carried));
    }
    return prev;
  }
  // On the CPU: one gather over [all; init] with a row index, instead of two
  // small copies per step (which cost more than the step's GEMM at small batch).
  const int64_t N = all.size(0);
  std::vector<int64_t> index(N);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t src = reverse ? t + 1 : t - 1;
    const int64_t carried = carried_rows(t, src);
    for (int64_t b = 0; b < s.batch[t]; ++b) {
      index[s.offset[t] + b] = b < carried ? s.offset[src] + b : N + b;
    }
  }
  at::index_select_out(prev, at::cat({all, init}), 0, at::tensor(index, at::TensorOptions().dtype(at::kLong)));
  return prev;
}

template <typename Cell, typename Device>
BackwardOutputs layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                               const SavedForBackward& saved, const LayerWeights& w, const StepSchedule& sched,
                               bool reverse, bool need_grad_input) {
  constexpr int64_t G = Cell::kGates;
  const int64_t N = saved.input.size(0);
  const int64_t B = saved.h0.size(0);
  const int64_t P = saved.h0.size(1);
  const int64_t H = w.w_hh.size(0) / G;
  const bool is_lstm = saved.c0.defined();
  const bool is_gru = G == 3;
  const bool has_proj = w.w_hr.defined();
  const auto opts = saved.input.options();

  BackwardOutputs g;
  at::Tensor dgates = new_buffer({N, G * H}, opts);
  // GRU's hidden-side gradient differs from the input side in the n gate.
  at::Tensor dgates_h = is_gru ? new_buffer({N, G * H}, opts) : dgates;
  at::Tensor h_prev = gather_previous_states(saved.output, saved.h0, sched, reverse);
  at::Tensor c_prev = is_lstm ? gather_previous_states(saved.cells, saved.c0, sched, reverse) : at::Tensor();
  at::Tensor dh_state = grad_h_n.clone(at::MemoryFormat::Contiguous);
  at::Tensor dc_state = is_lstm ? grad_c_n.clone(at::MemoryFormat::Contiguous) : at::Tensor();
  // With projection: dh of every token (for dW_hr), dr of this step, r of every token.
  at::Tensor dh_all = has_proj ? new_buffer({N, P}, opts) : at::Tensor();
  at::Tensor dr = has_proj ? new_buffer({B, H}, opts) : at::Tensor();
  at::Tensor r_all = has_proj ? new_buffer({N, H}, opts) : at::Tensor();

  // A device with a sequence engine (the CPU's) may run the whole loop below
  // itself, with the same cell math; the weight gradients after it are shared.
  bool engine_done = false;
  if constexpr (has_sequence_engine<Device>::value) {
    engine_done = !has_proj && Device::template backward_sequence<Cell>(grad_output, saved, w, sched, reverse, h_prev,
                                                                       c_prev, dh_state, dc_state, dgates, dgates_h);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.input.scalar_type(), "fusedrnn.layer_backward", [&] {
    using T = scalar_t;
    for (int64_t k = 0; !engine_done && k < sched.steps(); ++k) {
      const int64_t t = reverse ? k : sched.steps() - 1 - k;
      const int64_t bs = sched.batch[t];
      const int64_t off = sched.offset[t];
      BackwardStepParams<T> p;
      p.batch = bs;
      p.hidden = H;
      p.gates = saved.gates.defined() ? saved.gates.template const_data_ptr<T>() + off * G * H : nullptr;
      if (has_proj) {
        at::Tensor dh_t = rows(dh_all, off, bs);
        at::add_out(dh_t, rows(dh_state, 0, bs), rows(grad_output, off, bs));
        at::Tensor dr_t = rows(dr, 0, bs);
        Device::gemm(dr_t, dh_t, w.w_hr, at::Tensor(), false);
        p.grad_out = dr.template const_data_ptr<T>();
        p.grad_h_state = nullptr;
        p.r_out = r_all.template data_ptr<T>() + off * H;
      } else {
        p.grad_out = grad_output.template const_data_ptr<T>() + off * P;
        p.grad_h_state = dh_state.template data_ptr<T>();
      }
      if (is_lstm) {
        p.grad_c_state = dc_state.template data_ptr<T>();
        p.cells = saved.cells.template const_data_ptr<T>() + off * H;
        p.c_prev = c_prev.template const_data_ptr<T>() + off * H;
      }
      if (is_gru) {
        p.h_prev = h_prev.template const_data_ptr<T>() + off * H;
        p.hn = saved.hn.template const_data_ptr<T>() + off * H;
        p.grad_gates_h = dgates_h.template data_ptr<T>() + off * G * H;
      }
      p.out = saved.output.template const_data_ptr<T>() + off * P;
      p.grad_gates = dgates.template data_ptr<T>() + off * G * H;
      Device::template backward<Cell, T>(p);

      // dh_{t-1} = dgates_h W_hh; GRU adds it to the direct z * dh path its cell wrote.
      at::Tensor dh_prev = rows(dh_state, 0, bs);
      Device::template matmul<T>(dh_prev, rows(dgates_h, off, bs), w.w_hh, at::Tensor(), is_gru);
    }
  });

  g.grad_input = need_grad_input ? device_mm<Device>(dgates, w.w_ih) : at::empty({0}, opts);
  g.grad_w_ih = device_mm<Device>(dgates.t(), saved.input);
  g.grad_w_hh = device_mm<Device>(dgates_h.t(), h_prev);
  g.grad_b_ih = dgates.sum(0);
  g.grad_b_hh = is_gru ? dgates_h.sum(0) : g.grad_b_ih.clone();
  g.grad_w_hr = has_proj ? device_mm<Device>(dh_all.t(), r_all) : at::empty({0}, opts);
  g.grad_h0 = dh_state;
  g.grad_c0 = is_lstm ? dc_state : at::empty({0}, opts);
  return g;
}

}  // namespace fusedrnn
