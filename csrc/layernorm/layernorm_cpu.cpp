// Layer-normalised LSTM and GRU layers with zoneout: schemas and the CPU kernels.
//
// Equations, parameter names and epsilon: fusedrnn/reference.py ("layer-normalised LSTM / GRU").
// Per layer and direction, as the plain ops (csrc/ops.cpp): packed time-major input [N, I] with
// batch_sizes [T]; `reverse` runs the sequence backwards.
//
// Forward: the input projection of every step (W_ih x, no bias: the bias comes after the
// normalisation), normalised row by row in one parallel pass before the time loop (it does not
// depend on the recurrence); float32 computes the projection in that pass, a block of rows at a
// time by brgemm (project_and_normalize_inputs), the other dtypes as one GEMM before it. Per step
// and block of rows (one parallel_for chunk): the block's GEMM W_hh h (float32: ATen's brgemm; else
// MKL per step, see use_row_block_gemm) into its rows of norm_h, then ONE fused pass per row: the
// row's LN statistics of W_hh h, the gates, the cell, the LN of c (LSTM) and zoneout, everything in
// registers / L1 (the row is 4H values).
// Saved for backward (outputs after the main ones): the normalised projections norm_x, norm_h
// [N, G], the activated gates [N, G], the LSTM's state c_t [N, H] and normalised c' [N, H], and the
// inverse standard deviations rstd [N, 3] (x, h, c; GRU [N, 2]) in float32 (float64 for float64).
//
// Backward: reverse time, per step one fused pass per row (zoneout, the LN of c, the cell, the two
// gate LNs' backward; each row prefetches the next row's saved values) then the GEMM
// dh += d(W_hh h) W_hh (per block of rows, as forward's); after each block of ~256 rows of steps the
// weight gradients' share of it is one GEMM each (step_blocks), the gain / bias gradients per-thread
// column sums.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include "../cells/cell_common.h"
#include "../cpu/cpu_blas.h"
#include "../cpu/cpu_device.h"  // CpuDevice::gemm: the plain layers' choice of GEMM for the weight gradients
#include "../cpu/cpu_engine.h"  // isa(): the instruction set the CPU kernels run on (FUSEDRNN_CPU_ISA caps it)
#include "../layer/checks.h"
#include "layernorm_checks.h"
#include "../layer/layer_forward.h"  // new_buffer: NaN-filled under FUSEDRNN_POISON_OUTPUTS=1

namespace fusedrnn {
namespace layernorm {

using OptTensor = std::optional<at::Tensor>;

// See run_rows below: the row passes' helpers are inlined into each compiled copy of a row loop.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDRNN_LN_AVX512_ROWS 1
#define FUSEDRNN_LN_INLINE __attribute__((always_inline)) inline
#define FUSEDRNN_LN_AVX512_TARGET __attribute__((target("avx512f,avx2,fma,prefer-vector-width=512")))
#else
#define FUSEDRNN_LN_INLINE inline
#endif

constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorise the row reductions

// Sum of f(k) for k in [0, n) in `kLanes` interleaved partial sums (a single accumulator would be a
// serial chain of adds that -O3 may not reorder).
template <typename A, typename F>
FUSEDRNN_LN_INLINE A row_sum(int64_t n, F f) {
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
FUSEDRNN_LN_INLINE A normalize_row(S* v, int64_t n, A eps) {
  const A mean = row_sum<A>(n, [&](int64_t k) { return A(v[k]); }) / A(n);
  const A var = row_sum<A>(n, [&](int64_t k) {
                  const A d = A(v[k]) - mean;
                  return d * d;
                }) / A(n);
  const A rstd = A(1) / std::sqrt(var + eps);
  for (int64_t k = 0; k < n; ++k) v[k] = S((A(v[k]) - mean) * rstd);
  return rstd;
}

// v[0..n) normalised into out_acc, returning rstd.
template <typename A>
FUSEDRNN_LN_INLINE A normalize_acc(const A* v, int64_t n, A eps, A* out_acc) {
  const A mean = row_sum<A>(n, [&](int64_t k) { return v[k]; }) / A(n);
  const A var = row_sum<A>(n, [&](int64_t k) {
                  const A d = v[k] - mean;
                  return d * d;
                }) / A(n);
  const A rstd = A(1) / std::sqrt(var + eps);
  for (int64_t k = 0; k < n; ++k) out_acc[k] = (v[k] - mean) * rstd;
  return rstd;
}

// Same, and the normalised values stored as S in `out` too (the forward op saves them for backward; the
// inference op calls normalize_acc alone, so its out_acc is bitwise this one's).
template <typename S, typename A>
FUSEDRNN_LN_INLINE A normalize_into(const A* v, int64_t n, A eps, S* out, A* out_acc) {
  const A rstd = normalize_acc<A>(v, n, eps, out_acc);
  for (int64_t k = 0; k < n; ++k) out[k] = S(out_acc[k]);
  return rstd;
}

// a[k] = b[k] = v[k]: the step's new state into the output and the running state. Distinct arrays
// (__restrict__), else with S = A = float the loop's four-store original stayed scalar (NOTES entry 20).
template <typename S, typename A>
inline void store_twice(const int64_t n, const A* __restrict__ v, S* __restrict__ a, S* __restrict__ b) {
  for (int64_t k = 0; k < n; ++k) {
    const S x = S(v[k]);
    a[k] = x;
    b[k] = x;
  }
}

template <typename S>
inline const S* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<S>() : nullptr;
}

inline at::Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// A zoneout argument ([N, H] weights of the previous state) as the kernels read it: contiguous [N, H], or,
// where every row is the same row (stride 0 along the rows: eval's constant p, which fusedrnn/layernorm.py
// passes as one row expanded), that one row [H], read for every row (zoneout_row_step 0). Eval's blend then
// reads H values from L1 instead of an [N, H] tensor of p's filled per call (NOTES entry 37).
inline at::Tensor zoneout_or_undefined(const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  if (t->dim() == 2 && t->size(0) > 0 && t->stride(0) == 0) return t->select(0, 0).contiguous();
  return t->contiguous();
}

// Elements between consecutive rows of a zoneout argument from zoneout_or_undefined: H, or 0 for one shared row.
inline int64_t zoneout_row_step(const at::Tensor& z, int64_t H) { return z.defined() && z.dim() == 1 ? 0 : H; }

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

// float32's step GEMMs: each thread multiplies its own block of the step's rows with ATen's brgemm
// (oneDNN's JIT micro-kernel, B read row-major in place) inside the same parallel_for as the row pass,
// so that one fork per step does both and the rows are still in L1 for the pass. MKL's sgemm per step
// (the path of the other dtypes, `matmul`) repacked W_hh on every call (its scopy_down* copies were
// ~5 ms of a ~45 ms LN-LSTM training step, 1 thread, benchmarks/NOTES.md). FUSEDRNN_LN_GEMM=blas
// forces the sgemm path (read per call, so a benchmark compares both in one process).
template <typename S>
inline bool use_row_block_gemm() {
  if constexpr (!std::is_same_v<S, float>) {
    return false;
  } else {
    const char* v = std::getenv("FUSEDRNN_LN_GEMM");
    return v == nullptr || std::strcmp(v, "blas") != 0;
  }
}

// Row-major C[m, n] (=, or += when accumulate) A[m, k] B[k, n] on this thread, rows of A and C strided
// by lda / ldc, B contiguous. Where oneDNN's micro-kernel is not available (CPU, build, or
// torch.backends.mkldnn disabled), ATen's brgemm falls back to its own gemm: the same result, slower.
inline void row_block_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, float* c,
                           int64_t ldc, bool accumulate) {
  if (m == 0) return;
  at::native::cpublas::brgemm(m, n, k, lda, n, ldc, accumulate, a, b, c);
}

// The backward's recurrent product dh (=, or += when accumulate) dg W_hh on this thread: dg [m, k] (rows strided by
// lda) times W_hh [k, n] contiguous, k = G (4H LSTM, 3H GRU). One brgemm over all of k chains k multiply-adds per
// element in one accumulator; measured teacher-forced against float64 (every step from the float64 trajectory's
// state, so that the recurrence's amplification of rounding is out of the comparison; NOTES entry 46), that made
// the float32 gradients' error 1.2-1.7x the Python loop's (MKL's sgemm, which blocks k) at the sentiment shape,
// while the forward (k = H) matched it. So k is cut into kGradSplitK chunks, each product into its own scratch
// block, summed pairwise, (p0 + p1) + (p2 + p3): the same operations in the same order for any thread count.
// FUSEDRNN_LN_SPLIT_K=0 runs the one brgemm over all of k (read per call, for an A/B in one process).
constexpr int64_t kGradSplitK = 4;

inline bool split_recurrent_grad() {
  const char* v = std::getenv("FUSEDRNN_LN_SPLIT_K");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

inline void recurrent_grad_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, float* c,
                                int64_t ldc, bool accumulate, bool split) {
  if (m == 0 || n == 0) return;
  if (!split) {
    row_block_gemm(m, n, k, a, lda, b, c, ldc, accumulate);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, (k + kGradSplitK - 1) / kGradSplitK);
  const int64_t block = m * n;
  // The partial products, kept per thread: this runs once per step and row block.
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(kGradSplitK * block)) scratch.resize(static_cast<size_t>(kGradSplitK * block));
  float* part = scratch.data();
  int64_t parts = 0;
  for (int64_t k0 = 0; k0 < k; k0 += chunk, ++parts) {
    at::native::cpublas::brgemm(m, n, std::min(chunk, k - k0), lda, n, n, false, a + k0, b + k0 * n,
                                part + parts * block);
  }
  if (parts < kGradSplitK) std::fill(part + parts * block, part + kGradSplitK * block, 0.0f);  // + 0 is exact
  for (int64_t r = 0; r < m; ++r) {
    const float* __restrict__ p0 = part + r * n;
    const float* __restrict__ p1 = p0 + block;
    const float* __restrict__ p2 = p1 + block;
    const float* __restrict__ p3 = p2 + block;
    float* __restrict__ cr = c + r * ldc;
    if (accumulate) {
      for (int64_t j = 0; j < n; ++j) cr[j] += (p0[j] + p1[j]) + (p2[j] + p3[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) cr[j] = (p0[j] + p1[j]) + (p2[j] + p3[j]);
    }
  }
}

// The end of a thread's brgemm calls (releases what the micro-kernel configured on this thread: AMX tiles
// where it used them).
inline void row_block_gemm_done() { at::native::cpublas::brgemm_release(false); }

// The input projection W_ih x of every row, and its LN, before the time loop (neither depends on the
// recurrence); rstd of row p into rs[p * rs_stride] where rs is not null. With `project` (float32 on the
// brgemm path, see input_projection_in_pass) norm_x arrives unfilled and each thread computes its rows'
// projection here, kProjectRows at a time by brgemm, and normalises each block while it is in L1 / L2.
// The one MKL sgemm over all rows that it replaces (still the path of the other dtypes and of
// FUSEDRNN_LN_GEMM=blas) zero-filled the fresh [N, G] output first (beta = 0: mkl_blas_def_sgemm_mscale),
// and the LN pass then read it back from beyond L2 (NOTES entry 37).
constexpr int64_t kProjectRows = 32;

template <typename S, typename A>
void project_and_normalize_inputs(const Shapes& s, const at::Tensor& input, const at::Tensor& w_ih_t, bool project,
                                  S* nx, A eps, A* rs, int64_t rs_stride) {
  const int64_t G = s.G;
  at::parallel_for(0, s.N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kProjectRows) {
      const int64_t stop = std::min(end, b + kProjectRows);
      if constexpr (std::is_same_v<S, float>) {
        if (project) {
          row_block_gemm(stop - b, G, s.I, input.const_data_ptr<float>() + b * s.I, s.I,
                         w_ih_t.const_data_ptr<float>(), nx + b * G, G, false);
        }
      }
      for (int64_t p = b; p < stop; ++p) {
        const A r = normalize_row<S, A>(nx + p * G, G, eps);
        if (rs != nullptr) rs[p * rs_stride] = r;
      }
    }
    if constexpr (std::is_same_v<S, float>) {
      if (project) row_block_gemm_done();
    }
  });
}

