// The persistent backward of one layer and direction, the ATen part. It plugs
// into the shared backward driver (csrc/layer/layer_backward.h) through its
// sequence-engine hook: `PersistentBackward<Base, Launch>` is the device policy
// `Base` (CudaDevice, or the CPU's for the runner) whose `backward_sequence`
// runs the whole reverse-time recurrence as ONE launch of the persistent
// backward kernel (persistent_backward.h) through `Launch` (the CUDA launcher
// in csrc/cuda/register_cuda.cpp, or the CPU runner in
// csrc/cpu/persistent_emulation.cpp). The kernel writes the input-side gate
// gradients of every token and the state gradients dL/dh0, dL/dc0; the
// driver's tail then computes dX, dW_ih, dW_hh and the bias gradients as a few
// large GEMMs exactly as after its per-step loop, so both paths share them.
// It reads what either forward path saved (the same tensors, same layout).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>
#include <type_traits>
#include <vector>

#include "../layer/layer_backward.h"
#include "../layer/layer_tensors.h"
#include "persistent_backward.h"
#include "persistent_layer.h"  // device_schedule

namespace fusedrnn {
namespace persistent {

// One direction's persistent backward kernel: what it reads (contiguous) and writes.
struct BackwardDirection {
  at::Tensor grad_output, h0, c0, w_hh;  // c0: LSTM only
  SavedForBackward saved;                // output, gates, cells (LSTM), hn (GRU) as a forward saved them
  at::Tensor dh_state, dc_state;         // in: dL/dh_n, dL/dc_n (LSTM); out: dL/dh0, dL/dc0
  at::Tensor dgates;                     // out: the input-side gate gradients of every token
  bool reverse = false;
};

// The backward recurrence of one or two directions of a layer over the same schedule in ONE launch
// (persistent_directions.h) through Launch::run_directions<Cell, T>(Directions<BackwardParams<T>>&,
// directions), which sets the rows per CTA and the grid. `written_schedule`: a ragged batch's
// [2, steps] schedule the forward already wrote on the device (the bidirectional ops save it), read
// instead of writing it again; undefined: written here.
template <typename Cell, typename Launch>
void backward_directions(std::vector<BackwardDirection>& dirs, const StepSchedule& s,
                         const at::Tensor& written_schedule = at::Tensor()) {
  constexpr int64_t G = Cell::kGates;
  TORCH_CHECK(dirs.size() == 1 || dirs.size() == 2, "fusedrnn: a persistent launch runs one or two directions, got ",
              dirs.size());
  const int64_t B = dirs[0].dh_state.size(0), H = dirs[0].dh_state.size(1), T_ = s.steps();
  if (B == 0 || T_ == 0) return;
  // The ragged schedule written on the device, as the forward's (persistent_layer.h).
  at::Tensor schedule;
  if (!s.uniform && written_schedule.defined()) {
    TORCH_CHECK(written_schedule.dim() == 2 && written_schedule.size(0) == 2 && written_schedule.size(1) == T_ &&
                    written_schedule.scalar_type() == at::kLong && written_schedule.is_contiguous() &&
                    written_schedule.device() == dirs[0].grad_output.device(),
                "fusedrnn: the saved schedule must be the contiguous int64 [2, ", T_,
                "] tensor the forward returned, on grad_output's device; got ", written_schedule.sizes(), " ",
                written_schedule.scalar_type(), " on ", written_schedule.device());
    schedule = written_schedule;
  } else if (!s.uniform) {
    schedule = device_schedule(s, dirs[0].grad_output.device(), [](const ScheduleChunk& c) { Launch::fill_schedule(c); });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dirs[0].grad_output.scalar_type(),
                                  "fusedrnn.persistent_backward", [&] {
    using T = scalar_t;
    Directions<BackwardParams<T>> l;
    for (size_t d = 0; d < dirs.size(); ++d) {
      const BackwardDirection& x = dirs[d];
      BackwardParams<T>& p = l.dir[d];
      p.batch = B;
      p.hidden = H;
      p.steps = T_;
      p.reverse = x.reverse;
      p.step_batch = schedule.defined() ? schedule.const_data_ptr<int64_t>() : nullptr;
      p.step_offset = schedule.defined() ? schedule.const_data_ptr<int64_t>() + T_ : nullptr;
      p.w_hh = x.w_hh.const_data_ptr<T>();
      p.h0 = x.h0.const_data_ptr<T>();
      p.c0 = x.c0.defined() ? x.c0.const_data_ptr<T>() : nullptr;
      p.grad_output = x.grad_output.const_data_ptr<T>();
      p.gates = x.saved.gates.defined() && x.saved.gates.numel() > 0 ? x.saved.gates.const_data_ptr<T>() : nullptr;
      p.output = x.saved.output.const_data_ptr<T>();
      p.cells = G == 4 ? x.saved.cells.const_data_ptr<T>() : nullptr;
      p.hn = G == 3 ? x.saved.hn.const_data_ptr<T>() : nullptr;
      p.grad_gates = x.dgates.data_ptr<T>();
      p.grad_h = x.dh_state.data_ptr<T>();
      p.grad_c = G == 4 ? x.dc_state.data_ptr<T>() : nullptr;
    }
    if (dirs.size() == 1) l.dir[1] = l.dir[0];  // no block reads it; not left half-initialised
    Launch::template run_directions<Cell, T>(l, int64_t(dirs.size()));
  });
}

// The arguments of the test-only op persistent_backward_bidirectional (per-direction lists; direction
// 0 ran forward in time, direction 1 reversed), checked, as BackwardDirection with fresh outputs; and
// its result: each direction's (gate gradients, dL/dh0, dL/dc0 (LSTM; else empty)).
inline std::vector<BackwardDirection> bidirectional_backward_inputs(
    const char* op, const std::string& cell, at::TensorList grad_output, at::TensorList grad_h_n,
    at::TensorList grad_c_n, at::TensorList h0, at::TensorList c0, at::TensorList w_hh, at::TensorList output,
    at::TensorList gates, at::TensorList extra, const StepSchedule& s) {
  const bool lstm = cell == "lstm", gru = cell == "gru";
  const int64_t G = lstm ? 4 : gru ? 3 : 1;
  FUSEDRNN_CHECK(lstm || gru || cell == "rnn_tanh" || cell == "rnn_relu", op,
                 "cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  const size_t states = lstm ? 2 : 0, saved = lstm || gru ? 2 : 0;
  FUSEDRNN_CHECK(grad_output.size() == 2 && grad_h_n.size() == 2 && h0.size() == 2 && w_hh.size() == 2 &&
                     output.size() == 2 && grad_c_n.size() == states && c0.size() == states &&
                     gates.size() == saved && extra.size() == saved,
                 op, "every per-direction list must hold 2 tensors (grad_c_n, c0: lstm only; gates, extra: lstm, gru)");
  const int64_t N = grad_output[0].size(0), B = h0[0].size(0), H = h0[0].size(1);
  FUSEDRNN_CHECK(H <= kMaxHidden, op, "hidden_size must be at most ", kMaxHidden, ", got ", H);
  int64_t tokens = 0;
  for (int64_t t = 0; t < s.steps(); ++t) tokens += s.batch[t];
  FUSEDRNN_CHECK(tokens == N && (s.steps() == 0 || s.batch[0] == B), op, "batch_sizes do not match grad_output / h0");
  auto shaped = [&](const at::Tensor& t, at::IntArrayRef want, const char* what) {
    FUSEDRNN_CHECK(t.sizes() == want && t.scalar_type() == grad_output[0].scalar_type() &&
                       t.device() == grad_output[0].device(),
                   op, what, " must be ", want, " of grad_output's dtype and device, got ", t.sizes(), " ",
                   t.scalar_type(), " on ", t.device());
    return t.contiguous();
  };
  std::vector<BackwardDirection> dirs(2);
  for (int d = 0; d < 2; ++d) {
    BackwardDirection& x = dirs[d];
    x.grad_output = shaped(grad_output[d], {N, H}, "grad_output");
    x.h0 = shaped(h0[d], {B, H}, "h0");
    x.c0 = lstm ? shaped(c0[d], {B, H}, "c0") : at::Tensor();
    x.w_hh = shaped(w_hh[d], {G * H, H}, "w_hh");
    x.saved.output = shaped(output[d], {N, H}, "output");
    if (saved) x.saved.gates = shaped(gates[d], {N, G * H}, "gates");
    if (lstm) x.saved.cells = shaped(extra[d], {N, H}, "extra (cells)");
    if (gru) x.saved.hn = shaped(extra[d], {N, H}, "extra (hn)");
    x.dh_state = copy_of_state(shaped(grad_h_n[d], {B, H}, "grad_h_n"));
    x.dc_state = lstm ? copy_of_state(shaped(grad_c_n[d], {B, H}, "grad_c_n")) : at::Tensor();
    x.dgates = new_buffer({N, G * H}, x.grad_output.options());
    x.reverse = d == 1;
  }
  return dirs;
}
inline std::vector<at::Tensor> bidirectional_backward_outputs(const std::vector<BackwardDirection>& dirs) {
  std::vector<at::Tensor> out;
  for (const BackwardDirection& x : dirs) {
    out.push_back(x.dgates);
    out.push_back(x.dh_state);
    out.push_back(x.dc_state.defined() ? x.dc_state : at::empty({0}, x.dgates.options()));
  }
  return out;
}

// Launch: struct with `static bool accepts<Cell>(const at::Tensor& like, int64_t hidden, int64_t batch)`
// (false: leave the call to the per-step loop; it may raise when the path is forced),
// `template <typename Cell, typename T> static void run_directions(Directions<BackwardParams<T>>&,
// int64_t directions)` and `static void fill_schedule(const ScheduleChunk&)` (the FillSchedule
// kernel, persistent_schedule.h).
template <typename Base, typename Launch>
struct PersistentBackward : Base {
  static constexpr bool kSequenceEngine = true;
  // The persistent kernel runs the half types as such (fp32 sums and state inside), on the GPU and
  // in the CPU runner that stands for it: never the CPU policy's widening to float32 (layer_forward.h).
  static constexpr bool kWidensHalfTypes = false;

  template <typename Cell>
  static bool backward_sequence(const at::Tensor& grad_output, const SavedForBackward& saved, const LayerWeights& w,
                                const StepSchedule& s, bool reverse, const at::Tensor& h0, const at::Tensor& c0,
                                at::Tensor& dh_state, at::Tensor& dc_state, at::Tensor& dgates, at::Tensor& dgates_h) {
    (void)dgates_h;  // GRU's hidden-side gate gradients live in the kernel's shared memory
    if (!Launch::template accepts<Cell>(grad_output, dh_state.size(1), dh_state.size(0))) return false;
    std::vector<BackwardDirection> one(1);
    one[0] = BackwardDirection{grad_output, h0, c0, w.w_hh.contiguous(), saved, dh_state, dc_state, dgates, reverse};
    backward_directions<Cell, Launch>(one, s);
    return true;
  }
};

}  // namespace persistent
}  // namespace fusedrnn
