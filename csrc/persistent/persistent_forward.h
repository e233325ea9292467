// The persistent forward kernel, framework-free and host+device: one CTA runs
// a group of sequences (batch rows) through EVERY time step of one layer and
// direction, with W_hh on chip (registers + shared memory) for all steps.
// `Forward<Cell, T>::run(ctx, p)` is the kernel's body, written once against an
// execution context (csrc/exec/cuda_block.h): the `__global__` wrapper
// (csrc/cuda/persistent_kernel.cuh) runs it with CUDA's intrinsics, the CPU
// runner (csrc/exec/cpu_runner.h, used by csrc/cpu/persistent_emulation.cpp
// and the tests) runs the same source with every thread of the CTA as a fiber,
// real barriers, lane-exact shuffles and checked shared memory. Its phases:
//
//   for each register gate g (0, 1):
//     stage(g) sync take<g> sync         W_hh block -> shared slot -> registers
//   stage(g) for the shared gates, load_state        W_hh blocks, b_hh, h0, c0 -> shared
//   sync
//   for each step i of the CTA's longest row (time t = i, or reversed):
//     for each row r of the CTA:
//       if row_active(r, t):             (uniform over the CTA)
//         fetch_input(tid, r)            x_t W_ih^T + b_ih of (row, unit) into registers, early
//         partial(tid, r)                this thread's k-slice of every gate's dot product
//         xor-shuffle 1, xor-shuffle 2   (add_shuffled) the unit's kKSlices partial sums meet
//       cell(tid, r)                     slice-0 thread of unit j: the shared cell math on
//                                        (row, j), h_t into the other h buffer, outputs out
//     sync                               h_t visible to every thread for step i + 1
//   store_final(cta, tid)                h_n, c_n
//
// Ownership: thread tid = j * kKSlices + q owns hidden unit j and the k-slice
// k = q, q + kKSlices, ... (interleaved, so the four slices of a unit read four
// consecutive words of h: distinct banks, broadcast across the warp's units).
// Partial tiles: units j >= H and columns k >= H hold zero weights, and h is
// zero-padded to kMaxHidden, so they add exact zeros; units j >= H run no cell.
// Ragged batches: rows are sorted by decreasing length, so a row is active at
// time t iff its index is below batch[t]; the CTA runs as many steps as its
// first (longest) row, an inactive row just carries its h to the next buffer.
// Reverse: time runs from the row's last step down to 0; a row that has not
// started yet carries h0, exactly what the per-step path does.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../cells/cell_common.h"
#include "../cells/step_params.h"
#include "../exec/cuda_block.h"
#include "persistent_directions.h"
#include "persistent_limits.h"

// Loops over register arrays must be unrolled on the device: a run-time index
// would move the array to local memory (a stack frame in ptxas's report).
#if !defined(FUSEDRNN_UNROLL)
#if defined(__CUDA_ARCH__)
#define FUSEDRNN_UNROLL _Pragma("unroll")
#else
#define FUSEDRNN_UNROLL
#endif
#endif

namespace fusedrnn {
namespace persistent {

template <typename T>
struct ForwardParams {
  int64_t batch = 0;       // B: rows (sequences), sorted by decreasing length
  int64_t hidden = 0;      // H <= kMaxHidden
  int64_t steps = 0;       // time steps of the longest sequence
  int64_t rows_per_cta = 1;
  bool reverse = false;
  // [steps] rows active at time t (non-increasing) and the first packed row of
  // time t; both nullptr for a full batch (batch[t] = B, offset[t] = t * B), which
  // then needs no table on the device and no copy to it.
  const int64_t* step_batch = nullptr;
  const int64_t* step_offset = nullptr;
  const T* w_hh = nullptr;  // [G*H, H] row-major
  const T* b_hh = nullptr;  // [G*H] or nullptr
  const T* h0 = nullptr;    // [B, H]
  const T* c0 = nullptr;    // [B, H] LSTM only
  T* gates = nullptr;       // [N, G*H] in: x W_ih^T + b_ih; out: activated gates (as the per-step path)
  T* output = nullptr;      // [N, H]
  T* cells = nullptr;       // [N, H] LSTM: c_t
  T* hn = nullptr;          // [N, H] GRU: W_hn h_{t-1} + b_hn
  T* h_n = nullptr;         // [B, H]
  T* c_n = nullptr;         // [B, H] LSTM only
};

// The CTA's shared memory, carved from one dynamic allocation through the
// execution context (plain pointers on the GPU, checked ones on the CPU
// runner). State is in the accumulation type A (float for half types), so
// sums, h between steps and the LSTM cell state never round to half.
template <typename Ctx, typename T, typename A>
struct Shared {
  exec::shared_ptr_t<Ctx, T> w;     // [slots][kKPerThread][kThreads]: a warp reads 32 consecutive words
  exec::shared_ptr_t<Ctx, A> h;     // [2][rows][kMaxHidden] double-buffered state, zero beyond H
  exec::shared_ptr_t<Ctx, A> c;     // [rows][kMaxHidden] LSTM cell state (single buffer: only its owner touches it)
  exec::shared_ptr_t<Ctx, A> bias;  // [G][kMaxHidden] b_hh (zero without bias): here, not in registers, which the weights fill
};

template <typename Cell, typename T>
struct Forward {
  using A = acc_t<T>;
  static constexpr int G = Cell::kGates;
  static constexpr int kRegGates = register_gates(G);
  static constexpr int kSmemGates = G - kRegGates;
  static_assert(kRegGates >= 1 && kRegGates <= 2, "the kernel and the CPU driver stage gates 0 and 1 by name");
  // Shared weight slots: the shared gates, and at least one to stage the register gates through.
  static constexpr int kSlots = kSmemGates > 0 ? kSmemGates : 1;
  // LSTM (4 gates) carries a cell state c between steps; GRU and RNN do not.
  static constexpr bool kCellState = G == 4;

