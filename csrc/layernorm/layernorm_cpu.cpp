// Layer-normalised LSTM and GRU layers with zoneout: schemas and the CPU kernels.
//
// Equations, parameter names and epsilon: fusedrnn/reference.py ("layer-normalised LSTM / GRU").
// Per layer and direction, as the plain ops (csrc/ops.cpp): packed time-major input [N, I] with
// batch_sizes [T]; `reverse` runs the sequence backwards.
//
// Forward: the input projection of every step is one GEMM (W_ih x, no bias: the bias comes after
// the normalisation), normalised row by row in one parallel pass before the time loop (it does not
// depend on the recurrence). Per step: one GEMM W_hh h (ATen's CPU BLAS) into the step's rows of
// norm_h, then ONE fused pass per row: the row's LN statistics of W_hh h, the gates, the cell, the
// LN of c (LSTM) and zoneout, everything in registers / L1 (the row is 4H values).
// Saved for backward (outputs after the main ones): the normalised projections norm_x, norm_h
// [N, G], the activated gates [N, G], the LSTM's state c_t [N, H] and normalised c' [N, H], and the
// inverse standard deviations rstd [N, 3] (x, h, c; GRU [N, 2]) in float32 (float64 for float64).
//
// Backward: reverse time, per step one fused pass per row (zoneout, the LN of c, the cell, the two
// gate LNs' backward) then one GEMM dh += d(W_hh h) W_hh; after the loop the weight gradients are
// single large GEMMs over all steps and the gain / bias gradients column sums.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#include "../cells/cell_common.h"
#include "../cpu/cpu_blas.h"
#include "../layer/checks.h"

namespace fusedrnn {
namespace layernorm {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorise the row reductions

// Sum of f(k) for k in [0, n) in `kLanes` interleaved partial sums (a single accumulator would be a
// serial chain of adds that -O3 may not reorder).
template <typename A, typename F>
inline A row_sum(int64_t n, F f) {
  A acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += f(k + l);
  }
  A s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; k < n; ++k) s += f(k);
  return s;
}

// Normalises v[0..n) in place (to (v - mean) * rstd, stored as S) and returns rstd.
template <typename S, typename A>
inline A normalize_row(S* v, int64_t n, A eps) {
  const A mean = row_sum<A>(n, [&](int64_t k) { return A(v[k]); }) / A(n);
  const A var = row_sum<A>(n, [&](int64_t k) {
                  const A d = A(v[k]) - mean;
                  return d * d;
                }) / A(n);
  const A rstd = A(1) / std::sqrt(var + eps);
  for (int64_t k = 0; k < n; ++k) v[k] = S((A(v[k]) - mean) * rstd);
  return rstd;
}

// Same, from an A buffer into an S output, keeping the normalised values in `out_acc` too.
template <typename S, typename A>
inline A normalize_into(const A* v, int64_t n, A eps, S* out, A* out_acc) {
  const A mean = row_sum<A>(n, [&](int64_t k) { return v[k]; }) / A(n);
  const A var = row_sum<A>(n, [&](int64_t k) {
                  const A d = v[k] - mean;
                  return d * d;
                }) / A(n);
  const A rstd = A(1) / std::sqrt(var + eps);
  for (int64_t k = 0; k < n; ++k) {
    out_acc[k] = (v[k] - mean) * rstd;
    out[k] = S(out_acc[k]);
  }
  return rstd;
}

// LN backward of one row: given dn = d(normalised) (already multiplied by the gain) and the
// normalised values xhat, d(pre-LN) = rstd * (dn - mean(dn) - xhat * mean(dn * xhat)).
template <typename S, typename A>
inline void layer_norm_backward_row(const A* dn, const S* xhat, A rstd, int64_t n, S* out) {
  const A m1 = row_sum<A>(n, [&](int64_t k) { return dn[k]; }) / A(n);
  const A m2 = row_sum<A>(n, [&](int64_t k) { return dn[k] * A(xhat[k]); }) / A(n);
  for (int64_t k = 0; k < n; ++k) out[k] = S(rstd * (dn[k] - m1 - A(xhat[k]) * m2));
}

template <typename S>
inline const S* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<S>() : nullptr;
}