// Whether project_and_normalize_inputs computes the input projection itself (else norm_x is at::mm's).
// FUSEDRNN_LN_PROJECTION=mm forces at::mm (read per call, for an A/B in one process).
inline bool input_projection_in_pass(const at::Tensor& input) {
  const char* v = std::getenv("FUSEDRNN_LN_PROJECTION");
  const bool forced_mm = v != nullptr && std::strcmp(v, "mm") == 0;
  return input.scalar_type() == at::kFloat && input.size(1) > 0 && use_row_block_gemm<float>() && !forced_mm;
}

// The row passes, compiled twice: with the build's flags (-mavx2 -mfma on an AVX2 build machine) and for
// AVX-512F, taken where cpu_engine::isa() says the CPU has it (so FUSEDRNN_CPU_ISA=avx2 tests the other
// copy on an AVX-512 machine). A chunk's row loop is an always-inline lambda, so the compiler inlines it
// (and the row functions and activations it calls, all inline) into each copy and vectorises it for that
// copy's width. Only AVX-512F is asked for: what isa() checks. The loops' arithmetic and their order are
// the same in both (the row sums' kLanes partial sums do not depend on the vector width).
#ifdef FUSEDRNN_LN_AVX512_ROWS
template <typename F>
FUSEDRNN_LN_AVX512_TARGET __attribute__((noinline)) void run_rows_avx512(F& rows) {
  rows();
}
#endif

inline bool rows_on_avx512() {
#ifdef FUSEDRNN_LN_AVX512_ROWS
  return cpu_engine::isa() == cpu_engine::Isa::kAvx512;
#else
  return false;
#endif
}

template <typename F>
inline void run_rows(bool avx512, F& rows) {
#ifdef FUSEDRNN_LN_AVX512_ROWS
  if (avx512) {
    run_rows_avx512(rows);
    return;
  }
#endif
  (void)avx512;
  rows();
}

