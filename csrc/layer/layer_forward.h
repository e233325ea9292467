// Forward of one layer, one direction, over the whole (packed) sequence.
//
//   1. input projection of every time step as ONE GEMM:  gates = X W_ih^T + b_ih
//   2. per step: one recurrent GEMM on the active rows   hproj = h W_hh^T + b_hh
//                (b_hh added by the pointwise step instead where the Device says so)
//                one fused pointwise step (Cell::forward, via Device)
//                [LSTM proj_size > 0: one projection GEMM h_t = r_t W_hr^T]
//
// The driver is device-generic. The large GEMMs go through ATen (MKL on the
// CPU, cuBLAS on the current stream on CUDA); the `Device` policy supplies the
// per-step GEMM (Device::matmul) and the pointwise loop or kernel launch around
// the shared per-element cell math (Device::forward / backward):
// cpu/cpu_device.h and cuda/register_cuda.cpp.
// All buffers are allocated once before the time loop; nothing is allocated
// per step except ATen's view objects.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../cells/step_params.h"
#include "checks.h"
#include "layer_tensors.h"

namespace fusedrnn {

// Every buffer a driver returns or reads back is allocated here. With
// FUSEDRNN_POISON_OUTPUTS=1 in the environment (the test suite sets it) they
// start as NaN, so an element that a kernel forgot to write fails the tests
// instead of passing on whatever the memory held.
inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* v = std::getenv("FUSEDRNN_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  return poison ? at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts) : at::empty(sizes, opts);
}

// A contiguous copy of a state tensor, in a fresh buffer. On the CPU a plain memcpy: Tensor::clone
// goes through the dispatcher and a TensorIterator copy, ~6 K instructions, as much as the whole
// one-step RNN kernel of a small call (B = 1, H = 64; benchmarks/NOTES.md, entry 16).
// The gradient of an unused state arrives as a zero scalar expanded to the state's shape
// (fusedrnn/_ops.py: _unused_grad): that one becomes a memset.
inline at::Tensor copy_of_state(const at::Tensor& t) {
  if (t.is_cpu() && !t.is_neg() && !t.is_conj() && t.layout() == at::kStrided) {
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    if (t.is_contiguous()) {
      at::Tensor out = new_buffer(t.sizes(), t.options());
      if (bytes > 0) std::memcpy(out.data_ptr(), t.const_data_ptr(), bytes);
      return out;
    }
    bool expanded_scalar = t.numel() > 0;
    for (int64_t d = 0; d < t.dim() && expanded_scalar; ++d) expanded_scalar = t.stride(d) == 0;
    if (expanded_scalar) {
      const auto* first = static_cast<const unsigned char*>(t.const_data_ptr());
      bool zero = true;
      for (int64_t i = 0; i < t.element_size(); ++i) zero = zero && first[i] == 0;
      if (zero) {
        at::Tensor out = new_buffer(t.sizes(), t.options());
        std::memset(out.data_ptr(), 0, bytes);
        return out;
      }
    }
  }
  return t.clone(at::MemoryFormat::Contiguous);
}

// View of rows [start, start + count) of a 2-D tensor, skipping the view when
// it would cover the whole tensor.
inline at::Tensor rows(const at::Tensor& t, int64_t start, int64_t count) {
  return (start == 0 && count == t.size(0)) ? t : t.narrow(0, start, count);
}

// out = a @ b (+ bias broadcast over rows) (+ out when accumulate), through
// ATen: the devices' default per-step GEMM (cuBLAS on CUDA).
inline void aten_matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                        bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else if (bias.defined()) {
    at::addmm_out(out, bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// a @ b into a new tensor through the Device's GEMM. Every GEMM of the drivers
// goes through Device::gemm (or the per-step Device::matmul), so that the CUDA
// policy can choose the float32 math per call as torch.nn's cuDNN RNNs do
// (cuda/fp32_gemm.h).
template <typename Device>
at::Tensor device_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  Device::gemm(out, a, b, at::Tensor(), false);
  return out;
}

// A device policy may run a layer's whole time loop itself (the CPU engine,
// cpu/cpu_engine.h) by declaring `static constexpr bool kSequenceEngine = true`
// and forward_sequence / backward_sequence, which return false to leave the
// call to the per-step loop here. The CUDA policy declares nothing and keeps
// the per-step path.
template <typename Device, typename = void>
struct has_sequence_engine : std::false_type {};
template <typename Device>
struct has_sequence_engine<Device, std::void_t<decltype(Device::kSequenceEngine)>>
    : std::bool_constant<Device::kSequenceEngine> {};

// A device policy may run the half types' layers in float32 (the CPU's: cpu/widened_layer.h) by
// declaring `static constexpr bool kWidensHalfTypes = true`, widens(dtype), forward_widened and
// backward_widened: the drivers hand those the call and themselves on float32 tensors, to run on the
// widened tensors (in chunks of time steps, on the CPU).
template <typename Device, typename = void>
struct widens_half_types : std::false_type {};
template <typename Device>
struct widens_half_types<Device, std::void_t<decltype(Device::kWidensHalfTypes)>>
    : std::bool_constant<Device::kWidensHalfTypes> {};

// A device policy whose pointwise step adds b_hh itself (ForwardStepParams::hproj_bias)
// declares `static constexpr bool kStepAddsHiddenBias = true`; its recurrent GEMM
// then runs without the bias (CUDA: no bias copy into the GEMM's output first,
// one launch less per step).
template <typename Device, typename = void>
struct step_adds_hidden_bias : std::false_type {};
template <typename Device>
struct step_adds_hidden_bias<Device, std::void_t<decltype(Device::kStepAddsHiddenBias)>>
    : std::bool_constant<Device::kStepAddsHiddenBias> {};

// save_for_backward false (the inference ops: no gradient will be taken): gates, cells and hn
// come back undefined, and what only backward reads is not kept. The CPU engine then does not
// even compute-and-store it (cpu/cpu_device.h); the per-step loop here still needs the [N, G*H]
// gates as its input projection, and writes each step's c_t / hn into one [B, H] scratch row
// block instead of a [N, H] buffer. output, h_n and c_n are bitwise the same either way.
template <typename Cell, typename Device>
ForwardOutputs layer_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                             const LayerWeights& w, const StepSchedule& sched, bool reverse,
                             bool save_for_backward = true) {
  if constexpr (widens_half_types<Device>::value) {
    if (Device::widens(input.scalar_type())) {
      return Device::forward_widened(input, h0, c0, w, sched, reverse, save_for_backward,
                                     [](auto&&... a) { return layer_forward<Cell, Device>(a...); });
    }
  }
  constexpr int64_t G = Cell::kGates;
  const int64_t N = input.size(0);
  const int64_t B = h0.size(0);
  const int64_t P = h0.size(1);
  const int64_t H = w.w_hh.size(0) / G;
  const bool is_lstm = c0.defined();
  const bool has_proj = w.w_hr.defined();
  const auto opts = input.options();

  // RNN (G = 1) returns no gates: its [N, H] buffer is only ever the input projection.
  const bool save = save_for_backward && G > 1;
  ForwardOutputs r;
  if (save) r.gates = new_buffer({N, G * H}, opts);
  r.output = new_buffer({N, P}, opts);
  r.h_n = copy_of_state(h0);  // the running state; final state at the end
  r.c_n = is_lstm ? copy_of_state(c0) : at::Tensor();
  if (save) {
    r.cells = is_lstm ? new_buffer({N, H}, opts) : at::empty({0}, opts);
    r.hn = G == 3 ? new_buffer({N, H}, opts) : at::empty({0}, opts);
  }
  if constexpr (has_sequence_engine<Device>::value) {
    // The engine owns the input projection too: inside its recurrent tiles
    // where that measured faster, otherwise as this same one GEMM
    // (cpu/cpu_device.h, cpu/cpu_engine.h: fuse_input_projection).
    if (!has_proj && Device::template forward_sequence<Cell>(r, input, w, sched, reverse, save)) return r;
  }
  // The per-step loop: the gates buffer holds the input projection, then the activated gates.
  at::Tensor gates = save ? r.gates : new_buffer({N, G * H}, opts);
  at::Tensor cells = save || !is_lstm ? r.cells : new_buffer({B, H}, opts);  // inference: one step's c_t
  at::Tensor hn = save || G != 3 ? r.hn : new_buffer({B, H}, opts);          // inference: one step's hn
  Device::gemm(gates, input, w.w_ih.t(), w.b_ih, false);
  at::Tensor hproj = new_buffer({B, G * H}, opts);
  at::Tensor proj_in = has_proj ? new_buffer({B, H}, opts) : at::Tensor();  // r_t = o * tanh(c_t)
  // W_hh^T, once: the per-step GEMM then reads both operands row by row.
  const at::Tensor w_hh_t = w.w_hh.t().contiguous();
  constexpr bool bias_in_step = step_adds_hidden_bias<Device>::value;
  const at::Tensor step_bias = bias_in_step && w.b_hh.defined() ? w.b_hh.contiguous() : at::Tensor();
  const at::Tensor gemm_bias = bias_in_step ? at::Tensor() : w.b_hh;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedrnn.layer_forward", [&] {
    using T = scalar_t;
    for (int64_t k = 0; k < sched.steps(); ++k) {
      const int64_t t = reverse ? sched.steps() - 1 - k : k;
      const int64_t bs = sched.batch[t];
      const int64_t off = sched.offset[t];
      at::Tensor hproj_t = rows(hproj, 0, bs);
      Device::template matmul<T>(hproj_t, rows(r.h_n, 0, bs), w_hh_t, gemm_bias, false);

      ForwardStepParams<T> p;
      p.batch = bs;
      p.hidden = H;
      p.gates = gates.template data_ptr<T>() + off * G * H;
      p.hproj = hproj.template const_data_ptr<T>();
      p.hproj_bias = step_bias.defined() ? step_bias.template const_data_ptr<T>() : nullptr;
      // With projection the cell's output is r_t, not the state: let it write r_t
      // twice to the same place, which keeps the cell free of branches.
      p.h_state = has_proj ? proj_in.template data_ptr<T>() : r.h_n.template data_ptr<T>();
      p.out = has_proj ? proj_in.template data_ptr<T>() : r.output.template data_ptr<T>() + off * P;
      if (is_lstm) {
        p.c_state = r.c_n.template data_ptr<T>();
        p.cells = cells.template data_ptr<T>() + (save ? off * H : 0);
      }
      if (G == 3) p.hn = hn.template data_ptr<T>() + (save ? off * H : 0);
      Device::template forward<Cell, T>(p);

      if (has_proj) {
        at::Tensor out_t = rows(r.output, off, bs);
        Device::gemm(out_t, rows(proj_in, 0, bs), w.w_hr.t(), at::Tensor(), false);
        rows(r.h_n, 0, bs).copy_(out_t);
      }
    }
  });
  return r;
}

}  // namespace fusedrnn
