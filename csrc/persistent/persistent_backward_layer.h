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

#include <type_traits>

#include "../layer/layer_backward.h"
#include "../layer/layer_tensors.h"
#include "persistent_backward.h"
#include "persistent_layer.h"  // device_schedule

namespace fusedrnn {
namespace persistent {

// Launch: struct with `static bool accepts<Cell>(const at::Tensor& like, int64_t hidden, int64_t batch)`
// (false: leave the call to the per-step loop; it may raise when the path is forced),
// `template <typename Cell, typename T> static void run(const BackwardParams<T>&)` and
// `static void fill_schedule(const ScheduleChunk&)` (the FillSchedule kernel, persistent_schedule.h).
template <typename Base, typename Launch>
struct PersistentBackward : Base {
  static constexpr bool kSequenceEngine = true;

  template <typename Cell>
  static bool backward_sequence(const at::Tensor& grad_output, const SavedForBackward& saved, const LayerWeights& w,
                                const StepSchedule& s, bool reverse, const at::Tensor& h0, const at::Tensor& c0,
                                at::Tensor& dh_state, at::Tensor& dc_state, at::Tensor& dgates, at::Tensor& dgates_h) {
    (void)dgates_h;  // GRU's hidden-side gate gradients live in the kernel's shared memory
    constexpr int64_t G = Cell::kGates;
    const int64_t B = dh_state.size(0), H = dh_state.size(1), T_ = s.steps();
    if (!Launch::template accepts<Cell>(grad_output, H, B)) return false;
    if (B == 0 || T_ == 0) return true;
    // The ragged schedule written on the device, as the forward's (persistent_layer.h).
    at::Tensor schedule;
    if (!s.uniform) {
      schedule = device_schedule(s, grad_output.device(), [](const ScheduleChunk& c) { Launch::fill_schedule(c); });
    }
    const at::Tensor w_hh = w.w_hh.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                    "fusedrnn.persistent_backward", [&] {
      using T = scalar_t;
      BackwardParams<T> p;
      p.batch = B;
      p.hidden = H;
      p.steps = T_;
      p.reverse = reverse;
      p.step_batch = schedule.defined() ? schedule.const_data_ptr<int64_t>() : nullptr;
      p.step_offset = schedule.defined() ? schedule.const_data_ptr<int64_t>() + T_ : nullptr;
      p.w_hh = w_hh.const_data_ptr<T>();
      p.h0 = h0.const_data_ptr<T>();
      p.c0 = c0.defined() ? c0.const_data_ptr<T>() : nullptr;
      p.grad_output = grad_output.const_data_ptr<T>();
      p.gates = saved.gates.defined() && saved.gates.numel() > 0 ? saved.gates.const_data_ptr<T>() : nullptr;
      p.output = saved.output.const_data_ptr<T>();
      p.cells = G == 4 ? saved.cells.const_data_ptr<T>() : nullptr;
      p.hn = G == 3 ? saved.hn.const_data_ptr<T>() : nullptr;
      p.grad_gates = dgates.data_ptr<T>();
      p.grad_h = dh_state.data_ptr<T>();
      p.grad_c = G == 4 ? dc_state.data_ptr<T>() : nullptr;
      Launch::template run<Cell, T>(p);
    });
    return true;
  }
};

}  // namespace persistent
}  // namespace fusedrnn
