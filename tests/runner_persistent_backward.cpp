// The persistent backward kernel's body (csrc/persistent/persistent_backward.h) on the CPU runner,
// torch-free, for tests/test_kernel_runner.py: it is built from a copy of the kernel's headers with
// one bug planted (a barrier removed, the dg buffer no longer double-buffered) to show the runner
// catches what the kernel's barriers are there for. Included relative to this file's directory,
// so the copy's headers win over csrc/'s.
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cells/lstm_cell.h"
#include "exec/cpu_runner.h"
#include "persistent/persistent_backward.h"

using namespace fusedrnn;
using namespace fusedrnn::persistent;

// LSTM, B = 2 rows in one CTA, H = 8, T = 3. Returns 0 when every check passed, 1 with the
// runner's message in `msg` when one failed.
extern "C" int runner_persistent_backward(char* msg, int64_t msg_size) {
  const int64_t B = 2, H = 8, T = 3, N = B * T, G = 4;
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  auto vec = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = u(gen);
    return v;
  };
  auto w = vec(G * H * H), h0 = vec(B * H), c0 = vec(B * H), go = vec(N * H), gates = vec(N * G * H),
       out = vec(N * H), cells = vec(N * H), gh = vec(B * H), gc = vec(B * H);
  std::vector<float> dgates(N * G * H);
  BackwardParams<float> p;
  p.batch = B;
  p.hidden = H;
  p.steps = T;
  p.rows_per_cta = 2;
  p.w_hh = w.data();
  p.h0 = h0.data();
  p.c0 = c0.data();
  p.grad_output = go.data();
  p.gates = gates.data();
  p.output = out.data();
  p.cells = cells.data();
  p.grad_gates = dgates.data();
  p.grad_h = gh.data();
  p.grad_c = gc.data();
  using K = Backward<LstmCell, float>;
  exec::LaunchConfig config;
  config.grid = 1;
  config.threads = kThreads;
  config.shared_bytes = K::shared_bytes(p.rows_per_cta);
  try {
    exec::run_kernel(config, [&p](const exec::CpuThread& ctx) { K::run(ctx, p); });
  } catch (const exec::KernelCheckError& e) {
    std::strncpy(msg, e.what(), size_t(msg_size) - 1);
    msg[msg_size - 1] = '\0';
    return 1;
  }
  return 0;
}