inline at::Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Row-major C[m, n] (=, or += when accumulate) A[m, k] B[k, n], every matrix contiguous: the direct
// BLAS call of the plain layers (cpu/cpu_blas.h: MKL's sgemm_/dgemm_, without ATen's dispatch and
// copies, one thread below ~1M multiply-adds) for float32/64, at::mm otherwise (half types, or a
// torch without those symbols). ATen's cpublas::gemm would serve every dtype but is not exported
// from libtorch_cpu (only brgemm is).
template <typename S>
inline void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor c, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    if (blas_matmul<S>(m, n, k, a.const_data_ptr<S>(), k, b.const_data_ptr<S>(), n, nullptr, accumulate,
                       c.data_ptr<S>(), n)) {
      return;
    }
  }
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// Rows per parallel_for chunk: a step of a few rows runs on one thread (a fork costs ~1-2 us).
constexpr int64_t kRowGrain = 4;

// ---- argument checks -------------------------------------------------------------------------

struct Shapes {
  int64_t N, B, H, G, I;
};

inline Shapes check_common(const char* op, int64_t gates, const at::Tensor& input, const at::Tensor& h0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                           const OptTensor& b_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                           const OptTensor& zoneout_h) {
  check_floating(op, "input", input);
  FUSEDRNN_CHECK(input.device().is_cpu(), op, "input must be a CPU tensor (no CUDA kernel yet), got ",
                 input.device());
  FUSEDRNN_CHECK(input.dim() == 2, op, "input must be 2-D [tokens, input_size] (packed, time-major), got shape ",
                 input.sizes());
  check_like(op, "h0", h0, input);
  FUSEDRNN_CHECK(h0.dim() == 2, op, "h0 must be 2-D [batch, hidden], got shape ", h0.sizes());
  check_like(op, "w_ih", w_ih, input);
  check_like(op, "w_hh", w_hh, input);
  FUSEDRNN_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1) && w_hh.size(1) > 0, op, "w_hh must be 2-D [",
                 gates, " * hidden_size, hidden_size], got shape ", w_hh.sizes());
  Shapes s{input.size(0), h0.size(0), w_hh.size(1), w_hh.size(0), input.size(1)};
  check_shape(op, "w_ih", w_ih, {s.G, s.I}, "[gates * hidden_size, input_size]");
  check_shape(op, "h0", h0, {s.B, s.H}, "[batch, hidden_size]");
  check_optional(op, "b_ih", b_ih, input, {s.G}, "[gates * hidden_size]");
  check_optional(op, "b_hh", b_hh, input, {s.G}, "[gates * hidden_size]");
  check_like(op, "ln_ih_w", ln_ih_w, input);
  check_shape(op, "ln_ih_w", ln_ih_w, {s.G}, "[gates * hidden_size]");
  check_like(op, "ln_hh_w", ln_hh_w, input);
  check_shape(op, "ln_hh_w", ln_hh_w, {s.G}, "[gates * hidden_size]");
  check_optional(op, "zoneout_h", zoneout_h, input, {s.N, s.H}, "[tokens, hidden_size]");
  return s;
}

// ---- LSTM ------------------------------------------------------------------------------------

