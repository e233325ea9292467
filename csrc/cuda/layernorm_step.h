// The CUDA per-step kernels of the layer-normalised LSTM and GRU (the ops of
// csrc/layernorm/layernorm_cpu.cpp; equations: fusedrnn/reference.py), framework-free and
// host+device, written once against the execution context (csrc/exec/cuda_block.h): the
// `__global__` wrappers (layernorm_kernels.cuh) run them with CUDA's indices, the CPU runner
// (csrc/exec/cpu_runner.h) runs the same source on the host (tests/test_layernorm_cuda_runner.py).
//
// One block per row of the step (one sequence of the batch): the row's gate vector (G = 4H or 3H)
// is what a layer norm reduces over, so a block owns exactly the values its statistics need and
// the reductions are block-local (warp shuffles, then one partial per warp in shared memory).
// Thread t owns the hidden units k = t, t + blockDim, ... with ALL gates of each unit, so the cell
// math of a unit needs nothing from another thread; a thread reads back only what it wrote
// itself, and the only shared values are the per-warp partial sums, each in its own region
// (written once, read after one barrier: one barrier per reduction, no race by construction).
//
// Forward, per row: LN statistics of W_ih x and W_hh h (two-pass: mean, then the biased
// variance, as F.layer_norm), the gates, the cell, LN(c') (LSTM) and zoneout, in one kernel;
// the normalised projections overwrite the raw ones in place (the op returns them for backward).
// Backward, per row: zoneout, LN(c') (LSTM), the cell, then both gate LNs' backward; the
// per-row gate gradients are written in the accumulation type so the host's column sums (the
// gain and bias gradients) and the large weight-gradient GEMMs after the loop read them exactly.
// The rounding points (which values are stored as the storage type S and read back) are the CPU
// op's, so half types give the CPU op's numbers up to the order of the sums.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../cells/cell_common.h"
#include "../exec/cuda_block.h"

#if defined(__CUDACC__)
#define FUSEDRNN_LN_UNROLL _Pragma("unroll")
#else
#define FUSEDRNN_LN_UNROLL
#endif