// A backward row function NAME(PARAMS) compiled twice from NAME_body (always inline), as NAME and NAME_avx512.
// Each copy is its own function of __restrict__ parameters: the row inlined into the row loop (through a
// lambda, as the forward's) lost them and, measured, ran at half the speed (NOTES).
#ifdef FUSEDRNN_LN_AVX512_ROWS
#define FUSEDRNN_LN_ROW_COPIES(NAME, PARAMS, ARGS)                                                         \
  template <typename S, typename A>                                                                        \
  __attribute__((noinline)) void NAME PARAMS { NAME##_body<S, A> ARGS; }                                   \
  template <typename S, typename A>                                                                        \
  FUSEDRNN_LN_AVX512_TARGET __attribute__((noinline)) void NAME##_avx512 PARAMS { NAME##_body<S, A> ARGS; }
#else
#define FUSEDRNN_LN_ROW_COPIES(NAME, PARAMS, ARGS) \
  template <typename S, typename A>                \
  void NAME PARAMS { NAME##_body<S, A> ARGS; }
#endif

// The per-call parameter vectors in the accumulation type, absent ones as 0 (the row loops then
// need no branch): the gains of LN(W_ih x) and LN(W_hh h), the two gate biases summed (they enter
// the LSTM only as a sum; the GRU keeps them apart), and LN(c)'s gain and shift.
template <typename A>
struct ParamVectors {
  std::vector<A> gain_x, gain_h, bias, bias_x, bias_h, gain_c, shift_c;
  ParamVectors(const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
               const at::Tensor& ln_c_w, const at::Tensor& ln_c_b, int64_t G, int64_t H)
      : gain_x(read(ln_ih_w, G)), gain_h(read(ln_hh_w, G)), bias(G), bias_x(read(b_ih, G)),
        bias_h(read(b_hh, G)), gain_c(read(ln_c_w, H)), shift_c(read(ln_c_b, H)) {
    for (int64_t c = 0; c < G; ++c) bias[c] = bias_x[c] + bias_h[c];
  }
  static std::vector<A> read(const at::Tensor& t, int64_t n) {
    std::vector<A> v(n, A(0));
    if (t.defined()) {
      const at::Tensor c = t.contiguous().to(c10::CppTypeToScalarType<A>::value);
      const A* d = c.const_data_ptr<A>();
      for (int64_t i = 0; i < n; ++i) v[i] = d[i];
    }
    return v;
  }
};

// ---- LSTM ------------------------------------------------------------------------------------

// Save = false: the inference op (ln_lstm_inference). The same arithmetic in the same order, minus the
// stores only backward reads: no gates, cells, norm_c or rstd (undefined tensors), and norm_h a [B, G]
// scratch of the step's rows where norm_h_rows says so.
template <typename S, bool Save>
void ln_lstm_forward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, double eps_d,
                          const at::Tensor& input, const at::Tensor& w_ih_t, bool project,
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
  S* out = output.data_ptr<S>();
  S* gt = Save ? gates.data_ptr<S>() : nullptr;
  S* cl = Save ? cells.data_ptr<S>() : nullptr;
  S* nc = Save ? norm_c.data_ptr<S>() : nullptr;
  A* rs = Save ? rstd.data_ptr<A>() : nullptr;
  S* hs = h_state.data_ptr<S>();
  S* cs = c_state.data_ptr<S>();
  const S *zh = ptr_or_null<S>(zh_t), *zc = ptr_or_null<S>(zc_t);
  const int64_t zh_step = zoneout_row_step(zh_t, H), zc_step = zoneout_row_step(zc_t, H);
  const ParamVectors<A> pv(b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, G, H);
  const A *gx = pv.gain_x.data(), *gh = pv.gain_h.data(), *bsum = pv.bias.data();
  const A *gc = pv.gain_c.data(), *bc = pv.shift_c.data();

  project_and_normalize_inputs<S, A>(s, input, w_ih_t, project, nx, eps, rs, 3);
  const int64_t T = sched.steps();
  const bool block_gemm = use_row_block_gemm<S>();
  const bool avx512 = rows_on_avx512();
  const bool full_norm_h = norm_h.size(0) == s.N;  // else a [B, G] scratch (see norm_h_rows)
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? T - 1 - i : i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    const int64_t nh_off = full_norm_h ? off : 0;  // the step's first row of norm_h
    if (!block_gemm) matmul<S>(h_state.narrow(0, 0, bs), w_hh_t, norm_h.narrow(0, nh_off, bs), false);
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<S, float>) {
        if (block_gemm) {  // this block's W_hh h (each row reads only its own h_state row)
          row_block_gemm(end - begin, G, H, hs + begin * H, H, w_hh_t.const_data_ptr<float>(),
                         nh + (nh_off + begin) * G, G, false);
          row_block_gemm_done();
        }
      }
      // Each loop below is branch-free over contiguous arrays, so that it vectorises (the
      // activations included: cell_common.h's are written for it).
      std::vector<A> buf(G + 3 * H);
      A* a = buf.data();        // gate pre-activations, then activations [G]
      A* c_new = a + G;         // c' [H]
      A* c_hat = c_new + H;     // LN(c') before gain and shift [H]
      A* h_new = c_hat + H;     // o tanh(LN(c')) [H]
      auto rows = [&]() __attribute__((always_inline)) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const S* xr = nx + p * G;
        S* hr = nh + (nh_off + j) * G;
        const A rstd_h = normalize_row<S, A>(hr, G, eps);
        if constexpr (Save) rs[p * 3 + 1] = rstd_h;
        for (int64_t c = 0; c < G; ++c) a[c] = A(xr[c]) * gx[c] + A(hr[c]) * gh[c] + bsum[c];
        for (int64_t c = 0; c < 2 * H; ++c) a[c] = sigmoid_(a[c]);          // i, f
        for (int64_t c = 2 * H; c < 3 * H; ++c) a[c] = tanh_(a[c]);         // g
        for (int64_t c = 3 * H; c < G; ++c) a[c] = sigmoid_(a[c]);          // o
        if constexpr (Save) {
          S* g = gt + p * G;
          for (int64_t c = 0; c < G; ++c) g[c] = S(a[c]);
        }
        S* cs_row = cs + j * H;
        S* hs_row = hs + j * H;
        for (int64_t k = 0; k < H; ++k) c_new[k] = a[H + k] * A(cs_row[k]) + a[k] * a[2 * H + k];
        if constexpr (Save) {
          rs[p * 3 + 2] = normalize_into<S, A>(c_new, H, eps, nc + p * H, c_hat);
        } else {
          normalize_acc<A>(c_new, H, eps, c_hat);
        }
        for (int64_t k = 0; k < H; ++k) h_new[k] = a[3 * H + k] * tanh_(c_hat[k] * gc[k] + bc[k]);
        S* out_row = out + p * H;
        if (zh != nullptr) {
          const S* z = zh + p * zh_step;
          for (int64_t k = 0; k < H; ++k) h_new[k] = A(z[k]) * A(hs_row[k]) + (A(1) - A(z[k])) * h_new[k];
        }
        if (zc != nullptr) {
          const S* z = zc + p * zc_step;
          for (int64_t k = 0; k < H; ++k) c_new[k] = A(z[k]) * A(cs_row[k]) + (A(1) - A(z[k])) * c_new[k];
        }
        store_twice<S, A>(H, h_new, out_row, hs_row);
        if constexpr (Save) {
          store_twice<S, A>(H, c_new, cl + p * H, cs_row);
        } else {
          for (int64_t k = 0; k < H; ++k) cs_row[k] = S(c_new[k]);
        }
      }
      };
      run_rows(avx512, rows);
    });
  }
}

// prev[row of step t] = the state that row entered step t with: the previous step's (in the
// direction's order) row if that step had it, else the initial state; for the steps of backward processing
// indices [i_first, i_last] (a StepBlock's: their rows are [row_begin, row_begin + rows) of the packed rows),
// row r of them into dst row r - row_begin. Row copies by memcpy (the callers pass contiguous tensors of one
// dtype): ATen's narrow + copy_ per step were ~4 dispatches a step, a few us each, ~0.3 ms of a sentiment
// batch's backward (NOTES entry 46).
inline void copy_previous_rows(const StepSchedule& sched, bool reverse, const at::Tensor& states,
                               const at::Tensor& initial, int64_t i_first, int64_t i_last, int64_t row_begin,
                               at::Tensor& dst) {
  TORCH_CHECK(states.is_contiguous() && initial.is_contiguous() && dst.is_contiguous() &&
                  states.scalar_type() == initial.scalar_type() && states.scalar_type() == dst.scalar_type(),
              "fusedrnn: previous_states needs contiguous states and initial states of one dtype");
  const int64_t row_bytes = states.dim() == 2 ? states.size(1) * static_cast<int64_t>(states.element_size()) : 0;
  if (row_bytes == 0 || states.size(0) == 0) return;
  char* out = static_cast<char*>(dst.data_ptr());
  const char* src = static_cast<const char*>(states.const_data_ptr());
  const char* init = static_cast<const char*>(initial.const_data_ptr());
  const int64_t T = sched.steps();
  for (int64_t i = i_first; i <= i_last; ++i) {
    const int64_t t = reverse ? i : T - 1 - i;  // the backward's processing order (ln_*_backward_impl)
    const int64_t f = reverse ? T - 1 - t : t;  // the forward's step index
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    char* d = out + (off - row_begin) * row_bytes;
    int64_t from_prev = 0;
    if (f > 0) {
      const int64_t tp = reverse ? t + 1 : t - 1;
      from_prev = std::min(bs, sched.batch[tp]);
      std::memcpy(d, src + sched.offset[tp] * row_bytes, from_prev * row_bytes);
    }
    if (bs > from_prev) {
      std::memcpy(d + from_prev * row_bytes, init + from_prev * row_bytes, (bs - from_prev) * row_bytes);
    }
  }
}

// The same for every row: an [N, H] tensor of previous states.
inline at::Tensor previous_states(const StepSchedule& sched, bool reverse, const at::Tensor& states,
                                  const at::Tensor& initial) {
  at::Tensor prev = at::empty_like(states);
  const int64_t T = sched.steps();
  if (T > 0) copy_previous_rows(sched, reverse, states, initial, 0, T - 1, 0, prev);
  return prev;
}

// Per-thread sums of the gain and bias gradients over the rows a thread handles (summed over threads
// at the end, in thread order: bitwise reproducible for a fixed thread count).
template <typename A>
struct ColumnSums {
  int64_t width;
  std::vector<A> data;
  ColumnSums(int64_t width_) : width(width_), data(static_cast<size_t>(at::get_num_threads()) * width_, A(0)) {}
  A* mine() { return data.data() + static_cast<int64_t>(at::get_thread_num()) * width; }
  at::Tensor total(int64_t start, int64_t n, const at::TensorOptions& opts) const {
    std::vector<A> sum(n, A(0));
    for (size_t t = 0; t < data.size() / width; ++t) {
      for (int64_t i = 0; i < n; ++i) sum[i] += data[t * width + start + i];
    }
    return at::tensor(c10::ArrayRef<A>(sum), opts.dtype(c10::CppTypeToScalarType<A>::value)).to(opts.dtype());
  }
};

// Sums of the R values f(k, v) writes into v[0..R) over k in [0, n), each in kLanes interleaved partial
// sums (as row_sum); f may write elsewhere too, so that a pass produces values and their row sums at once.
template <int R, typename A, typename F>
FUSEDRNN_LN_INLINE std::array<A, R> row_sums(int64_t n, F f) {
  A acc[R][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      A v[R];
      f(k + l, v);
      for (int r = 0; r < R; ++r) acc[r][l] += v[r];
    }
  }
  std::array<A, R> s{};
  for (int r = 0; r < R; ++r) {
    for (int64_t l = 0; l < kLanes; ++l) s[r] += acc[r][l];
  }
  for (; k < n; ++k) {
    A v[R];
    f(k, v);
    for (int r = 0; r < R; ++r) s[r] += v[r];
  }
  return s;
}

