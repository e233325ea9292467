// bfloat16 and float16 layers on the CPU, run in float32 (issue 15 item 3; benchmarks/NOTES.md, entry 30).
//
// ATen's bfloat16 GEMMs on a CPU without AVX-512 (at::mm of [32, 128] x [128, 512]: ~1.2 GFLOP/s on
// an AVX2 Zen 3, ATen's scalar fallback, ~35x slower than float32) made the per-step path of the half
// types 10-25x slower than the float32 layer. ATen's `cpublas::brgemm` runs bfloat16 through oneDNN's micro-kernel only with B in VNNI
// layout on an avx512_core CPU, and its `pack` to that layout only with AMX (`could_pack`), so it does
// not serve the CPUs that lack both. A product of two bfloat16 (or float16) numbers is exact in float32
// (8 / 11 significant bits each, 16 / 22 in the product, float32 has 24), so the float32 engine's FMAs
// on the widened operands compute exactly what a bf16 dot-product instruction with float32
// accumulation computes, up to the order of the sums: the layer's input, states and weights are widened
// once per call, the whole layer (engine or per-step loop, whichever float32 takes) runs in float32 --
// the hidden state between steps too (torch.nn's bfloat16 rounds it to bfloat16 before every step's
// GEMM) -- and what the op returns is rounded to the layer's dtype once at the end, so the ops' contract
// (every tensor in the input's dtype, saved-for-backward included) is unchanged.
//
// FUSEDRNN_CPU_HALF=per_step (read per call) keeps the half types on the per-step path in their own
// dtype, as before this file (to compare the two, and to test that path).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "../layer/checks.h"
#include "../layer/layer_tensors.h"
#include "cpu_engine.h"

namespace fusedrnn::cpu_widened {

// Whether a CPU layer in dtype `t` runs widened to float32. The seam for a step GEMM on the hardware's
// bf16 dot products (AMX, AVX-512-BF16: `at::native::cpublas::brgemm` with B packed to VNNI by
// `cpublas::pack` where `could_pack(kBFloat16)`, i.e. AMX) is here: on such a CPU a bf16 engine would
// take the layer first and this would answer false for it (benchmarks/NOTES.md, entry 30, says what to
// measure there before it does).
inline bool takes(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const char* v = std::getenv("FUSEDRNN_CPU_HALF");
  if (v == nullptr || std::strcmp(v, "float32") == 0) return true;
  TORCH_CHECK(std::strcmp(v, "per_step") == 0, "fusedrnn: FUSEDRNN_CPU_HALF must be float32 or per_step, got '", v,
              "'");
  return false;
}

// What the float32 engine may know of the widened layer call this thread is running (forward_in_chunks,
// backward_in_chunks; nullptr outside one): whether its forward runs on the CPU's bf16 dot products (a
// bfloat16 layer: every float32 value the engine is handed is a bf16 value; cpu_engine.h:
// bf16_products_for_call, ForwardArgs::bf16_products), whether its backward's one-shot GEMMs may run in
// bf16, and a cache for the weights the engine packs, which the chunks of the call share (cpu_engine.h:
// PackCache; the call's float32 weight copies do not change while it runs). A scope, not an argument:
// the drivers between here and the engine (layer_forward, layer_backward) are device-neutral
// (cpu_device.h reads it).
struct WidenedCall {
  bool bf16_products = false;
  bool bf16_gemms = false;
  cpu_engine::PackCache pack_cache;
};
inline WidenedCall*& current_widened_call() {
  static thread_local WidenedCall* call = nullptr;
  return call;
}

// The pack cache of the widened call this thread is running, for an engine call to use; nullptr outside
// one, or with FUSEDRNN_CPU_PACK_CACHE=0 (read per engine call), which packs the weights for every chunk
// again, as before the cache (tests: the same numbers, bitwise, either way); only 0 or 1.
inline cpu_engine::PackCache* pack_cache() {
  WidenedCall* call = current_widened_call();
  if (call == nullptr) return nullptr;
  const char* v = std::getenv("FUSEDRNN_CPU_PACK_CACHE");
  if (v == nullptr || v[0] == '\0') return &call->pack_cache;
  TORCH_CHECK((v[0] == '0' || v[0] == '1') && v[1] == '\0', "fusedrnn: FUSEDRNN_CPU_PACK_CACHE must be 0 (pack "
              "the weights for every chunk of a half-type layer call) or 1, got '", v, "'");
  return v[0] == '1' ? &call->pack_cache : nullptr;
}

struct WidenedCallScope {
  WidenedCall call;
  WidenedCall* outer;
  WidenedCallScope(bool bf16_products, bool bf16_gemms) : outer(current_widened_call()) {
    call.bf16_products = bf16_products;
    call.bf16_gemms = bf16_gemms;
    current_widened_call() = &call;
  }
  ~WidenedCallScope() { current_widened_call() = outer; }
  WidenedCallScope(const WidenedCallScope&) = delete;
  WidenedCallScope& operator=(const WidenedCallScope&) = delete;
};

// Undefined (absent bias, c0 of a GRU) and empty placeholders pass through the casts as they are.
inline at::Tensor widen(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat).contiguous() : t; }
inline at::Tensor narrow(const at::Tensor& t, at::ScalarType type) { return t.defined() ? t.to(type) : t; }

