// Both directions of a bidirectional layer as one op pair (issue 13 item 2):
// fusedrnn::bidirectional_forward / bidirectional_backward (schemas in
// csrc/cpu/persistent_emulation.cpp), what fusedrnn/functional.py calls for a
// bidirectional layer on CUDA. Where the persistent path is chosen for the
// layer (the one-direction rule: FUSEDRNN_CUDA_PATH and the plan) and both
// directions' grids are co-resident (both_directions_in_one_launch), each
// recurrence runs as ONE launch of the persistent kernel for both directions
// (persistent_directions.h); otherwise each direction runs exactly as the
// one-direction ops run it (persistent launches one by one, or the per-step
// driver), so a layer the two-direction launch cannot take gets today's results.
// Backward: both directions' reverse-time recurrence in one launch
// (backward_directions; one launch each where the grids are not co-resident),
// then each direction's one-direction backward op
// (layer_ops.h: every check, and the driver's dX, dW_ih, dW_hh and bias GEMMs)
// with the recurrence's results handed in by PrecomputedRecurrence in place of
// its sequence engine. A ragged batch's schedule is written on the device once,
// by the forward, returned as its last output, saved for backward and read
// there (no second fill kernel; replayed by a CUDA graph like any kernel).
//
// Backend: the CUDA launcher (csrc/cuda/register_cuda.cpp) or the CPU runner
// (csrc/cpu/persistent_emulation.cpp, the kernels' own source on the CPU), with
//   using Device          the one-direction device policy (CudaDevice, CpuDevice)
//   using DeviceGuard
//   using BackwardLaunch  as PersistentBackward takes it, plus `static Plan plan` set by accepts
//   template <typename Cell> static Plan forward_plan(const at::Tensor& like, int64_t hidden, int64_t batch)
//   static DeviceLimits limits()                        (the SM count, for co-residency)
//   static auto forward_launch(const Plan&)             (as layer_forward_directions takes it)
//   static void fill_schedule(const ScheduleChunk&)
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../layer/layer_ops.h"
#include "persistent_backward_layer.h"
#include "persistent_layer.h"
#include "persistent_plan.h"

namespace fusedrnn {
namespace persistent {

// The device policy `Base` whose sequence engine is a recurrence already run: it hands the driver
// the gate gradients and dL/dh0, dL/dc0 that backward_directions wrote for this direction (set in
// `ready` on this thread around the one call), and the driver's tail does the rest.
template <typename Base>
struct PrecomputedRecurrence : Base {
  static constexpr bool kSequenceEngine = true;
  static constexpr bool kWidensHalfTypes = false;  // the recurrence's results are in the layer's dtype
  static inline thread_local BackwardDirection* ready = nullptr;

