// The AVX2+FMA recurrent engine (interface and design: cpu_engine.h).
//
// Portability: everything below the `#pragma GCC target` line is compiled for
// AVX2+FMA whatever the build's flags, and only runs after available() has
// checked the CPU at run time. The cell math is included into a namespace of
// its own here, so the AVX2 copies of the shared inline functions
// (Cell::forward, exp_simd, ...) are distinct symbols: the linker cannot hand
// them to the portable code in other translation units (the ODR trap that
// PyTorch avoids with its CPU_CAPABILITY namespaces).
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_engine.h"

namespace fusedrnn {
namespace cpu_engine {

bool available() {
  static const bool cpu_has_avx2_fma = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (!cpu_has_avx2_fma) return false;
  // Opt-in: on the project's 2-core EPYC, quiet, the per-step path (MKL step
  // GEMMs) measured 2-17% faster for LSTM and GRU, the engine ~8% faster for
  // RNN (benchmarks/NOTES.md, entry 10), so the measured-faster path is the default.
  const char* v = std::getenv("FUSEDRNN_CPU_ENGINE");
  return v != nullptr && v[0] == '1';
}

}  // namespace cpu_engine
}  // namespace fusedrnn

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// The shared per-element cell math, compiled here for AVX2 (see the top), in an
// anonymous namespace: internal linkage, so these copies are neither exported
// nor merged with the portable ones (and are called directly, not through the PLT).
// <cmath> and <cstdint> are already included, so only the cell code lands here.
namespace {
namespace fusedrnn_avx2 {
#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
}  // namespace fusedrnn_avx2
}  // namespace

namespace fusedrnn {
namespace cpu_engine {
namespace {

namespace cells = fusedrnn_avx2::fusedrnn;

// Micro-tile: kMR rows x 16 columns (two 8-float vectors) of C in 12 ymm
// registers, the shape of BLIS's Haswell sgemm kernel. Per k: two loads of B,
// kMR broadcasts of A, 2*kMR FMAs: each B element loaded is used kMR times,
// and 12 independent accumulators cover the FMA latency (4 cycles x 2 ports).
constexpr int kMR = 6;
constexpr int kVec = 8;          // floats per ymm
constexpr int kPanel = 2 * kVec;  // columns per micro-kernel call

// acc[m][v] += sum_k A[m * lda + k] * Bp[k * ldb + v * 8 .. + 8] for m < MR.
template <int MR>
__attribute__((always_inline)) inline void micro_kernel(int64_t K, const float* A, int64_t lda, const float* Bp,
                                                        int64_t ldb, __m256 (&acc)[kMR][2]) {
  __m256 c[MR][2];
  for (int m = 0; m < MR; ++m) {
    c[m][0] = acc[m][0];
    c[m][1] = acc[m][1];
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp);
    const __m256 b1 = _mm256_loadu_ps(Bp + kVec);
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(A + m * lda + k);
      c[m][0] = _mm256_fmadd_ps(a, b0, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(a, b1, c[m][1]);
    }
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = c[m][0];
    acc[m][1] = c[m][1];
  }
}

// Mask of the first `valid` lanes (0..8) for maskload/maskstore.
inline __m256i lane_mask(int64_t valid) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(valid, kVec))), lanes);
}

// Stores the first `valid` floats of v (all 8 when valid >= 8, none when <= 0).
inline void store_partial(float* dst, __m256 v, int64_t valid) {
  if (valid >= kVec) {
    _mm256_storeu_ps(dst, v);
  } else if (valid > 0) {
    _mm256_maskstore_ps(dst, lane_mask(valid), v);
  }
}
inline __m256 load_partial(const float* src, int64_t valid) {
  if (valid >= kVec) return _mm256_loadu_ps(src);
  if (valid > 0) return _mm256_maskload_ps(src, lane_mask(valid));
  return _mm256_setzero_ps();
}

// ---------------------------------------------------------------------------
// Splitting the batch rows across threads
// ---------------------------------------------------------------------------

// Contiguous row ranges, one per thread, with about equal numbers of tokens
// (a ragged batch's first rows are its longest sequences). Depends only on the
// schedule and the thread count, so the work split is the same run to run.
std::vector<int64_t> split_rows(const Schedule& s, int64_t B, int threads) {
  const std::vector<int64_t>& batch = *s.batch;
  // length of row b = number of steps with batch[t] > b (batch is non-increasing)
  std::vector<int64_t> length(B, 0);
  for (int64_t bs : batch) {
    for (int64_t b = 0; b < bs; ++b) ++length[b];
  }
  int64_t total = 0;
  for (int64_t l : length) total += l;
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, B)));
  std::vector<int64_t> bounds(n + 1, B);
  bounds[0] = 0;
  int64_t row = 0, seen = 0;
  for (int i = 1; i < n; ++i) {
    const int64_t target = (total * i + n - 1) / n;
    // at least one row for each thread, and leave one for each later thread
    while (row < B - (n - i) && (seen < target || row < bounds[i - 1] + 1)) seen += length[row++];
    bounds[i] = row;
  }
  return bounds;
}