template <typename S>
void ln_lstm_forward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, double eps_d,
                          const at::Tensor& w_hh_t, const at::Tensor& b_ih, const at::Tensor& b_hh,
                          const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const at::Tensor& ln_c_w,
                          const at::Tensor& ln_c_b, const at::Tensor& zh_t, const at::Tensor& zc_t,
                          at::Tensor& h_state, at::Tensor& c_state, at::Tensor& output, at::Tensor& norm_x,
                          at::Tensor& norm_h, at::Tensor& gates, at::Tensor& cells, at::Tensor& norm_c,
                          at::Tensor& rstd) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const A eps = A(eps_d);
  S* nx = norm_x.data_ptr<S>();
  S* nh = norm_h.data_ptr<S>();
  S* gt = gates.data_ptr<S>();
  S* out = output.data_ptr<S>();
  S* cl = cells.data_ptr<S>();
  S* nc = norm_c.data_ptr<S>();
  A* rs = rstd.data_ptr<A>();
  S* hs = h_state.data_ptr<S>();
  S* cs = c_state.data_ptr<S>();
  const S *bih = ptr_or_null<S>(b_ih), *bhh = ptr_or_null<S>(b_hh);
  const S *gx = ln_ih_w.const_data_ptr<S>(), *gh = ln_hh_w.const_data_ptr<S>();
  const S *gc = ln_c_w.const_data_ptr<S>(), *bc = ptr_or_null<S>(ln_c_b);
  const S *zh = ptr_or_null<S>(zh_t), *zc = ptr_or_null<S>(zc_t);

  // LN of the input projection, all rows at once (off the recurrence's critical path).
  at::parallel_for(0, s.N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) rs[p * 3] = normalize_row<S, A>(nx + p * G, G, eps);
  });
  const int64_t T = sched.steps();
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? T - 1 - i : i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    matmul<S>(h_state.narrow(0, 0, bs), w_hh_t, norm_h.narrow(0, off, bs), false);
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<A> buf(2 * H);
      A* c_new = buf.data();
      A* c_hat = c_new + H;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        S* xr = nx + p * G;
        S* hr = nh + p * G;
        rs[p * 3 + 1] = normalize_row<S, A>(hr, G, eps);
        S* g = gt + p * G;
        for (int64_t k = 0; k < H; ++k) {
          A a[4];
          for (int q = 0; q < 4; ++q) {
            const int64_t c = q * H + k;
            A v = A(xr[c]) * A(gx[c]) + A(hr[c]) * A(gh[c]);
            if (bih) v += A(bih[c]);
            if (bhh) v += A(bhh[c]);
            a[q] = v;
          }
          const A ig = sigmoid_(a[0]), fg = sigmoid_(a[1]), gg = tanh_(a[2]), og = sigmoid_(a[3]);
          g[k] = S(ig);
          g[H + k] = S(fg);
          g[2 * H + k] = S(gg);
          g[3 * H + k] = S(og);
          c_new[k] = fg * A(cs[j * H + k]) + ig * gg;
        }
        rs[p * 3 + 2] = normalize_into<S, A>(c_new, H, eps, nc + p * H, c_hat);
        for (int64_t k = 0; k < H; ++k) {
          const A y = c_hat[k] * A(gc[k]) + (bc ? A(bc[k]) : A(0));
          const A h_new = A(g[3 * H + k]) * tanh_(y);
          const A h_prev = A(hs[j * H + k]), c_prev = A(cs[j * H + k]);
          const A h_next = zh ? A(zh[p * H + k]) * h_prev + (A(1) - A(zh[p * H + k])) * h_new : h_new;
          const A c_next = zc ? A(zc[p * H + k]) * c_prev + (A(1) - A(zc[p * H + k])) * c_new[k] : c_new[k];
          out[p * H + k] = S(h_next);
          cl[p * H + k] = S(c_next);
          hs[j * H + k] = S(h_next);
          cs[j * H + k] = S(c_next);
        }
      }
    });
  }
}

// prev[row of step t] = the state that row entered step t with: the previous step's (in the
// direction's order) row if that step had it, else the initial state.
inline at::Tensor previous_states(const StepSchedule& sched, bool reverse, const at::Tensor& states,
                                  const at::Tensor& initial) {
  at::Tensor prev = at::empty_like(states);
  const int64_t T = sched.steps();
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? T - 1 - i : i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    int64_t from_prev = 0;
    if (i > 0) {
      const int64_t tp = reverse ? t + 1 : t - 1;
      from_prev = std::min(bs, sched.batch[tp]);
      prev.narrow(0, off, from_prev).copy_(states.narrow(0, sched.offset[tp], from_prev));
    }
    if (bs > from_prev) prev.narrow(0, off + from_prev, bs - from_prev).copy_(initial.narrow(0, from_prev, bs - from_prev));
  }
  return prev;
}