inline LayerWeights widen(const LayerWeights& w) {
  return {widen(w.w_ih), widen(w.w_hh), widen(w.b_ih), widen(w.b_hh), widen(w.w_hr)};
}

inline SavedForBackward widen(const SavedForBackward& s) {
  return {widen(s.input), widen(s.h0), widen(s.c0), widen(s.output), widen(s.gates), widen(s.cells), widen(s.hn)};
}

inline ForwardOutputs narrow(ForwardOutputs r, at::ScalarType type) {
  for (at::Tensor* t : {&r.output, &r.h_n, &r.c_n, &r.gates, &r.cells, &r.hn}) *t = narrow(*t, type);
  return r;
}

inline BackwardOutputs narrow(BackwardOutputs g, at::ScalarType type) {
  for (at::Tensor* t : {&g.grad_input, &g.grad_h0, &g.grad_c0, &g.grad_w_ih, &g.grad_w_hh, &g.grad_b_ih, &g.grad_b_hh,
                        &g.grad_w_hr}) {
    *t = narrow(*t, type);
  }
  return g;
}

// ---- Chunks of time steps (benchmarks/NOTES.md, entry 39) ----------------------------------------------------
//
// Widening the whole sequence at once held a float32 copy of every per-token tensor beside its half-type
// form: 2.8x torch.nn's bf16 training peak (LSTM sentiment shape 26.1 MB against 9.4). So the layer runs
// as a series of short float32 layers over consecutive chunks of time steps (a chunk of steps is a
// contiguous range of packed rows), each widened on entry and rounded into the half-type results on
// exit, with the states carried between chunks in float32; what is float32 at once is one chunk's
// tensors. The float32 arithmetic of each step is the same as one whole-sequence call's (the states are
// carried unrounded); the weight gradients are sums over chunks of per-chunk GEMMs, a different float32
// summation order than one GEMM over all tokens, fixed for a given chunking and thread count.

// Steps [t0, t1) of the schedule: packed rows [row0, row0 + rows).
struct Chunk {
  int64_t t0, t1, row0, rows;
};

// The float32 bytes a chunk may hold: at most a quarter of the half-type per-token tensors the call holds
// whole anyway (what the chunk's floats are copies of), so the floats stay small beside them, and at most
// kChunkMaxBytes (4 MiB; below), which bounds them for long sequences. Smaller chunks cost time: a chunk is a
// float32 layer call of its own (the engine's setup, the casts, per-chunk GEMMs for dX / dW over its rows);
// on the sentiment shape one-step chunks (32 rows) were 1.35-1.45x slower, 128 rows and more as fast as
// the whole sequence, 64 rows in between (NOTES entry 39 has the measurements that chose this), so a
// chunk has at least 64 rows. The cap was 1 MiB (about one L2) until the chunks shared their packed
// weights; since, at large hidden sizes, where 1 MiB is few rows, the per-chunk GEMMs and the
// weight-gradient sums over chunks cost more than L2 saves (NOTES entry 57: LSTM T 100 B 64 I = H = 512
// training, bf16 on the Zen 5: 64-row chunks (1 MiB) 190.7 ms, 128 170.9, 256 157.4, 512 156.9, whole
// 161.4; float16 302.8 / 245.6 / 218.7 / 211.9 / 242.5; I = H = 256 B 32 bf16 33.2 / 25.5 / 23.1 / whole
// 23.6), so 4 MiB; the quarter rule still binds where the call is small (the sentiment shape's RNN
// backward: 156 rows, its training peak equal to torch.nn's bf16 within 1%, tested).
// A call of at most kWholeMaxRows tokens runs whole: there the chunks' per-call costs (the engine's
// setup and weight packing per chunk) outweigh what they save (small_batch T=100 B=4, bf16 training, 2
// threads: 64-row chunks 1.34-1.42x the whole call's time, 128 rows 1.18-1.24x, 256 rows 1.08-1.12x), and
// the weights' float32 copies, which no chunking removes, are of the same order as the rest (lead, NOTES
// entry 39's addendum).
// FUSEDRNN_CPU_HALF_CHUNK_ROWS (read per call) sets the rows per chunk instead, whatever the call's size:
// for measurements, and for the tests that compare chunkings (a value >= the tokens: the whole sequence).
constexpr int64_t kChunkMaxBytes = int64_t(4) << 20;
constexpr int64_t kChunkShareOfHalf = 4;
constexpr int64_t kChunkMinRows = 64;
constexpr int64_t kWholeMaxRows = 512;