// Rows [lo, end) in blocks of at most kMR rows, as even as possible (32 rows:
// 6,6,5,5,5,5 rather than 6,6,6,6,6,2): a thin block runs its micro-kernel with
// few accumulators, latency-bound at a fraction of the FMA rate.
template <typename Body>
void for_each_row_block(int64_t lo, int64_t end, const Body& body) {
  const int64_t n = end - lo;
  if (n <= 0) return;
  const int64_t blocks = (n + kMR - 1) / kMR;
  const int64_t base = n / blocks, extra = n % blocks;
  int64_t m0 = lo;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t mr = base + (i < extra ? 1 : 0);
    body(m0, mr);
    m0 += mr;
  }
}

// Runs body(row_begin, row_end) once per thread on its rows, for the whole
// sequence: one parallel region per call, no synchronisation between steps.
template <typename Body>
void for_each_thread_rows(const Schedule& s, int64_t B, const Body& body) {
  const std::vector<int64_t> bounds = split_rows(s, B, at::get_num_threads());
  const int64_t n = static_cast<int64_t>(bounds.size()) - 1;
  if (n == 1) {
    body(bounds[0], bounds[1]);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(bounds[i], bounds[i + 1]);
  });
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Gate-interleaved packing of W_hh for forward. Hidden units go in blocks of
// U (8 for LSTM, 16 for GRU and RNN, so that a block's G*U columns are whole
// 16-column micro-kernel panels); block ub holds, for every k, the G gates of
// its U units: packed[ub][k][g * U + u] = W_hh[g * H + ub * U + u][k], zero past
// H. One micro-tile of rows x (G*U) columns then holds all the gates of its
// units, ready for the cell.
template <int G>
struct ForwardPacking {
  static constexpr int U = (G % 2 == 0) ? 8 : 16;
  static constexpr int kWidth = G * U;  // columns of one unit block's panel
  static constexpr int kCalls = kWidth / kPanel;
  static_assert(kWidth % kPanel == 0, "a unit block must be whole micro-kernel panels");
};

template <int G>
void pack_forward(const float* w_hh, const float* b_hh, int64_t H, std::vector<float>& w_packed,
                  std::vector<float>& b_packed) {
  using P = ForwardPacking<G>;
  const int64_t blocks = (H + P::U - 1) / P::U;
  w_packed.assign(blocks * H * P::kWidth, 0.0f);
  b_packed.assign(blocks * P::kWidth, 0.0f);
  for (int64_t ub = 0; ub < blocks; ++ub) {
    for (int g = 0; g < G; ++g) {
      for (int u = 0; u < P::U; ++u) {
        const int64_t j = ub * P::U + u;
        if (j >= H) continue;
        const float* row = w_hh + (g * H + j) * H;
        float* dst = w_packed.data() + ub * H * P::kWidth + g * P::U + u;
        for (int64_t k = 0; k < H; ++k) dst[k * P::kWidth] = row[k];
        if (b_hh != nullptr) b_packed[ub * P::kWidth + g * P::U + u] = b_hh[g * H + j];
      }
    }
  }
}

// One micro-tile row block x unit block: the recurrent product in registers,
// stored into the L1 tile where the cell reads it as `hproj`, then the cell on
// these rows and units.
// flatten: the micro-kernel, the cell and its activations are inlined into one
// loop nest (GCC's inliner otherwise gives up inside the big per-thread loop
// and calls the cell out of line, scalar); noinline keeps each tile variant a
// function of its own.
template <typename Cell, int MR>
__attribute__((noinline, flatten)) void forward_tile(const cells::ForwardStepParams<float>& q, const float* a, const float* w_panel,
                  const float* b_panel, int64_t ub, float* tile) {
  constexpr int G = Cell::kGates;
  using P = ForwardPacking<G>;
  const int64_t H = q.hidden;
  const int64_t j0 = ub * P::U;
  for (int c = 0; c < P::kCalls; ++c) {
    __m256 acc[kMR][2];
    const __m256 bias0 = _mm256_loadu_ps(b_panel + c * kPanel);
    const __m256 bias1 = _mm256_loadu_ps(b_panel + c * kPanel + kVec);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = bias0;
      acc[m][1] = bias1;
    }
    micro_kernel<MR>(H, a, H, w_panel + c * kPanel, P::kWidth, acc);
    for (int v = 0; v < 2; ++v) {
      const int col = c * kPanel + v * kVec;  // column within the unit block
      const int g = col / P::U;
      const int64_t j = j0 + col % P::U;
      for (int m = 0; m < MR; ++m) store_partial(tile + m * G * H + g * H + j, acc[m][v], H - j);
    }
  }
  if (j0 + P::U <= H) {
    for (int m = 0; m < MR; ++m) {
#pragma omp simd simdlen(8)
      for (int u = 0; u < P::U; ++u) Cell::forward(q, m, j0 + u);
    }
  } else {
    for (int m = 0; m < MR; ++m) {
#pragma omp simd simdlen(8)
      for (int64_t j = j0; j < H; ++j) Cell::forward(q, m, j);
    }
  }
}

