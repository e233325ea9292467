// CPU driver of the persistent forward kernel's phase functions
// (csrc/persistent/persistent_forward.h), for the tests: it runs every CTA and,
// within a CTA, every thread in order between the barriers, with the warp
// shuffles done as the hardware does them (every lane reads its partner's
// value from before the exchange). Same schedule, same partitioning of weights
// and units, same reduction order as the CUDA kernel; only the parallelism is
// serial. Registered as the test-only op fusedrnn::persistent_emulate_forward
// (CPU), plus fusedrnn::persistent_plan to test the path choice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
#include "../layer/layer_ops.h"
#include "../persistent/persistent_layer.h"
#include "../persistent/persistent_plan.h"

namespace fusedrnn {
namespace persistent {
namespace {

struct EmulatedLaunch {
  template <typename Cell, typename T>
  void run(const ForwardParams<T>& p) {
    using K = Forward<Cell, T>;
    using A = typename K::A;
    constexpr int G = K::G;
    const int64_t grid = (p.batch + p.rows_per_cta - 1) / p.rows_per_cta;
    std::vector<unsigned char> smem(K::shared_bytes(p.rows_per_cta));
    std::vector<typename K::Thread> threads(kThreads);
    std::vector<std::array<A, G>> acc(kThreads), before(kThreads), xin(kThreads);
    auto acc_of = [](std::array<A, G>& a) -> A(&)[G] { return *reinterpret_cast<A(*)[G]>(a.data()); };
    for (int64_t cta = 0; cta < grid; ++cta) {
      // Poison shared memory (all-ones bytes are NaN in every floating type):
      // a read of an element no phase wrote shows up as NaN in the outputs.
      std::fill(smem.begin(), smem.end(), static_cast<unsigned char>(0xff));
      const Shared<T, A> s = K::carve(smem.data(), p.rows_per_cta);
      for (int tid = 0; tid < kThreads; ++tid) K::stage(p, s, 0, tid);
      for (int tid = 0; tid < kThreads; ++tid) K::template take<0>(s, threads[tid], tid);  // after a barrier
      if constexpr (K::kRegGates > 1) {
        for (int tid = 0; tid < kThreads; ++tid) K::stage(p, s, 1, tid);
        for (int tid = 0; tid < kThreads; ++tid) K::template take<1>(s, threads[tid], tid);
      }
      for (int tid = 0; tid < kThreads; ++tid) {
        for (int g = K::kRegGates; g < G; ++g) K::stage(p, s, g, tid);
        K::load_state(p, s, cta, tid);
      }
      // __syncthreads
      const int64_t steps = K::cta_steps(p, cta);
      int parity = 0;
      for (int64_t i = 0; i < steps; ++i) {
        const int64_t t = K::time_of(p, steps, i);
        for (int64_t r = 0; r < p.rows_per_cta; ++r) {
          const bool active = K::row_active(p, cta, r, t);
          if (active) {
            for (int tid = 0; tid < kThreads; ++tid) K::fetch_input(p, cta, tid, r, t, acc_of(xin[tid]));
            for (int tid = 0; tid < kThreads; ++tid) K::partial(p, s, threads[tid], tid, r, parity, acc_of(acc[tid]));
            for (int round = 0; round < kShuffleRounds; ++round) {  // __shfl_xor_sync(~0u, acc[g], 1 << round)
              before = acc;
              for (int tid = 0; tid < kThreads; ++tid) {
                K::add_shuffled(acc_of(acc[tid]), acc_of(before[tid ^ (1 << round)]));
              }
            }
          }
          for (int tid = 0; tid < kThreads; ++tid) {
            K::cell(p, s, threads[tid], cta, tid, r, t, parity, active, acc_of(acc[tid]), acc_of(xin[tid]));
          }
        }
        parity = 1 - parity;  // __syncthreads
      }
      for (int tid = 0; tid < kThreads; ++tid) K::store_final(p, s, cta, tid, parity);
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
  EmulatedLaunch launch;
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
