// GRU cell, one element (batch row b, hidden unit j) of one time step.
// PyTorch's (= cuDNN's) variant, gate order r, z, n:
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))      <- reset applied after the matmul
//   h' = (1 - z) * n + z * h
#pragma once

#include "cell_common.h"
#include "step_params.h"

namespace fusedrnn {

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr const char* kName = "gru";

  template <typename T>
  FUSEDRNN_HOST_DEVICE static void forward(const ForwardStepParams<T>& p, int64_t b, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.hidden;
    T* gates = p.gates + b * 3 * H;
    const T* hproj = p.hproj + b * 3 * H;
    const A r = sigmoid_(A(gates[j]) + A(hproj[j]));
    const A z = sigmoid_(A(gates[H + j]) + A(hproj[H + j]));
    const A hn = A(hproj[2 * H + j]);
    const A n = tanh_(fma_(r, hn, A(gates[2 * H + j])));  // fma_: as the AVX2 epilogue, bitwise
    const int64_t k = b * H + j;
    const A h = fma_(z, A(p.h_state[k]), (A(1) - z) * n);
    gates[j] = T(r);
    gates[H + j] = T(z);
    gates[2 * H + j] = T(n);
    p.hn[k] = T(hn);
    p.h_state[k] = T(h);
    p.out[k] = T(h);
  }

  template <typename T>
  FUSEDRNN_HOST_DEVICE static void backward(const BackwardStepParams<T>& p, int64_t b, int64_t j) {
    using A = acc_t<T>;
    const int64_t H = p.hidden;
    const int64_t k = b * H + j;
    const T* gates = p.gates + b * 3 * H;
    const A r = A(gates[j]), z = A(gates[H + j]), n = A(gates[2 * H + j]);
    const A dh = A(p.grad_out[k]) + A(p.grad_h_state[k]);
    const A dn_pre = dh * (A(1) - z) * (A(1) - n * n);
    const A dz_pre = dh * (A(p.h_prev[k]) - n) * z * (A(1) - z);
    const A dr_pre = dn_pre * A(p.hn[k]) * r * (A(1) - r);
    T* dx = p.grad_gates + b * 3 * H;
    T* dhh = p.grad_gates_h + b * 3 * H;
    dx[j] = T(dr_pre);
    dx[H + j] = T(dz_pre);
    dx[2 * H + j] = T(dn_pre);
    dhh[j] = T(dr_pre);
    dhh[H + j] = T(dz_pre);
    dhh[2 * H + j] = T(dn_pre * r);
    p.grad_h_state[k] = T(dh * z);  // direct path; the driver adds dgates_h W_hh
  }
};

}  // namespace fusedrnn
