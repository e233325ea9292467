// LSTM cell, one element (batch row b, hidden unit j) of one time step.
// Gate order as torch.nn.LSTM: i, f, g, o.
//   i = sigmoid(.), f = sigmoid(.), g = tanh(.), o = sigmoid(.)
//   c_t = f * c_{t-1} + i * g
//   h_t = o * tanh(c_t)              (then h_t = W_hr h_t when proj_size > 0)
#pragma once

#include "cell_common.h"
#include "step_params.h"

namespace fusedrnn {

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr const char* kName = "lstm";

  template <typename T>
  FUSEDRNN_HOST_DEVICE static void forward(const ForwardStepParams<T>& p, int64_t b, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.hidden;
    T* gates = p.gates + b * 4 * H;
    const T* hproj = p.hproj + b * 4 * H;
    const A i = sigmoid_(A(gates[j]) + A(hproj[j]));
    const A f = sigmoid_(A(gates[H + j]) + A(hproj[H + j]));
    const A g = tanh_(A(gates[2 * H + j]) + A(hproj[2 * H + j]));
    const A o = sigmoid_(A(gates[3 * H + j]) + A(hproj[3 * H + j]));
    const int64_t k = b * H + j;
    const A c = fma_(f, A(p.c_state[k]), i * g);  // as the AVX2 epilogue: bitwise the same
    const A h = o * tanh_(c);
    gates[j] = T(i);
    gates[H + j] = T(f);
    gates[2 * H + j] = T(g);
    gates[3 * H + j] = T(o);
    p.c_state[k] = T(c);
    p.cells[k] = T(c);
    p.out[k] = T(h);
    p.h_state[k] = T(h);
  }

  template <typename T>
  FUSEDRNN_HOST_DEVICE static void backward(const BackwardStepParams<T>& p, int64_t b, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.hidden;
    const int64_t k = b * H + j;
    const T* gates = p.gates + b * 4 * H;
    const A i = A(gates[j]), f = A(gates[H + j]), g = A(gates[2 * H + j]), o = A(gates[3 * H + j]);
    A dh = A(p.grad_out[k]);
    if (p.grad_h_state != nullptr) dh += A(p.grad_h_state[k]);
    const A tc = tanh_(A(p.cells[k]));
    const A dc = A(p.grad_c_state[k]) + dh * o * (A(1) - tc * tc);
    T* dgates = p.grad_gates + b * 4 * H;
    dgates[j] = T(dc * g * i * (A(1) - i));
    dgates[H + j] = T(dc * A(p.c_prev[k]) * f * (A(1) - f));
    dgates[2 * H + j] = T(dc * i * (A(1) - g * g));
    dgates[3 * H + j] = T(dh * tc * o * (A(1) - o));
    p.grad_c_state[k] = T(dc * f);
    if (p.r_out != nullptr) p.r_out[k] = T(o * tc);
  }
};

}  // namespace fusedrnn