namespace fusedrnn {
namespace lncuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;  // block size cap (and __launch_bounds__)
constexpr int kRegionValues = 4;  // values per warp in one reduction region (the widest reduction)

// Threads per row: one per hidden unit, whole warps, at most kMaxThreads (then units are strided).
inline int row_threads(int64_t hidden) {
  const int64_t t = (hidden + kWarpSize - 1) / kWarpSize * kWarpSize;
  return t < kWarpSize ? kWarpSize : (t > kMaxThreads ? kMaxThreads : static_cast<int>(t));
}

// Sums each of v[0..N) over the block; every thread gets the same bits (the butterfly's adds are
// commutative pairs; the warp partials are summed in warp order). `region` holds
// warps * kRegionValues values, used by this reduction only.
template <int N, typename A, typename Ctx>
FUSEDRNN_HOST_DEVICE void block_sum(const Ctx& ctx, A (&v)[N], exec::shared_ptr_t<Ctx, A> region) {
  FUSEDRNN_LN_UNROLL
  for (int i = 0; i < N; ++i) {
    FUSEDRNN_LN_UNROLL
    for (int m = kWarpSize / 2; m > 0; m >>= 1) v[i] += ctx.shfl_xor(v[i], m);
  }
  const unsigned warps = ctx.block_dim() / kWarpSize, warp = ctx.thread() / kWarpSize;
  if (ctx.thread() % kWarpSize == 0) {
    FUSEDRNN_LN_UNROLL
    for (int i = 0; i < N; ++i) region[warp * kRegionValues + i] = v[i];
  }
  ctx.sync();
  FUSEDRNN_LN_UNROLL
  for (int i = 0; i < N; ++i) {
    A s = A(0);
    for (unsigned w = 0; w < warps; ++w) s += region[w * kRegionValues + i];
    v[i] = s;
  }
}

template <typename A>
FUSEDRNN_HOST_DEVICE A inverse_std(A sum_sq, int64_t n, A eps) {
  return A(1) / std::sqrt(sum_sq / A(n) + eps);
}

// The LN statistics of a row's two gate projections (W_ih x at xr, W_hh h at hr, kGates * H values
// each; this thread's units t, t + block_dim, ...): the means, then the inverse standard deviations
// from the biased variance (two passes). Uses the first two reduction regions of `scratch`.
template <int kGates, typename S, typename A, typename Ctx>
FUSEDRNN_HOST_DEVICE void gate_ln_statistics(const Ctx& ctx, const S* xr, const S* hr, int64_t H, A eps,
                                             exec::shared_ptr_t<Ctx, A> scratch, A (&mean)[2], A& rx, A& rh) {
  const int64_t G = kGates * H, t0 = ctx.thread(), step = ctx.block_dim();
  const unsigned warps = ctx.block_dim() / kWarpSize;
  mean[0] = A(0);
  mean[1] = A(0);
  for (int64_t k = t0; k < H; k += step) {
    FUSEDRNN_LN_UNROLL
    for (int q = 0; q < kGates; ++q) {
      mean[0] += A(xr[q * H + k]);
      mean[1] += A(hr[q * H + k]);
    }
  }
  block_sum(ctx, mean, scratch);
  mean[0] /= A(G);
  mean[1] /= A(G);
  A sq[2] = {A(0), A(0)};
  for (int64_t k = t0; k < H; k += step) {
    FUSEDRNN_LN_UNROLL
    for (int q = 0; q < kGates; ++q) {
      const A dx = A(xr[q * H + k]) - mean[0], dh = A(hr[q * H + k]) - mean[1];
      sq[0] += dx * dx;
      sq[1] += dh * dh;
    }
  }
  block_sum(ctx, sq, scratch + int64_t(warps) * kRegionValues);
  rx = inverse_std(sq[0], G, eps);
  rh = inverse_std(sq[1], G, eps);
}

// ---- LSTM forward ------------------------------------------------------------------------------

// Pointers at the step's rows (rows = the step's batch): per-token tensors at offset `off` of the
// packed [N, *] tensors, the states at row 0. Parameter vectors in the accumulation type A, absent
// ones as zeros; `bias` = b_ih + b_hh (they enter the LSTM only as a sum).
template <typename S>
struct LnLstmForwardParams {
  using A = acc_t<S>;
  int64_t rows = 0, hidden = 0;
  A eps = A(0);
  S* norm_x = nullptr;  // [rows, 4H] in: W_ih x; out: its LN before gain
  S* norm_h = nullptr;  // [rows, 4H] in: W_hh h; out: its LN before gain
  S* gates = nullptr;   // [rows, 4H] out: i, f, g, o activated
  S* h_state = nullptr;  // [rows, H] in: h_{t-1}; out: h_t
  S* c_state = nullptr;  // [rows, H] in: c_{t-1}; out: c_t
  S* out = nullptr;      // [rows, H] h_t
  S* cells = nullptr;    // [rows, H] c_t
  S* norm_c = nullptr;   // [rows, H] LN(c') before gain and shift
  A* rstd = nullptr;     // [rows, 3] inverse standard deviations of W_ih x, W_hh h, c'
  const S* zoneout_h = nullptr;  // [rows, H] or null
  const S* zoneout_c = nullptr;
  const A *gain_x = nullptr, *gain_h = nullptr, *bias = nullptr;  // [4H]
  const A *gain_c = nullptr, *shift_c = nullptr;                  // [H]
};

template <typename S>
struct LnLstmForward {
  using A = acc_t<S>;
  static constexpr int kRegions = 4;  // sums of x and h, their squares, sum of c', its squares
  // Shared memory: the reduction regions, then c' and o per unit (the thread's own, in A).
  static size_t shared_bytes(int threads, int64_t hidden) {
    return (size_t(kRegions) * (threads / kWarpSize) * kRegionValues + 2 * size_t(hidden)) * sizeof(A);
  }

  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const LnLstmForwardParams<S>& p) {
    const int64_t H = p.hidden, G = 4 * H, j = ctx.block();
    const unsigned warps = ctx.block_dim() / kWarpSize;
    const auto scratch = ctx.template shared<A>(0);
    const auto c_new = scratch + int64_t(kRegions) * warps * kRegionValues;
    const auto o_gate = c_new + H;
    S* xr = p.norm_x + j * G;
    S* hr = p.norm_h + j * G;
    const int64_t t0 = ctx.thread(), step = ctx.block_dim();

    A mean[2], rx, rh;
    gate_ln_statistics<4>(ctx, xr, hr, H, p.eps, scratch, mean, rx, rh);

    A csum[1] = {A(0)};
    for (int64_t k = t0; k < H; k += step) {
      A a[4];
      FUSEDRNN_LN_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int64_t c = q * H + k;
        const S xn = S((A(xr[c]) - mean[0]) * rx), hn = S((A(hr[c]) - mean[1]) * rh);
        xr[c] = xn;
        hr[c] = hn;
        a[q] = A(xn) * p.gain_x[c] + A(hn) * p.gain_h[c] + p.bias[c];
      }
      const A i = sigmoid_(a[0]), f = sigmoid_(a[1]), g = tanh_(a[2]), o = sigmoid_(a[3]);
      S* gr = p.gates + j * G;
      gr[k] = S(i);
      gr[H + k] = S(f);
      gr[2 * H + k] = S(g);
      gr[3 * H + k] = S(o);
      const A cn = f * A(p.c_state[j * H + k]) + i * g;
      c_new[k] = cn;
      o_gate[k] = o;
      csum[0] += cn;
    }
    block_sum(ctx, csum, scratch + 2 * int64_t(warps) * kRegionValues);
    const A mean_c = csum[0] / A(H);
    A csq[1] = {A(0)};
    for (int64_t k = t0; k < H; k += step) {
      const A d = A(c_new[k]) - mean_c;
      csq[0] += d * d;
    }
    block_sum(ctx, csq, scratch + 3 * int64_t(warps) * kRegionValues);
    const A rc = inverse_std(csq[0], H, p.eps);
    if (t0 == 0) {
      p.rstd[j * 3] = rx;
      p.rstd[j * 3 + 1] = rh;
      p.rstd[j * 3 + 2] = rc;
    }

