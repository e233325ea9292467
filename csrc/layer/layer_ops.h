// The operator entry points, one forward and one backward per cell type, with
// exactly the signatures of the schemas in csrc/ops.cpp. They validate every
// argument, then call the device-generic drivers. Each device registers them
// with its own Device policy (cpu/cpu_device.h, cuda/register_cuda.cpp).
// The device guard comes after the checks: the dispatcher runs the CUDA kernel
// when any argument is on CUDA (batch_sizes included), and a CUDA guard built
// from a CPU input would throw c10's message before ours could say which
// argument is on which device.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
#include "checks.h"
#include "layer_backward.h"
#include "layer_forward.h"

namespace fusedrnn {

using OptTensor = std::optional<at::Tensor>;

// An optional tensor as the drivers take it: contiguous (see check_layer), or undefined when absent.
inline at::Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// The ops also take a full-length batch as the modules hold it (csrc/ops.cpp): input [T, B, I] and
// states [1, B, *], returning output [T, B, P] and final states [1, B, *]; the drivers run on the
// row views below. What this saves is the caller's four view calls around each op call (two
// reshapes of the sequence, two of the state: a dispatcher round trip from Python apiece, ~5 us of
// a ~40 us one-step layer call; benchmarks/NOTES.md, entry 38); a C++ view is ~20x cheaper.
struct RowArgs {
  at::Tensor input, h0, c0;  // [tokens, I], [B, P], [B, H] (c0 undefined when absent)
  bool sequence = false;     // input was [T, B, I]: outputs [tokens, *] become [T, B, *]
  bool state = false;        // the states were [1, B, *]: final states and their gradients get the 1 back
  int64_t steps = 0, batch = 0;

