// Backward of one layer, one direction: backpropagation through time in the
// reverse of the forward's processing order.
//
//   per step: one fused pointwise backward (Cell::backward) that turns the
//             incoming dh (and dc) into gate gradients, then one GEMM
//             dh_{t-1} = dgates W_hh  for the active rows
//             [LSTM proj_size > 0: dr_t = dh_t W_hr before the pointwise step]
//   after the loop, the parameter and input gradients as a few large GEMMs
//   over all tokens at once:
//             dX = dgates W_ih (when asked for),  dW_ih = dgates^T X,  dW_hh = dgates_h^T H_prev
//             (H_prev read in place: grad_times_previous),
//             db = column sums,  dW_hr = dH^T R.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../cells/step_params.h"
#include "checks.h"
#include "layer_forward.h"
#include "layer_tensors.h"

namespace fusedrnn {

// The state each token's step started from, gathered into one [N, S] tensor:
// rows of step t come from the previously processed step's rows in `all`
// (the sequences that were already running) or from `init` (those that start
// at t, which only happens in the reverse direction of a ragged batch).
inline at::Tensor gather_previous_states(const at::Tensor& all, const at::Tensor& init, const StepSchedule& s,
                                         bool reverse) {
  at::Tensor prev = new_buffer(all.sizes(), all.options());
  const int64_t T = s.steps();
  if (T == 0) return prev;
  const int64_t B = s.batch[0];
  if (s.uniform) {  // two copies instead of T
    const int64_t N = all.size(0);
    const int64_t first = reverse ? N - B : 0;  // rows of the first processed step
    rows(prev, first, B).copy_(init);
    if (N > B) {
      if (reverse) {
        rows(prev, 0, N - B).copy_(rows(all, B, N - B));
      } else {
        rows(prev, B, N - B).copy_(rows(all, 0, N - B));
      }
    }
    return prev;
  }
  // How many of step t's rows continue sequences that were running at `src`
  // (the previously processed step); the rest start from `init`.
  auto carried_rows = [&](int64_t t, int64_t src) -> int64_t {
    return (src < 0 || src >= T) ? 0 : std::min(s.batch[t], s.batch[src]);
  };
  if (!all.device().is_cpu()) {
    // On a GPU the index would be a host-to-device copy, which a CUDA graph
    // capture forbids: copy step by step instead (two small copies per step).
    for (int64_t t = 0; t < T; ++t) {
      const int64_t src = reverse ? t + 1 : t - 1;
      const int64_t bs = s.batch[t];
      const int64_t carried = carried_rows(t, src);
      if (carried > 0) rows(prev, s.offset[t], carried).copy_(rows(all, s.offset[src], carried));
      if (carried < bs) rows(prev, s.offset[t] + carried, bs - carried).copy_(rows(init, carried, bs - carried));
    }
    return prev;
  }
  // On the CPU: one gather over [all; init] with a row index, instead of two
  // small copies per step (which cost more than the step's GEMM at small batch).
  const int64_t N = all.size(0);
  std::vector<int64_t> index(N);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t src = reverse ? t + 1 : t - 1;
    const int64_t carried = carried_rows(t, src);
    for (int64_t b = 0; b < s.batch[t]; ++b) {
      index[s.offset[t] + b] = b < carried ? s.offset[src] + b : N + b;
    }
  }
  at::index_select_out(prev, at::cat({all, init}), 0, at::tensor(index, at::TensorOptions().dtype(at::kLong)));
  return prev;
}

// Where the states of step t's rows came from: rows [0, carried) continue
// sequences that were running at the previously processed step, whose rows
// start at packed row `src_offset` of the per-token tensor (output or cells);
// rows [carried, batch[t]) start from the same rows of the initial state (at
// the first processed step, and in the reverse direction of a ragged batch
// where sequences start). The CPU engine (cpu/engine_backward.h) reads
// the same rule.
struct PreviousRows {
  int64_t src_offset = 0;
  int64_t carried = 0;
};
inline PreviousRows previous_rows(const StepSchedule& s, int64_t t, bool reverse) {
  const int64_t src = reverse ? t + 1 : t - 1;
  if (src < 0 || src >= s.steps()) return {};
  return {s.offset[src], std::min(s.batch[t], s.batch[src])};
}