// floats_per_row: the float32 values a chunk holds per row; rows: the call's tokens; half_bytes: the
// bytes of the half-type per-token tensors of the whole call.
inline int64_t chunk_rows(int64_t floats_per_row, int64_t rows, int64_t half_bytes) {
  if (const char* v = std::getenv("FUSEDRNN_CPU_HALF_CHUNK_ROWS")) {
    char* end = nullptr;
    const long long forced = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != v && *end == '\0' && forced > 0,
                "fusedrnn: FUSEDRNN_CPU_HALF_CHUNK_ROWS must be a positive integer, got '", v, "'");
    return forced;
  }
  if (rows <= kWholeMaxRows) return std::max<int64_t>(1, rows);
  const int64_t bytes = std::min(kChunkMaxBytes, half_bytes / kChunkShareOfHalf);
  return std::max(kChunkMinRows, bytes / (int64_t(sizeof(float)) * std::max<int64_t>(1, floats_per_row)));
}

// Consecutive steps, each chunk as many as fit in `max_rows` (at least one step), in time order.
inline std::vector<Chunk> chunks_of(const StepSchedule& s, int64_t max_rows) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < s.steps();) {
    Chunk c{t, t, s.offset[t], 0};
    do {
      c.rows += s.batch[c.t1++];
    } while (c.t1 < s.steps() && c.rows + s.batch[c.t1] <= max_rows);
    out.push_back(c);
    t = c.t1;
  }
  return out;
}

// The chunk's steps as a schedule of their own (rows counted from the chunk's first).
inline StepSchedule schedule_of(const StepSchedule& s, const Chunk& c) {
  StepSchedule sub;
  for (int64_t t = c.t0; t < c.t1; ++t) {
    sub.batch.push_back(s.batch[t]);
    sub.offset.push_back(s.offset[t] - c.row0);
    sub.uniform = sub.uniform && s.batch[t] == s.batch[c.t0];
  }
  return sub;
}

// The chunk's rows of a per-token tensor ([N, *]) in float32; an undefined tensor or an empty
// placeholder (RNN's cells, LSTM's hn) passes as it is (widened).
inline at::Tensor widened_rows(const at::Tensor& t, int64_t tokens, const Chunk& c) {
  if (!t.defined() || t.dim() == 0 || t.size(0) != tokens || t.numel() == 0) return widen(t);
  return widen(t.narrow(0, c.row0, c.rows));
}

// Rounds a chunk's float32 part of a per-token result into rows of the half-type whole (allocated at
// the first chunk); a placeholder or undefined part is the result as it is.
inline void store_rows(at::Tensor& whole, const at::Tensor& part, int64_t tokens, const Chunk& c, at::ScalarType type) {
  if (!part.defined() || part.dim() == 0 || part.size(0) != c.rows || part.numel() == 0) {
    if (!whole.defined()) whole = narrow(part, type);
    return;
  }
  if (!whole.defined()) whole = at::empty({tokens, part.size(1)}, part.options().dtype(type));
  whole.narrow(0, c.row0, c.rows).copy_(part);
}