  at::Tensor sequence_out(const at::Tensor& rows) const {
    return sequence ? rows.reshape({steps, batch, rows.size(1)}) : rows;
  }
  // An input gradient: [T, B, I] like input, or the empty tensor of need_grad_input=false as it is.
  at::Tensor sequence_out_if(const at::Tensor& rows) const { return rows.dim() == 2 ? sequence_out(rows) : rows; }
  // A final state or a state gradient: [1, B, *] like h0, or the empty tensor of need_grad_h0=false.
  at::Tensor state_out(const at::Tensor& s) const { return state && s.dim() == 2 ? s.unsqueeze(0) : s; }
  // A tensor given with the sequence's shape ([T, B, *] when input was 3-D), as rows.
  at::Tensor sequence_rows(const char* op, const char* name, const at::Tensor& t) const {
    if (!sequence) return t;
    FUSEDRNN_CHECK(t.dim() == 3 && t.size(0) == steps && t.size(1) == batch, op, name, " must be 3-D [", steps,
                   ", ", batch, ", *] like input, got shape ", t.sizes());
    return t.reshape({steps * batch, t.size(2)});
  }
  // A tensor given with the states' shape ([1, B, *] when h0 was 3-D), as [B, *].
  at::Tensor state_rows(const char* op, const char* name, const at::Tensor& t) const {
    if (!state) return t;
    FUSEDRNN_CHECK(t.dim() == 3 && t.size(0) == 1, op, name, " must be 3-D [1, batch, *] like h0, got shape ",
                   t.sizes());
    return t.select(0, 0);
  }
};

inline RowArgs as_rows(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor* c0,
                       const at::Tensor& batch_sizes) {
  RowArgs r;
  r.state = h0.dim() == 3;
  FUSEDRNN_CHECK(c0 == nullptr || c0->dim() == h0.dim(), op, "c0 must have the rank of h0 (", h0.dim(),
                 "-D), got shape ", c0 != nullptr ? c0->sizes() : h0.sizes());
  r.h0 = r.state_rows(op, "h0", h0);
  if (c0 != nullptr) r.c0 = r.state_rows(op, "c0", *c0);
  r.sequence = input.dim() == 3;
  r.input = input;
  if (r.sequence) {
    // Full length only: T steps of B rows, B = the states' batch (batch_sizes then holds B T times).
    FUSEDRNN_CHECK(r.h0.dim() >= 1 && input.size(1) == r.h0.size(0) && batch_sizes.dim() == 1 &&
                       batch_sizes.size(0) == input.size(0),
                   op, "input must be 2-D [tokens, input_size] (packed), or 3-D [steps, batch, input_size] for a "
                   "full-length batch (batch = h0's, ", r.h0.dim() >= 1 ? r.h0.size(0) : -1, ", and batch_sizes of ",
                   input.size(0), " steps), got input of shape ", input.sizes(), " and batch_sizes of shape ",
                   batch_sizes.sizes());
    r.steps = input.size(0);
    r.batch = input.size(1);
    r.input = input.reshape({r.steps * r.batch, input.size(2)});
  }
  return r;
}

// Validates the arguments common to every op and returns the layer's weights
// (made contiguous where a kernel reads them through raw pointers).
inline LayerWeights check_layer(const char* op, int64_t gates, const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor* c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr) {
  check_floating(op, "input", input);
  FUSEDRNN_CHECK(input.dim() == 2, op, "input must be 2-D [tokens, input_size] (packed, time-major) or 3-D "
                 "[steps, batch, input_size] (full length), got shape ", input.sizes());
  check_like(op, "h0", h0, input);
  FUSEDRNN_CHECK(h0.dim() == 2, op, "h0 must be 2-D [batch, hidden] or 3-D [1, batch, hidden], got shape ",
                 h0.sizes());
  check_like(op, "w_ih", w_ih, input);
  check_like(op, "w_hh", w_hh, input);
  FUSEDRNN_CHECK(w_hh.dim() == 2 && w_hh.size(0) % gates == 0 && w_hh.size(0) > 0, op,
                 "w_hh must be 2-D [", gates, " * hidden_size, state_size], got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / gates;
  const bool has_proj = w_hr.has_value() && w_hr->defined();
  const int64_t P = has_proj ? w_hr->size(0) : H;
  check_shape(op, "w_ih", w_ih, {gates * H, input.size(1)}, "[gates * hidden_size, input_size]");
  check_shape(op, "w_hh", w_hh, {gates * H, P}, "[gates * hidden_size, state_size]");
  check_shape(op, "h0", h0, {h0.size(0), P}, "[batch, state_size]");
  if (c0 != nullptr) {
    check_like(op, "c0", *c0, input);
    check_shape(op, "c0", *c0, {h0.size(0), H}, "[batch, hidden_size]");
  }
  check_optional(op, "b_ih", b_ih, input, {gates * H}, "[gates * hidden_size]");
  check_optional(op, "b_hh", b_hh, input, {gates * H}, "[gates * hidden_size]");
  if (has_proj) {
    check_like(op, "w_hr", *w_hr, input);
    FUSEDRNN_CHECK(w_hr->dim() == 2 && w_hr->size(1) == H && w_hr->size(0) > 0 && w_hr->size(0) < H, op,
                   "w_hr must be 2-D [proj_size, hidden_size] with 0 < proj_size < hidden_size = ", H,
                   ", got shape ", w_hr->sizes());
  }
  // A weight may have any strides a torch.nn weight can have: an expanded (stride-0) view
  // from a parametrization that ties rows, a transposed or sliced view passed through
  // torch.func.functional_call or load_state_dict(assign=True). The kernels and BLAS take
  // row-major matrices with unit column stride and a leading dimension >= the row length,
  // so anything else is copied (contiguous() returns the tensor itself when it already is).
  LayerWeights w;
  w.w_ih = w_ih.contiguous();
  w.w_hh = w_hh.contiguous();
  w.b_ih = contiguous_or_undefined(b_ih);
  w.b_hh = contiguous_or_undefined(b_hh);
  w.w_hr = contiguous_or_undefined(w_hr);
  return w;
}

// Saved tensors handed back to a backward op must have the shapes forward gave
// them, since the kernels index them directly.
inline void check_saved(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                        at::IntArrayRef expected) {
  check_like(op, name, t, input);
  check_shape(op, name, t, expected, "(as returned by the forward op)");
}

// ---------------------------------------------------------------------------
// Forward ops
// ---------------------------------------------------------------------------

// A forward's outputs in the shapes of its call (RowArgs): output and final states; gates, cells and
// hn stay [tokens, *] (only the backward ops read them).
inline ForwardOutputs shaped_as_given(const RowArgs& rows, ForwardOutputs r) {
  r.output = rows.sequence_out(r.output);
  r.h_n = rows.state_out(r.h_n);
  if (r.c_n.defined()) r.c_n = rows.state_out(r.c_n);
  return r;
}

// Every forward op and its inference twin (csrc/ops.cpp): the op's checks, its schedule, the
// device guard and the driver; save_for_backward false keeps nothing that only backward reads.
template <typename Cell, typename Device>
ForwardOutputs run_forward_op(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor* c0,
                              const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                              const OptTensor& b_hh, const OptTensor& w_hr, const at::Tensor& batch_sizes,
                              bool reverse, bool save_for_backward) {
  const RowArgs rows = as_rows(op, input, h0, c0, batch_sizes);
  const LayerWeights w = check_layer(op, Cell::kGates, rows.input, rows.h0, c0 != nullptr ? &rows.c0 : nullptr, w_ih,
                                     w_hh, b_ih, b_hh, w_hr);
  const StepSchedule s = make_schedule(op, batch_sizes, rows.input.size(0), rows.h0.size(0));
  const typename Device::DeviceGuard device_guard(input.device());
  return shaped_as_given(rows, layer_forward<Cell, Device>(rows.input, rows.h0, rows.c0, w, s, reverse,
                                                           save_for_backward));
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const at::Tensor& batch_sizes, bool reverse) {
  ForwardOutputs r = run_forward_op<LstmCell, Device>("lstm_forward", input, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                      batch_sizes, reverse, /*save_for_backward=*/true);
  return {r.output, r.h_n, r.c_n, r.gates, r.cells};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& batch_sizes, bool reverse) {
  ForwardOutputs r = run_forward_op<GruCell, Device>("gru_forward", input, h0, nullptr, w_ih, w_hh, b_ih, b_hh,
                                                     std::nullopt, batch_sizes, reverse, /*save_for_backward=*/true);
  return {r.output, r.h_n, r.gates, r.hn};
}

// The inference twins: the same checks and driver, nothing saved for backward.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const at::Tensor& batch_sizes, bool reverse) {
  ForwardOutputs r = run_forward_op<LstmCell, Device>("lstm_inference", input, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                      batch_sizes, reverse, /*save_for_backward=*/false);
  return {r.output, r.h_n, r.c_n};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> gru_inference(const at::Tensor& input, const at::Tensor& h0,
                                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                 const OptTensor& b_ih, const OptTensor& b_hh,
                                                 const at::Tensor& batch_sizes, bool reverse) {
  ForwardOutputs r = run_forward_op<GruCell, Device>("gru_inference", input, h0, nullptr, w_ih, w_hh, b_ih, b_hh,
                                                     std::nullopt, batch_sizes, reverse, /*save_for_backward=*/false);
  return {r.output, r.h_n};
}

// RNN saves nothing but its output, so its forward is its own inference op.
template <typename Cell, typename Device>
std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& input, const at::Tensor& h0,
                                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                                               const OptTensor& b_ih, const OptTensor& b_hh,
                                               const at::Tensor& batch_sizes, bool reverse) {
  ForwardOutputs r = run_forward_op<Cell, Device>(Cell::kRelu ? "rnn_relu_forward" : "rnn_tanh_forward", input, h0,
                                                  nullptr, w_ih, w_hh, b_ih, b_hh, std::nullopt, batch_sizes, reverse,
                                                  /*save_for_backward=*/true);
  return {r.output, r.h_n};
}

// ---------------------------------------------------------------------------
// Backward ops
// ---------------------------------------------------------------------------
// need_grad_h0 defaults to true as in the schemas (the persistent runner's test op calls these directly).

// Every backward op (csrc/ops.cpp), as run_forward_op is every forward: the call's checks, the saved
// tensors checked against the shapes forward gave them, the device guard, the driver, and the input and
// state gradients back in the shapes of the call. c0 / grad_c_n: the LSTM's (nullptr otherwise); gates,
// cells, hn: what the cell saved besides the output (nullptr where it saves none: the RNN needs only h_t).
template <typename Cell, typename Device>
BackwardOutputs run_backward_op(const char* op, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                const at::Tensor* grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor* c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const OptTensor& w_hr, const at::Tensor& batch_sizes, bool reverse,
                                bool need_grad_input, const at::Tensor& output, const at::Tensor* gates,
                                const at::Tensor* cells, const at::Tensor* hn, bool need_grad_h0) {
  constexpr int64_t G = Cell::kGates;
  const RowArgs rows = as_rows(op, input, h0, c0, batch_sizes);
  const LayerWeights w = check_layer(op, G, rows.input, rows.h0, c0 != nullptr ? &rows.c0 : nullptr, w_ih, w_hh,
                                     std::nullopt, std::nullopt, w_hr);
  const StepSchedule s = make_schedule(op, batch_sizes, rows.input.size(0), rows.h0.size(0));
  const int64_t N = rows.input.size(0), B = rows.h0.size(0), P = rows.h0.size(1), H = w_hh.size(0) / G;
  const at::Tensor grad_out = rows.sequence_rows(op, "grad_output", grad_output);
  const at::Tensor out = rows.sequence_rows(op, "output", output);
  const at::Tensor grad_hn = rows.state_rows(op, "grad_h_n", grad_h_n);
  const at::Tensor grad_cn = grad_c_n != nullptr ? rows.state_rows(op, "grad_c_n", *grad_c_n) : at::Tensor();
  const at::Tensor& x = rows.input;
  check_saved(op, "grad_output", grad_out, x, {N, P});
  check_saved(op, "grad_h_n", grad_hn, x, {B, P});
  if (grad_c_n != nullptr) check_saved(op, "grad_c_n", grad_cn, x, {B, H});
  check_saved(op, "output", out, x, {N, P});
  if (gates != nullptr) check_saved(op, "gates", *gates, x, {N, G * H});
  if (cells != nullptr) check_saved(op, "cells", *cells, x, {N, H});
  if (hn != nullptr) check_saved(op, "hn", *hn, x, {N, H});
  const typename Device::DeviceGuard device_guard(input.device());
  auto saved_or_none = [](const at::Tensor* t) { return t != nullptr ? t->contiguous() : at::Tensor(); };
  SavedForBackward saved{x, rows.h0, rows.c0, out.contiguous(), saved_or_none(gates), saved_or_none(cells),
                         saved_or_none(hn)};
  BackwardOutputs g =
      layer_backward<Cell, Device>(grad_out, grad_hn, grad_cn, saved, w, s, reverse, need_grad_input, need_grad_h0);
  g.grad_input = rows.sequence_out_if(g.grad_input);
  g.grad_h0 = rows.state_out(g.grad_h0);
  if (c0 != nullptr) g.grad_c0 = rows.state_out(g.grad_c0);
  return g;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
              const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
              const at::Tensor& w_hh, const OptTensor& w_hr, const at::Tensor& batch_sizes, bool reverse,
              bool need_grad_input, const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
              bool need_grad_h0 = true) {
  BackwardOutputs g = run_backward_op<LstmCell, Device>("lstm_backward", grad_output, grad_h_n, &grad_c_n, input, h0,
                                                        &c0, w_ih, w_hh, w_hr, batch_sizes, reverse, need_grad_input,
                                                        output, &gates, &cells, nullptr, need_grad_h0);
  return {g.grad_input, g.grad_h0, g.grad_c0, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh, g.grad_w_hr};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& batch_sizes, bool reverse,
    bool need_grad_input, const at::Tensor& output, const at::Tensor& gates, const at::Tensor& hn,
    bool need_grad_h0 = true) {
  BackwardOutputs g = run_backward_op<GruCell, Device>("gru_backward", grad_output, grad_h_n, nullptr, input, h0,
                                                       nullptr, w_ih, w_hh, std::nullopt, batch_sizes, reverse,
                                                       need_grad_input, output, &gates, nullptr, &hn, need_grad_h0);
  return {g.grad_input, g.grad_h0, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh};
}

template <typename Cell, typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& batch_sizes, bool reverse,
    bool need_grad_input, const at::Tensor& output, bool need_grad_h0 = true) {
  BackwardOutputs g = run_backward_op<Cell, Device>(
      Cell::kRelu ? "rnn_relu_backward" : "rnn_tanh_backward", grad_output, grad_h_n, nullptr, input, h0, nullptr,
      w_ih, w_hh, std::nullopt, batch_sizes, reverse, need_grad_input, output, nullptr, nullptr, nullptr, need_grad_h0);
  return {g.grad_input, g.grad_h0, g.grad_w_ih, g.grad_w_hh, g.grad_b_ih, g.grad_b_hh};
}

// Registers every op's implementation for one dispatch key.
template <typename Device>
void register_layer_ops(torch::Library& m) {
  m.impl("lstm_forward", &lstm_forward<Device>);
  m.impl("lstm_backward", &lstm_backward<Device>);
  m.impl("gru_forward", &gru_forward<Device>);
  m.impl("lstm_inference", &lstm_inference<Device>);
  m.impl("gru_inference", &gru_inference<Device>);
  m.impl("gru_backward", &gru_backward<Device>);
  m.impl("rnn_tanh_forward", &rnn_forward<RnnTanhCell, Device>);
  m.impl("rnn_tanh_backward", &rnn_backward<RnnTanhCell, Device>);
  m.impl("rnn_relu_forward", &rnn_forward<RnnReluCell, Device>);
  m.impl("rnn_relu_backward", &rnn_backward<RnnReluCell, Device>);
}

}  // namespace fusedrnn
