// Elman RNN cell, one element: h_t = act(W_ih x + b_ih + W_hh h + b_hh),
// act = tanh (RnnTanhCell) or relu (RnnReluCell), as torch.nn.RNN's nonlinearity.
#pragma once

#include "cell_common.h"
#include "step_params.h"

namespace fusedrnn {

template <bool Relu>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr bool kRelu = Relu;
  static constexpr const char* kName = Relu ? "rnn_relu" : "rnn_tanh";

  template <typename T>
  FUSEDRNN_HOST_DEVICE static void forward(const ForwardStepParams<T>& p, int64_t b, int64_t j) {
    using A = acc_t<T>;
    const int64_t k = b * p.hidden + j;
    const A a = A(p.gates[k]) + A(p.hproj[k]);
    const A h = kRelu ? relu_(a) : tanh_(a);
    p.h_state[k] = T(h);
    p.out[k] = T(h);
  }

  template <typename T>
  FUSEDRNN_HOST_DEVICE static void backward(const BackwardStepParams<T>& p, int64_t b, int64_t j) {
    using A = acc_t<T>;
    const int64_t k = b * p.hidden + j;
    const A dh = A(p.grad_out[k]) + A(p.grad_h_state[k]);
    const A h = A(p.out[k]);
    // Derivatives from the output alone: tanh' = 1 - h^2, relu' = [h > 0]. relu is written as
    // torch's threshold_backward(grad, result, 0) is, `h <= 0 ? 0 : grad`, so that a NaN
    // pre-activation (h = relu(NaN) = NaN) passes the gradient through as torch.relu does.
    p.grad_gates[k] = T(kRelu ? (h <= A(0) ? A(0) : dh) : dh * (A(1) - h * h));
  }
};

using RnnTanhCell = RnnCell<false>;
using RnnReluCell = RnnCell<true>;

}  // namespace fusedrnn
