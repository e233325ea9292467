// The AVX2+FMA engine, forward: the whole time loop of one layer and direction,
// recurrent GEMM and cell fused per tile (design: cpu_engine.h).
#include "avx2_engine_common.h"  // last: switches the target to AVX2+FMA

namespace fusedrnn {
namespace cpu_engine {
namespace avx2 {
namespace {

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

}  // namespace
}  // namespace avx2

void forward(const ForwardArgs& a) {
  switch (a.cell) {
    case CellKind::kLstm: avx2::forward_impl<avx2::cells::LstmCell>(a); break;
    case CellKind::kGru: avx2::forward_impl<avx2::cells::GruCell>(a); break;
    case CellKind::kRnnTanh: avx2::forward_impl<avx2::cells::RnnTanhCell>(a); break;
    case CellKind::kRnnRelu: avx2::forward_impl<avx2::cells::RnnReluCell>(a); break;
  }
}

}  // namespace cpu_engine
}  // namespace fusedrnn

#pragma GCC pop_options