  template <typename Cell>
  static bool backward_sequence(const at::Tensor&, const SavedForBackward&, const LayerWeights&, const StepSchedule&,
                                bool, const at::Tensor&, const at::Tensor&, at::Tensor& dh_state,
                                at::Tensor& dc_state, at::Tensor& dgates, at::Tensor&) {
    TORCH_CHECK(ready != nullptr, "fusedrnn.bidirectional_backward: no recurrence result for this direction");
    dh_state = ready->dh_state;
    dc_state = ready->dc_state;
    dgates = ready->dgates;
    ready = nullptr;
    return true;
  }
};

using BidirectionalForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor>;
using BidirectionalBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline int64_t cell_gates(const char* op, const std::string& cell) {
  if (cell == "lstm") return 4;
  if (cell == "gru") return 3;
  FUSEDRNN_CHECK(cell == "rnn_tanh" || cell == "rnn_relu", op, "cell must be lstm, gru, rnn_tanh or rnn_relu, got ",
                 cell);
  return 1;
}

// Calls f(Cell{}) with the cell type named by `cell` (checked by cell_gates).
template <typename F>
void with_cell(const std::string& cell, F&& f) {
  if (cell == "lstm") f(LstmCell{});
  else if (cell == "gru") f(GruCell{});
  else if (cell == "rnn_tanh") f(RnnTanhCell{});
  else f(RnnReluCell{});
}

template <typename Cell, typename Backend>
std::vector<ForwardOutputs> bidirectional_forward_directions(const char* op, const at::Tensor& input,
                                                             const std::vector<DirectionInputs>& dirs,
                                                             const StepSchedule& s, at::Tensor& schedule) {
  const int64_t B = dirs[0].h0.size(0), H = dirs[0].h0.size(1);
  bool written = false;
  std::vector<ForwardOutputs> r;
  PathRequest request;
  if (wants_persistent(op, &request)) {
    const Plan plan = Backend::template forward_plan<Cell>(input, H, B);
    check_forced(op, request, plan);
    if (plan.ok) {
      auto launch = Backend::forward_launch(plan);
      if (both_directions_in_one_launch(plan, Backend::limits())) {
        r = layer_forward_directions<Cell>(input, dirs, s, plan.rows_per_cta, launch, &schedule, &written);
      } else {  // two waves would be no better than two launches: one by one, one schedule
        for (const DirectionInputs& d : dirs) {
          r.push_back(layer_forward_directions<Cell>(input, {d}, s, plan.rows_per_cta, launch, &schedule, &written)[0]);
        }
      }
    }
  }
  if (r.empty()) {  // the per-step driver, as the one-direction forward ops run it
    for (const DirectionInputs& d : dirs) {
      r.push_back(layer_forward<Cell, typename Backend::Device>(input, d.h0, d.c0, d.w, s, d.reverse));
    }
  }
  // The backward reads the schedule whichever path it takes, so a ragged batch's is always written.
  if (!s.uniform && !written && B > 0) {
    device_schedule(s, input.device(), [](const ScheduleChunk& c) { Backend::fill_schedule(c); }, schedule);
  }
  return r;
}

// fusedrnn::bidirectional_forward: direction 0 forward in time, direction 1 reversed; returns each
// direction's (output, h_n, c_n (LSTM, else empty), gates (LSTM, GRU, else empty), extra (LSTM:
// cells, GRU: hn, else empty)) as the one-direction forward ops return them, then the [2, steps]
// int64 schedule on input's device (written for a ragged batch; the backward's argument).
template <typename Backend>
BidirectionalForwardResult bidirectional_forward_op(
    const std::string& cell, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& h0_reverse,
    const OptTensor& c0, const OptTensor& c0_reverse, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const OptTensor& b_ih_reverse, const OptTensor& b_hh_reverse, const at::Tensor& batch_sizes) {
  constexpr const char* op = "bidirectional_forward";
  const int64_t G = cell_gates(op, cell);
  const bool lstm = G == 4;
  FUSEDRNN_CHECK(lstm == (c0.has_value() && c0_reverse.has_value()) && (lstm || !(c0 || c0_reverse)), op,
                 "c0 and c0_reverse must be given for lstm and only for lstm");
  std::vector<at::Tensor> c0s;
  if (lstm) c0s = {*c0, *c0_reverse};
  const std::vector<DirectionInputs> dirs =
      bidirectional_inputs(op, cell, input, {h0, h0_reverse}, c0s, {w_ih, w_ih_reverse}, {w_hh, w_hh_reverse},
                           {b_ih, b_ih_reverse}, {b_hh, b_hh_reverse}, /*persistent_only=*/false);
  const StepSchedule s = make_schedule(op, batch_sizes, input.size(0), h0.size(0));
  const typename Backend::DeviceGuard device_guard(input.device());
  at::Tensor schedule = at::empty({2, s.steps()}, input.options().dtype(at::kLong));
  std::vector<ForwardOutputs> r;
  with_cell(cell, [&](auto cell_tag) {
    r = bidirectional_forward_directions<decltype(cell_tag), Backend>(op, input, dirs, s, schedule);
  });
  // A fresh empty tensor for each absent output: an op's outputs must not alias each other.
  auto or_empty = [&](const at::Tensor& t, bool wanted) {
    return wanted && t.defined() ? t : at::empty({0}, input.options());
  };
  std::array<at::Tensor, 10> out;
  for (int d = 0; d < 2; ++d) {
    const ForwardOutputs& o = r[d];
    out[5 * d + 0] = o.output;
    out[5 * d + 1] = o.h_n;
    out[5 * d + 2] = or_empty(o.c_n, lstm);
    out[5 * d + 3] = or_empty(o.gates, G > 1);  // RNN's backward reads only its output
    out[5 * d + 4] = lstm ? o.cells : or_empty(o.hn, G == 3);
  }
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9], schedule};
}