  // What a thread keeps in registers for the whole sequence.
  struct Thread {
    T w[kRegGates][kKPerThread];
  };

  // Bytes of dynamic shared memory for `rows` rows per CTA (host and device agree).
  FUSEDRNN_HOST_DEVICE static size_t weight_bytes() { return sizeof(T) * size_t(kSlots) * kKPerThread * kThreads; }
  FUSEDRNN_HOST_DEVICE static size_t shared_bytes(int64_t rows) {
    return weight_bytes() + sizeof(A) * (size_t(3) * rows * kMaxHidden + size_t(G) * kMaxHidden);
  }

  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static Shared<Ctx, T, A> carve(const Ctx& ctx, int64_t rows) {
    Shared<Ctx, T, A> s;
    size_t off = 0;
    s.w = ctx.template shared<T>(off);
    off += weight_bytes();
    s.h = ctx.template shared<A>(off);
    off += sizeof(A) * size_t(2) * rows * kMaxHidden;
    s.c = ctx.template shared<A>(off);
    off += sizeof(A) * size_t(rows) * kMaxHidden;
    s.bias = ctx.template shared<A>(off);
    return s;
  }

  FUSEDRNN_HOST_DEVICE static int64_t unit(int tid) { return tid / kKSlices; }
  FUSEDRNN_HOST_DEVICE static int slice(int tid) { return tid % kKSlices; }
  // The dot products run in chunks of kKChunk columns (partial()).
  static constexpr int kKChunk = 8;
  // Weights per gate row per thread actually used: ceil(H / kKSlices).
  FUSEDRNN_HOST_DEVICE static int k_used(int64_t H) { return int((H + kKSlices - 1) / kKSlices); }

  FUSEDRNN_HOST_DEVICE static int64_t batch_at(const ForwardParams<T>& p, int64_t t) {
    return p.step_batch != nullptr ? p.step_batch[t] : p.batch;
  }
  FUSEDRNN_HOST_DEVICE static int64_t offset_at(const ForwardParams<T>& p, int64_t t) {
    return p.step_offset != nullptr ? p.step_offset[t] : t * p.batch;
  }

