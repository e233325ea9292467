// The persistent backward kernel's body (csrc/persistent/persistent_backward.h) on the CPU runner,
// torch-free, for tests/test_kernel_runner.py: it is built from a copy of the kernel's headers with
// one bug planted (a barrier removed, the dg buffer no longer double-buffered) to show the runner
// catches what the kernel's barriers are there for. Included relative to this file's directory,
// so the copy's headers win over csrc/'s.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
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

// Both directions of an LSTM layer (the second reversed, other data) in ONE launch of the backward
// kernel (persistent_directions.h: blocks [0, 2) direction 0, [2, 4) direction 1; B = 3 rows, 2 per
// CTA, so each direction ends in a partial CTA) against each direction launched alone: every output
// (gate gradients, dL/dh0, dL/dc0) must be bitwise the same. Returns 0 when they are, 1 with the
// runner's message when a check failed, 2 with the first difference in `msg`.
extern "C" int runner_persistent_backward_two_directions(char* msg, int64_t msg_size) {
  const int64_t B = 3, H = 8, T = 4, N = B * T, G = 4, R = 2;
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  auto vec = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = u(gen);
    return v;
  };
  struct Direction {
    std::vector<float> w, h0, c0, go, gates, out, cells, gh, gc, dgates;
  };
  Direction dir[2];
  for (auto& d : dir) {
    d = Direction{vec(G * H * H), vec(B * H), vec(B * H), vec(N * H), vec(N * G * H), vec(N * H), vec(N * H),
                  vec(B * H), vec(B * H), std::vector<float>(N * G * H)};
  }
  auto params = [&](Direction& d, bool reverse) {
    BackwardParams<float> p;
    p.batch = B;
    p.hidden = H;
    p.steps = T;
    p.rows_per_cta = R;
    p.reverse = reverse;
    p.w_hh = d.w.data();
    p.h0 = d.h0.data();
    p.c0 = d.c0.data();
    p.grad_output = d.go.data();
    p.gates = d.gates.data();
    p.output = d.out.data();
    p.cells = d.cells.data();
    p.grad_gates = d.dgates.data();
    p.grad_h = d.gh.data();
    p.grad_c = d.gc.data();
    return p;
  };
  using K = Backward<LstmCell, float>;
  const int64_t ctas = ctas_for(B, R);
  auto launch = [&](const Directions<BackwardParams<float>>& l, int64_t grid) {
    exec::LaunchConfig config;
    config.grid = grid;
    config.threads = kThreads;
    config.shared_bytes = K::shared_bytes(R);
    exec::run_kernel(config, [&l](const exec::CpuThread& ctx) { run_directions<K>(ctx, l); });
  };
  try {
    Direction alone[2] = {dir[0], dir[1]};
    for (int d = 0; d < 2; ++d) {
      const BackwardParams<float> p = params(alone[d], d == 1);
      launch(Directions<BackwardParams<float>>{{p, p}, ctas}, ctas);
    }
    launch(Directions<BackwardParams<float>>{{params(dir[0], false), params(dir[1], true)}, ctas}, 2 * ctas);
    for (int d = 0; d < 2; ++d) {
      const std::pair<const char*, std::pair<const std::vector<float>*, const std::vector<float>*>> outs[] = {
          {"grad_gates", {&dir[d].dgates, &alone[d].dgates}},
          {"grad_h0", {&dir[d].gh, &alone[d].gh}},
          {"grad_c0", {&dir[d].gc, &alone[d].gc}}};
      for (const auto& o : outs) {
        if (std::memcmp(o.second.first->data(), o.second.second->data(), o.second.first->size() * sizeof(float)) != 0) {
          std::snprintf(msg, size_t(msg_size), "direction %d: %s differs from its own launch's", d, o.first);
          return 2;
        }
      }
    }
  } catch (const exec::KernelCheckError& e) {
    std::strncpy(msg, e.what(), size_t(msg_size) - 1);
    msg[msg_size - 1] = '\0';
    return 1;
  }
  return 0;
}