    for (int64_t k = t0; k < H; k += step) {
      const int64_t e = j * H + k;
      A cn = c_new[k];
      const A c_hat = (cn - mean_c) * rc;
      p.norm_c[e] = S(c_hat);
      A hn = A(o_gate[k]) * tanh_(c_hat * p.gain_c[k] + p.shift_c[k]);
      if (p.zoneout_h != nullptr) {
        const A z = A(p.zoneout_h[e]);
        hn = z * A(p.h_state[e]) + (A(1) - z) * hn;
      }
      if (p.zoneout_c != nullptr) {
        const A z = A(p.zoneout_c[e]);
        cn = z * A(p.c_state[e]) + (A(1) - z) * cn;
      }
      p.out[e] = p.h_state[e] = S(hn);
      p.cells[e] = p.c_state[e] = S(cn);
    }
  }
};

// ---- LSTM backward -----------------------------------------------------------------------------

template <typename S>
struct LnLstmBackwardParams {
  using A = acc_t<S>;
  int64_t rows = 0, hidden = 0;
  const S* grad_out = nullptr;  // [rows, H]
  S* grad_h_state = nullptr;    // [rows, H] in: dL/dh_t (recurrent); out: its part through zoneout only
  S* grad_c_state = nullptr;    // [rows, H] in: dL/dc_t; out: dL/dc_{t-1}
  const S* gates = nullptr;     // [rows, 4H]
  const S* norm_c = nullptr;    // [rows, H]
  const S* c_prev = nullptr;    // [rows, H] c_{t-1}
  const S* norm_x = nullptr;    // [rows, 4H]
  const S* norm_h = nullptr;    // [rows, 4H]
  const A* rstd = nullptr;      // [rows, 3]
  const S* zoneout_h = nullptr;
  const S* zoneout_c = nullptr;
  const A *gain_x = nullptr, *gain_h = nullptr;    // [4H]
  const A *gain_c = nullptr, *shift_c = nullptr;   // [H]
  A* grad_gates = nullptr;  // [rows, 4H] out: d(gate pre-activations) = d(bias)
  A* grad_y = nullptr;      // [rows, H] out: d(LN(c') gain + shift) = d(shift_c)
  S* grad_x = nullptr;      // [rows, 4H] out: d(W_ih x)
  S* grad_hh = nullptr;     // [rows, 4H] out: d(W_hh h) (the host's GEMM adds it times W_hh into grad_h_state)
};