// The rows of the previous states of all tokens ([N, S], what gather_previous_states
// builds) as a few runs of consecutive rows of `all` or `init`: packed rows
// [dst, dst + count) started from rows [src, src + count) of one of them. A
// full-length batch has two runs ([h0; output[:-B]] forward, [output[B:]; h0]
// reverse), a ragged one a run per change of the batch size.
struct PreviousRun {
  int64_t dst, src, count;
  bool from_init;
};
inline std::vector<PreviousRun> previous_runs(const StepSchedule& s, bool reverse) {
  std::vector<PreviousRun> runs;
  auto add = [&](int64_t dst, int64_t src, int64_t count, bool from_init) {
    if (count <= 0) return;
    if (!runs.empty()) {
      PreviousRun& last = runs.back();
      if (last.from_init == from_init && last.dst + last.count == dst && last.src + last.count == src) {
        last.count += count;
        return;
      }
    }
    runs.push_back({dst, src, count, from_init});
  };
  for (int64_t t = 0; t < s.steps(); ++t) {
    const PreviousRows p = previous_rows(s, t, reverse);
    add(s.offset[t], p.src_offset, p.carried, false);
    add(s.offset[t] + p.carried, p.carried, s.batch[t] - p.carried, true);
  }
  return runs;
}

// grad^T H_prev ([N, K]^T [N, S] -> [K, S]) for the weight gradient of W_hh,
// where H_prev holds each token's previous state: one GEMM per run of
// previous_runs against views of `all` and `init`, so H_prev is never built
// (an [N, S] buffer). A batch with very many runs (many distinct lengths) pays a
// gather instead of as many small GEMMs.
template <typename Device>
at::Tensor grad_times_previous(const at::Tensor& grad, const at::Tensor& all, const at::Tensor& init,
                               const StepSchedule& s, bool reverse) {
  constexpr size_t kMaxRuns = 64;
  const std::vector<PreviousRun> runs = previous_runs(s, reverse);
  if (runs.size() > kMaxRuns) return device_mm<Device>(grad.t(), gather_previous_states(all, init, s, reverse));
  if (runs.empty()) return at::zeros({grad.size(1), all.size(1)}, grad.options());
  at::Tensor out = at::empty({grad.size(1), all.size(1)}, grad.options());
  for (size_t i = 0; i < runs.size(); ++i) {
    const PreviousRun& r = runs[i];
    Device::gemm(out, rows(grad, r.dst, r.count).t(), rows(r.from_init ? init : all, r.src, r.count), at::Tensor(),
                 i > 0);
  }
  return out;
}

// Step t's previous states (h_{t-1} for the GRU cell, c_{t-1} for LSTM's) as one
// [batch[t], S] block: a pointer into `all` or `init` when the step's rows come
// from one of them, else (where sequences start mid-batch, reverse ragged only)
// the two parts copied into `scratch` ([B, S], allocated on first use).
template <typename T>
const T* previous_block(const at::Tensor& all, const at::Tensor& init, const StepSchedule& s, int64_t t, bool reverse,
                        at::Tensor& scratch) {
  const PreviousRows p = previous_rows(s, t, reverse);
  const int64_t bs = s.batch[t];
  const int64_t S = all.size(1);
  if (p.carried >= bs) return all.template const_data_ptr<T>() + p.src_offset * S;
  if (p.carried == 0) return init.template const_data_ptr<T>();
  if (!scratch.defined()) scratch = new_buffer(init.sizes(), init.options());
  rows(scratch, 0, p.carried).copy_(rows(all, p.src_offset, p.carried));
  rows(scratch, p.carried, bs - p.carried).copy_(rows(init, p.carried, bs - p.carried));
  return scratch.template const_data_ptr<T>();
}

