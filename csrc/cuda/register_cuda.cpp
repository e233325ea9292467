// CUDA implementations of every fusedrnn op, and the choice between the two
// forward paths:
//   per-step    the device-generic layer drivers (csrc/layer/) with the CUDA
//               pointwise kernels: per step one cuBLAS GEMM + one pointwise
//               kernel. Any size, float64, LSTM projection.
//   persistent  one launch per layer and direction for the whole sequence,
//               W_hh on chip (csrc/persistent/, csrc/cuda/persistent_*.cu):
//               hidden_size <= 128, float32/float16/bfloat16, no projection.
// The choice (persistent/persistent_plan.h) reads the device's SM count,
// shared memory and register limits and the compiled kernel's resources before
// anything is launched; FUSEDRNN_CUDA_PATH=per_step|persistent|auto forces it
// (persistent on a layer it cannot run: an error saying why). Backward makes
// the same choice with its own plan (the backward kernel's resources): the
// persistent backward (persistent/persistent_backward.h) runs the reverse-time
// recurrence in one launch, the weight and input gradients stay GEMMs; it reads
// what either forward path saved (the same tensors, in the same layout).
// The per-step path's GEMMs run on cuBLAS with ATen's handle and the current
// stream (float32 through fp32_gemm.h, with the math torch.nn's cuDNN RNNs would
// use; others through ATen); the persistent path's input projection goes through
// ATen and its recurrent product is exact fp32 on chip. Kernels launch on the
// current stream too, so the ops are correct on any stream and capturable in
// CUDA graphs. A bidirectional layer runs through bidirectional_forward /
// bidirectional_backward (persistent/persistent_bidirectional.h): both
// directions' recurrences in one persistent launch where the plan allows.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../layer/layer_ops.h"
#include "../persistent/persistent_backward_layer.h"
#include "../persistent/persistent_bidirectional.h"
#include "../persistent/persistent_layer.h"
#include "../persistent/persistent_plan.h"
#include "fp32_gemm.h"
#include "persistent_backward_launch.h"
#include "persistent_launch.h"
#include "pointwise_launch.h"

namespace fusedrnn {

struct CudaDevice {
  using DeviceGuard = c10::cuda::OptionalCUDAGuard;
  // The per-step forward's pointwise kernel adds b_hh (cuda/pointwise_step.h: forward_element), so
  // its recurrent GEMM runs without one: per step a GEMM and the pointwise kernel, 2 launches, not
  // 3 (the bias copy into the GEMM's output is gone; layer_forward.h).
  static constexpr bool kStepAddsHiddenBias = true;

  // Every GEMM, per step or not: float32 math as torch.nn's cuDNN RNNs choose it (fp32_gemm.h).
  template <typename T>
  static void matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                     bool accumulate) {
    cuda_gemm(out, a, b, bias, accumulate);
  }

  static void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   bool accumulate) {
    cuda_gemm(out, a, b, bias, accumulate);
  }

  template <typename Cell, typename T>
  static void forward(const ForwardStepParams<T>& p) {
    const cudaError_t err = launch_forward_step<Cell, T>(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(err);
  }

  template <typename Cell, typename T>
  static void backward(const BackwardStepParams<T>& p) {
    const cudaError_t err = launch_backward_step<Cell, T>(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(err);
  }
};

namespace persistent {

// The device's limits and the compiled kernel's resources, for the plan.
template <typename Cell, typename T, bool kBackward = false>
DeviceLimits device_limits() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaFuncAttributes attr{};
  const cudaError_t err = kBackward ? backward_attributes<Cell, T>(&attr) : forward_attributes<Cell, T>(&attr);
  C10_CUDA_CHECK(err);
  DeviceLimits d;
  d.sm_count = prop->multiProcessorCount;
  d.shared_optin_bytes = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  d.registers_per_block = prop->regsPerBlock;
  d.kernel_registers = attr.numRegs;
  d.kernel_max_threads = attr.maxThreadsPerBlock;
  d.kernel_static_shared = static_cast<int64_t>(attr.sharedSizeBytes);
  return d;
}

template <typename Cell>
Plan plan_layer(const at::Tensor& input, int64_t hidden, int64_t batch, bool projection) {
  const LayerShape l{hidden, batch, input.scalar_type() == at::kDouble, projection};
  Plan plan;
  if (l.float64 || l.projection) return plan_forward(l, DeviceLimits{}, [](int64_t) { return size_t(0); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedrnn.plan", [&] {
    using T = scalar_t;
    if constexpr (!std::is_same_v<T, double>) {
      plan = plan_forward(l, device_limits<Cell, T>(), [](int64_t rows) { return Forward<Cell, T>::shared_bytes(rows); });
    }
  });
  return plan;
}

// The backward kernel's plan: the same rule (rows over the SMs, then packed), its own resources.
template <typename Cell>
Plan plan_backward_layer(const at::Tensor& like, int64_t hidden, int64_t batch) {
  const LayerShape l{hidden, batch, like.scalar_type() == at::kDouble, false};
  Plan plan;
  if (l.float64) return plan_forward(l, DeviceLimits{}, [](int64_t) { return size_t(0); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "fusedrnn.plan_backward", [&] {
    using T = scalar_t;
    if constexpr (!std::is_same_v<T, double>) {
      plan = plan_forward(l, device_limits<Cell, T, true>(),
                          [](int64_t rows) { return Backward<Cell, T>::shared_bytes(rows); });
    }
  });
  return plan;
}

// A ragged batch's schedule is written on the device by a kernel from its own parameters
// (persistent_schedule.h), so the persistent path is capturable in CUDA graphs, ragged or not.
inline void fill_schedule_on_device(const ScheduleChunk& c) {
  C10_CUDA_CHECK(launch_fill_schedule(c, at::cuda::getCurrentCUDAStream()));
}

struct CudaLaunch {
  Plan plan;
  template <typename Cell, typename T>
  void run(const Directions<ForwardParams<T>>& l, int64_t grid) {
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CHECK(false, "fusedrnn: the persistent kernel has no float64 version (the plan should have refused it)");
    } else {
      const cudaError_t err = launch_forward<Cell, T>(l, grid, plan.shared_bytes, at::cuda::getCurrentCUDAStream());
      C10_CUDA_CHECK(err);
    }
  }
  void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_device(c); }
};