template <typename S>
struct LnLstmBackward {
  using A = acc_t<S>;
  static constexpr int kRegions = 2;  // LN(c') backward's two means, the gate LNs' four
  // Shared memory: the reduction regions, then d c_t per unit after zoneout (the thread's own).
  static size_t shared_bytes(int threads, int64_t hidden) {
    return (size_t(kRegions) * (threads / kWarpSize) * kRegionValues + size_t(hidden)) * sizeof(A);
  }

  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const LnLstmBackwardParams<S>& p) {
    const int64_t H = p.hidden, G = 4 * H, j = ctx.block();
    const unsigned warps = ctx.block_dim() / kWarpSize;
    const auto scratch = ctx.template shared<A>(0);
    const auto dc_kept = scratch + int64_t(kRegions) * warps * kRegionValues;
    const int64_t t0 = ctx.thread(), step = ctx.block_dim();
    const S* g = p.gates + j * G;
    A* dn = p.grad_gates + j * G;

    // Zoneout, then h' = o tanh(y), y = LN(c') gain_c + shift_c.
    A m[2] = {A(0), A(0)};
    for (int64_t k = t0; k < H; k += step) {
      const int64_t e = j * H + k;
      A dh = A(p.grad_h_state[e]) + A(p.grad_out[e]);
      A dc = A(p.grad_c_state[e]);
      if (p.zoneout_h != nullptr) {
        const A z = A(p.zoneout_h[e]);
        p.grad_h_state[e] = S(z * dh);
        dh *= A(1) - z;
      } else {
        p.grad_h_state[e] = S(0);
      }
      if (p.zoneout_c != nullptr) {
        const A z = A(p.zoneout_c[e]);
        p.grad_c_state[e] = S(z * dc);
        dc *= A(1) - z;
      } else {
        p.grad_c_state[e] = S(0);
      }
      const A ch = A(p.norm_c[e]);
      const A ty = tanh_(ch * p.gain_c[k] + p.shift_c[k]);
      const A o = A(g[3 * H + k]);
      const A dy = dh * o * (A(1) - ty * ty);
      const A dc_hat = dy * p.gain_c[k];
      dn[3 * H + k] = dh * ty * o * (A(1) - o);
      p.grad_y[e] = dy;
      dc_kept[k] = dc;
      m[0] += dc_hat;
      m[1] += dc_hat * ch;
    }
    block_sum(ctx, m, scratch);
    const A m1 = m[0] / A(H), m2 = m[1] / A(H), rc = p.rstd[j * 3 + 2];

    // LN(c')'s backward, then c' = f c + i g; the sums of both gate LNs' backward.
    const S* xr = p.norm_x + j * G;
    const S* hr = p.norm_h + j * G;
    A s[4] = {A(0), A(0), A(0), A(0)};
    for (int64_t k = t0; k < H; k += step) {
      const int64_t e = j * H + k;
      const A ch = A(p.norm_c[e]);
      const A dc_hat = p.grad_y[e] * p.gain_c[k];
      const A dc = A(dc_kept[k]) + rc * (dc_hat - m1 - ch * m2);
      const A ig = A(g[k]), fg = A(g[H + k]), gg = A(g[2 * H + k]);
      dn[k] = dc * gg * ig * (A(1) - ig);
      dn[H + k] = dc * A(p.c_prev[e]) * fg * (A(1) - fg);
      dn[2 * H + k] = dc * ig * (A(1) - gg * gg);
      p.grad_c_state[e] = S(A(p.grad_c_state[e]) + dc * fg);
      FUSEDRNN_LN_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int64_t c = q * H + k;
        const A sx = dn[c] * p.gain_x[c], sh = dn[c] * p.gain_h[c];
        s[0] += sx;
        s[1] += sx * A(xr[c]);
        s[2] += sh;
        s[3] += sh * A(hr[c]);
      }
    }
    block_sum(ctx, s, scratch + int64_t(warps) * kRegionValues);
    const A m1x = s[0] / A(G), m2x = s[1] / A(G), m1h = s[2] / A(G), m2h = s[3] / A(G);
    const A rx = p.rstd[j * 3], rh = p.rstd[j * 3 + 1];
    S* dx = p.grad_x + j * G;
    S* dhh = p.grad_hh + j * G;
    for (int64_t k = t0; k < H; k += step) {
      FUSEDRNN_LN_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int64_t c = q * H + k;
        dx[c] = S(rx * (dn[c] * p.gain_x[c] - m1x - A(xr[c]) * m2x));
        dhh[c] = S(rh * (dn[c] * p.gain_h[c] - m1h - A(hr[c]) * m2h));
      }
    }
  }
};