// The backward of one LSTM row (one sequence, one step), in four passes over the row: zoneout and the
// incoming gradients [H]; o, LN(c) and its row sums [H]; the cell (i, f, g) [H]; the gate vector: the
// bias and gain gradients and both gate LNs' row sums [G]; then both gate LNs' input gradients [G].
// Every array is distinct (__restrict__): with S = A = float the compiler could otherwise not prove that
// a store to the state gradient leaves a work array alone, and kept these loops scalar (measured:
// NOTES entry 20). zh_row / zc_row are null without zoneout.
template <typename S, typename A>
FUSEDRNN_LN_INLINE void ln_lstm_backward_row_body(const int64_t H, const S* __restrict__ g, const S* __restrict__ ch,
                                 const S* __restrict__ xr, const S* __restrict__ hr, const S* __restrict__ cp_row,
                                 const S* __restrict__ go_row, const S* __restrict__ zh_row,
                                 const S* __restrict__ zc_row, const A rstd_x, const A rstd_h, const A rstd_c,
                                 const A* __restrict__ gx, const A* __restrict__ gh, const A* __restrict__ gc,
                                 const A* __restrict__ bc, S* __restrict__ dhs_row, S* __restrict__ dcs_row,
                                 A* __restrict__ acc, A* __restrict__ work, S* __restrict__ dx_row,
                                 S* __restrict__ dhh_row) {
  const int64_t G = 4 * H;
  A* __restrict__ dh = work;          // d h' [H]
  A* __restrict__ dc = work + H;      // d c' [H]
  A* __restrict__ dc_hat = dc + H;    // d(LN(c') before gain) [H]
  A* __restrict__ dn = dc_hat + H;    // d(gate pre-activations) [G]
  // Zoneout: h_t = z h_{t-1} + (1 - z) h'. The kept share goes straight to the previous state: stored in
  // dh_state now, the step's GEMM adds the recurrent part (without zoneout the GEMM writes the row).
  if (zh_row != nullptr) {
    for (int64_t k = 0; k < H; ++k) {
      const A d = A(dhs_row[k]) + A(go_row[k]), z = A(zh_row[k]);
      dhs_row[k] = S(z * d);
      dh[k] = (A(1) - z) * d;
    }
  } else {
    for (int64_t k = 0; k < H; ++k) dh[k] = A(dhs_row[k]) + A(go_row[k]);
  }
  if (zc_row != nullptr) {
    for (int64_t k = 0; k < H; ++k) {
      const A d = A(dcs_row[k]), z = A(zc_row[k]);
      dcs_row[k] = S(z * d);  // the cell's f dc' is added below
      dc[k] = (A(1) - z) * d;
    }
  } else {
    for (int64_t k = 0; k < H; ++k) dc[k] = A(dcs_row[k]);
  }
  // h' = o tanh(y), y = LN(c') gain + shift: d(pre-activation of o), the gain / shift gradients of LN(c),
  // d(LN(c') before gain) and LN(c)'s two row sums, in one pass.
  A* __restrict__ acc_gc = acc + 3 * G;
  A* __restrict__ acc_bc = acc_gc + H;
  A* __restrict__ dn_o = dn + 3 * H;
  const std::array<A, 2> c_sums = row_sums<2, A>(H, [&](int64_t k, A* v) {
    const A n = A(ch[k]);
    const A ty = tanh_(n * gc[k] + bc[k]);
    const A o = A(g[3 * H + k]);
    const A dy = dh[k] * o * (A(1) - ty * ty);
    dn_o[k] = dh[k] * ty * o * (A(1) - o);
    acc_gc[k] += dy * n;
    acc_bc[k] += dy;
    const A d_hat = dy * gc[k];
    dc_hat[k] = d_hat;
    v[0] = d_hat;
    v[1] = d_hat * n;
  });
  const A c_m1 = c_sums[0] / A(H), c_m2 = c_sums[1] / A(H);
  // c' = f c + i g, with the LN(c) backward's input gradient added to dc first.
  for (int64_t k = 0; k < H; ++k) {
    const A d = dc[k] + rstd_c * (dc_hat[k] - c_m1 - A(ch[k]) * c_m2);
    const A ig = A(g[k]), fg = A(g[H + k]), gg = A(g[2 * H + k]);
    dn[k] = d * gg * ig * (A(1) - ig);
    dn[H + k] = d * A(cp_row[k]) * fg * (A(1) - fg);
    dn[2 * H + k] = d * ig * (A(1) - gg * gg);
    dc[k] = d * fg;
  }
  if (zc_row != nullptr) {
    for (int64_t k = 0; k < H; ++k) dcs_row[k] = S(A(dcs_row[k]) + dc[k]);
  } else {
    for (int64_t k = 0; k < H; ++k) dcs_row[k] = S(dc[k]);
  }
  // The gate vector a = LN(W_ih x) gx + b_ih + LN(W_hh h) gh + b_hh: dn is each bias's gradient, dn times
  // the normalised value each gain's; both LNs' backward need mean(dn gain) and mean(dn gain xhat).
  A* __restrict__ acc_b = acc;
  A* __restrict__ acc_gx = acc + G;
  A* __restrict__ acc_gh = acc + 2 * G;
  const std::array<A, 4> gate_sums = row_sums<4, A>(G, [&](int64_t c, A* v) {
    const A d = dn[c], x = A(xr[c]), h = A(hr[c]);
    acc_b[c] += d;
    acc_gx[c] += d * x;
    acc_gh[c] += d * h;
    const A dxn = d * gx[c], dhn = d * gh[c];
    v[0] = dxn;
    v[1] = dxn * x;
    v[2] = dhn;
    v[3] = dhn * h;
  });
  const A x_m1 = gate_sums[0] / A(G), x_m2 = gate_sums[1] / A(G);
  const A h_m1 = gate_sums[2] / A(G), h_m2 = gate_sums[3] / A(G);
  for (int64_t c = 0; c < G; ++c) {
    const A d = dn[c], x = A(xr[c]), h = A(hr[c]);
    dx_row[c] = S(rstd_x * (d * gx[c] - x_m1 - x * x_m2));
    dhh_row[c] = S(rstd_h * (d * gh[c] - h_m1 - h * h_m2));
  }
}

FUSEDRNN_LN_ROW_COPIES(ln_lstm_backward_row,
                       (const int64_t H, const S* __restrict__ g, const S* __restrict__ ch, const S* __restrict__ xr,
                        const S* __restrict__ hr, const S* __restrict__ cp_row, const S* __restrict__ go_row,
                        const S* __restrict__ zh_row, const S* __restrict__ zc_row, const A rstd_x, const A rstd_h,
                        const A rstd_c, const A* __restrict__ gx, const A* __restrict__ gh, const A* __restrict__ gc,
                        const A* __restrict__ bc, S* __restrict__ dhs_row, S* __restrict__ dcs_row,
                        A* __restrict__ acc, A* __restrict__ work, S* __restrict__ dx_row, S* __restrict__ dhh_row),
                       (H, g, ch, xr, hr, cp_row, go_row, zh_row, zc_row, rstd_x, rstd_h, rstd_c, gx, gh, gc, bc,
                        dhs_row, dcs_row, acc, work, dx_row, dhh_row))