// The weight and bias gradients of a call of a few tokens (N <= 8 rows, CPU, float / double), with
// plain loops into the output buffers: dW_ih = dgates^T X, dW_hh = dgates_h^T H_prev (H_prev read
// in place, by previous_runs), db_ih / db_hh column sums (GRU: the n columns of dgates scaled by r in
// place first for the hidden side, as the ATen route does). Through ATen these are a few outer
// products and reductions whose dispatch, transposes and allocations cost ~40 K instructions at
// B = 1, H = 64, several times their arithmetic (benchmarks/NOTES.md, entry 24). Returns false (the
// caller takes the ATen route) for anything else, and above ~0.5 M multiply-adds, where MKL's
// threads pay.
inline bool small_weight_grads(BackwardOutputs& g, at::Tensor& dgates, const SavedForBackward& saved,
                               const at::Tensor& h0, const StepSchedule& sched, bool reverse, bool is_gru,
                               int64_t H) {
  constexpr int64_t kMaxRows = 8;
  constexpr int64_t kMaxMultiplyAdds = int64_t(1) << 19;
  const at::Tensor& x = saved.input;
  const at::Tensor& out = saved.output;
  const int64_t N = dgates.size(0), K = dgates.size(1), I = x.size(1), S = out.size(1);
  const auto type = x.scalar_type();
  if (!x.device().is_cpu() || N == 0 || N > kMaxRows || (type != at::kFloat && type != at::kDouble) ||
      N * K * (I + S) > kMaxMultiplyAdds || !x.is_contiguous() || !out.is_contiguous() || !h0.is_contiguous() ||
      !dgates.is_contiguous() || dgates.scalar_type() != type || (is_gru && !saved.gates.is_contiguous())) {
    return false;
  }
  const std::vector<PreviousRun> runs = previous_runs(sched, reverse);
  const auto opts = x.options();
  g.grad_w_ih = new_buffer({K, I}, opts);
  g.grad_w_hh = new_buffer({K, S}, opts);
  g.grad_b_ih = new_buffer({K}, opts);
  g.grad_b_hh = new_buffer({K}, opts);
  // Rows k of the gradients are independent: with threads, split them (1-2 MB of gradients written
  // at H = 256, which one core writes at its own bandwidth), where each thread gets at least
  // kMinMultiplyAddsPerThread; below that the fork costs more than it saves and one thread runs it.
  constexpr int64_t kMinMultiplyAddsPerThread = int64_t(1) << 16;
  const int64_t grain = std::max<int64_t>(1, kMinMultiplyAddsPerThread / std::max<int64_t>(1, N * (I + S)));
  AT_DISPATCH_FLOATING_TYPES(type, "fusedrnn.small_weight_grads", [&] {
    using T = scalar_t;
    const T* d = dgates.template const_data_ptr<T>();
    const T* xp = x.template const_data_ptr<T>();
    const T* gates = is_gru ? saved.gates.template const_data_ptr<T>() : nullptr;
    const T* outp = out.template const_data_ptr<T>();
    const T* h0p = h0.template const_data_ptr<T>();
    T* wih = g.grad_w_ih.template data_ptr<T>();
    T* bih = g.grad_b_ih.template data_ptr<T>();
    T* whh = g.grad_w_hh.template data_ptr<T>();
    T* bhh = g.grad_b_hh.template data_ptr<T>();
    at::parallel_for(0, K, grain, [&](int64_t k_begin, int64_t k_end) {
      for (int64_t k = k_begin; k < k_end; ++k) {
        // The first token's product is written, the others added: no zero fill first (at H = 256 the
        // gradients are 1-2 MB, beyond L2, so a fill is a whole extra pass over memory).
        T* row = wih + k * I;
        const T d0 = d[k];
        for (int64_t i = 0; i < I; ++i) row[i] = d0 * xp[i];
        T sum = d0;
        for (int64_t n = 1; n < N; ++n) {
          const T dk = d[n * K + k];
          const T* xr = xp + n * I;
          sum += dk;
          for (int64_t i = 0; i < I; ++i) row[i] += dk * xr[i];
        }
        bih[k] = sum;
        // The hidden side: GRU's n gate gradient is dn * r (r: the first H columns of gates).
        const bool scaled = is_gru && k >= 2 * H;
        auto hidden_grad = [&](int64_t n) {
          const T dk = d[n * K + k];
          return scaled ? dk * gates[n * 3 * H + (k - 2 * H)] : dk;
        };
        row = whh + k * S;
        bool first = true;  // the first product written, the rest added (as for dW_ih)
        for (const PreviousRun& r : runs) {
          for (int64_t n = 0; n < r.count; ++n) {
            const T dk = hidden_grad(r.dst + n);
            const T* hp = (r.from_init ? h0p : outp) + (r.src + n) * S;
            if (first) {
              for (int64_t j = 0; j < S; ++j) row[j] = dk * hp[j];
              first = false;
            } else {
              for (int64_t j = 0; j < S; ++j) row[j] += dk * hp[j];
            }
          }
        }
        if (first) std::fill(row, row + S, T(0));  // no runs (cannot happen with N > 0; kept exact)
        if (is_gru) {
          T hidden_sum = 0;
          for (int64_t n = 0; n < N; ++n) hidden_sum += hidden_grad(n);
          bhh[k] = hidden_sum;
        } else {
          bhh[k] = sum;
        }
      }
    });
  });
  return true;
}

