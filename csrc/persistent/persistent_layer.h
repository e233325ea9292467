// The persistent forward of one layer and direction, the ATen part: the input
// projection as one GEMM (as csrc/layer/layer_forward.h), the output buffers in
// exactly the per-step path's layout (so the existing backward ops accept
// them), the step schedule on the device, then ONE launch of the whole-sequence
// kernel through `Launch`: the CUDA launcher (csrc/cuda/register_cuda.cpp) or
// the CPU emulation (csrc/cpu/persistent_emulation.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../layer/checks.h"
#include "../layer/layer_forward.h"
#include "../layer/layer_tensors.h"
#include "persistent_forward.h"

namespace fusedrnn {
namespace persistent {

// Launch: struct with `template <typename Cell, typename T> void run(const ForwardParams<T>&)`.
template <typename Cell, typename Launch>
ForwardOutputs layer_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                             const LayerWeights& w, const StepSchedule& sched, bool reverse, int64_t rows_per_cta,
                             Launch& launch) {
  constexpr int64_t G = Cell::kGates;
  const int64_t N = input.size(0), B = h0.size(0), H = h0.size(1), T_ = sched.steps();
  const bool is_lstm = c0.defined();
  const auto opts = input.options();

  ForwardOutputs r;
  r.gates = new_buffer({N, G * H}, opts);
  aten_matmul(r.gates, input, w.w_ih.t(), w.b_ih, false);
  r.output = new_buffer({N, H}, opts);
  r.h_n = new_buffer({B, H}, opts);
  r.c_n = is_lstm ? new_buffer({B, H}, opts) : at::Tensor();
  r.cells = is_lstm ? new_buffer({N, H}, opts) : at::empty({0}, opts);
  r.hn = G == 3 ? new_buffer({N, H}, opts) : at::empty({0}, opts);
  if (B == 0) return r;

  // A ragged batch's schedule, [2, steps] (batch sizes, then offsets), goes to the
  // device in one copy, from pinned memory when the device is a GPU (so the copy
  // is asynchronous on the current stream). A full batch needs none.
  at::Tensor schedule;
  if (!sched.uniform) {
    schedule = at::empty({2, T_}, at::TensorOptions().dtype(at::kLong));
    int64_t* sp = schedule.data_ptr<int64_t>();
    for (int64_t t = 0; t < T_; ++t) {
      sp[t] = sched.batch[t];
      sp[T_ + t] = sched.offset[t];
    }
    if (!input.device().is_cpu()) schedule = schedule.pin_memory().to(input.device(), /*non_blocking=*/true);
  }
  const at::Tensor w_hh = w.w_hh.contiguous();
  const at::Tensor b_hh = w.b_hh.defined() ? w.b_hh.contiguous() : at::Tensor();
  const at::Tensor h0c = h0.contiguous();
  const at::Tensor c0c = is_lstm ? c0.contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedrnn.persistent_forward", [&] {
    using T = scalar_t;
    ForwardParams<T> p;
    p.batch = B;
    p.hidden = H;
    p.steps = T_;
    p.rows_per_cta = rows_per_cta;
    p.reverse = reverse;
    p.step_batch = schedule.defined() ? schedule.const_data_ptr<int64_t>() : nullptr;
    p.step_offset = schedule.defined() ? schedule.const_data_ptr<int64_t>() + T_ : nullptr;
    p.w_hh = w_hh.const_data_ptr<T>();
    p.b_hh = b_hh.defined() ? b_hh.const_data_ptr<T>() : nullptr;
    p.h0 = h0c.const_data_ptr<T>();
    p.c0 = is_lstm ? c0c.const_data_ptr<T>() : nullptr;
    p.gates = r.gates.data_ptr<T>();
    p.output = r.output.data_ptr<T>();
    p.cells = is_lstm ? r.cells.data_ptr<T>() : nullptr;
    p.hn = G == 3 ? r.hn.data_ptr<T>() : nullptr;
    p.h_n = r.h_n.data_ptr<T>();
    p.c_n = is_lstm ? r.c_n.data_ptr<T>() : nullptr;
    launch.template run<Cell, T>(p);
  });
  return r;
}

}  // namespace persistent
}  // namespace fusedrnn