template <typename Cell>
void forward_impl(const ForwardArgs& args) {
  constexpr int G = Cell::kGates;
  using P = ForwardPacking<G>;
  const int64_t H = args.H;
  const int64_t blocks = (H + P::U - 1) / P::U;
  std::vector<float> w_packed, b_packed;
  pack_forward<G>(args.w_hh, args.b_hh, H, w_packed, b_packed);
  const std::vector<int64_t>& batch = *args.sched.batch;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T = static_cast<int64_t>(batch.size());

  for_each_thread_rows(args.sched, args.B, [&](int64_t lo, int64_t hi) {
    // h_{t-1} of the row block: the cell overwrites the running state in place
    // while later unit blocks still multiply by the old one.
    std::vector<float> a(kMR * H);
    std::vector<float> tile(kMR * G * H);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = args.sched.reverse ? T - 1 - k : k;
      const int64_t end = std::min(hi, batch[t]);
      const int64_t off = offset[t];
      for_each_row_block(lo, end, [&](int64_t m0, int64_t mr) {
        std::memcpy(a.data(), args.h_state + m0 * H, mr * H * sizeof(float));
        cells::ForwardStepParams<float> q;
        q.batch = mr;
        q.hidden = H;
        q.gates = args.gates + (off + m0) * G * H;
        q.hproj = tile.data();
        q.h_state = args.h_state + m0 * H;
        q.out = args.output + (off + m0) * H;
        if (args.c_state != nullptr) q.c_state = args.c_state + m0 * H;
        if (args.cells != nullptr) q.cells = args.cells + (off + m0) * H;
        if (args.hn != nullptr) q.hn = args.hn + (off + m0) * H;
        for (int64_t ub = 0; ub < blocks; ++ub) {
          const float* w_panel = w_packed.data() + ub * H * P::kWidth;
          const float* b_panel = b_packed.data() + ub * P::kWidth;
          switch (mr) {
            case 6: forward_tile<Cell, 6>(q, a.data(), w_panel, b_panel, ub, tile.data()); break;
            case 5: forward_tile<Cell, 5>(q, a.data(), w_panel, b_panel, ub, tile.data()); break;
            case 4: forward_tile<Cell, 4>(q, a.data(), w_panel, b_panel, ub, tile.data()); break;
            case 3: forward_tile<Cell, 3>(q, a.data(), w_panel, b_panel, ub, tile.data()); break;
            case 2: forward_tile<Cell, 2>(q, a.data(), w_panel, b_panel, ub, tile.data()); break;
            default: forward_tile<Cell, 1>(q, a.data(), w_panel, b_panel, ub, tile.data()); break;
          }
        }
      });
    }
  });
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// W_hh [G*H, H] in 16-column panels for dh = dgates_h W_hh:
// packed[nb][k][e] = W_hh[k][nb * 16 + e], zero past H.
void pack_backward(const float* w_hh, int64_t G, int64_t H, std::vector<float>& w_packed) {
  const int64_t K = G * H;
  const int64_t blocks = (H + kPanel - 1) / kPanel;
  w_packed.assign(blocks * K * kPanel, 0.0f);
  for (int64_t nb = 0; nb < blocks; ++nb) {
    const int64_t width = std::min<int64_t>(kPanel, H - nb * kPanel);
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(w_packed.data() + (nb * K + k) * kPanel, w_hh + k * H + nb * kPanel, width * sizeof(float));
    }
  }
}

// dh_{t-1} rows [0, MR) = dgates_h rows W_hh (+ the direct path the GRU cell
// wrote into dh, when accumulate).
template <int MR>
void backward_gemm(const float* dgates_h, int64_t G, int64_t H, const float* w_packed, bool accumulate, float* dh) {
  const int64_t K = G * H;
  const int64_t blocks = (H + kPanel - 1) / kPanel;
  for (int64_t nb = 0; nb < blocks; ++nb) {
    const int64_t n0 = nb * kPanel;
    __m256 acc[kMR][2];
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) {
        acc[m][v] = accumulate ? load_partial(dh + m * H + n0 + v * kVec, H - n0 - v * kVec) : _mm256_setzero_ps();
      }
    }
    micro_kernel<MR>(K, dgates_h, K, w_packed + nb * K * kPanel, kPanel, acc);
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) store_partial(dh + m * H + n0 + v * kVec, acc[m][v], H - n0 - v * kVec);
    }
  }
}