template <typename S>
void ln_lstm_backward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, const at::Tensor& grad_output,
                           const at::Tensor& w_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                           const at::Tensor& ln_c_w, const at::Tensor& ln_c_b, const at::Tensor& zh_t,
                           const at::Tensor& zc_t, const at::Tensor& cprev, const at::Tensor& norm_x,
                           const at::Tensor& norm_h, const at::Tensor& gates, const at::Tensor& norm_c,
                           const at::Tensor& rstd, at::Tensor& dh_state, at::Tensor& dc_state, at::Tensor& dgates,
                           at::Tensor& dxp, at::Tensor& dhp, at::Tensor& dy) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const S* go = grad_output.const_data_ptr<S>();
  const S *gx = ln_ih_w.const_data_ptr<S>(), *gh = ln_hh_w.const_data_ptr<S>();
  const S *gc = ln_c_w.const_data_ptr<S>(), *bc = ptr_or_null<S>(ln_c_b);
  const S *zh = ptr_or_null<S>(zh_t), *zc = ptr_or_null<S>(zc_t);
  const S* cp = cprev.const_data_ptr<S>();
  const S *nx = norm_x.const_data_ptr<S>(), *nh = norm_h.const_data_ptr<S>();
  const S *gt = gates.const_data_ptr<S>(), *nc = norm_c.const_data_ptr<S>();
  const A* rs = rstd.const_data_ptr<A>();
  S *dhs = dh_state.data_ptr<S>(), *dcs = dc_state.data_ptr<S>();
  S *dg = dgates.data_ptr<S>(), *dx = dxp.data_ptr<S>(), *dhh = dhp.data_ptr<S>(), *dys = dy.data_ptr<S>();
  const int64_t T = sched.steps();
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? i : T - 1 - i;  // the forward's order, backwards
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<A> buf(3 * H + 2 * G);
      A* dh_new = buf.data();
      A* dc_hat = dh_new + H;
      A* dc_new = dc_hat + H;
      A* dn = dc_new + H;      // d(gate pre-activations) [G]
      A* scaled = dn + G;      // dn times one LN's gain [G]
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const S* g = gt + p * G;
        const S* ch = nc + p * H;
        // Zoneout, then h' = o tanh(y), y = LN(c') gain + bias.
        for (int64_t k = 0; k < H; ++k) {
          const A dh = A(dhs[j * H + k]) + A(go[p * H + k]);
          const A dc = A(dcs[j * H + k]);
          const A kh = zh ? A(zh[p * H + k]) : A(0), kc = zc ? A(zc[p * H + k]) : A(0);
          dh_new[k] = (A(1) - kh) * dh;
          dc_new[k] = (A(1) - kc) * dc;
          dhs[j * H + k] = S(kh * dh);  // the GEMM below adds the recurrent part
          dcs[j * H + k] = S(kc * dc);  // the cell's f * dc' is added below
          const A y = A(ch[k]) * A(gc[k]) + (bc ? A(bc[k]) : A(0));
          const A ty = tanh_(y);
          const A o = A(g[3 * H + k]);
          const A dyk = dh_new[k] * o * (A(1) - ty * ty);
          dys[p * H + k] = S(dyk);
          dc_hat[k] = dyk * A(gc[k]);
          dn[3 * H + k] = dh_new[k] * ty * o * (A(1) - o);  // d(pre-activation of o)
        }
        {
          const A r = rs[p * 3 + 2];
          const A m1 = row_sum<A>(H, [&](int64_t k) { return dc_hat[k]; }) / A(H);
          const A m2 = row_sum<A>(H, [&](int64_t k) { return dc_hat[k] * A(ch[k]); }) / A(H);
          for (int64_t k = 0; k < H; ++k) dc_new[k] += r * (dc_hat[k] - m1 - A(ch[k]) * m2);
        }
        // c' = f c + i g.
        for (int64_t k = 0; k < H; ++k) {
          const A ig = A(g[k]), fg = A(g[H + k]), gg = A(g[2 * H + k]);
          const A d = dc_new[k];
          dn[k] = d * gg * ig * (A(1) - ig);
          dn[H + k] = d * A(cp[p * H + k]) * fg * (A(1) - fg);
          dn[2 * H + k] = d * ig * (A(1) - gg * gg);
          dcs[j * H + k] = S(A(dcs[j * H + k]) + d * fg);
        }
        // The gate vector a = LN(W_ih x) gx + b_ih + LN(W_hh h) gh + b_hh: da is each bias's gradient;
        // the two LNs' backward give d(W_ih x) and d(W_hh h).
        S* dgr = dg + p * G;
        for (int64_t c = 0; c < G; ++c) dgr[c] = S(dn[c]);
        for (int64_t c = 0; c < G; ++c) scaled[c] = dn[c] * A(gx[c]);
        layer_norm_backward_row<S, A>(scaled, nx + p * G, rs[p * 3], G, dx + p * G);
        for (int64_t c = 0; c < G; ++c) scaled[c] = dn[c] * A(gh[c]);
        layer_norm_backward_row<S, A>(scaled, nh + p * G, rs[p * 3 + 1], G, dhh + p * G);
      }
    });
    matmul<S>(dhp.narrow(0, off, bs), w_hh, dh_state.narrow(0, 0, bs), true);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ln_lstm_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& ln_ih_w,
                const at::Tensor& ln_hh_w, const at::Tensor& ln_c_w, const OptTensor& ln_c_b,
                const OptTensor& zoneout_h, const OptTensor& zoneout_c, const at::Tensor& batch_sizes, bool reverse,
                double eps) {
  const char* op = "ln_lstm_forward";
  const Shapes s = check_common(op, 4, input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h);
  check_like(op, "c0", c0, input);
  check_shape(op, "c0", c0, {s.B, s.H}, "[batch, hidden_size]");
  check_like(op, "ln_c_w", ln_c_w, input);
  check_shape(op, "ln_c_w", ln_c_w, {s.H}, "[hidden_size]");
  check_optional(op, "ln_c_b", ln_c_b, input, {s.H}, "[hidden_size]");
  check_optional(op, "zoneout_c", zoneout_c, input, {s.N, s.H}, "[tokens, hidden_size]");
  FUSEDRNN_CHECK(eps > 0, op, "eps must be positive, got ", eps);
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  at::Tensor norm_x = at::mm(input, w_ih.t()).contiguous();
  at::Tensor norm_h = at::empty({s.N, s.G}, opts), gates = at::empty({s.N, s.G}, opts);
  at::Tensor output = at::empty({s.N, s.H}, opts), cells = at::empty({s.N, s.H}, opts);
  at::Tensor norm_c = at::empty({s.N, s.H}, opts);
  at::Tensor rstd = at::empty({s.N, 3}, opts.dtype(at::toOpMathType(input.scalar_type())));
  at::Tensor h_state = h0.contiguous().clone(), c_state = c0.contiguous().clone();
  const at::Tensor w_hh_t = w_hh.t().contiguous();  // [H, G]: the step GEMM's right operand
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_lstm_forward", [&] {
    ln_lstm_forward_impl<scalar_t>(s, sched, reverse, eps, w_hh_t, contiguous_or_undefined(b_ih),
                                   contiguous_or_undefined(b_hh), ln_ih_w.contiguous(), ln_hh_w.contiguous(),
                                   ln_c_w.contiguous(), contiguous_or_undefined(ln_c_b),
                                   contiguous_or_undefined(zoneout_h), contiguous_or_undefined(zoneout_c), h_state,
                                   c_state, output, norm_x, norm_h, gates, cells, norm_c, rstd);
  });
  return {output, h_state, c_state, norm_x, norm_h, gates, cells, norm_c, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
ln_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                 const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                 const at::Tensor& w_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                 const at::Tensor& ln_c_w, const OptTensor& ln_c_b, const OptTensor& zoneout_h,
                 const OptTensor& zoneout_c, const at::Tensor& batch_sizes, bool reverse, bool need_grad_input,
                 const at::Tensor& output, const at::Tensor& norm_x, const at::Tensor& norm_h, const at::Tensor& gates,
                 const at::Tensor& cells, const at::Tensor& norm_c, const at::Tensor& rstd) {
  const char* op = "ln_lstm_backward";
  const Shapes s = check_common(op, 4, input, h0, w_ih, w_hh, std::nullopt, std::nullopt, ln_ih_w, ln_hh_w, zoneout_h);
  check_shape(op, "c0", c0, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "grad_output", grad_output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "grad_c_n", grad_c_n, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "output", output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "cells", cells, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "norm_c", norm_c, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "norm_x", norm_x, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "norm_h", norm_h, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "gates", gates, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "rstd", rstd, {s.N, 3}, "[tokens, 3]");
  check_shape(op, "ln_c_w", ln_c_w, {s.H}, "[hidden_size]");
  check_optional(op, "ln_c_b", ln_c_b, input, {s.H}, "[hidden_size]");
  check_optional(op, "zoneout_c", zoneout_c, input, {s.N, s.H}, "[tokens, hidden_size]");
  for (const at::Tensor* t : {&grad_output, &grad_h_n, &grad_c_n, &c0, &output, &norm_x, &norm_h, &gates, &cells,
                              &norm_c}) {
    FUSEDRNN_CHECK(t->scalar_type() == input.scalar_type(), op, "every tensor must have the dtype of input (",
                   input.scalar_type(), "), got ", t->scalar_type());
  }
  FUSEDRNN_CHECK(rstd.scalar_type() == at::toOpMathType(input.scalar_type()), op, "rstd must be ",
                 at::toOpMathType(input.scalar_type()), ", got ", rstd.scalar_type());
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  const at::Tensor out_c = output.contiguous(), cells_c = cells.contiguous();
  const at::Tensor hprev = previous_states(sched, reverse, out_c, h0.contiguous());
  const at::Tensor cprev = previous_states(sched, reverse, cells_c, c0.contiguous());
  at::Tensor dh_state = grad_h_n.contiguous().clone(), dc_state = grad_c_n.contiguous().clone();
  at::Tensor dgates = at::empty({s.N, s.G}, opts), dxp = at::empty({s.N, s.G}, opts);
  at::Tensor dhp = at::empty({s.N, s.G}, opts), dy = at::empty({s.N, s.H}, opts);
  const at::Tensor nx = norm_x.contiguous(), nh = norm_h.contiguous(), nc = norm_c.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_lstm_backward", [&] {
    ln_lstm_backward_impl<scalar_t>(s, sched, reverse, grad_output.contiguous(), w_hh.contiguous(),
                                    ln_ih_w.contiguous(), ln_hh_w.contiguous(), ln_c_w.contiguous(),
                                    contiguous_or_undefined(ln_c_b), contiguous_or_undefined(zoneout_h),
                                    contiguous_or_undefined(zoneout_c), cprev, nx, nh, gates.contiguous(), nc,
                                    rstd.contiguous(), dh_state, dc_state, dgates, dxp, dhp, dy);
  });
  at::Tensor grad_input = need_grad_input ? at::mm(dxp, w_ih) : at::empty({0}, opts);
  at::Tensor grad_w_ih = at::mm(dxp.t(), input);
  at::Tensor grad_w_hh = at::mm(dhp.t(), hprev);
  at::Tensor grad_b = dgates.sum(0);
  at::Tensor grad_ln_ih_w = (dgates * nx).sum(0), grad_ln_hh_w = (dgates * nh).sum(0);
  at::Tensor grad_ln_c_b = dy.sum(0), grad_ln_c_w = (dy * nc).sum(0);
  return {grad_input, dh_state, dc_state, grad_w_ih, grad_w_hh, grad_b, grad_b.clone(), grad_ln_ih_w, grad_ln_hh_w,
          grad_ln_c_w, grad_ln_c_b};
}