// The persistent backward on CUDA, as the backward driver's sequence engine
// (persistent_backward_layer.h). `accepts` plans the launch (kept for `run` on
// this thread: the driver calls the two back to back); a layer the kernel cannot
// run goes to the per-step loop, or raises under FUSEDRNN_CUDA_PATH=persistent.
// LSTM's proj_size never reaches it (the driver keeps projection per-step; its
// forward already refused a forced persistent path).
struct CudaBackwardLaunch {
  static inline thread_local Plan plan{};
  template <typename Cell>
  static bool accepts(const at::Tensor& like, int64_t hidden, int64_t batch) {
    const std::string name = std::string(Cell::kName) + "_backward";
    const char* op = name.c_str();
    PathRequest request;
    if (!wants_persistent(op, &request)) return false;
    plan = plan_backward_layer<Cell>(like, hidden, batch);
    check_forced(op, request, plan);
    return plan.ok;
  }
  template <typename Cell, typename T>
  static void run_directions(Directions<BackwardParams<T>>& l, int64_t directions) {
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CHECK(false, "fusedrnn: the persistent backward has no float64 version (the plan should have refused it)");
    } else {
      TORCH_CHECK(plan.ok, "fusedrnn: the persistent backward was launched without a plan");
      for (BackwardParams<T>& p : l.dir) p.rows_per_cta = plan.rows_per_cta;
      l.first_ctas = plan.grid;
      const cudaError_t err = launch_backward<Cell, T>(l, plan.grid * directions, plan.shared_bytes,
                                                       at::cuda::getCurrentCUDAStream());
      C10_CUDA_CHECK(err);
    }
  }
  static void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_device(c); }
};
using PersistentCudaDevice = PersistentBackward<CudaDevice, CudaBackwardLaunch>;

