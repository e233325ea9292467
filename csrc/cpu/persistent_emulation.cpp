// The persistent CUDA kernels' own source on the CPU, for the tests: the
// layer's ATen part (csrc/persistent/persistent_layer.h, and the backward
// driver with persistent_backward_layer.h's sequence engine) with the launch
// replaced by the CPU runner (csrc/exec/cpu_runner.h), which runs the kernel
// body Forward<Cell, T>::run / Backward<Cell, T>::run for every thread of every
// CTA with real barriers, lane-exact warp shuffles and checked, poisoned shared
// memory; a failed check raises. Registered as the test-only ops
// fusedrnn::persistent_emulate_forward / persistent_emulate_backward (CPU), plus
// fusedrnn::persistent_plan / persistent_plan_backward to test the path choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
#include "../layer/layer_ops.h"
#include "../persistent/persistent_backward_layer.h"
#include "../persistent/persistent_bidirectional.h"
#include "../persistent/persistent_layer.h"
#include "../persistent/persistent_plan.h"
#include "../exec/cpu_runner.h"
#include "cpu_device.h"

namespace fusedrnn {
namespace persistent {
namespace {

// One launch of a persistent kernel K (Forward or Backward) on the CPU runner: the grid and
// shared memory the CUDA launch would have, every thread of each CTA as a fiber; a failed runner
// check becomes a RuntimeError naming the op and the kernel.
// The blocks dispatch to their direction as the `__global__` wrappers do (run_directions).
// Launches on the runner since the library was loaded: forward kernels, backward kernels, schedule
// kernels (persistent_runner_launches, for the tests that check which route a call took).
std::atomic<int64_t> runner_launches[3];
template <typename P>
struct is_backward_params : std::false_type {};
template <typename T>
struct is_backward_params<BackwardParams<T>> : std::true_type {};

template <typename K, typename Params>
void run_on_runner(const Directions<Params>& l, int64_t grid, const char* op, const char* cell, const char* kernel) {
  runner_launches[is_backward_params<Params>::value ? 1 : 0]++;
  exec::LaunchConfig config;
  config.grid = grid;
  config.threads = kThreads;
  config.shared_bytes = K::shared_bytes(l.dir[0].rows_per_cta);
  try {
    exec::run_kernel(config, [&l](const exec::CpuThread& ctx) { run_directions<K>(ctx, l); });
  } catch (const exec::KernelCheckError& e) {
    TORCH_CHECK(false, "fusedrnn.", op, ": the ", cell, kernel, " failed a check of the CPU runner: ", e.what());
  }
}

// One chunk of a ragged schedule written by the FillSchedule kernel's body on the CPU runner, with
// the CUDA launch's grid (persistent_schedule.h; csrc/cuda/step_schedule.cu).
void fill_schedule_on_runner(const ScheduleChunk& c, const char* op) {
  if (c.steps == 0) return;
  runner_launches[2]++;
  exec::LaunchConfig config;
  config.grid = FillSchedule::blocks(c.steps);
  config.threads = kScheduleThreads;
  try {
    exec::run_kernel(config, [&c](const exec::CpuThread& ctx) { FillSchedule::run(ctx, c); });
  } catch (const exec::KernelCheckError& e) {
    TORCH_CHECK(false, "fusedrnn.", op, ": the schedule kernel failed a check of the CPU runner: ", e.what());
  }
}

// The kernel's own body (Forward<Cell, T>::run) on the CPU runner.
struct RunnerLaunch {
  template <typename Cell, typename T>
  void run(const Directions<ForwardParams<T>>& l, int64_t grid) {
    run_on_runner<Forward<Cell, T>>(l, grid, "persistent_emulate_forward", Cell::kName, " kernel");
  }
  void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_runner(c, "persistent_emulate_forward"); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_forward(
    const std::string& cell, const at::Tensor& input, const at::Tensor& h0, const OptTensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const at::Tensor& batch_sizes, bool reverse, int64_t rows_per_cta) {
  constexpr const char* op = "persistent_emulate_forward";
  const bool lstm = cell == "lstm";
  const int64_t gates = lstm ? 4 : cell == "gru" ? 3 : 1;
  FUSEDRNN_CHECK(lstm || cell == "gru" || cell == "rnn_tanh" || cell == "rnn_relu", op,
                 "cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  FUSEDRNN_CHECK(lstm == (c0.has_value() && c0->defined()), op, "c0 must be given for lstm and only for lstm");
  const at::Tensor c0t = lstm ? *c0 : at::Tensor();
  const LayerWeights w = check_layer(op, gates, input, h0, lstm ? &c0t : nullptr, w_ih, w_hh, b_ih, b_hh,
                                     std::nullopt);
  const StepSchedule s = make_schedule(op, batch_sizes, input.size(0), h0.size(0));
  FUSEDRNN_CHECK(h0.size(1) <= kMaxHidden, op, "hidden_size must be at most ", kMaxHidden, ", got ", h0.size(1));
  FUSEDRNN_CHECK(rows_per_cta >= 1 && rows_per_cta <= kMaxRowsPerCta, op, "rows_per_cta must be in [1, ",
                 kMaxRowsPerCta, "], got ", rows_per_cta);
  RunnerLaunch launch;
  ForwardOutputs r;
  if (lstm) r = layer_forward<LstmCell>(input, h0, c0t, w, s, reverse, rows_per_cta, launch);
  else if (cell == "gru") r = layer_forward<GruCell>(input, h0, c0t, w, s, reverse, rows_per_cta, launch);
  else if (cell == "rnn_tanh") r = layer_forward<RnnTanhCell>(input, h0, c0t, w, s, reverse, rows_per_cta, launch);
  else r = layer_forward<RnnReluCell>(input, h0, c0t, w, s, reverse, rows_per_cta, launch);
  const at::Tensor empty = at::empty({0}, input.options());
  return {r.output, r.h_n, lstm ? r.c_n : empty, r.gates, lstm ? r.cells : gates == 3 ? r.hn : empty};
}

// Both directions of a layer (dir 0 forward in time, dir 1 reverse) in ONE launch of the forward
// kernel on the runner: blocks [0, ctas) run direction 0, the next ctas direction 1 (the CUDA
// implementation, register_cuda.cpp, launches the real kernel the same way where the plan allows).
std::vector<at::Tensor> forward_bidirectional_on_runner(const std::string& cell, const at::Tensor& input,
                                                        at::TensorList h0, at::TensorList c0, at::TensorList w_ih,
                                                        at::TensorList w_hh,
                                                        at::ArrayRef<std::optional<at::Tensor>> b_ih,
                                                        at::ArrayRef<std::optional<at::Tensor>> b_hh,
                                                        const at::Tensor& batch_sizes, int64_t rows_per_cta) {
  constexpr const char* op = "persistent_forward_bidirectional";
  const std::vector<DirectionInputs> dirs = bidirectional_inputs(op, cell, input, h0, c0, w_ih, w_hh, b_ih, b_hh);
  FUSEDRNN_CHECK(rows_per_cta >= 1 && rows_per_cta <= kMaxRowsPerCta, op, "rows_per_cta must be in [1, ",
                 kMaxRowsPerCta, "], got ", rows_per_cta);
  const StepSchedule s = make_schedule(op, batch_sizes, input.size(0), h0[0].size(0));
  RunnerLaunch launch;
  std::vector<ForwardOutputs> r;
  if (cell == "lstm") r = layer_forward_directions<LstmCell>(input, dirs, s, rows_per_cta, launch);
  else if (cell == "gru") r = layer_forward_directions<GruCell>(input, dirs, s, rows_per_cta, launch);
  else if (cell == "rnn_tanh") r = layer_forward_directions<RnnTanhCell>(input, dirs, s, rows_per_cta, launch);
  else r = layer_forward_directions<RnnReluCell>(input, dirs, s, rows_per_cta, launch);
  return bidirectional_outputs(cell, r, input.options());
}

// The backward kernel's own body (Backward<Cell, T>::run) on the CPU runner, with the rows per
// CTA the test asks for (set by emulate_backward around the call, on this thread).
struct RunnerBackwardLaunch {
  static inline thread_local int64_t rows_per_cta = 0;
  template <typename Cell>
  static bool accepts(const at::Tensor&, int64_t hidden, int64_t) {
    TORCH_CHECK(hidden <= kMaxHidden, "fusedrnn.persistent_emulate_backward: hidden_size must be at most ",
                kMaxHidden, ", got ", hidden);
    TORCH_CHECK(rows_per_cta >= 1, "fusedrnn.persistent_emulate_backward: no rows_per_cta set");
    return true;
  }
  template <typename Cell, typename T>
  static void run_directions(Directions<BackwardParams<T>>& l, int64_t directions) {
    for (BackwardParams<T>& p : l.dir) p.rows_per_cta = rows_per_cta;
    l.first_ctas = ctas_for(l.dir[0].batch, rows_per_cta);
    run_on_runner<Backward<Cell, T>>(l, l.first_ctas * directions, "persistent_emulate_backward", Cell::kName,
                                     " backward kernel");
  }
  static void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_runner(c, "persistent_emulate_backward"); }
};
using RunnerBackwardDevice = PersistentBackward<CpuDevice, RunnerBackwardLaunch>;

// The backward op of `cell` (layer_ops.h, every check included) with the persistent backward kernel
// on the runner in place of the per-step loop; LSTM's grad_c0 is empty for the other cells.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_backward(
    const std::string& cell, const at::Tensor& grad_output, const at::Tensor& grad_h_n, const OptTensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const OptTensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& batch_sizes, bool reverse, bool need_grad_input,
    const at::Tensor& output, const OptTensor& gates, const OptTensor& extra, int64_t rows_per_cta) {
  constexpr const char* op = "persistent_emulate_backward";
  const bool lstm = cell == "lstm", gru = cell == "gru";
  FUSEDRNN_CHECK(lstm || gru || cell == "rnn_tanh" || cell == "rnn_relu", op,
                 "cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  FUSEDRNN_CHECK(rows_per_cta >= 1 && rows_per_cta <= kMaxRowsPerCta, op, "rows_per_cta must be in [1, ",
                 kMaxRowsPerCta, "], got ", rows_per_cta);
  FUSEDRNN_CHECK(!lstm || (c0.has_value() && grad_c_n.has_value()), op, "lstm needs c0 and grad_c_n");
  FUSEDRNN_CHECK(!(lstm || gru) || (gates.has_value() && extra.has_value()), op, cell, " needs gates and extra");
  struct Rows {
    explicit Rows(int64_t r) { RunnerBackwardLaunch::rows_per_cta = r; }
    ~Rows() { RunnerBackwardLaunch::rows_per_cta = 0; }
  } rows(rows_per_cta);
  const at::Tensor empty = at::empty({0}, input.options());
  if (lstm) {
    auto g = lstm_backward<RunnerBackwardDevice>(grad_output, grad_h_n, *grad_c_n, input, h0, *c0, w_ih, w_hh,
                                                 std::nullopt, batch_sizes, reverse, need_grad_input, output, *gates,
                                                 *extra);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g),
            std::get<6>(g)};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> g;
  if (gru) {
    g = gru_backward<RunnerBackwardDevice>(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes, reverse,
                                           need_grad_input, output, *gates, *extra);
  } else if (cell == "rnn_tanh") {
    g = rnn_backward<RnnTanhCell, RunnerBackwardDevice>(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes,
                                                        reverse, need_grad_input, output);
  } else {
    g = rnn_backward<RnnReluCell, RunnerBackwardDevice>(grad_output, grad_h_n, input, h0, w_ih, w_hh, batch_sizes,
                                                        reverse, need_grad_input, output);
  }
  return {std::get<0>(g), std::get<1>(g), empty, std::get<2>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g)};
}

// Both directions' persistent backward recurrence (dir 0 ran forward in time, dir 1 reversed) in
// ONE launch of the backward kernel on the runner: each direction's (gate gradients, dL/dh0,
// dL/dc0), 6 tensors (the CUDA implementation, register_cuda.cpp, launches the real kernel so).
std::vector<at::Tensor> backward_bidirectional_on_runner(
    const std::string& cell, at::TensorList grad_output, at::TensorList grad_h_n, at::TensorList grad_c_n,
    at::TensorList h0, at::TensorList c0, at::TensorList w_hh, const at::Tensor& batch_sizes, at::TensorList output,
    at::TensorList gates, at::TensorList extra, int64_t rows_per_cta) {
  constexpr const char* op = "persistent_backward_bidirectional";
  FUSEDRNN_CHECK(rows_per_cta >= 1 && rows_per_cta <= kMaxRowsPerCta, op, "rows_per_cta must be in [1, ",
                 kMaxRowsPerCta, "], got ", rows_per_cta);
  FUSEDRNN_CHECK(!h0.empty() && !grad_output.empty(), op, "h0 and grad_output must hold 2 tensors");
  const StepSchedule s = make_schedule(op, batch_sizes, grad_output[0].size(0), h0[0].size(0));
  std::vector<BackwardDirection> dirs =
      bidirectional_backward_inputs(op, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, output, gates, extra, s);
  struct Rows {
    explicit Rows(int64_t r) { RunnerBackwardLaunch::rows_per_cta = r; }
    ~Rows() { RunnerBackwardLaunch::rows_per_cta = 0; }
  } rows(rows_per_cta);
  if (cell == "lstm") backward_directions<LstmCell, RunnerBackwardLaunch>(dirs, s);
  else if (cell == "gru") backward_directions<GruCell, RunnerBackwardLaunch>(dirs, s);
  else if (cell == "rnn_tanh") backward_directions<RnnTanhCell, RunnerBackwardLaunch>(dirs, s);
  else backward_directions<RnnReluCell, RunnerBackwardLaunch>(dirs, s);
  return bidirectional_backward_outputs(dirs);
}

// The bidirectional ops (persistent_bidirectional.h) on the CPU: the same wiring as on CUDA, the
// kernels' own source on the runner, planned for a modeled device (an H100's limits, the SM count
// settable by persistent_runner_sm_count so that a test can make the two directions co-resident or
// not). The runner runs float64 kernels too, so float64 is planned as float32 here (on CUDA the
// plan sends it to the per-step path): the wiring is checked at 1e-12.
std::atomic<int64_t> runner_sm_count{132};

DeviceLimits runner_limits() {
  DeviceLimits d;
  d.sm_count = runner_sm_count.load();
  d.shared_optin_bytes = 232448;
  d.registers_per_block = 65536;
  d.kernel_registers = kMaxRegisters;
  d.kernel_max_threads = 1024;
  return d;
}

template <typename Cell, bool kBackward>
Plan runner_plan(const at::Tensor& like, int64_t hidden, int64_t batch) {
  const LayerShape l{hidden, batch, /*float64=*/false, /*projection=*/false};
  Plan p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "fusedrnn.runner_plan", [&] {
    // float64 planned as float32 (its weights would not fit an H100's shared memory; the runner's
    // launch gives the float64 kernel the shared memory it needs).
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, float, scalar_t>;
    p = plan_forward(l, runner_limits(), [](int64_t rows) {
      return kBackward ? Backward<Cell, T>::shared_bytes(rows) : Forward<Cell, T>::shared_bytes(rows);
    });
  });
  return p;
}

// CudaBackwardLaunch's twin (register_cuda.cpp) on the runner: planned, and under FUSEDRNN_CUDA_PATH.
struct RunnerPlannedBackwardLaunch {
  static inline thread_local Plan plan{};
  template <typename Cell>
  static bool accepts(const at::Tensor& like, int64_t hidden, int64_t batch) {
    PathRequest request;
    if (!wants_persistent("bidirectional_backward", &request)) return false;
    plan = runner_plan<Cell, true>(like, hidden, batch);
    check_forced("bidirectional_backward", request, plan);
    return plan.ok;
  }
  template <typename Cell, typename T>
  static void run_directions(Directions<BackwardParams<T>>& l, int64_t directions) {
    TORCH_CHECK(plan.ok, "fusedrnn: the persistent backward was launched without a plan");
    for (BackwardParams<T>& p : l.dir) p.rows_per_cta = plan.rows_per_cta;
    l.first_ctas = plan.grid;
    run_on_runner<Backward<Cell, T>>(l, plan.grid * directions, "bidirectional_backward", Cell::kName,
                                     " backward kernel");
  }
  static void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_runner(c, "bidirectional_backward"); }
};