// ---- GRU -------------------------------------------------------------------------------------

template <typename S>
void ln_gru_forward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, double eps_d,
                         const at::Tensor& w_hh_t, const at::Tensor& b_ih, const at::Tensor& b_hh,
                         const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const at::Tensor& zh_t,
                         at::Tensor& h_state, at::Tensor& output, at::Tensor& norm_x, at::Tensor& norm_h,
                         at::Tensor& gates, at::Tensor& rstd) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const A eps = A(eps_d);
  S *nx = norm_x.data_ptr<S>(), *nh = norm_h.data_ptr<S>(), *gt = gates.data_ptr<S>(), *out = output.data_ptr<S>();
  A* rs = rstd.data_ptr<A>();
  S* hs = h_state.data_ptr<S>();
  const S *bih = ptr_or_null<S>(b_ih), *bhh = ptr_or_null<S>(b_hh);
  const S *gx = ln_ih_w.const_data_ptr<S>(), *gh = ln_hh_w.const_data_ptr<S>();
  const S* zh = ptr_or_null<S>(zh_t);
  at::parallel_for(0, s.N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) rs[p * 2] = normalize_row<S, A>(nx + p * G, G, eps);
  });
  const int64_t T = sched.steps();
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? T - 1 - i : i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    matmul<S>(h_state.narrow(0, 0, bs), w_hh_t, norm_h.narrow(0, off, bs), false);
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const S* xr = nx + p * G;
        S* hr = nh + p * G;
        rs[p * 2 + 1] = normalize_row<S, A>(hr, G, eps);
        S* g = gt + p * G;
        for (int64_t k = 0; k < H; ++k) {
          A ax[3], ah[3];
          for (int q = 0; q < 3; ++q) {
            const int64_t c = q * H + k;
            ax[q] = A(xr[c]) * A(gx[c]) + (bih ? A(bih[c]) : A(0));
            ah[q] = A(hr[c]) * A(gh[c]) + (bhh ? A(bhh[c]) : A(0));
          }
          const A r = sigmoid_(ax[0] + ah[0]), z = sigmoid_(ax[1] + ah[1]);
          const A n = tanh_(ax[2] + r * ah[2]);
          const A h_prev = A(hs[j * H + k]);
          const A h_new = (A(1) - z) * n + z * h_prev;
          const A h_next = zh ? A(zh[p * H + k]) * h_prev + (A(1) - A(zh[p * H + k])) * h_new : h_new;
          g[k] = S(r);
          g[H + k] = S(z);
          g[2 * H + k] = S(n);
          out[p * H + k] = S(h_next);
          hs[j * H + k] = S(h_next);
        }
      }
    });
  }
}