// A gradient as a contiguous buffer that belongs to this call. The gradients of a small training call
// usually arrive as one value expanded to the whole shape: ones from a `.sum()`, a zero for an unused
// output (eager_autograd.cpp: grad_or_zero). A fill of a fresh buffer replaces the generic copy there
// (Tensor::contiguous / clone: the dispatcher and a TensorIterator, a few K instructions each, as much
// as the arithmetic of a B = 1 step); anything else is copied as before (copy_of_state).
inline at::Tensor owned_gradient(const at::Tensor& t) {
  const auto type = t.scalar_type();
  bool expanded_scalar = t.is_cpu() && t.layout() == at::kStrided && !t.is_neg() && !t.is_conj() && t.numel() > 1 &&
                         (type == at::kFloat || type == at::kDouble);
  for (int64_t d = 0; d < t.dim() && expanded_scalar; ++d) expanded_scalar = t.stride(d) == 0 || t.size(d) == 1;
  if (!expanded_scalar) return copy_of_state(t);
  at::Tensor out = new_buffer(t.sizes(), t.options());
  AT_DISPATCH_FLOATING_TYPES(type, "fusedrnn.owned_gradient", [&] {
    const scalar_t value = *t.template const_data_ptr<scalar_t>();
    scalar_t* o = out.template data_ptr<scalar_t>();
    std::fill(o, o + out.numel(), value);
  });
  return out;
}

