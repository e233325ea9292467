// The persistent backward kernel, framework-free and host+device: one CTA runs
// a group of sequences (batch rows) through EVERY time step of one layer and
// direction in reverse processing order, with W_hh on chip for all steps, and
// writes the gate gradients of every token; the weight, input and bias
// gradients are left to a few large GEMMs over all tokens (layer_backward.h's
// tail). `Backward<Cell, T>::run(ctx, p)` is the body, written once against the
// execution context (csrc/exec/cuda_block.h) like the persistent forward
// (persistent_forward.h): the `__global__` wrapper
// (csrc/cuda/persistent_backward_kernel.cuh) runs it with CUDA's intrinsics, the
// CPU runner (csrc/exec/cpu_runner.h, csrc/cpu/persistent_emulation.cpp) runs
// the same source in CI. Per step (one barrier):
//
//   for each row r active at t:
//     cell(tid, r)       slice-0 thread of unit j: the shared cell backward
//                        (csrc/cells/) on (row, j) in registers: dh = grad_out +
//                        dh_state, dc; the input-side gate gradients to global
//                        memory, the hidden-side ones into shared dg[parity];
//                        dh_state[r][j] = the direct path (GRU's z * dh) or 0
//   sync                 dg[parity] visible to every thread
//   for each row r active at t:
//     partial(tid, r)    this thread's j-slice of dh_{t-1}[k] = sum_g,j dg[g][j] W_hh[g*H+j, k]
//     xor-shuffle 1, 2   the column's kKSlices partial sums meet
//     slice-0 thread of column k: dh_state[r][k] += the sum
//
// Ownership (the transpose of the forward's): thread tid = k * kKSlices + q owns
// column k of W_hh (hidden unit k of h_{t-1}) and the j-slice j = q, q +
// kKSlices, ... of every gate's rows. The slice-0 thread of unit j is both the
// one that runs the cell of unit j and the one that sums column j, so the
// state gradients dh_state and dc_state of unit j are touched by that one
// thread only and need no barrier; dg is double-buffered, so the next step's
// cells may write while slow threads still read this step's.
// Ragged batches and reverse as the forward: a row inactive at t carries its
// dh and dc unchanged; the previous state a cell backward needs (LSTM c_{t-1},
// GRU h_{t-1}) is the saved cells / output row of the previously processed
// step when the row was running there, else c0 / h0 (previous_rows() in
// layer_backward.h says the same).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../cells/cell_common.h"
#include "../cells/step_params.h"
#include "../exec/cuda_block.h"
#include "persistent_forward.h"  // FUSEDRNN_UNROLL, the limits
#include "persistent_limits.h"

namespace fusedrnn {
namespace persistent {

template <typename T>
struct BackwardParams {
  int64_t batch = 0;       // B: rows, sorted by decreasing length
  int64_t hidden = 0;      // H <= kMaxHidden
  int64_t steps = 0;       // time steps of the longest sequence
  int64_t rows_per_cta = 1;
  bool reverse = false;    // the FORWARD direction of the layer
  const int64_t* step_batch = nullptr;   // as ForwardParams: nullptr for a full batch
  const int64_t* step_offset = nullptr;
  const T* w_hh = nullptr;         // [G*H, H] row-major
  const T* h0 = nullptr;           // [B, H] GRU: h_{t-1} of a row's first step
  const T* c0 = nullptr;           // [B, H] LSTM: c_{t-1} of a row's first step
  const T* grad_output = nullptr;  // [N, H]
  const T* gates = nullptr;        // [N, G*H] activated gates (either forward path saves these)
  const T* output = nullptr;       // [N, H] h_t (RNN's derivative; GRU's h_{t-1})
  const T* cells = nullptr;        // [N, H] LSTM: c_t
  const T* hn = nullptr;           // [N, H] GRU: W_hn h_{t-1} + b_hn
  T* grad_gates = nullptr;         // [N, G*H] out: input-side gate gradients (RNN: may be grad_output)
  T* grad_h = nullptr;             // [B, H] in: dL/dh_n, out: dL/dh0
  T* grad_c = nullptr;             // [B, H] LSTM: in dL/dc_n, out dL/dc0
};

template <typename Ctx, typename T, typename A>
struct BackwardShared {
  exec::shared_ptr_t<Ctx, T> w;   // [slots][kKPerThread][kThreads], the transpose of the forward's blocks
  exec::shared_ptr_t<Ctx, A> dg;  // [2][rows][G][kMaxHidden] hidden-side gate gradients, zero beyond H
  exec::shared_ptr_t<Ctx, A> dh;  // [rows][kMaxHidden] dL/dh of the state, owner-only
  exec::shared_ptr_t<Ctx, A> dc;  // [rows][kMaxHidden] LSTM dL/dc, owner-only
};

template <typename Cell, typename T>
struct Backward {
  using A = acc_t<T>;
  using K = Forward<Cell, T>;  // the schedule helpers and the weight split are the forward's
  static constexpr int G = Cell::kGates;
  static constexpr int kRegGates = K::kRegGates;
  static constexpr int kSmemGates = K::kSmemGates;
  static constexpr int kSlots = K::kSlots;
  static constexpr bool kCellState = K::kCellState;
  // GRU's cell writes z * dh, the direct path to h_{t-1}, into its state gradient
  // (step_params.h); LSTM's and RNN's h_{t-1} gets only the recurrent product.
  static constexpr bool kDirectPath = G == 3;

