// The persistent CUDA forward kernel's own source on the CPU, for the tests:
// the layer's ATen part (csrc/persistent/persistent_layer.h) with the launch
// replaced by the CPU runner (csrc/exec/cpu_runner.h), which runs the kernel
// body Forward<Cell, T>::run for every thread of every CTA with real barriers,
// lane-exact warp shuffles and checked, poisoned shared memory; a failed check
// raises. Registered as the test-only op fusedrnn::persistent_emulate_forward
// (CPU), plus fusedrnn::persistent_plan to test the path choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
#include "../layer/layer_ops.h"
#include "../persistent/persistent_layer.h"
#include "../persistent/persistent_plan.h"
#include "../exec/cpu_runner.h"

namespace fusedrnn {
namespace persistent {
namespace {

// The kernel's own body (Forward<Cell, T>::run) on the CPU runner: the grid and
// shared memory the CUDA launch would have, every thread of each CTA as a fiber.
struct RunnerLaunch {
  template <typename Cell, typename T>
  void run(const ForwardParams<T>& p) {
    using K = Forward<Cell, T>;
    exec::LaunchConfig config;
    config.grid = (p.batch + p.rows_per_cta - 1) / p.rows_per_cta;
    config.threads = kThreads;
    config.shared_bytes = K::shared_bytes(p.rows_per_cta);
    try {
      exec::run_kernel(config, [&p](const exec::CpuThread& ctx) { K::run(ctx, p); });
    } catch (const exec::KernelCheckError& e) {
      TORCH_CHECK(false, "fusedrnn.persistent_emulate_forward: the ", Cell::kName,
                  " kernel failed a check of the CPU runner: ", e.what());
    }
  }
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

// The path choice with given device limits: [ok, rows_per_cta, grid, shared_bytes].
std::vector<int64_t> plan(const std::string& cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                          bool projection, int64_t sm_count, int64_t shared_optin, int64_t registers_per_block,
                          int64_t kernel_registers, int64_t kernel_max_threads) {
  LayerShape l{hidden, batch, dtype == at::kDouble, projection};
  DeviceLimits d{sm_count, shared_optin, registers_per_block, kernel_registers, kernel_max_threads, 0};
  Plan p;
  auto with = [&](auto cell_tag) {
    using Cell = decltype(cell_tag);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedrnn.persistent_plan", [&] {
      p = plan_forward(l, d, [](int64_t rows) { return Forward<Cell, scalar_t>::shared_bytes(rows); });
    });
  };
  if (cell == "lstm") with(LstmCell{});
  else if (cell == "gru") with(GruCell{});
  else if (cell == "rnn_tanh" || cell == "rnn_relu") with(RnnTanhCell{});
  else TORCH_CHECK(false, "fusedrnn.persistent_plan: cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  return {p.ok ? 1 : 0, p.rows_per_cta, p.grid, p.shared_bytes};
}

}  // namespace
}  // namespace persistent
}  // namespace fusedrnn

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) { m.impl("persistent_emulate_forward", &fusedrnn::persistent::emulate_forward); }
TORCH_LIBRARY_IMPL(fusedrnn, CompositeExplicitAutograd, m) { m.impl("persistent_plan", &fusedrnn::persistent::plan); }