// Software prefetch of n values from v. The backward row passes read each row's saved values (gates, norm_x,
// norm_h, ...: [N, G] each, far beyond L2) backwards in time, and their hottest instructions were the first
// loads of each saved row (perf annotate, NOTES entries 20 and 36); each row therefore prefetches the next
// row's (the next step's first row of this thread's chunk after its last row), a row's work ahead.
template <typename T>
FUSEDRNN_LN_INLINE void prefetch_values(const T* v, int64_t n) {
  const char* c = reinterpret_cast<const char*>(v);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// prefetch_values of each (values, count) whose values are not null: one row of each saved array.
template <typename S>
FUSEDRNN_LN_INLINE void prefetch_rows(std::initializer_list<std::pair<const S*, int64_t>> rows) {
  for (const auto& [v, n] : rows) {
    if (v != nullptr) prefetch_values(v, n);
  }
}

// FUSEDRNN_LN_PREFETCH=0 turns the backward's prefetches off (read per call, for an A/B in one process).
inline bool backward_prefetch() {
  const char* v = std::getenv("FUSEDRNN_LN_PREFETCH");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The row the backward processes after row j of step index i on the thread whose chunk is [begin, end), or -1.
inline int64_t next_backward_row(const StepSchedule& sched, bool reverse, int64_t i, int64_t j, int64_t begin,
                                 int64_t end) {
  const int64_t T = sched.steps();
  if (j + 1 < end) return sched.offset[reverse ? i : T - 1 - i] + j + 1;
  if (i + 1 >= T) return -1;
  const int64_t t = reverse ? i + 1 : T - 2 - i;
  return begin < sched.batch[t] ? sched.offset[t] + begin : -1;
}

// Backward's per-row gradients of the two gate LNs' inputs (dxp, dhp: [rows, G]) are held for a block of
// consecutive steps at a time, not for all N rows: after a block, its rows' share of the weight gradients
// (and of grad_input) is one GEMM each, accumulated. Two [N, G] buffers per call were what the LN-LSTM
// training step's page faults came from (glibc trims the heap's top after each step; NOTES entry 32);
// a block of ~kBlockRows rows stays in L2 between the row pass that writes it and the GEMMs that read it.
// float32 / float64 only: the half types keep one block of all rows, so that each weight gradient is still
// one GEMM rounded once (a bf16 accumulator over blocks would round per block). FUSEDRNN_LN_BACKWARD_BLOCK=all
// forces that single block for every dtype (read per call, so a benchmark compares both in one process).
constexpr int64_t kBlockRows = 256;

inline bool one_backward_block() {
  const char* v = std::getenv("FUSEDRNN_LN_BACKWARD_BLOCK");
  return v != nullptr && std::strcmp(v, "all") == 0;
}

struct StepBlock {
  int64_t first, last;  // processing indices i (the backward's order) of its steps, first <= last
  int64_t row_begin, rows;  // its packed rows [row_begin, row_begin + rows): contiguous, as steps are
};

template <typename S>
std::vector<StepBlock> step_blocks(const StepSchedule& sched, bool reverse, int64_t max_batch) {
  const int64_t T = sched.steps();
  const bool whole = !(std::is_same_v<S, float> || std::is_same_v<S, double>) || one_backward_block();
  const int64_t cap = whole ? std::numeric_limits<int64_t>::max() : std::max(kBlockRows, max_batch);
  std::vector<StepBlock> blocks;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? i : T - 1 - i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    if (blocks.empty() || blocks.back().rows + bs > cap) {
      blocks.push_back({i, i, off, bs});
    } else {
      StepBlock& b = blocks.back();
      b.last = i;
      b.row_begin = std::min(b.row_begin, off);
      b.rows += bs;
    }
  }
  return blocks;
}

inline int64_t block_buffer_rows(const std::vector<StepBlock>& blocks) {
  int64_t rows = 0;
  for (const StepBlock& b : blocks) rows = std::max(rows, b.rows);
  return rows;
}

// After a block's steps: grad_w_ih += dxp_block^T input_rows, grad_w_hh += dhp_block^T hprev_rows (the block's
// [b.rows, H] previous states), and the block's rows of grad_input = dxp_block W_ih.
inline void block_weight_grads(const StepBlock& b, const at::Tensor& dxp, const at::Tensor& dhp,
                               const at::Tensor& input, const at::Tensor& hprev_rows, const at::Tensor& w_ih,
                               bool need_grad_input, at::Tensor& grad_input, at::Tensor& grad_w_ih,
                               at::Tensor& grad_w_hh) {
  // Through the plain layers' GEMM choice (CpuDevice::gemm): the large GEMM where it measured faster than
  // MKL (float32, large_gemm::worth: these [4H, I] += [4H, rows] [rows, I] products of a block's <= 256
  // rows on every instruction set, dX on AMD's AVX-512), else ATen's mm / addmm_ as before.
  const at::Tensor dx = dxp.narrow(0, 0, b.rows), dh = dhp.narrow(0, 0, b.rows);
  const at::Tensor no_bias;
  if (need_grad_input) {
    at::Tensor rows = grad_input.narrow(0, b.row_begin, b.rows);
    CpuDevice::gemm(rows, dx, w_ih, no_bias, false);
  }
  CpuDevice::gemm(grad_w_ih, dx.t(), input.narrow(0, b.row_begin, b.rows), no_bias, true);
  CpuDevice::gemm(grad_w_hh, dh.t(), hprev_rows, no_bias, true);
}

template <typename S, typename BlockDone>
void ln_lstm_backward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, const at::Tensor& grad_output,
                           const at::Tensor& w_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                           const at::Tensor& ln_c_w, const at::Tensor& ln_c_b, const at::Tensor& zh_t,
                           const at::Tensor& zc_t, const at::Tensor& cells, const at::Tensor& c0,
                           at::Tensor& cprev_blk, const at::Tensor& norm_x,
                           const at::Tensor& norm_h, const at::Tensor& gates, const at::Tensor& norm_c,
                           const at::Tensor& rstd, at::Tensor& dh_state, at::Tensor& dc_state,
                           ColumnSums<at::opmath_type<S>>& sums, at::Tensor& dxp, at::Tensor& dhp,
                           const std::vector<StepBlock>& blocks, BlockDone block_done) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const S* go = grad_output.const_data_ptr<S>();
  const ParamVectors<A> pv(at::Tensor(), at::Tensor(), ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, G, H);
  const A *gx = pv.gain_x.data(), *gh = pv.gain_h.data(), *gc = pv.gain_c.data(), *bc = pv.shift_c.data();
  const S *zh = ptr_or_null<S>(zh_t), *zc = ptr_or_null<S>(zc_t);
  const int64_t zh_step = zoneout_row_step(zh_t, H), zc_step = zoneout_row_step(zc_t, H);
  // c_{t-1} of the block's rows, copied per block (a [block rows, H] buffer that stays in cache) instead of
  // an [N, H] copy of all rows first (NOTES entry 52).
  const S* cp = cprev_blk.const_data_ptr<S>();
  const S *nx = norm_x.const_data_ptr<S>(), *nh = norm_h.const_data_ptr<S>();
  const S *gt = gates.const_data_ptr<S>(), *nc = norm_c.const_data_ptr<S>();
  const A* rs = rstd.const_data_ptr<A>();
  S *dhs = dh_state.data_ptr<S>(), *dcs = dc_state.data_ptr<S>();
  S *dx = dxp.data_ptr<S>(), *dhh = dhp.data_ptr<S>();
  const int64_t T = sched.steps();
  const bool block_gemm = use_row_block_gemm<S>();
  const bool avx512 = rows_on_avx512();
  const bool prefetch = backward_prefetch();
  const bool split_k = split_recurrent_grad();
  for (const StepBlock& blk : blocks) {
  copy_previous_rows(sched, reverse, cells, c0, blk.first, blk.last, blk.row_begin, cprev_blk);
  for (int64_t i = blk.first; i <= blk.last; ++i) {
    const int64_t t = reverse ? i : T - 1 - i;  // the forward's order, backwards
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    const int64_t rel = off - blk.row_begin;  // the step's first row in dxp / dhp
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<A> work(3 * H + G);
      A* acc = sums.mine();
#ifdef FUSEDRNN_LN_AVX512_ROWS
      auto* row = avx512 ? &ln_lstm_backward_row_avx512<S, A> : &ln_lstm_backward_row<S, A>;
#else
      auto* row = &ln_lstm_backward_row<S, A>;
#endif
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const int64_t q = prefetch ? next_backward_row(sched, reverse, i, j, begin, end) : -1;
        if (q >= 0) {
          const int64_t q_blk = q - blk.row_begin;  // the next row's c_{t-1}: in this block's copy, or not yet copied
          const S* cp_q = q_blk >= 0 && q_blk < blk.rows ? cp + q_blk * H : nullptr;
          prefetch_rows<S>({{gt + q * G, G}, {nx + q * G, G}, {nh + q * G, G}, {nc + q * H, H}, {cp_q, H},
                            {go + q * H, H}, {zh == nullptr ? nullptr : zh + q * zh_step, H},
                            {zc == nullptr ? nullptr : zc + q * zc_step, H}});
        }
        row(H, gt + p * G, nc + p * H, nx + p * G, nh + p * G, cp + (rel + j) * H, go + p * H,
            zh == nullptr ? nullptr : zh + p * zh_step, zc == nullptr ? nullptr : zc + p * zc_step, rs[p * 3],
            rs[p * 3 + 1], rs[p * 3 + 2], gx, gh, gc, bc, dhs + j * H, dcs + j * H, acc, work.data(), dx + (rel + j) * G,
            dhh + (rel + j) * G);
      }
      if constexpr (std::is_same_v<S, float>) {
        if (block_gemm) {  // after the block's rows have read their dh_state rows
          recurrent_grad_gemm(end - begin, H, G, dhh + (rel + begin) * G, G, w_hh.const_data_ptr<float>(),
                              dhs + begin * H, H, zh != nullptr, split_k);
          row_block_gemm_done();
        }
      }
    });
    // Without zoneout the row pass left dh_state's rows alone: the GEMM writes them (no zeros first).
    if (!block_gemm) matmul<S>(dhp.narrow(0, rel, bs), w_hh, dh_state.narrow(0, 0, bs), zh != nullptr);
  }
  block_done(blk);
  }
}

// Rows of the forward's norm_h buffer: [N, G] when saved for backward; in the inference ops a [B, G] scratch
// that each step overwrites, except where the step GEMM is MKL's (float64, the half types, or
// FUSEDRNN_LN_GEMM=blas): its results depend on where C lies (measured: float64 GRU outputs differed from the
// forward op's with C at the scratch's offset instead of the step's rows), and the inference outputs must
// be the forward's bitwise. brgemm's do not (tested).
template <typename S>
inline int64_t norm_h_rows(bool save, const Shapes& s) {
  return save || !use_row_block_gemm<S>() ? s.N : s.B;
}

using LnLstmOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward op (Save) and its inference twin (!Save: the saved-for-backward outputs undefined, see
// ln_lstm_forward_impl): one body, so checks, messages and arithmetic are the same.
template <bool Save>
LnLstmOutputs run_ln_lstm(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                          const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const at::Tensor& ln_c_w,
                          const OptTensor& ln_c_b, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
                          const at::Tensor& batch_sizes, bool reverse, double eps) {
  const Shapes s = check_common(op, KernelDevice::kCpu, 4, input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w,
                                zoneout_h);
  check_lstm_cell_args(op, s, input, c0, ln_c_w, ln_c_b, zoneout_c);
  check_eps(op, eps);
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  const bool project = input_projection_in_pass(input);  // else norm_x is at::mm's W_ih x
  const at::Tensor input_c = project ? input.contiguous() : at::Tensor();
  const at::Tensor w_ih_t = project ? w_ih.t().contiguous() : at::Tensor();  // [I, G]
  at::Tensor norm_x = project ? new_buffer({s.N, s.G}, input.options()) : at::mm(input, w_ih.t()).contiguous();
  at::Tensor norm_h;
  at::Tensor output = new_buffer({s.N, s.H}, opts);
  at::Tensor gates, cells, norm_c, rstd;
  if constexpr (Save) {
    gates = new_buffer({s.N, s.G}, opts);
    cells = new_buffer({s.N, s.H}, opts);
    norm_c = new_buffer({s.N, s.H}, opts);
    rstd = new_buffer({s.N, 3}, opts.dtype(at::toOpMathType(input.scalar_type())));
  }
  at::Tensor h_state = h0.contiguous().clone(), c_state = c0.contiguous().clone();
  const at::Tensor w_hh_t = w_hh.t().contiguous();  // [H, G]: the step GEMM's right operand
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_lstm_forward", [&] {
    norm_h = new_buffer({norm_h_rows<scalar_t>(Save, s), s.G}, opts);
    ln_lstm_forward_impl<scalar_t, Save>(s, sched, reverse, eps, input_c, w_ih_t, project, w_hh_t, contiguous_or_undefined(b_ih),
                                         contiguous_or_undefined(b_hh), ln_ih_w.contiguous(), ln_hh_w.contiguous(),
                                         ln_c_w.contiguous(), contiguous_or_undefined(ln_c_b),
                                         zoneout_or_undefined(zoneout_h), zoneout_or_undefined(zoneout_c),
                                         h_state, c_state, output, norm_x, norm_h, gates, cells, norm_c, rstd);
  });
  return {output, h_state, c_state, norm_x, norm_h, gates, cells, norm_c, rstd};
}

LnLstmOutputs ln_lstm_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                              const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                              const OptTensor& b_hh, const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                              const at::Tensor& ln_c_w, const OptTensor& ln_c_b, const OptTensor& zoneout_h,
                              const OptTensor& zoneout_c, const at::Tensor& batch_sizes, bool reverse, double eps) {
  return run_ln_lstm<true>("ln_lstm_forward", input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b,
                           zoneout_h, zoneout_c, batch_sizes, reverse, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_lstm_inference(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& ln_ih_w,
    const at::Tensor& ln_hh_w, const at::Tensor& ln_c_w, const OptTensor& ln_c_b, const OptTensor& zoneout_h,
    const OptTensor& zoneout_c, const at::Tensor& batch_sizes, bool reverse, double eps) {
  const LnLstmOutputs r = run_ln_lstm<false>("ln_lstm_inference", input, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w,
                                             ln_hh_w, ln_c_w, ln_c_b, zoneout_h, zoneout_c, batch_sizes, reverse, eps);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
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
  const Shapes s = check_common(op, KernelDevice::kCpu, 4, input, h0, w_ih, w_hh, std::nullopt, std::nullopt, ln_ih_w,
                                ln_hh_w, zoneout_h);
  check_lstm_backward(op, s, input, c0, grad_output, grad_h_n, grad_c_n, output, cells, norm_c, norm_x, norm_h, gates,
                      rstd, ln_c_w, ln_c_b, zoneout_c);
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  const at::Tensor out_c = output.contiguous(), cells_c = cells.contiguous();
  const at::Tensor h0_c = h0.contiguous(), c0_c = c0.contiguous();
  at::Tensor dh_state = grad_h_n.contiguous().clone(), dc_state = grad_c_n.contiguous().clone();
  const at::Tensor nx = norm_x.contiguous(), nh = norm_h.contiguous(), nc = norm_c.contiguous();
  at::Tensor grad_input = need_grad_input ? new_buffer({s.N, s.I}, opts) : at::empty({0}, opts);
  at::Tensor grad_w_ih = at::zeros({s.G, s.I}, opts), grad_w_hh = at::zeros({s.G, s.H}, opts);
  at::Tensor grad_b, grad_ln_ih_w, grad_ln_hh_w, grad_ln_c_w, grad_ln_c_b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_lstm_backward", [&] {
    const std::vector<StepBlock> blocks = step_blocks<scalar_t>(sched, reverse, s.B);
    const int64_t rows = block_buffer_rows(blocks);
    at::Tensor dxp = new_buffer({rows, s.G}, opts), dhp = new_buffer({rows, s.G}, opts);
    // The block's previous states h_{t-1}, c_{t-1} (copy_previous_rows, per block).
    at::Tensor hprev_blk = new_buffer({rows, s.H}, opts), cprev_blk = new_buffer({rows, s.H}, opts);
    ColumnSums<at::opmath_type<scalar_t>> sums(3 * s.G + 2 * s.H);
    ln_lstm_backward_impl<scalar_t>(s, sched, reverse, grad_output.contiguous(), w_hh.contiguous(),
                                    ln_ih_w, ln_hh_w, ln_c_w, contiguous_or_undefined(ln_c_b),
                                    zoneout_or_undefined(zoneout_h), zoneout_or_undefined(zoneout_c), cells_c, c0_c,
                                    cprev_blk, nx, nh, gates.contiguous(), nc, rstd.contiguous(), dh_state, dc_state,
                                    sums, dxp, dhp, blocks, [&](const StepBlock& b) {
                                      copy_previous_rows(sched, reverse, out_c, h0_c, b.first, b.last, b.row_begin,
                                                         hprev_blk);
                                      block_weight_grads(b, dxp, dhp, input, hprev_blk.narrow(0, 0, b.rows), w_ih,
                                                         need_grad_input, grad_input, grad_w_ih, grad_w_hh);
                                    });
    grad_b = sums.total(0, s.G, opts);
    grad_ln_ih_w = sums.total(s.G, s.G, opts);
    grad_ln_hh_w = sums.total(2 * s.G, s.G, opts);
    grad_ln_c_w = sums.total(3 * s.G, s.H, opts);
    grad_ln_c_b = sums.total(3 * s.G + s.H, s.H, opts);
  });
  return {grad_input, dh_state, dc_state, grad_w_ih, grad_w_hh, grad_b, grad_b.clone(), grad_ln_ih_w, grad_ln_hh_w,
          grad_ln_c_w, grad_ln_c_b};
}

// ---- GRU -------------------------------------------------------------------------------------