struct RunnerBidirectional {
  using Device = CpuDevice;
  using DeviceGuard = CpuDevice::DeviceGuard;
  using BackwardLaunch = RunnerPlannedBackwardLaunch;
  template <typename Cell>
  static Plan forward_plan(const at::Tensor& like, int64_t hidden, int64_t batch) {
    return runner_plan<Cell, false>(like, hidden, batch);
  }
  static DeviceLimits limits() { return runner_limits(); }
  static RunnerLaunch forward_launch(const Plan&) { return RunnerLaunch{}; }
  static void fill_schedule(const ScheduleChunk& c) { fill_schedule_on_runner(c, "bidirectional_forward"); }
};

// Test-only: [forward, backward, schedule] kernel launches on the runner so far.
std::vector<int64_t> launches_on_runner() {
  return {runner_launches[0].load(), runner_launches[1].load(), runner_launches[2].load()};
}

// Test-only: sets the modeled device's SM count; returns the previous one.
int64_t set_runner_sm_count(int64_t sm_count) {
  TORCH_CHECK(sm_count >= 1, "fusedrnn.persistent_runner_sm_count: sm_count must be >= 1, got ", sm_count);
  return runner_sm_count.exchange(sm_count);
}

// The path choice (forward, or the backward kernel's) with given device limits: [ok, rows_per_cta, grid, shared_bytes].
template <bool kBackward, bool kDirections = false>
std::vector<int64_t> plan(const std::string& cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                          bool projection, int64_t sm_count, int64_t shared_optin, int64_t registers_per_block,
                          int64_t kernel_registers, int64_t kernel_max_threads) {
  LayerShape l{hidden, batch, dtype == at::kDouble, projection};
  DeviceLimits d{sm_count, shared_optin, registers_per_block, kernel_registers, kernel_max_threads, 0};
  Plan p;
  auto with = [&](auto cell_tag) {
    using Cell = decltype(cell_tag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedrnn.persistent_plan", [&] {
      p = plan_forward(l, d, [](int64_t rows) {
        return kBackward ? Backward<Cell, scalar_t>::shared_bytes(rows) : Forward<Cell, scalar_t>::shared_bytes(rows);
      });
    });
  };
  if (cell == "lstm") with(LstmCell{});
  else if (cell == "gru") with(GruCell{});
  else if (cell == "rnn_tanh" || cell == "rnn_relu") with(RnnTanhCell{});
  else TORCH_CHECK(false, "fusedrnn.persistent_plan: cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  if (kDirections) return {p.ok ? 1 : 0, p.rows_per_cta, p.grid, p.shared_bytes, both_directions_in_one_launch(p, d)};
  return {p.ok ? 1 : 0, p.rows_per_cta, p.grid, p.shared_bytes};
}