  // Steps the CTA runs: the length of its first (longest) row, i.e. the number
  // of t with batch[t] > r0; batch is non-increasing, so a binary search.
  FUSEDRNN_HOST_DEVICE static int64_t cta_steps(const ForwardParams<T>& p, int64_t cta) {
    const int64_t r0 = cta * p.rows_per_cta;
    int64_t lo = 0, hi = p.steps;  // invariant: batch[t] > r0 for t < lo, <= r0 for t >= hi
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (batch_at(p, mid) > r0) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
  FUSEDRNN_HOST_DEVICE static int64_t time_of(const ForwardParams<T>& p, int64_t steps, int64_t i) {
    return p.reverse ? steps - 1 - i : i;
  }
  FUSEDRNN_HOST_DEVICE static bool row_active(const ForwardParams<T>& p, int64_t cta, int64_t r, int64_t t) {
    return cta * p.rows_per_cta + r < batch_at(p, t);
  }

  // Phase 0, the weights, one gate row block at a time (the kernel loops over
  // g, unrolled, with a barrier after each stage and each take):
  //   stage(g):  the CTA copies W_hh's gate-g block into shared slot
  //              slot_of(g), already in the kernel's [i][tid] order and zero
  //              outside the H x H matrix: consecutive threads read
  //              consecutive columns of a row (coalesced), no thread's load
  //              depends on its own registers.
  //   take(g):   (register gates only) each thread moves its kKPerThread
  //              values from the slot into registers: no predicates, no
  //              global loads in flight, so the load phase does not spill.
  // Register gates stage through slot 0, before the shared gates fill it.
  FUSEDRNN_HOST_DEVICE static int slot_of(int g) { return g < kRegGates ? 0 : g - kRegGates; }
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void stage(const ForwardParams<T>& p, const S& s, int g, int tid) {
    const int64_t H = p.hidden;
    const auto slot = s.w + int64_t(slot_of(g)) * kKPerThread * kThreads;
    for (int e = tid; e < kKPerThread * kThreads; e += kThreads) {
      const int owner = e % kThreads, i = e / kThreads;
      const int64_t j = unit(owner), k = int64_t(i) * kKSlices + slice(owner);
      slot[e] = j < H && k < H ? p.w_hh[(g * H + j) * H + k] : T(0);
    }
  }
  template <int g, typename S>
  FUSEDRNN_HOST_DEVICE static void take(const S& s, Thread& th, int tid) {
    static_assert(g < kRegGates, "only register gates are taken");
    FUSEDRNN_UNROLL
    for (int i = 0; i < kKPerThread; ++i) th.w[g][i] = s.w[int64_t(i) * kThreads + tid];
  }

  // Phase 0, the state (after the weights; no barrier needed between): b_hh,
  // and this thread's stride of h0 / c0 into shared memory.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void load_state(const ForwardParams<T>& p, const S& s, int64_t cta,
                                              int tid) {
    const int64_t H = p.hidden;
    for (int64_t e = tid; e < G * kMaxHidden; e += kThreads) {
      const int64_t g = e / kMaxHidden, j = e % kMaxHidden;
      s.bias[e] = j < H && p.b_hh != nullptr ? A(p.b_hh[g * H + j]) : A(0);
    }
    const int64_t R = p.rows_per_cta;
    for (int64_t e = tid; e < R * kMaxHidden; e += kThreads) {
      const int64_t b = cta * R + e / kMaxHidden, k = e % kMaxHidden;
      const bool live = b < p.batch && k < H;
      s.h[e] = live ? A(p.h0[b * H + k]) : A(0);
      s.h[R * kMaxHidden + e] = A(0);
      s.c[e] = live && p.c0 != nullptr ? A(p.c0[b * H + k]) : A(0);
    }
  }

  // Phase 1a (row r active): the slice-0 thread of unit j < H loads this step's
  // input projection x_t W_ih^T + b_ih of (row, j) into registers, before the
  // dot products, so the global load's latency hides behind them.
  FUSEDRNN_HOST_DEVICE static void fetch_input(const ForwardParams<T>& p, int64_t cta, int tid, int64_t r, int64_t t,
                                               A (&xin)[G]) {
    const int64_t H = p.hidden, j = unit(tid);
    if (slice(tid) != 0 || j >= H) return;
    const T* gates = p.gates + (offset_at(p, t) + cta * p.rows_per_cta + r) * G * H;
    FUSEDRNN_UNROLL
    for (int g = 0; g < G; ++g) xin[g] = A(gates[g * H + j]);
  }

  // Phase 1b (row r active): this thread's share of h_{t-1} W_hh^T for every gate
  // of its unit. `parity` selects the h buffer holding h_{t-1}.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void partial(const ForwardParams<T>& p, const S& s, const Thread& th,
                                           int tid, int64_t r, int parity, A (&acc)[G]) {
    const auto h = s.h + (int64_t(parity) * p.rows_per_cta + r) * kMaxHidden + slice(tid);
    const int used = k_used(p.hidden);
    FUSEDRNN_UNROLL
    for (int g = 0; g < G; ++g) acc[g] = A(0);
    // Chunks of 8 columns, skipped whole beyond H (zero-padded inside a chunk):
    // one uniform branch per chunk instead of a predicate per column.
    FUSEDRNN_UNROLL
    for (int i0 = 0; i0 < kKPerThread; i0 += kKChunk) {
      if (i0 < used) {
        FUSEDRNN_UNROLL
        for (int i = i0; i < i0 + kKChunk; ++i) {
          const A hk = h[i * kKSlices];
          FUSEDRNN_UNROLL
          for (int g = 0; g < G; ++g) {
            const T w = g < kRegGates ? th.w[g < kRegGates ? g : 0][i]
                                      : T(s.w[(int64_t(g - kRegGates) * kKPerThread + i) * kThreads + tid]);
            acc[g] += A(w) * hk;
          }
        }
      }
    }
  }

  // Phase 2 (after each xor shuffle): add the partner lane's partial sums.
  FUSEDRNN_HOST_DEVICE static void add_shuffled(A (&acc)[G], const A (&partner)[G]) {

    FUSEDRNN_UNROLL
    for (int g = 0; g < G; ++g) acc[g] += partner[g];
  }