// The layer forward in chunks; `run` is the float32 driver (layer_forward on float32 tensors). The
// forward direction processes the chunks in time order, the reverse one from the end. A chunk's
// initial state is rows [0, batch[t0]) of the running state: the rows its first processed step
// continues, and (reverse, ragged) the initial states of the sequences that start inside it, which
// the running state still holds from h0 / c0.
template <typename RunFloat>
ForwardOutputs forward_in_chunks(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                 const LayerWeights& w, const StepSchedule& sched, bool reverse, bool save_for_backward,
                                 RunFloat&& run) {
  const at::ScalarType type = input.scalar_type();
  const int64_t N = input.size(0), I = input.size(1), P = h0.size(1), GH = w.w_hh.size(0);
  // Per token: the input, the output and what is saved (gates but RNN's, LSTM's cells, GRU's hn).
  const int64_t H = w.w_hr.defined() ? w.w_hr.size(1) : P, G = GH / H;
  const int64_t per_token = I + P + (G > 1 ? GH : 0) + (c0.defined() ? H : 0) + (G == 3 ? H : 0);
  // Inference (nothing saved) runs whole: its float32 copies are only the input and the output, and the
  // chunks' per-call costs measured up to +14% on it (NOTES entry 39).
  const std::vector<Chunk> chunks =
      save_for_backward ? chunks_of(sched, chunk_rows(per_token, N, N * per_token * input.element_size()))
                        : std::vector<Chunk>();
  const LayerWeights w32 = widen(w);
  // bf16 products for a call no gradient will be taken of only: a training call's forward keeps float32
  // products, so that its gradients are those of the function it computed at float32 accuracy (with h_{t-1}
  // rounded to bf16 in the products, gradients in chaotic or saturated recurrences fell to torch.nn's bf16
  // noise level, above 2x its error in 3 of 12 seeds of a probe: benchmarks/NOTES.md entry 57).
  const WidenedCallScope scope(type == at::kBFloat16 && !save_for_backward &&
                                   cpu_engine::bf16_products_for_call(h0.size(0), sched.steps(), sched.uniform),
                               false);
  if (chunks.size() <= 1) {
    return narrow(run(widen(input), widen(h0), widen(c0), w32, sched, reverse, save_for_backward), type);
  }
  at::Tensor h = widen(h0), c = widen(c0);  // fresh float32 buffers: the running states
  ForwardOutputs r;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& k = chunks[reverse ? chunks.size() - 1 - i : i];
    const int64_t b0 = sched.batch[k.t0];
    at::Tensor h_k = h.narrow(0, 0, b0), c_k = c.defined() ? c.narrow(0, 0, b0) : c;
    ForwardOutputs f = run(widen(input.narrow(0, k.row0, k.rows)), h_k, c_k, w32, schedule_of(sched, k), reverse,
                           save_for_backward);
    h_k.copy_(f.h_n);
    if (c.defined()) c_k.copy_(f.c_n);
    store_rows(r.output, f.output, N, k, type);
    store_rows(r.gates, f.gates, N, k, type);
    store_rows(r.cells, f.cells, N, k, type);
    store_rows(r.hn, f.hn, N, k, type);
  }
  r.h_n = narrow(h, type);
  r.c_n = narrow(c, type);
  return r;
}