template <typename S>
void ln_gru_backward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, const at::Tensor& grad_output,
                          const at::Tensor& w_hh, const at::Tensor& b_hh, const at::Tensor& ln_ih_w,
                          const at::Tensor& ln_hh_w, const at::Tensor& zh_t, const at::Tensor& hprev,
                          const at::Tensor& norm_x, const at::Tensor& norm_h, const at::Tensor& gates,
                          const at::Tensor& rstd, at::Tensor& dh_state, at::Tensor& dgx, at::Tensor& dgh,
                          at::Tensor& dxp, at::Tensor& dhp) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const S* go = grad_output.const_data_ptr<S>();
  const S* bhh = ptr_or_null<S>(b_hh);
  const S *gx = ln_ih_w.const_data_ptr<S>(), *gh = ln_hh_w.const_data_ptr<S>();
  const S* zh = ptr_or_null<S>(zh_t);
  const S* hp = hprev.const_data_ptr<S>();
  const S *nx = norm_x.const_data_ptr<S>(), *nh = norm_h.const_data_ptr<S>(), *gt = gates.const_data_ptr<S>();
  const A* rs = rstd.const_data_ptr<A>();
  S* dhs = dh_state.data_ptr<S>();
  S *dgxp = dgx.data_ptr<S>(), *dghp = dgh.data_ptr<S>(), *dx = dxp.data_ptr<S>(), *dhh = dhp.data_ptr<S>();
  const int64_t T = sched.steps();
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? i : T - 1 - i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<A> dax(G), dah(G);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const S* g = gt + p * G;
        const S* hr = nh + p * G;
        for (int64_t k = 0; k < H; ++k) {
          const A dh = A(dhs[j * H + k]) + A(go[p * H + k]);
          const A kh = zh ? A(zh[p * H + k]) : A(0);
          const A dh_new = (A(1) - kh) * dh;
          const A r = A(g[k]), z = A(g[H + k]), n = A(g[2 * H + k]);
          const int64_t cn = 2 * H + k;
          const A ahn = A(hr[cn]) * A(gh[cn]) + (bhh ? A(bhh[cn]) : A(0));
          const A dan = dh_new * (A(1) - z) * (A(1) - n * n);
          const A daz = dh_new * (A(hp[p * H + k]) - n) * z * (A(1) - z);
          const A dar = dan * ahn * r * (A(1) - r);
          dhs[j * H + k] = S(kh * dh + dh_new * z);  // the GEMM below adds the recurrent part
          dax[k] = dar;
          dax[H + k] = daz;
          dax[cn] = dan;
          dah[k] = dar;
          dah[H + k] = daz;
          dah[cn] = dan * r;
        }
        for (int64_t c = 0; c < G; ++c) {
          dgxp[p * G + c] = S(dax[c]);
          dghp[p * G + c] = S(dah[c]);
          dax[c] *= A(gx[c]);
          dah[c] *= A(gh[c]);
        }
        layer_norm_backward_row<S, A>(dax.data(), nx + p * G, rs[p * 2], G, dx + p * G);
        layer_norm_backward_row<S, A>(dah.data(), hr, rs[p * 2 + 1], G, dhh + p * G);
      }
    });
    matmul<S>(dhp.narrow(0, off, bs), w_hh, dh_state.narrow(0, 0, bs), true);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ln_gru_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
               const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
               const OptTensor& zoneout_h, const at::Tensor& batch_sizes, bool reverse, double eps) {
  const char* op = "ln_gru_forward";
  const Shapes s = check_common(op, 3, input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h);
  FUSEDRNN_CHECK(eps > 0, op, "eps must be positive, got ", eps);
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  at::Tensor norm_x = at::mm(input, w_ih.t()).contiguous();
  at::Tensor norm_h = at::empty({s.N, s.G}, opts), gates = at::empty({s.N, s.G}, opts);
  at::Tensor output = at::empty({s.N, s.H}, opts);
  at::Tensor rstd = at::empty({s.N, 2}, opts.dtype(at::toOpMathType(input.scalar_type())));
  at::Tensor h_state = h0.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_gru_forward", [&] {
    ln_gru_forward_impl<scalar_t>(s, sched, reverse, eps, w_hh.t().contiguous(), contiguous_or_undefined(b_ih),
                                  contiguous_or_undefined(b_hh), ln_ih_w.contiguous(), ln_hh_w.contiguous(),
                                  contiguous_or_undefined(zoneout_h), h_state, output, norm_x, norm_h, gates, rstd);
  });
  return {output, h_state, norm_x, norm_h, gates, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ln_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
                const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_hh,
                const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const OptTensor& zoneout_h,
                const at::Tensor& batch_sizes, bool reverse, bool need_grad_input, const at::Tensor& output,
                const at::Tensor& norm_x, const at::Tensor& norm_h, const at::Tensor& gates, const at::Tensor& rstd) {
  const char* op = "ln_gru_backward";
  const Shapes s = check_common(op, 3, input, h0, w_ih, w_hh, std::nullopt, b_hh, ln_ih_w, ln_hh_w, zoneout_h);
  check_shape(op, "grad_output", grad_output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "grad_h_n", grad_h_n, {s.B, s.H}, "[batch, hidden_size]");
  check_shape(op, "output", output, {s.N, s.H}, "[tokens, hidden_size]");
  check_shape(op, "norm_x", norm_x, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "norm_h", norm_h, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "gates", gates, {s.N, s.G}, "[tokens, gates * hidden_size]");
  check_shape(op, "rstd", rstd, {s.N, 2}, "[tokens, 2]");
  for (const at::Tensor* t : {&grad_output, &grad_h_n, &output, &norm_x, &norm_h, &gates}) {
    FUSEDRNN_CHECK(t->scalar_type() == input.scalar_type(), op, "every tensor must have the dtype of input (",
                   input.scalar_type(), "), got ", t->scalar_type());
  }
  FUSEDRNN_CHECK(rstd.scalar_type() == at::toOpMathType(input.scalar_type()), op, "rstd must be ",
                 at::toOpMathType(input.scalar_type()), ", got ", rstd.scalar_type());
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  const at::Tensor hprev = previous_states(sched, reverse, output.contiguous(), h0.contiguous());
  at::Tensor dh_state = grad_h_n.contiguous().clone();
  at::Tensor dgx = at::empty({s.N, s.G}, opts), dgh = at::empty({s.N, s.G}, opts);
  at::Tensor dxp = at::empty({s.N, s.G}, opts), dhp = at::empty({s.N, s.G}, opts);
  const at::Tensor nx = norm_x.contiguous(), nh = norm_h.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_gru_backward", [&] {
    ln_gru_backward_impl<scalar_t>(s, sched, reverse, grad_output.contiguous(), w_hh.contiguous(),
                                   contiguous_or_undefined(b_hh), ln_ih_w.contiguous(), ln_hh_w.contiguous(),
                                   contiguous_or_undefined(zoneout_h), hprev, nx, nh, gates.contiguous(),
                                   rstd.contiguous(), dh_state, dgx, dgh, dxp, dhp);
  });
  at::Tensor grad_input = need_grad_input ? at::mm(dxp, w_ih) : at::empty({0}, opts);
  at::Tensor grad_w_ih = at::mm(dxp.t(), input);
  at::Tensor grad_w_hh = at::mm(dhp.t(), hprev);
  return {grad_input, dh_state, grad_w_ih, grad_w_hh, dgx.sum(0), dgh.sum(0), (dgx * nx).sum(0), (dgh * nh).sum(0)};
}

}  // namespace layernorm
}  // namespace fusedrnn

