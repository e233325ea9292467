// The tensors of one layer in one direction, as the drivers take and return
// them. Absent optionals (bias, projection, LSTM cell state) are undefined
// tensors. All activations are packed: [tokens, features], time-major, with
// the StepSchedule saying which rows belong to which time step.
#pragma once

#include <ATen/ATen.h>

namespace fusedrnn {

struct LayerWeights {
  at::Tensor w_ih;  // [G*H, I]
  at::Tensor w_hh;  // [G*H, P]
  at::Tensor b_ih;  // [G*H] or undefined
  at::Tensor b_hh;  // [G*H] or undefined
  at::Tensor w_hr;  // [P, H] (LSTM proj_size > 0) or undefined
};

struct ForwardOutputs {
  at::Tensor output;  // [N, P]
  at::Tensor h_n;     // [B, P]
  at::Tensor c_n;     // [B, H] LSTM
  at::Tensor gates;   // [N, G*H] activated gates (saved for backward)
  at::Tensor cells;   // [N, H] LSTM: c_t
  at::Tensor hn;      // [N, H] GRU: W_hn h_{t-1} + b_hn
};

struct SavedForBackward {
  at::Tensor input, h0, c0, output, gates, cells, hn;
};

struct BackwardOutputs {
  at::Tensor grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
};

}  // namespace fusedrnn