// The forward plan and whether a bidirectional layer's two directions run in one launch:
// [ok, rows_per_cta, grid of one direction, shared_bytes, both directions in one launch].
std::vector<int64_t> plan_directions(const std::string& cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                                     int64_t sm_count, int64_t shared_optin, int64_t registers_per_block,
                                     int64_t kernel_registers, int64_t kernel_max_threads) {
  return plan<false, true>(cell, hidden, batch, dtype, false, sm_count, shared_optin, registers_per_block,
                           kernel_registers, kernel_max_threads);
}

// A ragged batch's [2, steps] schedule as the persistent path writes it on the device (the
// FillSchedule kernel's body, chunk by chunk, on the runner), for the test against batch_sizes.
at::Tensor schedule(const at::Tensor& batch_sizes, int64_t batch) {
  constexpr const char* op = "persistent_schedule";
  const StepSchedule s = make_schedule(op, batch_sizes, batch_sizes.sum().item<int64_t>(), batch);
  return device_schedule(s, at::kCPU, [](const ScheduleChunk& c) { fill_schedule_on_runner(c, "persistent_schedule"); });
}

}  // namespace
}  // namespace persistent
}  // namespace fusedrnn

// Test-only: the persistent backward kernel on the runner (the schema lives here, beside its only
// implementation); persistent_forward_bidirectional (CPU: the runner; CUDA: register_cuda.cpp, the
// real kernel, rows_per_cta there from the plan). Returns (grad_input, grad_h0, grad_c0 (LSTM, else empty), grad_w_ih, grad_w_hh,
// grad_b_ih, grad_b_hh).
TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(
      "persistent_emulate_backward(str cell, Tensor grad_output, Tensor grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor batch_sizes, bool reverse, bool need_grad_input, "
      "Tensor output, Tensor? gates, Tensor? extra, int rows_per_cta) -> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  m.def("persistent_schedule(Tensor batch_sizes, int batch) -> Tensor");
  m.def(
      "persistent_forward_bidirectional(str cell, Tensor input, Tensor[] h0, Tensor[] c0, Tensor[] w_ih, "
      "Tensor[] w_hh, Tensor?[] b_ih, Tensor?[] b_hh, Tensor batch_sizes, int rows_per_cta) -> Tensor[]");
  m.def(
      "persistent_backward_bidirectional(str cell, Tensor[] grad_output, Tensor[] grad_h_n, Tensor[] grad_c_n, "
      "Tensor[] h0, Tensor[] c0, Tensor[] w_hh, Tensor batch_sizes, Tensor[] output, Tensor[] gates, Tensor[] extra, "
      "int rows_per_cta) -> Tensor[]");
  // Both directions of a bidirectional layer (fusedrnn/functional.py; persistent_bidirectional.h). CPU: the
  // runner (tests); CUDA: register_cuda.cpp.
  m.def(
      "bidirectional_forward(str cell, Tensor input, Tensor h0, Tensor h0_reverse, Tensor? c0, Tensor? c0_reverse, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor w_ih_reverse, Tensor w_hh_reverse, "
      "Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor batch_sizes) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor gates, Tensor extra, Tensor output_reverse, Tensor h_n_reverse, Tensor c_n_reverse, "
      "Tensor gates_reverse, Tensor extra_reverse, Tensor schedule)");
  m.def(
      "bidirectional_backward(str cell, Tensor grad_output, Tensor grad_output_reverse, Tensor grad_h_n, "
      "Tensor grad_h_n_reverse, Tensor? grad_c_n, Tensor? grad_c_n_reverse, Tensor input, Tensor h0, "
      "Tensor h0_reverse, Tensor? c0, Tensor? c0_reverse, Tensor w_ih, Tensor w_hh, Tensor w_ih_reverse, "
      "Tensor w_hh_reverse, Tensor batch_sizes, bool need_grad_input, Tensor output, Tensor gates, Tensor extra, "
      "Tensor output_reverse, Tensor gates_reverse, Tensor extra_reverse, Tensor schedule) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, "
      "Tensor grad_h0_reverse, Tensor grad_c0_reverse, Tensor grad_w_ih_reverse, Tensor grad_w_hh_reverse, "
      "Tensor grad_b_ih_reverse, Tensor grad_b_hh_reverse)");
  m.def("persistent_runner_sm_count(int sm_count) -> int");
  m.def("persistent_runner_launches() -> int[]");
  m.def(
      "persistent_plan_directions(str cell, int hidden, int batch, ScalarType dtype, int sm_count, int shared_optin, "
      "int registers_per_block, int kernel_registers, int kernel_max_threads) -> int[]");
  m.def(
      "persistent_plan_backward(str cell, int hidden, int batch, ScalarType dtype, bool projection, int sm_count, "
      "int shared_optin, int registers_per_block, int kernel_registers, int kernel_max_threads) -> int[]");
}
TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("persistent_emulate_forward", &fusedrnn::persistent::emulate_forward);
  m.impl("persistent_emulate_backward", &fusedrnn::persistent::emulate_backward);
  m.impl("persistent_schedule", &fusedrnn::persistent::schedule);
  m.impl("persistent_forward_bidirectional", &fusedrnn::persistent::forward_bidirectional_on_runner);
  m.impl("persistent_backward_bidirectional", &fusedrnn::persistent::backward_bidirectional_on_runner);
  using fusedrnn::persistent::RunnerBidirectional;
  m.impl("bidirectional_forward", &fusedrnn::persistent::bidirectional_forward_op<RunnerBidirectional>);
  m.impl("bidirectional_backward", &fusedrnn::persistent::bidirectional_backward_op<RunnerBidirectional>);
}
TORCH_LIBRARY_IMPL(fusedrnn, CompositeExplicitAutograd, m) {
  m.impl("persistent_plan", &fusedrnn::persistent::plan<false>);
  m.impl("persistent_plan_backward", &fusedrnn::persistent::plan<true>);
  m.impl("persistent_plan_directions", &fusedrnn::persistent::plan_directions);
  m.impl("persistent_runner_sm_count", &fusedrnn::persistent::set_runner_sm_count);
  m.impl("persistent_runner_launches", &fusedrnn::persistent::launches_on_runner);
}