// One block of MR rows of one step: the cell backward, then dh_{t-1} = dgates_h
// W_hh while the block's gate gradients are in L1. GRU's cell has written the
// direct path z * dh into dh, which the product adds to.
template <typename Cell, int MR>
__attribute__((noinline, flatten)) void backward_block(const cells::BackwardStepParams<float>& q,
                                                       const float* dgates_h, const float* w_packed, float* dh) {
  constexpr int G = Cell::kGates;
  for (int m = 0; m < MR; ++m) {
#pragma omp simd simdlen(8)
    for (int64_t j = 0; j < q.hidden; ++j) Cell::backward(q, m, j);
  }
  backward_gemm<MR>(dgates_h, G, q.hidden, w_packed, G == 3, dh);
}

template <typename Cell>
void backward_impl(const BackwardArgs& args) {
  constexpr int G = Cell::kGates;
  constexpr bool is_gru = G == 3;
  const int64_t H = args.H;
  std::vector<float> w_packed;
  pack_backward(args.w_hh, G, H, w_packed);
  const std::vector<int64_t>& batch = *args.sched.batch;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T = static_cast<int64_t>(batch.size());

  for_each_thread_rows(args.sched, args.B, [&](int64_t lo, int64_t hi) {
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = args.sched.reverse ? k : T - 1 - k;  // reverse of the forward's order
      const int64_t end = std::min(hi, batch[t]);
      const int64_t off = offset[t];
      for_each_row_block(lo, end, [&](int64_t m0, int64_t mr) {
        const int64_t row = off + m0;  // packed row of the block's first sequence
        cells::BackwardStepParams<float> q;
        q.batch = mr;
        q.hidden = H;
        q.gates = args.gates + row * G * H;
        q.grad_out = args.grad_output + row * H;
        q.grad_h_state = args.grad_h_state + m0 * H;
        if (args.grad_c_state != nullptr) q.grad_c_state = args.grad_c_state + m0 * H;
        if (args.cells != nullptr) q.cells = args.cells + row * H;
        if (args.c_prev != nullptr) q.c_prev = args.c_prev + row * H;
        if (args.h_prev != nullptr) q.h_prev = args.h_prev + row * H;
        if (args.hn != nullptr) q.hn = args.hn + row * H;
        q.out = args.output + row * H;
        q.grad_gates = args.grad_gates + row * G * H;
        if (is_gru) q.grad_gates_h = args.grad_gates_h + row * G * H;
        const float* dgates_h = (is_gru ? args.grad_gates_h : args.grad_gates) + row * G * H;
        float* dh = args.grad_h_state + m0 * H;
        switch (mr) {
          case 6: backward_block<Cell, 6>(q, dgates_h, w_packed.data(), dh); break;
          case 5: backward_block<Cell, 5>(q, dgates_h, w_packed.data(), dh); break;
          case 4: backward_block<Cell, 4>(q, dgates_h, w_packed.data(), dh); break;
          case 3: backward_block<Cell, 3>(q, dgates_h, w_packed.data(), dh); break;
          case 2: backward_block<Cell, 2>(q, dgates_h, w_packed.data(), dh); break;
          default: backward_block<Cell, 1>(q, dgates_h, w_packed.data(), dh); break;
        }
      });
    }
  });
}

}  // namespace

void forward(const ForwardArgs& a) {
  switch (a.cell) {
    case CellKind::kLstm: forward_impl<cells::LstmCell>(a); break;
    case CellKind::kGru: forward_impl<cells::GruCell>(a); break;
    case CellKind::kRnnTanh: forward_impl<cells::RnnTanhCell>(a); break;
    case CellKind::kRnnRelu: forward_impl<cells::RnnReluCell>(a); break;
  }
}

void backward(const BackwardArgs& a) {
  switch (a.cell) {
    case CellKind::kLstm: backward_impl<cells::LstmCell>(a); break;
    case CellKind::kGru: backward_impl<cells::GruCell>(a); break;
    case CellKind::kRnnTanh: backward_impl<cells::RnnTanhCell>(a); break;
    case CellKind::kRnnRelu: backward_impl<cells::RnnReluCell>(a); break;
  }
}

}  // namespace cpu_engine
}  // namespace fusedrnn

#pragma GCC pop_options