// One direction's backward op (layer_ops.h, every check) on the device policy D: (grad_input,
// grad_h0, grad_c0 (LSTM, else empty), grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh).
template <typename Cell, typename D>
std::array<at::Tensor, 7> one_direction_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                                 const at::Tensor& grad_c_n, const at::Tensor& input,
                                                 const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                                                 const at::Tensor& w_hh, const at::Tensor& batch_sizes, bool reverse,
                                                 bool need_grad_input, const at::Tensor& output,
                                                 const at::Tensor& gates, const at::Tensor& extra) {
  if constexpr (Cell::kGates == 4) {
    auto g = lstm_backward<D>(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, std::nullopt, batch_sizes,
                              reverse, need_grad_input, output, gates, extra);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g),
            std::get<6>(g)};
  } else {
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> g;
    if constexpr (Cell::kGates == 3) {
      g = gru_backward<D>(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes, reverse, need_grad_input, output,
                          gates, extra);
    } else {
      g = rnn_backward<Cell, D>(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes, reverse, need_grad_input,
                                output);
    }
    return {std::get<0>(g), std::get<1>(g), at::empty({0}, input.options()), std::get<2>(g), std::get<3>(g),
            std::get<4>(g), std::get<5>(g)};
  }
}

// fusedrnn::bidirectional_backward: the gradients of bidirectional_forward's differentiable outputs
// (each direction's output, h_n, c_n) -> (grad_input (both directions' sum; empty unless
// need_grad_input), then per direction grad_h0, grad_c0 (LSTM, else empty), grad_w_ih, grad_w_hh,
// grad_b_ih, grad_b_hh). `output`..`extra_reverse` and `schedule`: what the forward returned.
template <typename Backend>
BidirectionalBackwardResult bidirectional_backward_op(
    const std::string& cell, const at::Tensor& grad_output, const at::Tensor& grad_output_reverse,
    const at::Tensor& grad_h_n, const at::Tensor& grad_h_n_reverse, const OptTensor& grad_c_n,
    const OptTensor& grad_c_n_reverse, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& h0_reverse,
    const OptTensor& c0, const OptTensor& c0_reverse, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse, const at::Tensor& batch_sizes,
    bool need_grad_input, const at::Tensor& output, const at::Tensor& gates, const at::Tensor& extra,
    const at::Tensor& output_reverse, const at::Tensor& gates_reverse, const at::Tensor& extra_reverse,
    const at::Tensor& schedule) {
  constexpr const char* op = "bidirectional_backward";
  const int64_t G = cell_gates(op, cell);
  const bool lstm = G == 4;
  FUSEDRNN_CHECK(!lstm || (c0 && c0_reverse && grad_c_n && grad_c_n_reverse), op,
                 "lstm needs c0, c0_reverse, grad_c_n and grad_c_n_reverse");
  const at::Tensor none;
  const std::array<at::Tensor, 2> go{grad_output, grad_output_reverse}, ghn{grad_h_n, grad_h_n_reverse},
      gcn{lstm ? *grad_c_n : none, lstm ? *grad_c_n_reverse : none}, h0s{h0, h0_reverse},
      c0s{lstm ? *c0 : none, lstm ? *c0_reverse : none}, wih{w_ih, w_ih_reverse}, whh{w_hh, w_hh_reverse},
      outs{output, output_reverse}, gts{gates, gates_reverse}, exs{extra, extra_reverse};
  // Every argument checked as the one-direction ops check it, before anything is planned or launched.
  for (int d = 0; d < 2; ++d) {
    check_layer(op, G, input, h0s[d], lstm ? &c0s[d] : nullptr, wih[d], whh[d], std::nullopt, std::nullopt,
                std::nullopt);
  }
  FUSEDRNN_CHECK(h0.sizes() == h0_reverse.sizes(), op, "both directions' h0 must have the same shape, got ",
                 h0.sizes(), " and ", h0_reverse.sizes());
  const StepSchedule s = make_schedule(op, batch_sizes, input.size(0), h0.size(0));
  const int64_t B = h0.size(0), H = h0.size(1);
  std::array<std::array<at::Tensor, 7>, 2> g;
  with_cell(cell, [&](auto cell_tag) {
    using Cell = decltype(cell_tag);
    using Device = typename Backend::Device;
    using Launch = typename Backend::BackwardLaunch;
    bool persistent = false;
    std::vector<BackwardDirection> dirs;
    {
      const typename Backend::DeviceGuard device_guard(input.device());
      persistent = B > 0 && s.steps() > 0 && Launch::template accepts<Cell>(grad_output, H, B);
      if (persistent) {
        const std::vector<at::Tensor> saved_gates = G > 1 ? std::vector<at::Tensor>{gates, gates_reverse}
                                                          : std::vector<at::Tensor>{};
        const std::vector<at::Tensor> saved_extra = G > 1 ? std::vector<at::Tensor>{extra, extra_reverse}
                                                          : std::vector<at::Tensor>{};
        const std::vector<at::Tensor> c0v = lstm ? std::vector<at::Tensor>{c0s[0], c0s[1]} : std::vector<at::Tensor>{};
        const std::vector<at::Tensor> gcnv = lstm ? std::vector<at::Tensor>{gcn[0], gcn[1]} : std::vector<at::Tensor>{};
        dirs = bidirectional_backward_inputs(op, cell, {grad_output, grad_output_reverse},
                                             {grad_h_n, grad_h_n_reverse}, gcnv, {h0, h0_reverse}, c0v,
                                             {w_hh, w_hh_reverse}, {output, output_reverse}, saved_gates,
                                             saved_extra, s);
        if (both_directions_in_one_launch(Launch::plan, Backend::limits())) {
          backward_directions<Cell, Launch>(dirs, s, schedule);
        } else {  // two waves would be no better than two launches: one by one, the same schedule
          for (const BackwardDirection& x : dirs) {
            std::vector<BackwardDirection> one{x};  // shares x's buffers: the results land in dirs
            backward_directions<Cell, Launch>(one, s, schedule);
          }
        }
      }
    }
    for (int d = 0; d < 2; ++d) {
      if (persistent) {
        using Ready = PrecomputedRecurrence<Device>;
        Ready::ready = &dirs[d];
        struct Reset {
          ~Reset() { Ready::ready = nullptr; }
        } reset;
        // dirs[d].grad_output: the contiguous copy the recurrence read, so the driver copies nothing again.
        g[d] = one_direction_backward<Cell, Ready>(dirs[d].grad_output, ghn[d], gcn[d], input, h0s[d], c0s[d], wih[d],
                                                   whh[d], batch_sizes, d == 1, need_grad_input, outs[d], gts[d],
                                                   exs[d]);
      } else {  // the per-step loop, as the one-direction backward op runs it (its plan refuses too)
        g[d] = one_direction_backward<Cell, PersistentBackward<Device, Launch>>(
            go[d], ghn[d], gcn[d], input, h0s[d], c0s[d], wih[d], whh[d], batch_sizes, d == 1, need_grad_input,
            outs[d], gts[d], exs[d]);
      }
    }
  });
  at::Tensor grad_input = need_grad_input ? g[0][0].add_(g[1][0]) : at::empty({0}, input.options());
  return {grad_input, g[0][1], g[0][2], g[0][3], g[0][4], g[0][5], g[0][6],
          g[1][1],    g[1][2], g[1][3], g[1][4], g[1][5], g[1][6]};
}

}  // namespace persistent
}  // namespace fusedrnn