  // Phase 3: the slice-0 thread of unit j < H runs the cell on (row r, unit j)
  // through the shared per-element math (csrc/cells/), on one element in
  // registers (hidden = 1, element 0: every index the cell computes is a
  // constant), and writes the step's outputs. It carries h_{t-1} into the h_t
  // buffer, so an inactive row keeps its state. Reads h buffer `parity`,
  // writes buffer 1 - parity; the LSTM cell state is read and written by this
  // thread only.
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void cell(const ForwardParams<T>& p, const S& s, int64_t cta, int tid, int64_t r,
                                        int64_t t, int parity, bool active, const A (&acc)[G], const A (&xin)[G]) {
    const int64_t H = p.hidden, j = unit(tid);
    if (slice(tid) != 0 || j >= H) return;
    const int64_t R = p.rows_per_cta;
    A h = s.h[(int64_t(parity) * R + r) * kMaxHidden + j];
    if (active) {
      const int64_t tok = offset_at(p, t) + cta * R + r;
      A xg[G], hp[G], c = A(0), out = A(0), cells = A(0), hn = A(0);
      FUSEDRNN_UNROLL
      for (int g = 0; g < G; ++g) {
        xg[g] = xin[g];
        hp[g] = acc[g] + s.bias[g * kMaxHidden + j];
      }
      if constexpr (kCellState) c = s.c[r * kMaxHidden + j];
      forward_in_registers<Cell>(xg, hp, h, c, out, cells, hn);
      if constexpr (kCellState) s.c[r * kMaxHidden + j] = c;
      T* gates = p.gates + tok * G * H;
      FUSEDRNN_UNROLL
      for (int g = 0; g < G; ++g) gates[g * H + j] = T(xg[g]);
      p.output[tok * H + j] = T(out);
      if (p.cells != nullptr) p.cells[tok * H + j] = T(cells);
      if (p.hn != nullptr) p.hn[tok * H + j] = T(hn);
    }
    s.h[(int64_t(1 - parity) * R + r) * kMaxHidden + j] = h;
  }

  // Last phase (after the final barrier): h_n and c_n of the CTA's rows, from
  // the buffer the last step wrote (`parity`).
  template <typename S>
  FUSEDRNN_HOST_DEVICE static void store_final(const ForwardParams<T>& p, const S& s, int64_t cta,
                                               int tid, int parity) {
    const int64_t R = p.rows_per_cta, H = p.hidden;
    for (int64_t e = tid; e < R * kMaxHidden; e += kThreads) {
      const int64_t b = cta * R + e / kMaxHidden, k = e % kMaxHidden;
      if (b >= p.batch || k >= H) continue;
      p.h_n[b * H + k] = T(s.h[int64_t(parity) * R * kMaxHidden + e]);
      if (p.c_n != nullptr) p.c_n[b * H + k] = T(s.c[e]);
    }
  }

  // The kernel body, for every thread of a CTA (block ctx.block() = the CTA's
  // index): the phases above with the barriers and warp shuffles between them.
  // The `__global__` wrapper (csrc/cuda/persistent_kernel.cuh) runs it on the
  // GPU; the CPU runner (csrc/exec/cpu_runner.h) runs the same source on the host.
  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const ForwardParams<T>& p) {
    run(ctx, p, ctx.block());
  }
  // `cta`: the block's index within its direction (persistent_directions.h).
  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const ForwardParams<T>& p, int64_t cta) {
    const auto s = carve(ctx, p.rows_per_cta);
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
    const int64_t steps = cta_steps(p, cta);
    int parity = 0;
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t t = time_of(p, steps, i);
      for (int64_t r = 0; r < p.rows_per_cta; ++r) {
        const bool active = row_active(p, cta, r, t);  // the same for every thread of the CTA
#if defined(__CUDA_ARCH__)
        A acc[G], xin[G];
#else
        // Zeroed on the host only, for g++'s -Wmaybe-uninitialized (it cannot see that cell()
        // reads them only where fetch_input and partial wrote them); on the device the zeroing
        // cost LSTM fp32 7 registers.
        A acc[G] = {}, xin[G] = {};
#endif
        if (active) {
          fetch_input(p, cta, tid, r, t, xin);
          partial(p, s, th, tid, r, parity, acc);
          FUSEDRNN_UNROLL
          for (int round = 0; round < kShuffleRounds; ++round) {
            A partner[G];
            FUSEDRNN_UNROLL
            for (int g = 0; g < G; ++g) partner[g] = ctx.shfl_xor(acc[g], 1 << round);
            add_shuffled(acc, partner);
          }
        }
        cell(p, s, cta, tid, r, t, parity, active, acc, xin);
      }
      parity = 1 - parity;
      ctx.sync();
    }
    store_final(p, s, cta, tid, parity);
  }
};

}  // namespace persistent
}  // namespace fusedrnn