  struct Thread {
    T w[kRegGates][kKPerThread];
  };

  FUSEDRNN_HOST_DEVICE static size_t weight_bytes() { return K::weight_bytes(); }
  FUSEDRNN_HOST_DEVICE static size_t shared_bytes(int64_t rows) {
    return weight_bytes() + sizeof(A) * (size_t(2) * rows * G * kMaxHidden + size_t(2) * rows * kMaxHidden);
  }

  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static BackwardShared<Ctx, T, A> carve(const Ctx& ctx, int64_t rows) {
    BackwardShared<Ctx, T, A> s;
    size_t off = 0;
    s.w = ctx.template shared<T>(off);
    off += weight_bytes();
    s.dg = ctx.template shared<A>(off);
    off += sizeof(A) * size_t(2) * rows * G * kMaxHidden;
    s.dh = ctx.template shared<A>(off);
    off += sizeof(A) * size_t(rows) * kMaxHidden;
    s.dc = ctx.template shared<A>(off);
    return s;
  }

  FUSEDRNN_HOST_DEVICE static int64_t unit(int tid) { return tid / kKSlices; }
  FUSEDRNN_HOST_DEVICE static int slice(int tid) { return tid % kKSlices; }
  static constexpr int kKChunk = K::kKChunk;

  // The schedule, through the forward's helpers (same fields).
  FUSEDRNN_HOST_DEVICE static ForwardParams<T> schedule(const BackwardParams<T>& p) {
    ForwardParams<T> f;
    f.batch = p.batch;
    f.steps = p.steps;
    f.rows_per_cta = p.rows_per_cta;
    f.reverse = p.reverse;
    f.step_batch = p.step_batch;
    f.step_offset = p.step_offset;
    return f;
  }

  // The packed row of (global row b, time t)'s previous state, or -1 for the
  // initial state: the previously processed step of the forward (t - 1, or t + 1
  // reversed) when b was running there.
  FUSEDRNN_HOST_DEVICE static int64_t previous_token(const ForwardParams<T>& f, int64_t b, int64_t t) {
    const int64_t src = f.reverse ? t + 1 : t - 1;
    if (src < 0 || src >= f.steps || b >= K::batch_at(f, src)) return -1;
    return K::offset_at(f, src) + b;
  }

  // Phase 0: the weights (as the forward's stage/take, transposed: slot entry
  // (i, owner) holds W_hh[g*H + j, k] with k = unit(owner), j = i * kKSlices +
  // slice(owner)), zero outside the H x H block.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void stage(const BackwardParams<T>& p, const S& s, int g, int tid) {
    const int64_t H = p.hidden;
    const auto slot = s.w + int64_t(K::slot_of(g)) * kKPerThread * kThreads;
    for (int e = tid; e < kKPerThread * kThreads; e += kThreads) {
      const int owner = e % kThreads, i = e / kThreads;
      const int64_t k = unit(owner), j = int64_t(i) * kKSlices + slice(owner);
      slot[e] = j < H && k < H ? p.w_hh[(g * H + j) * H + k] : T(0);
    }
  }
  template <int g, typename S>
  FUSEDRNN_HOST_DEVICE static void take(const S& s, Thread& th, int tid) {
    static_assert(g < kRegGates, "only register gates are taken");
    FUSEDRNN_UNROLL
    for (int i = 0; i < kKPerThread; ++i) th.w[g][i] = s.w[int64_t(i) * kThreads + tid];
  }