// One forward layer on CUDA: the arguments are checked once (before the device
// guard, so a CPU tensor among CUDA ones gets our message, not c10's), then the
// layer runs on the persistent kernel when the path choice allows and the plan
// fits the device, otherwise on the per-step driver.
template <typename Cell>
ForwardOutputs forward_layer(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor* c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                             const OptTensor& b_hh, const OptTensor& w_hr, const at::Tensor& batch_sizes,
                             bool reverse) {
  // A [T, B, I] input and [1, B, *] states run as rows, and come back in their shapes (layer_ops.h).
  const RowArgs rows = as_rows(op, input, h0, c0, batch_sizes);
  const at::Tensor& x = rows.input;
  const LayerWeights w =
      check_layer(op, Cell::kGates, x, rows.h0, c0 != nullptr ? &rows.c0 : nullptr, w_ih, w_hh, b_ih, b_hh, w_hr);
  const StepSchedule s = make_schedule(op, batch_sizes, x.size(0), rows.h0.size(0));
  const c10::cuda::OptionalCUDAGuard device_guard(input.device());
  PathRequest request;
  if (wants_persistent(op, &request)) {
    const int64_t hidden = w_hh.size(0) / Cell::kGates;
    Plan plan = plan_layer<Cell>(x, hidden, rows.h0.size(0), w.w_hr.defined());
    check_forced(op, request, plan);
    if (plan.ok) {
      CudaLaunch launch{plan};
      return shaped_as_given(rows, layer_forward<Cell>(x, rows.h0, rows.c0, w, s, reverse, plan.rows_per_cta, launch));
    }
  }
  return shaped_as_given(rows, fusedrnn::layer_forward<Cell, CudaDevice>(x, rows.h0, rows.c0, w, s, reverse));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const at::Tensor& batch_sizes, bool reverse) {
  const ForwardOutputs r =
      forward_layer<LstmCell>("lstm_forward", input, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {r.output, r.h_n, r.c_n, r.gates, r.cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& batch_sizes, bool reverse) {
  const ForwardOutputs r = forward_layer<GruCell>("gru_forward", input, h0, nullptr, w_ih, w_hh, b_ih, b_hh,
                                                  std::nullopt, batch_sizes, reverse);
  return {r.output, r.h_n, r.gates, r.hn};
}

template <typename Cell>
std::tuple<at::Tensor, at::Tensor> rnn_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                               const at::Tensor& batch_sizes, bool reverse) {
  const char* op = Cell::kRelu ? "rnn_relu_forward" : "rnn_tanh_forward";
  const ForwardOutputs r =
      forward_layer<Cell>(op, input, h0, nullptr, w_ih, w_hh, b_ih, b_hh, std::nullopt, batch_sizes, reverse);
  return {r.output, r.h_n};
}

// Test-only (tests/test_persistent.py on a GPU): both directions of a layer through the persistent
// forward, in ONE launch where the plan says both grids are co-resident
// (both_directions_in_one_launch), else one launch per direction. rows_per_cta is the plan's here
// (the argument is for the CPU runner's implementation).
std::vector<at::Tensor> forward_bidirectional(const std::string& cell, const at::Tensor& input, at::TensorList h0,
                                              at::TensorList c0, at::TensorList w_ih, at::TensorList w_hh,
                                              at::ArrayRef<std::optional<at::Tensor>> b_ih,
                                              at::ArrayRef<std::optional<at::Tensor>> b_hh,
                                              const at::Tensor& batch_sizes, int64_t /*rows_per_cta*/) {
  constexpr const char* op = "persistent_forward_bidirectional";
  const std::vector<DirectionInputs> dirs = bidirectional_inputs(op, cell, input, h0, c0, w_ih, w_hh, b_ih, b_hh);
  const StepSchedule s = make_schedule(op, batch_sizes, input.size(0), h0[0].size(0));
  const c10::cuda::OptionalCUDAGuard device_guard(input.device());
  std::vector<ForwardOutputs> r;
  auto run = [&](auto cell_tag) {
    using Cell = decltype(cell_tag);
    const Plan plan = plan_layer<Cell>(input, h0[0].size(1), h0[0].size(0), false);
    FUSEDRNN_CHECK(plan.ok, op, "the persistent kernel cannot run this layer: ", plan.why_not);
    CudaLaunch launch{plan};
    DeviceLimits limits;
    limits.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    if (both_directions_in_one_launch(plan, limits)) {
      r = layer_forward_directions<Cell>(input, dirs, s, plan.rows_per_cta, launch);
    } else {
      for (const DirectionInputs& d : dirs) {
        r.push_back(layer_forward_directions<Cell>(input, {d}, s, plan.rows_per_cta, launch)[0]);
      }
    }
  };
  if (cell == "lstm") run(LstmCell{});
  else if (cell == "gru") run(GruCell{});
  else if (cell == "rnn_tanh") run(RnnTanhCell{});
  else run(RnnReluCell{});
  return bidirectional_outputs(cell, r, input.options());
}

// Test-only: both directions' persistent backward recurrence, in ONE launch where both grids are
// co-resident, else one per direction (rows_per_cta: the plan's here, as forward_bidirectional).
std::vector<at::Tensor> backward_bidirectional(const std::string& cell, at::TensorList grad_output,
                                               at::TensorList grad_h_n, at::TensorList grad_c_n, at::TensorList h0,
                                               at::TensorList c0, at::TensorList w_hh, const at::Tensor& batch_sizes,
                                               at::TensorList output, at::TensorList gates, at::TensorList extra,
                                               int64_t /*rows_per_cta*/) {
  constexpr const char* op = "persistent_backward_bidirectional";
  FUSEDRNN_CHECK(!h0.empty() && !grad_output.empty(), op, "h0 and grad_output must hold 2 tensors");
  const StepSchedule s = make_schedule(op, batch_sizes, grad_output[0].size(0), h0[0].size(0));
  std::vector<BackwardDirection> dirs =
      bidirectional_backward_inputs(op, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, output, gates, extra, s);
  const c10::cuda::OptionalCUDAGuard device_guard(grad_output[0].device());
  auto run = [&](auto cell_tag) {
    using Cell = decltype(cell_tag);
    const int64_t B = h0[0].size(0), H = h0[0].size(1);
    FUSEDRNN_CHECK(CudaBackwardLaunch::accepts<Cell>(grad_output[0], H, B), op,
                   "the persistent backward does not run this layer (FUSEDRNN_CUDA_PATH=per_step?)");
    DeviceLimits limits;
    limits.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    if (both_directions_in_one_launch(CudaBackwardLaunch::plan, limits)) {
      backward_directions<Cell, CudaBackwardLaunch>(dirs, s);
    } else {
      for (BackwardDirection& d : dirs) {
        std::vector<BackwardDirection> one{d};
        backward_directions<Cell, CudaBackwardLaunch>(one, s);
      }
    }
  };
  if (cell == "lstm") run(LstmCell{});
  else if (cell == "gru") run(GruCell{});
  else if (cell == "rnn_tanh") run(RnnTanhCell{});
  else run(RnnReluCell{});
  return bidirectional_backward_outputs(dirs);
}

// The bidirectional ops (persistent_bidirectional.h) on CUDA: the real kernels, both directions in
// one launch where the plan says both grids are co-resident on this device.
struct CudaBidirectional {
  using Device = CudaDevice;
  using DeviceGuard = c10::cuda::OptionalCUDAGuard;
  using BackwardLaunch = CudaBackwardLaunch;
  template <typename Cell>
  static Plan forward_plan(const at::Tensor& like, int64_t hidden, int64_t batch) {
    return plan_layer<Cell>(like, hidden, batch, false);
  }
  static DeviceLimits limits() {
    DeviceLimits d;
    d.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    return d;
  }
  static CudaLaunch forward_launch(const Plan& plan) { return CudaLaunch{plan}; }
  static void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_device(c); }
};