// Memory: besides the saved tensors and the gradients it returns, backward
// holds one [N, G*H] buffer, the gate gradients, and a few [B, *] ones.
//  - RNN: when grad_output arrives non-contiguous, the copy made here is ours,
//    and each element's gate gradient goes where its grad_output was.
//  - GRU: the hidden-side gate gradients (the n gate times r) live one step at
//    a time in a [B, 3H] buffer; for dW_hh, dgates' n columns are scaled by r in
//    place once dX, dW_ih and db_ih are done.
//  - The previous states (h_{t-1}, LSTM's c_{t-1}) are read where forward left
//    them (output / cells, h0 / c0), never gathered into an [N, H] copy.
//  - dX reuses the dgates buffer when input_size == G * H (not GRU).
template <typename Cell, typename Device>
BackwardOutputs layer_backward(const at::Tensor& grad_output_in, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                               const SavedForBackward& saved, const LayerWeights& w, const StepSchedule& sched,
                               bool reverse, bool need_grad_input, bool need_grad_h0 = true) {
  if constexpr (widens_half_types<Device>::value) {  // the half types in float32 (layer_forward.h)
    if (Device::widens(saved.input.scalar_type())) {
      return Device::backward_widened(grad_output_in, grad_h_n, grad_c_n, saved, w, sched, reverse, need_grad_input,
                                      need_grad_h0, [](auto&&... a) { return layer_backward<Cell, Device>(a...); });
    }
  }
  constexpr int64_t G = Cell::kGates;
  const int64_t N = saved.input.size(0);
  const int64_t B = saved.h0.size(0);
  const int64_t P = saved.h0.size(1);
  const int64_t H = w.w_hh.size(0) / G;
  const bool is_lstm = saved.c0.defined();
  const bool is_gru = G == 3;
  const bool has_proj = w.w_hr.defined();
  const auto opts = saved.input.options();

  BackwardOutputs g;
  // A non-contiguous grad_output (the expanded gradient of a sum, say) is copied
  // here, and that copy belongs to this call.
  const bool own_grad_output = !grad_output_in.is_contiguous();
  const at::Tensor grad_output = own_grad_output ? owned_gradient(grad_output_in) : grad_output_in;
  // RNN without projection: the gate gradient of element k needs only element k
  // of grad_output, so it may take grad_output's place when the buffer is ours.
  at::Tensor dgates = (G == 1 && !has_proj && own_grad_output) ? grad_output : new_buffer({N, G * H}, opts);
  // GRU's hidden-side gate gradients of the current step only (see above).
  at::Tensor dgates_h = is_gru ? new_buffer({B, G * H}, opts) : dgates;
  const at::Tensor h0 = saved.h0.contiguous();
  const at::Tensor c0 = is_lstm ? saved.c0.contiguous() : at::Tensor();
  at::Tensor prev_scratch;  // [B, H], for steps whose previous states come from two places
  at::Tensor dh_state = owned_gradient(grad_h_n);
  at::Tensor dc_state = is_lstm ? owned_gradient(grad_c_n) : at::Tensor();
  // With projection: dh of every token (for dW_hr), dr of this step, r of every token.
  at::Tensor dh_all = has_proj ? new_buffer({N, P}, opts) : at::Tensor();
  at::Tensor dr = has_proj ? new_buffer({B, H}, opts) : at::Tensor();
  at::Tensor r_all = has_proj ? new_buffer({N, H}, opts) : at::Tensor();

  // A device with a sequence engine (the CPU's) may run the whole loop below
  // itself, with the same cell math; the weight gradients after it are shared.
  // An engine that takes need_grad_h0 skips the first step's dh_{t-1} product when it is false; the
  // others (the persistent CUDA backward) compute it, and it is dropped below.
  bool engine_done = false;
  if constexpr (has_sequence_engine<Device>::value) {
    if (!has_proj) {
      if constexpr (requires {
                      Device::template backward_sequence<Cell>(grad_output, saved, w, sched, reverse, h0, c0,
                                                               dh_state, dc_state, dgates, dgates_h, need_grad_h0);
                    }) {
        engine_done = Device::template backward_sequence<Cell>(grad_output, saved, w, sched, reverse, h0, c0, dh_state,
                                                               dc_state, dgates, dgates_h, need_grad_h0);
      } else {
        engine_done = Device::template backward_sequence<Cell>(grad_output, saved, w, sched, reverse, h0, c0, dh_state,
                                                               dc_state, dgates, dgates_h);
      }
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.input.scalar_type(), "fusedrnn.layer_backward", [&] {
    using T = scalar_t;
    for (int64_t k = 0; !engine_done && k < sched.steps(); ++k) {
      const int64_t t = reverse ? k : sched.steps() - 1 - k;
      const int64_t bs = sched.batch[t];
      const int64_t off = sched.offset[t];
      BackwardStepParams<T> p;
      p.batch = bs;
      p.hidden = H;
      p.gates = saved.gates.defined() ? saved.gates.template const_data_ptr<T>() + off * G * H : nullptr;
      if (has_proj) {
        at::Tensor dh_t = rows(dh_all, off, bs);
        at::add_out(dh_t, rows(dh_state, 0, bs), rows(grad_output, off, bs));
        at::Tensor dr_t = rows(dr, 0, bs);
        Device::gemm(dr_t, dh_t, w.w_hr, at::Tensor(), false);
        p.grad_out = dr.template const_data_ptr<T>();
        p.grad_h_state = nullptr;
        p.r_out = r_all.template data_ptr<T>() + off * H;
      } else {
        p.grad_out = grad_output.template const_data_ptr<T>() + off * P;
        p.grad_h_state = dh_state.template data_ptr<T>();
      }
      if (is_lstm) {
        p.grad_c_state = dc_state.template data_ptr<T>();
        p.cells = saved.cells.template const_data_ptr<T>() + off * H;
        p.c_prev = previous_block<T>(saved.cells, c0, sched, t, reverse, prev_scratch);
      }
      if (is_gru) {
        p.h_prev = previous_block<T>(saved.output, h0, sched, t, reverse, prev_scratch);
        p.hn = saved.hn.template const_data_ptr<T>() + off * H;
        p.grad_gates_h = dgates_h.template data_ptr<T>();
      }
      p.out = saved.output.template const_data_ptr<T>() + off * P;
      p.grad_gates = dgates.template data_ptr<T>() + off * G * H;
      Device::template backward<Cell, T>(p);

      // dh_{t-1} = dgates_h W_hh; GRU adds it to the direct z * dh path its cell wrote. At the last
      // step processed here (the first of the sequence) it is dh0 alone (every row's previous state
      // is h0's), so without need_grad_h0 nothing reads it.
      if (k == sched.steps() - 1 && !need_grad_h0) continue;
      at::Tensor dh_prev = rows(dh_state, 0, bs);
      Device::template matmul<T>(dh_prev, rows(dgates_h, is_gru ? 0 : off, bs), w.w_hh, at::Tensor(), is_gru);
    }
  });
  prev_scratch = at::Tensor();

  // dX = dgates W_ih takes dgates' own buffer when the two have the same shape
  // (input_size == G * H: an RNN layer over another's output, say), computed last.
  // GRU's dgates is rescaled for dW_hh below, so it keeps its own dX buffer.
  const bool grad_input_in_place = need_grad_input && !is_gru && w.w_ih.size(1) == G * H;
  if (need_grad_input && !grad_input_in_place) g.grad_input = device_mm<Device>(dgates, w.w_ih);
  if (!small_weight_grads(g, dgates, saved, h0, sched, reverse, is_gru, H)) {
    g.grad_w_ih = device_mm<Device>(dgates.t(), saved.input);
    g.grad_b_ih = dgates.sum(0);
    if (is_gru) {
      // The hidden side differs from the input side only in the n gate: dn * r.
      // dgates' input-side job is done, so scale its n columns in place.
      dgates.narrow(1, 2 * H, H).mul_(saved.gates.narrow(1, 0, H));
      g.grad_b_hh = dgates.sum(0);
    } else {
      g.grad_b_hh = g.grad_b_ih.clone();
    }
    g.grad_w_hh = grad_times_previous<Device>(dgates, saved.output, h0, sched, reverse);
  }
  if (grad_input_in_place) {
    // Row blocks of about 1 MB in float32 through a small buffer, each copied
    // back over the dgates rows it was computed from.
    const int64_t I = w.w_ih.size(1);
    const int64_t block = std::min<int64_t>(N, std::max<int64_t>(64, (int64_t(1) << 18) / std::max<int64_t>(1, I)));
    at::Tensor tmp = at::empty({block, I}, opts);
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      at::Tensor t = rows(tmp, 0, n);
      at::Tensor d = rows(dgates, r0, n);
      Device::gemm(t, d, w.w_ih, at::Tensor(), false);
      d.copy_(t);
    }
    g.grad_input = dgates;
  } else if (!need_grad_input) {
    g.grad_input = at::empty({0}, opts);
  }
  g.grad_w_hr = has_proj ? device_mm<Device>(dh_all.t(), r_all) : at::empty({0}, opts);
  g.grad_h0 = need_grad_h0 ? dh_state : at::empty({0}, opts);
  g.grad_c0 = is_lstm ? dc_state : at::empty({0}, opts);
  return g;
}

}  // namespace fusedrnn