// Save = false: the inference op (ln_gru_inference), as the LSTM's: no gates or rstd, norm_h a [B, G]
// scratch.
template <typename S, bool Save>
void ln_gru_forward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, double eps_d,
                         const at::Tensor& input, const at::Tensor& w_ih_t, bool project,
                         const at::Tensor& w_hh_t, const at::Tensor& b_ih, const at::Tensor& b_hh,
                         const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const at::Tensor& zh_t,
                         at::Tensor& h_state, at::Tensor& output, at::Tensor& norm_x, at::Tensor& norm_h,
                         at::Tensor& gates, at::Tensor& rstd) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const A eps = A(eps_d);
  S *nx = norm_x.data_ptr<S>(), *nh = norm_h.data_ptr<S>(), *out = output.data_ptr<S>();
  S* gt = Save ? gates.data_ptr<S>() : nullptr;
  A* rs = Save ? rstd.data_ptr<A>() : nullptr;
  S* hs = h_state.data_ptr<S>();
  const ParamVectors<A> pv(b_ih, b_hh, ln_ih_w, ln_hh_w, at::Tensor(), at::Tensor(), G, H);
  const A *gx = pv.gain_x.data(), *gh = pv.gain_h.data(), *bx = pv.bias_x.data(), *bh = pv.bias_h.data();
  const S* zh = ptr_or_null<S>(zh_t);
  const int64_t zh_step = zoneout_row_step(zh_t, H);
  project_and_normalize_inputs<S, A>(s, input, w_ih_t, project, nx, eps, rs, 2);
  const int64_t T = sched.steps();
  const bool block_gemm = use_row_block_gemm<S>();
  const bool avx512 = rows_on_avx512();
  const bool full_norm_h = norm_h.size(0) == s.N;  // else a [B, G] scratch (see norm_h_rows)
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? T - 1 - i : i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    const int64_t nh_off = full_norm_h ? off : 0;  // the step's first row of norm_h
    if (!block_gemm) matmul<S>(h_state.narrow(0, 0, bs), w_hh_t, norm_h.narrow(0, nh_off, bs), false);
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<S, float>) {
        if (block_gemm) {
          row_block_gemm(end - begin, G, H, hs + begin * H, H, w_hh_t.const_data_ptr<float>(),
                         nh + (nh_off + begin) * G, G, false);
          row_block_gemm_done();
        }
      }
      std::vector<A> buf(2 * G + H);
      A* ax = buf.data();  // LN(W_ih x) gain + b_ih, then r, z, n [G]
      A* ah = ax + G;      // LN(W_hh h) gain + b_hh [G]
      A* h_new = ah + G;   // [H]
      auto rows = [&]() __attribute__((always_inline)) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const S* xr = nx + p * G;
        S* hr = nh + (nh_off + j) * G;
        const A rstd_h = normalize_row<S, A>(hr, G, eps);
        if constexpr (Save) rs[p * 2 + 1] = rstd_h;
        for (int64_t c = 0; c < G; ++c) {
          ax[c] = A(xr[c]) * gx[c] + bx[c];
          ah[c] = A(hr[c]) * gh[c] + bh[c];
        }
        for (int64_t c = 0; c < 2 * H; ++c) ax[c] = sigmoid_(ax[c] + ah[c]);  // r, z
        for (int64_t k = 0; k < H; ++k) ax[2 * H + k] = tanh_(ax[2 * H + k] + ax[k] * ah[2 * H + k]);  // n
        S* hs_row = hs + j * H;
        for (int64_t k = 0; k < H; ++k) {
          const A z = ax[H + k];
          h_new[k] = (A(1) - z) * ax[2 * H + k] + z * A(hs_row[k]);
        }
        if (zh != nullptr) {
          const S* zr = zh + p * zh_step;
          for (int64_t k = 0; k < H; ++k) h_new[k] = A(zr[k]) * A(hs_row[k]) + (A(1) - A(zr[k])) * h_new[k];
        }
        if constexpr (Save) {
          S* g = gt + p * G;
          for (int64_t c = 0; c < G; ++c) g[c] = S(ax[c]);
        }
        S* out_row = out + p * H;
        store_twice<S, A>(H, h_new, out_row, hs_row);
      }
      };
      run_rows(avx512, rows);
    });
  }
}

// The backward of one GRU row: zoneout and the cell [H], then the bias and gain gradients and both gate
// LNs' row sums in one pass [G], then both LNs' input gradients [G]. Arrays distinct, as the LSTM row's.
// The GRU's h_{t-1} gradient z dh is written here (the step's GEMM adds the recurrent part).
template <typename S, typename A>
FUSEDRNN_LN_INLINE void ln_gru_backward_row_body(const int64_t H, const S* __restrict__ g, const S* __restrict__ xr,
                                const S* __restrict__ hr, const S* __restrict__ hp_row, const S* __restrict__ go_row,
                                const S* __restrict__ zh_row, const A rstd_x, const A rstd_h,
                                const A* __restrict__ gx, const A* __restrict__ gh, const A* __restrict__ bh,
                                S* __restrict__ dhs_row, A* __restrict__ acc, A* __restrict__ work,
                                S* __restrict__ dx_row, S* __restrict__ dhh_row) {
  const int64_t G = 3 * H;
  A* __restrict__ dax = work;       // d(LN(W_ih x) gain + b_ih) [G]
  A* __restrict__ dah = work + G;   // d(LN(W_hh h) gain + b_hh) [G]
  A* __restrict__ keep = dah + G;   // zoneout's share of dh_t for h_{t-1} [H]
  for (int64_t k = 0; k < H; ++k) {
    const A d = A(dhs_row[k]) + A(go_row[k]);
    const A z = zh_row != nullptr ? A(zh_row[k]) : A(0);
    keep[k] = z * d;
    const A dh = (A(1) - z) * d;
    const A r = A(g[k]), u = A(g[H + k]), n = A(g[2 * H + k]);
    const int64_t cn = 2 * H + k;
    const A ahn = A(hr[cn]) * gh[cn] + bh[cn];
    const A dan = dh * (A(1) - u) * (A(1) - n * n);
    const A dau = dh * (A(hp_row[k]) - n) * u * (A(1) - u);
    const A dar = dan * ahn * r * (A(1) - r);
    dax[k] = dar;
    dax[H + k] = dau;
    dax[cn] = dan;
    dah[k] = dar;
    dah[H + k] = dau;
    dah[cn] = dan * r;
    dhs_row[k] = S(keep[k] + dh * u);
  }
  // Column sums: [0, G) d b_ih, [G, 2G) d b_hh, [2G, 3G) d gain_x, [3G, 4G) d gain_h.
  A* __restrict__ acc_bx = acc;
  A* __restrict__ acc_bh = acc + G;
  A* __restrict__ acc_gx = acc + 2 * G;
  A* __restrict__ acc_gh = acc + 3 * G;
  const std::array<A, 4> sums = row_sums<4, A>(G, [&](int64_t c, A* v) {
    const A x = A(xr[c]), h = A(hr[c]);
    acc_bx[c] += dax[c];
    acc_bh[c] += dah[c];
    acc_gx[c] += dax[c] * x;
    acc_gh[c] += dah[c] * h;
    const A dxn = dax[c] * gx[c], dhn = dah[c] * gh[c];
    v[0] = dxn;
    v[1] = dxn * x;
    v[2] = dhn;
    v[3] = dhn * h;
  });
  const A x_m1 = sums[0] / A(G), x_m2 = sums[1] / A(G), h_m1 = sums[2] / A(G), h_m2 = sums[3] / A(G);
  for (int64_t c = 0; c < G; ++c) {
    const A x = A(xr[c]), h = A(hr[c]);
    dx_row[c] = S(rstd_x * (dax[c] * gx[c] - x_m1 - x * x_m2));
    dhh_row[c] = S(rstd_h * (dah[c] * gh[c] - h_m1 - h * h_m2));
  }
}

FUSEDRNN_LN_ROW_COPIES(ln_gru_backward_row,
                       (const int64_t H, const S* __restrict__ g, const S* __restrict__ xr, const S* __restrict__ hr,
                        const S* __restrict__ hp_row, const S* __restrict__ go_row, const S* __restrict__ zh_row,
                        const A rstd_x, const A rstd_h, const A* __restrict__ gx, const A* __restrict__ gh,
                        const A* __restrict__ bh, S* __restrict__ dhs_row, A* __restrict__ acc, A* __restrict__ work,
                        S* __restrict__ dx_row, S* __restrict__ dhh_row),
                       (H, g, xr, hr, hp_row, go_row, zh_row, rstd_x, rstd_h, gx, gh, bh, dhs_row, acc, work, dx_row,
                        dhh_row))