// ---- GRU forward -------------------------------------------------------------------------------

template <typename S>
struct LnGruForwardParams {
  using A = acc_t<S>;
  int64_t rows = 0, hidden = 0;
  A eps = A(0);
  S* norm_x = nullptr;   // [rows, 3H] in: W_ih x; out: its LN before gain
  S* norm_h = nullptr;   // [rows, 3H] in: W_hh h; out: its LN before gain
  S* gates = nullptr;    // [rows, 3H] out: r, z, n
  S* h_state = nullptr;  // [rows, H] in: h_{t-1}; out: h_t
  S* out = nullptr;      // [rows, H]
  A* rstd = nullptr;     // [rows, 2]
  const S* zoneout_h = nullptr;
  const A *gain_x = nullptr, *gain_h = nullptr, *bias_x = nullptr, *bias_h = nullptr;  // [3H]
};

template <typename S>
struct LnGruForward {
  using A = acc_t<S>;
  static constexpr int kRegions = 2;
  static size_t shared_bytes(int threads, int64_t) {
    return size_t(kRegions) * (threads / kWarpSize) * kRegionValues * sizeof(A);
  }

  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const LnGruForwardParams<S>& p) {
    const int64_t H = p.hidden, G = 3 * H, j = ctx.block();
    const auto scratch = ctx.template shared<A>(0);
    S* xr = p.norm_x + j * G;
    S* hr = p.norm_h + j * G;
    const int64_t t0 = ctx.thread(), step = ctx.block_dim();

    A mean[2], rx, rh;
    gate_ln_statistics<3>(ctx, xr, hr, H, p.eps, scratch, mean, rx, rh);
    if (t0 == 0) {
      p.rstd[j * 2] = rx;
      p.rstd[j * 2 + 1] = rh;
    }
    for (int64_t k = t0; k < H; k += step) {
      A ax[3], ah[3];
      FUSEDRNN_LN_UNROLL
      for (int q = 0; q < 3; ++q) {
        const int64_t c = q * H + k;
        const S xn = S((A(xr[c]) - mean[0]) * rx), hn = S((A(hr[c]) - mean[1]) * rh);
        xr[c] = xn;
        hr[c] = hn;
        ax[q] = A(xn) * p.gain_x[c] + p.bias_x[c];
        ah[q] = A(hn) * p.gain_h[c] + p.bias_h[c];
      }
      const A r = sigmoid_(ax[0] + ah[0]), z = sigmoid_(ax[1] + ah[1]);
      const A n = tanh_(ax[2] + r * ah[2]);
      const int64_t e = j * H + k;
      const A h_prev = A(p.h_state[e]);
      A h_new = (A(1) - z) * n + z * h_prev;
      if (p.zoneout_h != nullptr) {
        const A zo = A(p.zoneout_h[e]);
        h_new = zo * h_prev + (A(1) - zo) * h_new;
      }
      S* gr = p.gates + j * G;
      gr[k] = S(r);
      gr[H + k] = S(z);
      gr[2 * H + k] = S(n);
      p.out[e] = p.h_state[e] = S(h_new);
    }
  }
};

// ---- GRU backward ------------------------------------------------------------------------------