// The layer backward in chunks, in the reverse of the forward's processing order; `run` is the float32
// driver (layer_backward on float32 tensors). The incoming gradient of the state (grad_h_n, grad_c_n)
// is carried as a running [B, *] float32 gradient: a chunk's grad_h_n is its rows [0, batch[t0]) --
// the gradient its successor returned for the rows that continue past it, grad_h_n's own rows for the
// sequences that end inside it -- and the chunk's grad_h0 is written back over them, so what the
// running gradient holds at the end is the gradient of h0 (c0). A chunk's saved h0 / c0 are the
// saved output / cells of the step processed before its first one, for the rows that continue it,
// and h0 / c0's rows for the rest (reverse, ragged: the sequences that start inside it).
template <typename RunFloat>
BackwardOutputs backward_in_chunks(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                   const at::Tensor& grad_c_n, const SavedForBackward& saved, const LayerWeights& w,
                                   const StepSchedule& sched, bool reverse, bool need_grad_input, bool need_grad_h0,
                                   RunFloat&& run) {
  const at::ScalarType type = saved.input.scalar_type();
  const int64_t N = saved.input.size(0), I = saved.input.size(1), P = saved.h0.size(1), GH = w.w_hh.size(0);
  // Per token: the saved input, output, gates, cells, hn; in float32 also grad_output, the gate gradients, dX.
  int64_t per_token = 0;
  for (const at::Tensor* t : {&saved.input, &saved.output, &saved.gates, &saved.cells, &saved.hn}) {
    if (t->defined() && t->dim() == 2 && t->size(0) == N) per_token += t->size(1);
  }
  const std::vector<Chunk> chunks = chunks_of(
      sched, chunk_rows(per_token + I + GH + P, N, N * per_token * saved.input.element_size()));
  const LayerWeights w32 = widen(w);
  // The pack cache; bf16: the one-shot GEMMs (dX, dW) in bf16. Not with a projection (LSTM proj_size): its
  // per-step loop's products (dh_t W_hr) go through the same gemm and stay float32, as every recurrent
  // product of the backward does.
  const WidenedCallScope scope(false, type == at::kBFloat16 && !w.w_hr.defined());
  if (chunks.size() <= 1) {
    return narrow(run(widen(grad_output), widen(grad_h_n), widen(grad_c_n), widen(saved), w32, sched, reverse,
                      need_grad_input, need_grad_h0),
                  type);
  }
  const bool is_lstm = saved.c0.defined();
  at::Tensor dh = widen(grad_h_n), dc = is_lstm ? widen(grad_c_n) : at::Tensor();  // the running gradients
  const at::Tensor h0 = widen(saved.h0), c0 = widen(saved.c0);
  // A chunk's initial state: rows [0, carried) of `all` from packed row `src`, the rest h0's / c0's.
  auto initial_state = [](const at::Tensor& all, const at::Tensor& init, int64_t src, int64_t carried, int64_t b0) {
    if (carried == 0) return init.narrow(0, 0, b0);
    at::Tensor carried_rows = widen(all.narrow(0, src, carried));
    return carried == b0 ? carried_rows : at::cat({carried_rows, init.narrow(0, carried, b0 - carried)});
  };
  BackwardOutputs g;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& k = chunks[reverse ? i : chunks.size() - 1 - i];
    const bool last = i + 1 == chunks.size();
    const int64_t b0 = sched.batch[k.t0];
    // The step processed before the chunk's first: t0 - 1 forward, t1 reverse (layer_backward.h's
    // previous_rows); its rows continue the chunk's first min(batch) rows.
    const int64_t first = reverse ? k.t1 - 1 : k.t0, src = reverse ? k.t1 : k.t0 - 1;
    const bool has_src = src >= 0 && src < sched.steps();
    const int64_t src_row = has_src ? sched.offset[src] : 0;
    const int64_t carried = has_src ? std::min(sched.batch[first], sched.batch[src]) : 0;
    SavedForBackward s;
    s.input = widened_rows(saved.input, N, k);
    s.h0 = initial_state(saved.output, h0, src_row, carried, b0);
    s.c0 = is_lstm ? initial_state(saved.cells, c0, src_row, carried, b0) : at::Tensor();
    s.output = widened_rows(saved.output, N, k);
    s.gates = widened_rows(saved.gates, N, k);
    s.cells = widened_rows(saved.cells, N, k);
    s.hn = widened_rows(saved.hn, N, k);
    at::Tensor dh_k = dh.narrow(0, 0, b0), dc_k = is_lstm ? dc.narrow(0, 0, b0) : at::Tensor();
    const bool chunk_grad_h0 = need_grad_h0 || !last;
    BackwardOutputs b = run(widen(grad_output.narrow(0, k.row0, k.rows)), dh_k, dc_k, s, w32, schedule_of(sched, k),
                            reverse, need_grad_input, chunk_grad_h0);
    if (chunk_grad_h0) dh_k.copy_(b.grad_h0);
    if (is_lstm) dc_k.copy_(b.grad_c0);
    if (need_grad_input) store_rows(g.grad_input, b.grad_input, N, k, type);
    for (auto [sum, part] : {std::pair{&g.grad_w_ih, &b.grad_w_ih}, std::pair{&g.grad_w_hh, &b.grad_w_hh},
                             std::pair{&g.grad_b_ih, &b.grad_b_ih}, std::pair{&g.grad_b_hh, &b.grad_b_hh},
                             std::pair{&g.grad_w_hr, &b.grad_w_hr}}) {
      if (i == 0) {
        *sum = *part;
      } else if (sum->defined() && sum->numel() > 0) {
        sum->add_(*part);
      }
    }
  }
  const auto half = saved.input.options().dtype(type);
  if (!need_grad_input) g.grad_input = at::empty({0}, half);
  g.grad_h0 = need_grad_h0 ? narrow(dh, type) : at::empty({0}, half);
  g.grad_c0 = is_lstm ? narrow(dc, type) : at::empty({0}, half);
  for (at::Tensor* t : {&g.grad_w_ih, &g.grad_w_hh, &g.grad_b_ih, &g.grad_b_hh, &g.grad_w_hr}) *t = narrow(*t, type);
  return g;
}

}  // namespace fusedrnn::cpu_widened