  // Phase 0, the state: dh, dc from dL/dh_n, dL/dc_n (zero beyond the batch and
  // H); both dg buffers zero, so the partial tiles (j >= H) add exact zeros.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void load_state(const BackwardParams<T>& p, const S& s, int64_t cta, int tid) {
    const int64_t H = p.hidden, R = p.rows_per_cta;
    for (int64_t e = tid; e < 2 * R * G * kMaxHidden; e += kThreads) s.dg[e] = A(0);
    for (int64_t e = tid; e < R * kMaxHidden; e += kThreads) {
      const int64_t b = cta * R + e / kMaxHidden, k = e % kMaxHidden;
      const bool live = b < p.batch && k < H;
      s.dh[e] = live ? A(p.grad_h[b * H + k]) : A(0);
      s.dc[e] = live && p.grad_c != nullptr ? A(p.grad_c[b * H + k]) : A(0);
    }
  }

  // Phase 1 (row r active at t): the slice-0 thread of unit j < H runs the
  // shared cell backward on one element in registers (hidden = 1, element 0),
  // writes the input-side gate gradients of the token, the hidden-side ones
  // into dg[parity], and leaves in dh_state the part of dL/dh_{t-1} that does
  // not go through W_hh.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void cell(const BackwardParams<T>& p, const ForwardParams<T>& f, const S& s,
                                        int64_t cta, int tid, int64_t r, int64_t t, int parity) {
    const int64_t H = p.hidden, j = unit(tid);
    if (slice(tid) != 0 || j >= H) return;
    const int64_t R = p.rows_per_cta, b = cta * R + r;
    const int64_t tok = K::offset_at(f, t) + b;
    A gates[G], dgx[G], dgh[G];
    FUSEDRNN_UNROLL
    for (int g = 0; g < G; ++g) {
      gates[g] = p.gates != nullptr ? A(p.gates[tok * G * H + g * H + j]) : A(0);
      dgx[g] = A(0);
      dgh[g] = A(0);
    }
    A grad_out = A(p.grad_output[tok * H + j]);
    A dh = s.dh[r * kMaxHidden + j];
    A dc = A(0), c_t = A(0), c_prev = A(0), h_prev = A(0), hn = A(0), out = A(0);
    BackwardStepParams<A> e;
    e.batch = 1;
    e.hidden = 1;
    e.gates = gates;
    e.grad_out = &grad_out;
    e.grad_h_state = &dh;
    e.grad_gates = dgx;
    if constexpr (kCellState) {
      const int64_t prev = previous_token(f, b, t);
      dc = s.dc[r * kMaxHidden + j];
      c_t = A(p.cells[tok * H + j]);
      c_prev = prev >= 0 ? A(p.cells[prev * H + j]) : A(p.c0[b * H + j]);
      e.grad_c_state = &dc;
      e.cells = &c_t;
      e.c_prev = &c_prev;
    }
    if constexpr (G == 3) {
      const int64_t prev = previous_token(f, b, t);
      h_prev = prev >= 0 ? A(p.output[prev * H + j]) : A(p.h0[b * H + j]);
      hn = A(p.hn[tok * H + j]);
      e.h_prev = &h_prev;
      e.hn = &hn;
      e.grad_gates_h = dgh;
    }
    if constexpr (G == 1) {
      out = A(p.output[tok * H + j]);
      e.out = &out;
    }
    Cell::backward(e, 0, 0);
    T* grad_gates = p.grad_gates + tok * G * H;
    const auto dg = s.dg + ((int64_t(parity) * R + r) * G) * kMaxHidden + j;
    FUSEDRNN_UNROLL
    for (int g = 0; g < G; ++g) {
      grad_gates[g * H + j] = T(dgx[g]);
      dg[g * kMaxHidden] = G == 3 ? dgh[g] : dgx[g];
    }
    s.dh[r * kMaxHidden + j] = kDirectPath ? dh : A(0);
    if constexpr (kCellState) s.dc[r * kMaxHidden + j] = dc;
  }

  // Phase 2 (row r active, after the barrier): this thread's j-slice of
  // dL/dh_{t-1}[k] over every gate.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static A partial(const BackwardParams<T>& p, const S& s, const Thread& th, int tid, int64_t r,
                                        int parity) {
    const auto dg = s.dg + ((int64_t(parity) * p.rows_per_cta + r) * G) * kMaxHidden + slice(tid);
    const int used = K::k_used(p.hidden);
    A acc = A(0);
    FUSEDRNN_UNROLL
    for (int i0 = 0; i0 < kKPerThread; i0 += kKChunk) {
      if (i0 < used) {
        FUSEDRNN_UNROLL
        for (int i = i0; i < i0 + kKChunk; ++i) {
          FUSEDRNN_UNROLL
          for (int g = 0; g < G; ++g) {
            const T w = g < kRegGates ? th.w[g < kRegGates ? g : 0][i]
                                      : T(s.w[(int64_t(g - kRegGates) * kKPerThread + i) * kThreads + tid]);
            acc += A(w) * A(dg[g * kMaxHidden + i * kKSlices]);
          }
        }
      }
    }
    return acc;
  }

  // Last phase (after the final barrier): dL/dh0 and dL/dc0 of the CTA's rows.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void store_final(const BackwardParams<T>& p, const S& s, int64_t cta, int tid) {
    const int64_t R = p.rows_per_cta, H = p.hidden;
    for (int64_t e = tid; e < R * kMaxHidden; e += kThreads) {
      const int64_t b = cta * R + e / kMaxHidden, k = e % kMaxHidden;
      if (b >= p.batch || k >= H) continue;
      p.grad_h[b * H + k] = T(s.dh[e]);
      if (p.grad_c != nullptr) p.grad_c[b * H + k] = T(s.dc[e]);
    }
  }

  // The kernel body for every thread of a CTA.
  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const BackwardParams<T>& p) {
    run(ctx, p, ctx.block());
  }
  // `cta`: the block's index within its direction (persistent_directions.h).
  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const BackwardParams<T>& p, int64_t cta) {
    const auto s = carve(ctx, p.rows_per_cta);
    const ForwardParams<T> f = schedule(p);
    const int tid = ctx.thread();
    Thread th;
    stage(p, s, 0, tid);
    ctx.sync();
    take<0>(s, th, tid);
    ctx.sync();
    if constexpr (kRegGates > 1) {
      stage(p, s, 1, tid);
      ctx.sync();
      take<kRegGates - 1>(s, th, tid);
      ctx.sync();
    }
    for (int g = kRegGates; g < G; ++g) stage(p, s, g, tid);
    load_state(p, s, cta, tid);
    ctx.sync();
    const int64_t steps = K::cta_steps(f, cta);
    int parity = 0;
    for (int64_t i = 0; i < steps; ++i) {
      // The forward's order reversed: its step steps - 1 - i.
      const int64_t t = K::time_of(f, steps, steps - 1 - i);
      for (int64_t r = 0; r < p.rows_per_cta; ++r) {
        if (K::row_active(f, cta, r, t)) cell(p, f, s, cta, tid, r, t, parity);
      }
      ctx.sync();
      for (int64_t r = 0; r < p.rows_per_cta; ++r) {
        if (!K::row_active(f, cta, r, t)) continue;  // the same for every thread of the CTA
        A acc = partial(p, s, th, tid, r, parity);
        FUSEDRNN_UNROLL
        for (int round = 0; round < kShuffleRounds; ++round) acc += ctx.shfl_xor(acc, 1 << round);
        const int64_t k = unit(tid);
        if (slice(tid) == 0 && k < p.hidden) s.dh[r * kMaxHidden + k] += acc;
      }
      parity = 1 - parity;
    }
    ctx.sync();
    store_final(p, s, cta, tid);
  }
};

}  // namespace persistent
}  // namespace fusedrnn