template <typename S>
struct LnGruBackwardParams {
  using A = acc_t<S>;
  int64_t rows = 0, hidden = 0;
  const S* grad_out = nullptr;  // [rows, H]
  S* grad_h_state = nullptr;    // [rows, H] in: dL/dh_t; out: dL/dh_{t-1} without the recurrent GEMM's part
  const S* gates = nullptr;     // [rows, 3H]
  const S* h_prev = nullptr;    // [rows, H]
  const S* norm_x = nullptr;    // [rows, 3H]
  const S* norm_h = nullptr;    // [rows, 3H]
  const A* rstd = nullptr;      // [rows, 2]
  const S* zoneout_h = nullptr;
  const A *gain_x = nullptr, *gain_h = nullptr, *bias_h = nullptr;  // [3H]
  A* grad_gates_x = nullptr;  // [rows, 3H] out: d(LN(W_ih x) gain + b_ih) = d(b_ih)
  A* grad_gates_h = nullptr;  // [rows, 3H] out: d(LN(W_hh h) gain + b_hh) = d(b_hh)
  S* grad_x = nullptr;        // [rows, 3H] out: d(W_ih x)
  S* grad_hh = nullptr;       // [rows, 3H] out: d(W_hh h)
};

template <typename S>
struct LnGruBackward {
  using A = acc_t<S>;
  static constexpr int kRegions = 1;
  static size_t shared_bytes(int threads, int64_t) {
    return size_t(kRegions) * (threads / kWarpSize) * kRegionValues * sizeof(A);
  }

  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const LnGruBackwardParams<S>& p) {
    const int64_t H = p.hidden, G = 3 * H, j = ctx.block();
    const auto scratch = ctx.template shared<A>(0);
    const int64_t t0 = ctx.thread(), step = ctx.block_dim();
    const S* g = p.gates + j * G;
    const S* xr = p.norm_x + j * G;
    const S* hr = p.norm_h + j * G;
    A* dax = p.grad_gates_x + j * G;
    A* dah = p.grad_gates_h + j * G;
    A s[4] = {A(0), A(0), A(0), A(0)};
    for (int64_t k = t0; k < H; k += step) {
      const int64_t e = j * H + k;
      A dh = A(p.grad_h_state[e]) + A(p.grad_out[e]);
      if (p.zoneout_h != nullptr) {
        const A zo = A(p.zoneout_h[e]);
        p.grad_h_state[e] = S(zo * dh);
        dh *= A(1) - zo;
      } else {
        p.grad_h_state[e] = S(0);
      }
      const A r = A(g[k]), z = A(g[H + k]), n = A(g[2 * H + k]);
      const int64_t cn = 2 * H + k;
      const A ahn = A(hr[cn]) * p.gain_h[cn] + p.bias_h[cn];
      const A dan = dh * (A(1) - z) * (A(1) - n * n);
      const A daz = dh * (A(p.h_prev[e]) - n) * z * (A(1) - z);
      const A dar = dan * ahn * r * (A(1) - r);
      p.grad_h_state[e] = S(A(p.grad_h_state[e]) + dh * z);
      const A dx3[3] = {dar, daz, dan}, dh3[3] = {dar, daz, dan * r};
      FUSEDRNN_LN_UNROLL
      for (int q = 0; q < 3; ++q) {
        const int64_t c = q * H + k;
        dax[c] = dx3[q];
        dah[c] = dh3[q];
        const A sx = dx3[q] * p.gain_x[c], sh = dh3[q] * p.gain_h[c];
        s[0] += sx;
        s[1] += sx * A(xr[c]);
        s[2] += sh;
        s[3] += sh * A(hr[c]);
      }
    }
    block_sum(ctx, s, scratch);
    const A m1x = s[0] / A(G), m2x = s[1] / A(G), m1h = s[2] / A(G), m2h = s[3] / A(G);
    const A rx = p.rstd[j * 2], rh = p.rstd[j * 2 + 1];
    S* dx = p.grad_x + j * G;
    S* dhh = p.grad_hh + j * G;
    for (int64_t k = t0; k < H; k += step) {
      FUSEDRNN_LN_UNROLL
      for (int q = 0; q < 3; ++q) {
        const int64_t c = q * H + k;
        dx[c] = S(rx * (dax[c] * p.gain_x[c] - m1x - A(xr[c]) * m2x));
        dhh[c] = S(rh * (dah[c] * p.gain_h[c] - m1h - A(hr[c]) * m2h));
      }
    }
  }
};

}  // namespace lncuda
}  // namespace fusedrnn
