// The layer-normalised ops' argument checks, shared by the CPU kernels (layernorm_cpu.cpp) and the CUDA
// ones (layernorm_cuda.cpp), so that both raise the same errors for the same mistakes. Only the device
// requirement differs (each kernel gets its own device's tensors from the dispatcher; the check says
// which kernel a stray tensor reached) and CUDA's one block per row (a batch below 2^31).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "../layer/checks.h"

namespace fusedrnn {
namespace layernorm {

struct Shapes {
  int64_t N, B, H, G, I;  // tokens, batch, hidden, gates * hidden, input features
};

enum class KernelDevice { kCpu, kCuda };

// The arguments every op takes (forward and backward): dtypes, devices and shapes, and the sizes they imply.
inline Shapes check_common(const char* op, KernelDevice device, int64_t gates, const at::Tensor& input,
                           const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                           const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                           const std::optional<at::Tensor>& zoneout_h) {
  check_floating(op, "input", input);
  if (device == KernelDevice::kCpu) {
    FUSEDRNN_CHECK(input.device().is_cpu(), op,
                   "the CPU kernel needs the input on the CPU (CUDA inputs take the CUDA kernel), got ", input.device());
  } else {
    FUSEDRNN_CHECK(input.device().is_cuda(), op, "input must be a CUDA tensor, got ", input.device());
  }
  FUSEDRNN_CHECK(input.dim() == 2, op, "input must be 2-D [tokens, input_size] (packed, time-major), got shape ",
                 input.sizes());
  check_like(op, "h0", h0, input);
  FUSEDRNN_CHECK(h0.dim() == 2, op, "h0 must be 2-D [batch, hidden], got shape ", h0.sizes());
  check_like(op, "w_ih", w_ih, input);
  check_like(op, "w_hh", w_hh, input);
  FUSEDRNN_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1) && w_hh.size(1) > 0, op, "w_hh must be 2-D [",
                 gates, " * hidden_size, hidden_size], got shape ", w_hh.sizes());
  const Shapes s{input.size(0), h0.size(0), w_hh.size(1), w_hh.size(0), input.size(1)};
  check_shape(op, "w_ih", w_ih, {s.G, s.I}, "[gates * hidden_size, input_size]");
  check_shape(op, "h0", h0, {s.B, s.H}, "[batch, hidden_size]");
  check_optional(op, "b_ih", b_ih, input, {s.G}, "[gates * hidden_size]");
  check_optional(op, "b_hh", b_hh, input, {s.G}, "[gates * hidden_size]");
  check_like(op, "ln_ih_w", ln_ih_w, input);
  check_shape(op, "ln_ih_w", ln_ih_w, {s.G}, "[gates * hidden_size]");
  check_like(op, "ln_hh_w", ln_hh_w, input);
  check_shape(op, "ln_hh_w", ln_hh_w, {s.G}, "[gates * hidden_size]");
  check_optional(op, "zoneout_h", zoneout_h, input, {s.N, s.H}, "[tokens, hidden_size]");
  if (device == KernelDevice::kCuda) {
    FUSEDRNN_CHECK(s.B <= INT32_MAX, op, "batch must be below 2^31 (one CUDA block per row), got ", s.B);
  }
  return s;
}

inline void check_eps(const char* op, double eps) { FUSEDRNN_CHECK(eps > 0, op, "eps must be positive, got ", eps); }

// The LSTM's own arguments: the cell state and LN(c)'s parameters, c's zoneout.
inline void check_lstm_cell_args(const char* op, const Shapes& s, const at::Tensor& input, const at::Tensor& c0,
                                 const at::Tensor& ln_c_w, const std::optional<at::Tensor>& ln_c_b,
                                 const std::optional<at::Tensor>& zoneout_c) {
  check_like(op, "c0", c0, input);
  check_shape(op, "c0", c0, {s.B, s.H}, "[batch, hidden_size]");
  check_like(op, "ln_c_w", ln_c_w, input);
  check_shape(op, "ln_c_w", ln_c_w, {s.H}, "[hidden_size]");
  check_optional(op, "ln_c_b", ln_c_b, input, {s.H}, "[hidden_size]");
  check_optional(op, "zoneout_c", zoneout_c, input, {s.N, s.H}, "[tokens, hidden_size]");
}

// What backward reads besides the forward's arguments (the incoming gradients, the saved tensors): on
// input's device, in input's dtype, rstd in its accumulation type.
inline void check_saved(const char* op, const at::Tensor& input, std::initializer_list<const at::Tensor*> like_input,
                        const at::Tensor& rstd) {
  for (const at::Tensor* t : like_input) {
    FUSEDRNN_CHECK(t->device() == input.device(), op, "every tensor must be on the device of input (", input.device(),
                   "), got ", t->device());
    FUSEDRNN_CHECK(t->scalar_type() == input.scalar_type(), op, "every tensor must have the dtype of input (",
                   input.scalar_type(), "), got ", t->scalar_type());
  }
  FUSEDRNN_CHECK(rstd.device() == input.device(), op, "every tensor must be on the device of input (", input.device(),
                 "), got ", rstd.device());
  FUSEDRNN_CHECK(rstd.scalar_type() == at::toOpMathType(input.scalar_type()), op, "rstd must be ",
                 at::toOpMathType(input.scalar_type()), ", got ", rstd.scalar_type());
}

// ln_lstm_backward's checks after check_common.
inline void check_lstm_backward(const char* op, const Shapes& s, const at::Tensor& input, const at::Tensor& c0,
                                const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                const at::Tensor& output, const at::Tensor& cells, const at::Tensor& norm_c,
                                const at::Tensor& norm_x, const at::Tensor& norm_h, const at::Tensor& gates,
                                const at::Tensor& rstd, const at::Tensor& ln_c_w,
                                const std::optional<at::Tensor>& ln_c_b, const std::optional<at::Tensor>& zoneout_c) {
  check_lstm_cell_args(op, s, input, c0, ln_c_w, ln_c_b, zoneout_c);
  check_shape(op, "grad_output", grad_output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "grad_c_n", grad_c_n, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "output", output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "cells", cells, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "norm_c", norm_c, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "norm_x", norm_x, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "norm_h", norm_h, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "gates", gates, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "rstd", rstd, {s.N, 3}, "[tokens, 3]");
  check_saved(op, input, {&grad_output, &grad_h_n, &grad_c_n, &output, &norm_x, &norm_h, &gates, &cells, &norm_c},
              rstd);
}

// ln_gru_backward's checks after check_common.
inline void check_gru_backward(const char* op, const Shapes& s, const at::Tensor& input, const at::Tensor& grad_output,
                               const at::Tensor& grad_h_n, const at::Tensor& output, const at::Tensor& norm_x,
                               const at::Tensor& norm_h, const at::Tensor& gates, const at::Tensor& rstd) {
  check_shape(op, "grad_output", grad_output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "output", output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "norm_x", norm_x, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "norm_h", norm_h, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "gates", gates, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "rstd", rstd, {s.N, 2}, "[tokens, 2]");
  check_saved(op, input, {&grad_output, &grad_h_n, &output, &norm_x, &norm_h, &gates}, rstd);
}

}  // namespace layernorm
}  // namespace fusedrnn