// The inference twins (csrc/ops.cpp): on CUDA the forward as above, its saved buffers dropped.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const at::Tensor& batch_sizes, bool reverse) {
  const ForwardOutputs r =
      forward_layer<LstmCell>("lstm_inference", input, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {r.output, r.h_n, r.c_n};
}

std::tuple<at::Tensor, at::Tensor> gru_inference(const at::Tensor& input, const at::Tensor& h0,
                                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                 const OptTensor& b_ih, const OptTensor& b_hh,
                                                 const at::Tensor& batch_sizes, bool reverse) {
  const ForwardOutputs r = forward_layer<GruCell>("gru_inference", input, h0, nullptr, w_ih, w_hh, b_ih, b_hh,
                                                  std::nullopt, batch_sizes, reverse);
  return {r.output, r.h_n};
}

}  // namespace persistent
}  // namespace fusedrnn

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) {
  using namespace fusedrnn;
  m.impl("lstm_forward", &persistent::lstm_forward);
  m.impl("gru_forward", &persistent::gru_forward);
  m.impl("lstm_inference", &persistent::lstm_inference);
  m.impl("gru_inference", &persistent::gru_inference);
  m.impl("rnn_tanh_forward", &persistent::rnn_forward<RnnTanhCell>);
  m.impl("rnn_relu_forward", &persistent::rnn_forward<RnnReluCell>);
  // Backward: the driver with the persistent backward as its sequence engine, which
  // itself falls back to the per-step loop where the path choice says so.
  m.impl("lstm_backward", &lstm_backward<persistent::PersistentCudaDevice>);
  m.impl("gru_backward", &gru_backward<persistent::PersistentCudaDevice>);
  m.impl("rnn_tanh_backward", &rnn_backward<RnnTanhCell, persistent::PersistentCudaDevice>);
  m.impl("rnn_relu_backward", &rnn_backward<RnnReluCell, persistent::PersistentCudaDevice>);
  // Test-only (schema in csrc/cpu/persistent_emulation.cpp): a bidirectional layer's persistent forward.
  m.impl("persistent_forward_bidirectional", &persistent::forward_bidirectional);
  m.impl("persistent_backward_bidirectional", &persistent::backward_bidirectional);
  // What a bidirectional layer on CUDA runs (fusedrnn/functional.py; schema in csrc/cpu/persistent_emulation.cpp).
  m.impl("bidirectional_forward", &persistent::bidirectional_forward_op<persistent::CudaBidirectional>);
  m.impl("bidirectional_backward", &persistent::bidirectional_backward_op<persistent::CudaBidirectional>);
}