// Schemas: see the file comment (and fusedrnn/_layernorm_ops.py for fake kernels and autograd).
// zoneout_h / zoneout_c: [tokens, hidden] weights of the previous state (a 0/1 mask in training,
// the probability p in eval), or None for no zoneout.
TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(
      "ln_lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor ln_ih_w, Tensor ln_hh_w, Tensor ln_c_w, Tensor? ln_c_b, Tensor? zoneout_h, Tensor? zoneout_c, "
      "Tensor batch_sizes, bool reverse, float eps) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor norm_x, "
      "Tensor norm_h, Tensor gates, Tensor cells, Tensor norm_c, Tensor rstd)");
  m.def(
      "ln_lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor ln_ih_w, Tensor ln_hh_w, Tensor ln_c_w, Tensor? ln_c_b, Tensor? zoneout_h, "
      "Tensor? zoneout_c, Tensor batch_sizes, bool reverse, bool need_grad_input, Tensor output, Tensor norm_x, "
      "Tensor norm_h, Tensor gates, Tensor cells, Tensor norm_c, Tensor rstd) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, "
      "Tensor grad_ln_ih_w, Tensor grad_ln_hh_w, Tensor grad_ln_c_w, Tensor grad_ln_c_b)");
  m.def(
      "ln_gru_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor ln_ih_w, Tensor ln_hh_w, Tensor? zoneout_h, Tensor batch_sizes, bool reverse, float eps) -> "
      "(Tensor output, Tensor h_n, Tensor norm_x, Tensor norm_h, Tensor gates, Tensor rstd)");
  m.def(
      "ln_gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_hh, Tensor ln_ih_w, Tensor ln_hh_w, Tensor? zoneout_h, Tensor batch_sizes, bool reverse, "
      "bool need_grad_input, Tensor output, Tensor norm_x, Tensor norm_h, Tensor gates, Tensor rstd) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh, Tensor grad_ln_ih_w, Tensor grad_ln_hh_w)");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("ln_lstm_forward", &fusedrnn::layernorm::ln_lstm_forward);
  m.impl("ln_lstm_backward", &fusedrnn::layernorm::ln_lstm_backward);
  m.impl("ln_gru_forward", &fusedrnn::layernorm::ln_gru_forward);
  m.impl("ln_gru_backward", &fusedrnn::layernorm::ln_gru_backward);
}