template <typename S, typename BlockDone>
void ln_gru_backward_impl(const Shapes& s, const StepSchedule& sched, bool reverse, const at::Tensor& grad_output,
                          const at::Tensor& w_hh, const at::Tensor& b_hh, const at::Tensor& ln_ih_w,
                          const at::Tensor& ln_hh_w, const at::Tensor& zh_t, const at::Tensor& hprev,
                          const at::Tensor& norm_x, const at::Tensor& norm_h, const at::Tensor& gates,
                          const at::Tensor& rstd, at::Tensor& dh_state, ColumnSums<at::opmath_type<S>>& sums,
                          at::Tensor& dxp, at::Tensor& dhp, const std::vector<StepBlock>& blocks,
                          BlockDone block_done) {
  using A = at::opmath_type<S>;
  const int64_t H = s.H, G = s.G;
  const S* go = grad_output.const_data_ptr<S>();
  const ParamVectors<A> pv(at::Tensor(), b_hh, ln_ih_w, ln_hh_w, at::Tensor(), at::Tensor(), G, H);
  const A *gx = pv.gain_x.data(), *gh = pv.gain_h.data(), *bh = pv.bias_h.data();
  const S* zh = ptr_or_null<S>(zh_t);
  const int64_t zh_step = zoneout_row_step(zh_t, H);
  const S* hp = hprev.const_data_ptr<S>();
  const S *nx = norm_x.const_data_ptr<S>(), *nh = norm_h.const_data_ptr<S>(), *gt = gates.const_data_ptr<S>();
  const A* rs = rstd.const_data_ptr<A>();
  S* dhs = dh_state.data_ptr<S>();
  S *dx = dxp.data_ptr<S>(), *dhh = dhp.data_ptr<S>();
  const int64_t T = sched.steps();
  const bool block_gemm = use_row_block_gemm<S>();
  const bool avx512 = rows_on_avx512();
  const bool prefetch = backward_prefetch();
  const bool split_k = split_recurrent_grad();
  for (const StepBlock& blk : blocks) {
  for (int64_t i = blk.first; i <= blk.last; ++i) {
    const int64_t t = reverse ? i : T - 1 - i;
    const int64_t bs = sched.batch[t], off = sched.offset[t];
    const int64_t rel = off - blk.row_begin;  // the step's first row in dxp / dhp
    at::parallel_for(0, bs, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<A> work(2 * G + H);
      A* acc = sums.mine();
#ifdef FUSEDRNN_LN_AVX512_ROWS
      auto* row = avx512 ? &ln_gru_backward_row_avx512<S, A> : &ln_gru_backward_row<S, A>;
#else
      auto* row = &ln_gru_backward_row<S, A>;
#endif
      for (int64_t j = begin; j < end; ++j) {
        const int64_t p = off + j;
        const int64_t q = prefetch ? next_backward_row(sched, reverse, i, j, begin, end) : -1;
        if (q >= 0) {
          prefetch_rows<S>({{gt + q * G, G}, {nx + q * G, G}, {nh + q * G, G}, {hp + q * H, H}, {go + q * H, H},
                            {zh == nullptr ? nullptr : zh + q * zh_step, H}});
        }
        row(H, gt + p * G, nx + p * G, nh + p * G, hp + p * H, go + p * H,
            zh == nullptr ? nullptr : zh + p * zh_step, rs[p * 2], rs[p * 2 + 1], gx, gh, bh, dhs + j * H, acc,
            work.data(), dx + (rel + j) * G, dhh + (rel + j) * G);
      }
      if constexpr (std::is_same_v<S, float>) {
        if (block_gemm) {
          recurrent_grad_gemm(end - begin, H, G, dhh + (rel + begin) * G, G, w_hh.const_data_ptr<float>(),
                              dhs + begin * H, H, true, split_k);
          row_block_gemm_done();
        }
      }
    });
    if (!block_gemm) matmul<S>(dhp.narrow(0, rel, bs), w_hh, dh_state.narrow(0, 0, bs), true);
  }
  block_done(blk);
  }
}

using LnGruOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward op and its inference twin, as run_ln_lstm.
template <bool Save>
LnGruOutputs run_ln_gru(const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const at::Tensor& ln_ih_w,
                        const at::Tensor& ln_hh_w, const OptTensor& zoneout_h, const at::Tensor& batch_sizes,
                        bool reverse, double eps) {
  const Shapes s = check_common(op, KernelDevice::kCpu, 3, input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w,
                                zoneout_h);
  check_eps(op, eps);
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  const bool project = input_projection_in_pass(input);  // else norm_x is at::mm's W_ih x
  const at::Tensor input_c = project ? input.contiguous() : at::Tensor();
  const at::Tensor w_ih_t = project ? w_ih.t().contiguous() : at::Tensor();  // [I, G]
  at::Tensor norm_x = project ? new_buffer({s.N, s.G}, input.options()) : at::mm(input, w_ih.t()).contiguous();
  at::Tensor norm_h;
  at::Tensor output = new_buffer({s.N, s.H}, opts);
  at::Tensor gates, rstd;
  if constexpr (Save) {
    gates = new_buffer({s.N, s.G}, opts);
    rstd = new_buffer({s.N, 2}, opts.dtype(at::toOpMathType(input.scalar_type())));
  }
  at::Tensor h_state = h0.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_gru_forward", [&] {
    norm_h = new_buffer({norm_h_rows<scalar_t>(Save, s), s.G}, opts);
    ln_gru_forward_impl<scalar_t, Save>(s, sched, reverse, eps, input_c, w_ih_t, project, w_hh.t().contiguous(), contiguous_or_undefined(b_ih),
                                        contiguous_or_undefined(b_hh), ln_ih_w.contiguous(), ln_hh_w.contiguous(),
                                        zoneout_or_undefined(zoneout_h), h_state, output, norm_x, norm_h, gates,
                                        rstd);
  });
  return {output, h_state, norm_x, norm_h, gates, rstd};
}

LnGruOutputs ln_gru_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                            const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const OptTensor& zoneout_h,
                            const at::Tensor& batch_sizes, bool reverse, double eps) {
  return run_ln_gru<true>("ln_gru_forward", input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w, zoneout_h,
                          batch_sizes, reverse, eps);
}

std::tuple<at::Tensor, at::Tensor> ln_gru_inference(const at::Tensor& input, const at::Tensor& h0,
                                                    const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                    const OptTensor& b_ih, const OptTensor& b_hh,
                                                    const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w,
                                                    const OptTensor& zoneout_h, const at::Tensor& batch_sizes,
                                                    bool reverse, double eps) {
  const LnGruOutputs r = run_ln_gru<false>("ln_gru_inference", input, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w,
                                           zoneout_h, batch_sizes, reverse, eps);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ln_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
                const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_hh,
                const at::Tensor& ln_ih_w, const at::Tensor& ln_hh_w, const OptTensor& zoneout_h,
                const at::Tensor& batch_sizes, bool reverse, bool need_grad_input, const at::Tensor& output,
                const at::Tensor& norm_x, const at::Tensor& norm_h, const at::Tensor& gates, const at::Tensor& rstd) {
  const char* op = "ln_gru_backward";
  const Shapes s = check_common(op, KernelDevice::kCpu, 3, input, h0, w_ih, w_hh, std::nullopt, b_hh, ln_ih_w, ln_hh_w,
                                zoneout_h);
  check_gru_backward(op, s, input, grad_output, grad_h_n, output, norm_x, norm_h, gates, rstd);
  const StepSchedule sched = make_schedule(op, batch_sizes, s.N, s.B);
  const auto opts = input.options();
  const at::Tensor hprev = previous_states(sched, reverse, output.contiguous(), h0.contiguous());
  at::Tensor dh_state = grad_h_n.contiguous().clone();
  const at::Tensor nx = norm_x.contiguous(), nh = norm_h.contiguous();
  at::Tensor grad_input = need_grad_input ? new_buffer({s.N, s.I}, opts) : at::empty({0}, opts);
  at::Tensor grad_w_ih = at::zeros({s.G, s.I}, opts), grad_w_hh = at::zeros({s.G, s.H}, opts);
  at::Tensor grad_b_ih, grad_b_hh, grad_ln_ih_w, grad_ln_hh_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ln_gru_backward", [&] {
    const std::vector<StepBlock> blocks = step_blocks<scalar_t>(sched, reverse, s.B);
    const int64_t rows = block_buffer_rows(blocks);
    at::Tensor dxp = new_buffer({rows, s.G}, opts), dhp = new_buffer({rows, s.G}, opts);
    ColumnSums<at::opmath_type<scalar_t>> sums(4 * s.G);
    ln_gru_backward_impl<scalar_t>(s, sched, reverse, grad_output.contiguous(), w_hh.contiguous(),
                                   contiguous_or_undefined(b_hh), ln_ih_w, ln_hh_w,
                                   zoneout_or_undefined(zoneout_h), hprev, nx, nh, gates.contiguous(),
                                   rstd.contiguous(), dh_state, sums, dxp, dhp, blocks, [&](const StepBlock& b) {
                                     block_weight_grads(b, dxp, dhp, input, hprev.narrow(0, b.row_begin, b.rows),
                                                        w_ih, need_grad_input, grad_input, grad_w_ih, grad_w_hh);
                                   });
    grad_b_ih = sums.total(0, s.G, opts);
    grad_b_hh = sums.total(s.G, s.G, opts);
    grad_ln_ih_w = sums.total(2 * s.G, s.G, opts);
    grad_ln_hh_w = sums.total(3 * s.G, s.G, opts);
  });
  return {grad_input, dh_state, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_ln_ih_w, grad_ln_hh_w};
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
  // The inference twins (as csrc/ops.cpp's lstm_inference / gru_inference): the forward's main outputs
  // bitwise, without the saved-for-backward buffers; what fusedrnn/_layernorm_ops.py runs when no
  // gradient can be taken. Not differentiable.
  m.def(
      "ln_lstm_inference(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor ln_ih_w, Tensor ln_hh_w, Tensor ln_c_w, Tensor? ln_c_b, Tensor? zoneout_h, Tensor? zoneout_c, "
      "Tensor batch_sizes, bool reverse, float eps) -> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "ln_gru_inference(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor ln_ih_w, Tensor ln_hh_w, Tensor? zoneout_h, Tensor batch_sizes, bool reverse, float eps) -> "
      "(Tensor output, Tensor h_n)");
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
  m.impl("ln_lstm_inference", &fusedrnn::layernorm::ln_lstm_inference);
  m.impl("ln_gru_inference", &fusedrnn::layernorm::ln_gru_inference);
}
