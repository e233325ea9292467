// The persistent forward of one layer and one or both directions, the ATen part: the input
// projection as one GEMM (as csrc/layer/layer_forward.h), the output buffers in
// exactly the per-step path's layout (so the existing backward ops accept
// them), the step schedule on the device, then ONE launch of the whole-sequence
// kernel through `Launch`: the CUDA launcher (csrc/cuda/register_cuda.cpp) or
// the CPU emulation (csrc/cpu/persistent_emulation.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../layer/checks.h"
#include "../layer/layer_forward.h"
#include "../layer/layer_tensors.h"
#include "persistent_directions.h"
#include "persistent_forward.h"
#include "persistent_plan.h"
#include "persistent_schedule.h"

namespace fusedrnn {
namespace persistent {

// The path for this call from FUSEDRNN_CUDA_PATH: true = persistent where the plan allows (auto) or
// always (persistent), false = per-step.
inline bool wants_persistent(const char* op, PathRequest* request) {
  const char* env = std::getenv("FUSEDRNN_CUDA_PATH");
  *request = parse_path_request(env);
  FUSEDRNN_CHECK(*request != PathRequest::kInvalid, op, "FUSEDRNN_CUDA_PATH must be per_step, persistent or auto, got '",
                 env, "'");
  return *request != PathRequest::kPerStep;
}

inline void check_forced(const char* op, PathRequest request, const Plan& plan) {
  FUSEDRNN_CHECK(request != PathRequest::kPersistent || plan.ok, op,
                 "FUSEDRNN_CUDA_PATH=persistent, but the persistent kernel cannot run this layer: ", plan.why_not,
                 " (unset FUSEDRNN_CUDA_PATH or set it to auto to fall back to the per-step path)");
}

// A ragged batch's schedule, [2, steps] (batch sizes, then offsets), in a buffer on `device`,
// written there by the FillSchedule kernel (persistent_schedule.h) through `fill(const
// ScheduleChunk&)`: nothing is copied from host memory, so a CUDA graph capture replays it (the
// chunks live in the captured kernels' parameters, the buffer in the graph's pool).
// `into`: a [2, steps] int64 buffer on `device` to write (the bidirectional ops' schedule output),
// or undefined for a fresh one.
template <typename Fill>
at::Tensor device_schedule(const StepSchedule& s, const at::Device& device, Fill&& fill, at::Tensor into = {}) {
  at::Tensor schedule = into.defined() ? into : at::empty({2, s.steps()}, at::TensorOptions().dtype(at::kLong).device(device));
  TORCH_CHECK(schedule.dim() == 2 && schedule.size(0) == 2 && schedule.size(1) == s.steps() &&
                  schedule.scalar_type() == at::kLong && schedule.is_contiguous() && schedule.device() == device,
              "fusedrnn: the schedule buffer must be a contiguous int64 [2, ", s.steps(), "] tensor on ", device);
  schedule_chunks(s.batch.data(), s.steps(), schedule.data_ptr<int64_t>(), fill);
  return schedule;
}

// One direction of a layer as the persistent forward takes it.
struct DirectionInputs {
  at::Tensor h0, c0;  // c0 undefined but for LSTM
  LayerWeights w;
  bool reverse = false;
};

// The forward of one or two directions of a layer over the same input and schedule, their
// kernels in ONE launch (persistent_directions.h); outputs as one-direction calls give them.
// Launch: struct with `template <typename Cell, typename T> void run(const Directions<ForwardParams<T>>&,
// int64_t grid)` and `void fill_schedule(const ScheduleChunk&)` (the FillSchedule kernel).
// `schedule`: where a ragged batch's device-written schedule is kept ([2, steps]): written here
// when it arrives undefined or unwritten (`*schedule_written` false), else read as it is, so the
// two directions launched one by one and the backward after them share one (see
// persistent_bidirectional.h); nullptr: a schedule of this call's own.
template <typename Cell, typename Launch>
std::vector<ForwardOutputs> layer_forward_directions(const at::Tensor& input, const std::vector<DirectionInputs>& dirs,
                                                     const StepSchedule& sched, int64_t rows_per_cta, Launch& launch,
                                                     at::Tensor* schedule_io = nullptr,
                                                     bool* schedule_written = nullptr) {
  constexpr int64_t G = Cell::kGates;
  TORCH_CHECK(dirs.size() == 1 || dirs.size() == 2, "fusedrnn: a persistent launch runs one or two directions, got ",
              dirs.size());
  const int64_t N = input.size(0), B = dirs[0].h0.size(0), H = dirs[0].h0.size(1), T_ = sched.steps();
  const bool is_lstm = dirs[0].c0.defined();
  const auto opts = input.options();

  std::vector<ForwardOutputs> out(dirs.size());
  // Contiguous operands, kept alive until the launch is queued.
  std::vector<at::Tensor> w_hh(dirs.size()), b_hh(dirs.size()), h0(dirs.size()), c0(dirs.size());
  for (size_t d = 0; d < dirs.size(); ++d) {
    ForwardOutputs& r = out[d];
    const LayerWeights& w = dirs[d].w;
    r.gates = new_buffer({N, G * H}, opts);
    aten_matmul(r.gates, input, w.w_ih.t(), w.b_ih, false);
    r.output = new_buffer({N, H}, opts);
    r.h_n = new_buffer({B, H}, opts);
    r.c_n = is_lstm ? new_buffer({B, H}, opts) : at::Tensor();
    r.cells = is_lstm ? new_buffer({N, H}, opts) : at::empty({0}, opts);
    r.hn = G == 3 ? new_buffer({N, H}, opts) : at::empty({0}, opts);
    w_hh[d] = w.w_hh.contiguous();
    b_hh[d] = w.b_hh.defined() ? w.b_hh.contiguous() : at::Tensor();
    h0[d] = dirs[d].h0.contiguous();
    c0[d] = is_lstm ? dirs[d].c0.contiguous() : at::Tensor();
  }
  if (B == 0) return out;

  // A ragged batch's schedule (the same for both directions), written on the device; a full batch
  // needs none.
  at::Tensor schedule;
  if (!sched.uniform) {
    const bool reuse = schedule_io != nullptr && schedule_written != nullptr && *schedule_written;
    schedule = reuse ? *schedule_io
                     : device_schedule(sched, input.device(), [&launch](const ScheduleChunk& c) { launch.fill_schedule(c); },
                                       schedule_io != nullptr ? *schedule_io : at::Tensor());
    if (schedule_written != nullptr) *schedule_written = true;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedrnn.persistent_forward", [&] {
    using T = scalar_t;
    Directions<ForwardParams<T>> l;
    for (size_t d = 0; d < dirs.size(); ++d) {
      ForwardOutputs& r = out[d];
      ForwardParams<T>& p = l.dir[d];
      p.batch = B;
      p.hidden = H;
      p.steps = T_;
      p.rows_per_cta = rows_per_cta;
      p.reverse = dirs[d].reverse;
      p.step_batch = schedule.defined() ? schedule.const_data_ptr<int64_t>() : nullptr;
      p.step_offset = schedule.defined() ? schedule.const_data_ptr<int64_t>() + T_ : nullptr;
      p.w_hh = w_hh[d].const_data_ptr<T>();
      p.b_hh = b_hh[d].defined() ? b_hh[d].const_data_ptr<T>() : nullptr;
      p.h0 = h0[d].const_data_ptr<T>();
      p.c0 = is_lstm ? c0[d].const_data_ptr<T>() : nullptr;
      p.gates = r.gates.data_ptr<T>();
      p.output = r.output.data_ptr<T>();
      p.cells = is_lstm ? r.cells.data_ptr<T>() : nullptr;
      p.hn = G == 3 ? r.hn.data_ptr<T>() : nullptr;
      p.h_n = r.h_n.data_ptr<T>();
      p.c_n = is_lstm ? r.c_n.data_ptr<T>() : nullptr;
    }
    if (dirs.size() == 1) l.dir[1] = l.dir[0];  // no block reads it; not left half-initialised
    l.first_ctas = ctas_for(B, rows_per_cta);
    launch.template run<Cell, T>(l, l.first_ctas * int64_t(dirs.size()));
  });
  return out;
}

// The arguments of the test-only op persistent_forward_bidirectional (per-direction lists; direction
// 0 runs forward in time, direction 1 reversed), checked, as DirectionInputs; and its result: each
// direction's (output, h_n, c_n, gates, extra) as the one-direction forward ops return them.
// `persistent_only`: refuse a hidden size the persistent kernels cannot run (the test-only ops); the
// bidirectional ops take any and leave it to the plan.
inline std::vector<DirectionInputs> bidirectional_inputs(const char* op, const std::string& cell,
                                                         const at::Tensor& input, at::TensorList h0,
                                                         at::TensorList c0, at::TensorList w_ih, at::TensorList w_hh,
                                                         at::ArrayRef<std::optional<at::Tensor>> b_ih,
                                                         at::ArrayRef<std::optional<at::Tensor>> b_hh,
                                                         bool persistent_only = true) {
  const bool lstm = cell == "lstm";
  const int64_t gates = lstm ? 4 : cell == "gru" ? 3 : 1;
  FUSEDRNN_CHECK(lstm || cell == "gru" || cell == "rnn_tanh" || cell == "rnn_relu", op,
                 "cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  FUSEDRNN_CHECK(h0.size() == 2 && w_ih.size() == 2 && w_hh.size() == 2 && b_ih.size() == 2 && b_hh.size() == 2 &&
                     c0.size() == (lstm ? 2u : 0u),
                 op, "every per-direction list must hold 2 tensors (c0: 2 for lstm, none otherwise)");
  FUSEDRNN_CHECK(h0[0].sizes() == h0[1].sizes(), op, "both directions' h0 must have the same shape, got ",
                 h0[0].sizes(), " and ", h0[1].sizes());
  std::vector<DirectionInputs> dirs(2);
  for (int d = 0; d < 2; ++d) {
    const at::Tensor c0d = lstm ? c0[d] : at::Tensor();
    dirs[d].w = check_layer(op, gates, input, h0[d], lstm ? &c0d : nullptr, w_ih[d], w_hh[d], b_ih[d], b_hh[d],
                            std::nullopt);
    dirs[d].h0 = h0[d];
    dirs[d].c0 = c0d;
    dirs[d].reverse = d == 1;
    FUSEDRNN_CHECK(!persistent_only || h0[d].size(1) <= kMaxHidden, op, "hidden_size must be at most ", kMaxHidden, ", got ",
                   h0[d].size(1));
  }
  return dirs;
}
inline std::vector<at::Tensor> bidirectional_outputs(const std::string& cell, const std::vector<ForwardOutputs>& r,
                                                     const at::TensorOptions& opts) {
  const at::Tensor empty = at::empty({0}, opts);
  std::vector<at::Tensor> out;
  for (const ForwardOutputs& o : r) {
    const at::Tensor extra = cell == "lstm" ? o.cells : cell == "gru" ? o.hn : empty;
    for (const at::Tensor& t : {o.output, o.h_n, cell == "lstm" ? o.c_n : empty, o.gates, extra}) out.push_back(t);
  }
  return out;
}

// One direction: the same, one direction's blocks.
template <typename Cell, typename Launch>
ForwardOutputs layer_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                             const LayerWeights& w, const StepSchedule& sched, bool reverse, int64_t rows_per_cta,
                             Launch& launch) {
  return layer_forward_directions<Cell>(input, {DirectionInputs{h0, c0, w, reverse}}, sched, rows_per_cta, launch)[0];
}

}  // namespace persistent
}  // namespace fusedrnn
