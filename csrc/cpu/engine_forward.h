// The engine's forward: the whole time loop of one layer and direction,
// recurrent GEMM and cell fused per tile (design: cpu_engine.h). Written for any
// vector width: included once per instruction set after engine_common.h (see there).

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Gate-interleaved packing of W_ih and W_hh for forward. Hidden units go in
// blocks of U (one vector for LSTM, two for GRU and RNN: AVX2 8 and 16, AVX-512
// 16 and 32, so that a block's G*U columns are whole 2-vector micro-kernel panels); block ub holds, for every k, the G
// gates of its U units in column g * U + u, zero past H. One micro-tile of rows x (G*U) columns
// then holds all the gates of its units, ready for the cell.
// Each micro-kernel call's kPanel columns are one contiguous [K][kPanel] stream (BLIS's packed
// B): packed[ub][c][k][e] = W[g * H + ub * U + u][k] for column c * kPanel + e = g * U + u.
// Interleaving the calls' columns per k ([K][G*U], one 64-byte line of each call per 128 or
// 192 bytes) measured slower once a block's panel left L1 (H > 128: benchmarks/NOTES.md,
// entry 43).
template <int G>
struct ForwardPacking {
  static constexpr int U = (G % 2 == 0) ? kVec : 2 * kVec;
  static constexpr int kWidth = G * U;  // columns of one unit block's panel
  static constexpr int kCalls = kWidth / kPanel;
  static_assert(kWidth % kPanel == 0, "a unit block must be whole micro-kernel panels");
};

// column(row, panel, e) for every real unit's weight row: W's row g * H + j, its unit block's panel
// ub * kCalls + c and column e in that panel (the packing's map; both operand types' packers use it).
template <int G, typename Column>
void for_each_packed_row(const float* w, int64_t H, int64_t K, const Column& column) {
  using P = ForwardPacking<G>;
  const int64_t blocks = (H + P::U - 1) / P::U;
  for (int64_t ub = 0; ub < blocks; ++ub) {
    for (int g = 0; g < G; ++g) {
      for (int u = 0; u < P::U; ++u) {
        const int64_t j = ub * P::U + u;
        if (j >= H) continue;
        const int64_t col = g * P::U + u;
        column(w + (g * H + j) * K, ub * P::kCalls + col / kPanel, col % kPanel);
      }
    }
  }
}

// w: [G*H, K] -> [blocks][kCalls][K][kPanel]
template <int G>
void pack_panels(const float* w, int64_t H, int64_t K, std::vector<float>& packed) {
  using P = ForwardPacking<G>;
  packed.assign((H + P::U - 1) / P::U * K * P::kWidth, 0.0f);
  for_each_packed_row<G>(w, H, K, [&](const float* row, int64_t panel, int64_t e) {
    float* dst = packed.data() + panel * K * kPanel + e;
    for (int64_t k = 0; k < K; ++k) dst[k * kPanel] = row[k];
  });
}

// The biases each accumulator starts from, per unit block: [blocks][kWidth (+ U)].
// b_ih + b_hh for every gate, except GRU's n gate, whose input and hidden parts
// stay apart (n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))): columns 2U..3U
// hold b_in and an extra U columns hold b_hn.
template <int G>
void pack_biases(const float* b_ih, const float* b_hh, int64_t H, std::vector<float>& packed) {
  using P = ForwardPacking<G>;
  constexpr int width = P::kWidth + (G == 3 ? P::U : 0);
  const int64_t blocks = (H + P::U - 1) / P::U;
  packed.assign(blocks * width, 0.0f);
  for (int64_t ub = 0; ub < blocks; ++ub) {
    for (int g = 0; g < G; ++g) {
      for (int u = 0; u < P::U; ++u) {
        const int64_t j = ub * P::U + u;
        if (j >= H) continue;
        const float bi = b_ih != nullptr ? b_ih[g * H + j] : 0.0f;
        const float bh = b_hh != nullptr ? b_hh[g * H + j] : 0.0f;
        float* dst = packed.data() + ub * width;
        if (G == 3 && g == 2) {
          dst[g * P::U + u] = bi;
          dst[P::kWidth + u] = bh;
        } else {
          dst[g * P::U + u] = bi + bh;
        }
      }
    }
  }
}

// ---- The cells on a tile, kVec units per vector ---------------------------
// tile[m * width + g * U + u]: row m's pre-activation x_t W_ih^T + b_ih +
// h_{t-1} W_hh^T + b_hh of gate g, unit j0 + u (GRU: the n gate's input part
// at 2U, its hidden part W_hn h + b_hn at 3U), for `valid` (<= U) real units.
// The pointers of q are at the row block's first row (row m of a [rows, G*H]
// or [rows, H] buffer is m * G * H or m * H further). Each epilogue is the
// vector form of its cell's forward in cells/*_cell.h: the same formulas and
// outputs, so fusedrnn.reference and the per-step path check it
// (tests/test_cpu_engine.py, tests/test_parity.py).
using StepPtrs = cells::ForwardStepParams<float>;

template <typename Cell>
struct ForwardEpilogue;

// i, f, o = sigmoid, g = tanh; c = f c_{t-1} + i g; h = o tanh(c).
template <>
struct ForwardEpilogue<cells::LstmCell> {
  static constexpr int G = 4, U = kVec, kTileWidth = G * U;
  template <int MR, bool Save>
  static void apply(const StepPtrs& q, const float* tile, int64_t j0, int64_t valid) {
    const int64_t H = q.hidden;
    Vecs<MR> i, f, g, o, c, h;
    for (int m = 0; m < MR; ++m) {
      const float* t = tile + m * kTileWidth;
      i[m] = Simd::load(t);
      f[m] = Simd::load(t + U);
      g[m] = Simd::load(t + 2 * U);
      o[m] = Simd::load(t + 3 * U);
    }
    sigmoid_n<MR>(i);
    sigmoid_n<MR>(f);
    sigmoid_n<MR>(o);
    tanh_n<MR>(g);
    for (int m = 0; m < MR; ++m) {
      c[m] = Simd::fmadd(f[m], load_partial(q.c_state + m * H + j0, valid), Simd::mul(i[m], g[m]));
      h[m] = c[m];
    }
    tanh_n<MR>(h);
    for (int m = 0; m < MR; ++m) {
      h[m] = Simd::mul(o[m], h[m]);
      if constexpr (Save) {
        float* x = q.gates + m * G * H + j0;
        store_partial(x, i[m], valid);
        store_partial(x + H, f[m], valid);
        store_partial(x + 2 * H, g[m], valid);
        store_partial(x + 3 * H, o[m], valid);
        store_partial(q.cells + m * H + j0, c[m], valid);
      }
      store_partial(q.c_state + m * H + j0, c[m], valid);
      store_partial(q.out + m * H + j0, h[m], valid);
      store_partial(q.h_state + m * H + j0, h[m], valid);
    }
  }
};

// r, z = sigmoid; n = tanh(x_n + r hn) with hn = W_hn h + b_hn (saved);
// h = (1 - z) n + z h_{t-1}. 2 * kVec units: two vectors per gate and row.
template <>
struct ForwardEpilogue<cells::GruCell> {
  static constexpr int G = 3, U = 2 * kVec, kTileWidth = (G + 1) * U;
  template <int MR, bool Save>
  static void apply(const StepPtrs& q, const float* tile, int64_t j0, int64_t valid) {
    const int64_t H = q.hidden;
    constexpr int N = 2 * MR;
    Vecs<N> r, z, n, hn;
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) {
        const float* t = tile + m * kTileWidth + v * kVec;
        r[2 * m + v] = Simd::load(t);
        z[2 * m + v] = Simd::load(t + U);
        hn[2 * m + v] = Simd::load(t + 3 * U);
      }
    }
    sigmoid_n<N>(r);
    sigmoid_n<N>(z);
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) {
        const int k = 2 * m + v;
        n[k] = Simd::fmadd(r[k], hn[k], Simd::load(tile + m * kTileWidth + 2 * U + v * kVec));
      }
    }
    tanh_n<N>(n);
    const V one = Simd::set1(1.0f);
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) {
        const int k = 2 * m + v;
        const int64_t left = valid - v * kVec, col = j0 + v * kVec;
        const V h_prev = load_partial(q.h_state + m * H + col, left);
        const V h = Simd::fmadd(z[k], h_prev, Simd::mul(Simd::sub(one, z[k]), n[k]));
        if constexpr (Save) {
          float* x = q.gates + m * G * H + col;
          store_partial(x, r[k], left);
          store_partial(x + H, z[k], left);
          store_partial(x + 2 * H, n[k], left);
          store_partial(q.hn + m * H + col, hn[k], left);
        }
        store_partial(q.h_state + m * H + col, h, left);
        store_partial(q.out + m * H + col, h, left);
      }
    }
  }
};

// h = tanh or relu of the pre-activation. 2 * kVec units: two vectors per row.
template <bool Relu>
struct ForwardEpilogue<cells::RnnCell<Relu>> {
  static constexpr int G = 1, U = 2 * kVec, kTileWidth = G * U;
  template <int MR, bool Save>
  static void apply(const StepPtrs& q, const float* tile, int64_t j0, int64_t valid) {
    const int64_t H = q.hidden;
    constexpr int N = 2 * MR;
    Vecs<N> a;
    for (int k = 0; k < N; ++k) a[k] = Simd::load(tile + k * kVec);  // rows are 2 * kVec floats apart
    if constexpr (Relu) {
      relu_n<N>(a);
    } else {
      tanh_n<N>(a);
    }
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) {
        store_partial(q.h_state + m * H + j0 + v * kVec, a[2 * m + v], valid - v * kVec);
        store_partial(q.out + m * H + j0 + v * kVec, a[2 * m + v], valid - v * kVec);
      }
    }
  }
};

// The packed weights of one layer call, and where one unit block's panels start. T: the products'
// operand type, float, or Bf16 (a bfloat16's bits: the bf16 dot-product forward, below).
template <int G, typename T = float>
struct ForwardPanels {
  using P = ForwardPacking<G>;
  static constexpr int kBiasWidth = P::kWidth + (G == 3 ? P::U : 0);
  // Elements per k of a panel: kPanel floats, or kPanel bf16 pairs per k pair.
  static constexpr int64_t kLdw = std::is_same_v<T, float> ? kPanel : 2 * kPanel;
  int64_t H = 0, I = 0;  // the products' depths (the operands' row widths): H and I, for bf16 rounded up to even
  std::vector<T> w_ih, w_hh;
  std::vector<float> bias;
  bool fused_input = false;  // w_ih packed here, else the gates buffer holds x W_ih^T + b_ih
  // Unit block ub's panel for micro-kernel call c (columns c * kPanel ..): [K][kPanel] (bf16: [K/2][kPanel][2]).
  const T* x_panel(int64_t ub, int c) const {
    return fused_input ? w_ih.data() + (ub * P::kCalls + c) * I * kPanel : nullptr;
  }
  const T* h_panel(int64_t ub, int c) const { return w_hh.data() + (ub * P::kCalls + c) * H * kPanel; }
  const float* bias_panel(int64_t ub) const { return bias.data() + ub * kBiasWidth; }
};

#ifdef FUSEDRNN_ENGINE_BF16_PRODUCTS
// ---- bfloat16 dot products (ForwardArgs::bf16_products; engine_avx512_bf16.cpp) -------------------
// vdpbf16ps acc, a, b adds a[2i] b[2i] + a[2i+1] b[2i+1] to float lane i: two bf16 x bf16 products
// (exact in float32: 8 significant bits each) per lane and instruction, twice the float32 FMA's work
// per instruction, with float32 sums (the instruction treats bf16 denormals as zero and flushes a
// denormal result, as torch.nn's oneDNN bf16 kernels, which run the same instruction, do). So the
// micro-kernel takes k in pairs: one 32-bit broadcast of a row's two bf16 (A), one 64-byte load of
// 16 columns' pairs (B), the panels holding each column's k pair side by side, [K/2][kPanel][2], K
// rounded up to even with a zero (and the operands' rows padded with a zero: 0 x 0, never 0 x NaN).
// The weights and the input of a bfloat16 layer are bf16 values (their float32 copies round back
// exactly); h_{t-1} is rounded to bf16 for the product each step (as torch.nn's bf16 layers round the
// whole state), the running state and the cell stay float32.
using Bf16 = uint16_t;  // a bfloat16's bits
inline int64_t round_up_even(int64_t k) { return (k + 1) & ~int64_t{1}; }

// Round to nearest even, as vcvtneps2bf16 (rows_to_bf16): NaN stays a (quiet) NaN, denormals are zero.
inline Bf16 to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  if ((b & 0x7f800000u) == 0) return static_cast<Bf16>((b >> 16) & 0x8000u);  // zero, denormal: signed zero
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<Bf16>((b >> 16) | 0x40u);  // NaN
  return static_cast<Bf16>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// w: [G*H, K] -> [blocks][kCalls][K2 / 2][kPanel][2], K2 = K rounded up to even, zeros past K and H.
template <int G>
void pack_panels_bf16(const float* w, int64_t H, int64_t K, std::vector<Bf16>& packed) {
  using P = ForwardPacking<G>;
  const int64_t K2 = round_up_even(K);
  packed.assign((H + P::U - 1) / P::U * K2 * P::kWidth, 0);
  for_each_packed_row<G>(w, H, K, [&](const float* row, int64_t panel, int64_t e) {
    Bf16* dst = packed.data() + panel * K2 * kPanel + 2 * e;
    for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 2 * kPanel + k % 2] = to_bf16(row[k]);
  });
}

// dst[r * K2 + k] = src[r * ld + k] in bf16 for r < rows, k < K; dst[r * K2 + K] = 0 where K is odd.
inline void rows_to_bf16(const float* src, int64_t ld, int64_t rows, int64_t K, Bf16* dst) {
  const int64_t K2 = round_up_even(K);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    Bf16* d = dst + r * K2;
    int64_t k = 0;
    for (; k + kVec <= K; k += kVec) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k), (__m256i)_mm512_cvtneps_pbh(Simd::load(s + k)));
    }
    if (k < K) {
      alignas(32) Bf16 tail[kVec];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail), (__m256i)_mm512_cvtneps_pbh(Simd::load_first(s + k, K - k)));
      std::memcpy(d + k, tail, (K - k) * sizeof(Bf16));
    }
    if (K2 > K) d[K] = 0;
  }
}

// micro_kernel on bf16 operands: acc[m][v] += sum_k A[m * lda + k] * B[k][v * kVec ..] for m < MR, K even,
// Bp the [K/2][kPanel][2] panel (ldb = 2 * kPanel Bf16s per k pair).
template <int MR>
__attribute__((always_inline)) inline void micro_kernel(int64_t K, const Bf16* A, int64_t lda, const Bf16* Bp,
                                                        int64_t ldb, V (&acc)[kMR][2]) {
  V c[MR][2];
  for (int m = 0; m < MR; ++m) {
    c[m][0] = acc[m][0];
    c[m][1] = acc[m][1];
  }
  for (int64_t k = 0; k < K; k += 2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(Bp + 2 * kVec);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + k, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      c[m][0] = _mm512_dpbf16_ps(c[m][0], a, b0);
      c[m][1] = _mm512_dpbf16_ps(c[m][1], a, b1);
    }
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = c[m][0];
    acc[m][1] = c[m][1];
  }
}
#endif  // FUSEDRNN_ENGINE_BF16_PRODUCTS

// acc (MR rows x kPanel columns) = bias + x rows . x_panel + h rows . h_panel (+ x_part),
// stored to the tile at column `col`; either product may be skipped (panel nullptr). x_part
// (nullptr: none): the precomputed input projection of these columns, row m's vector v at
// x_part[v] + m * ldx, its first x_valid[v] lanes real (the rest read as zeros). It is added
// after the products, in registers: the same one add per element, in the same place of the
// chain, as the separate pass over the stored tile that it replaces (bitwise the same).
// T: float, or Bf16 (x, h and the panels bf16; I and H even).
template <int MR, typename T>
__attribute__((always_inline)) inline void tile_product(const float* bias, const T* x, int64_t I,
                                                        const T* x_panel, const T* h, int64_t H,
                                                        const T* h_panel, int64_t ldw, float* tile,
                                                        int64_t tile_width, const float* const* x_part = nullptr,
                                                        const int64_t* x_valid = nullptr, int64_t ldx = 0) {
  V acc[kMR][2];
  const V bias0 = Simd::load(bias), bias1 = Simd::load(bias + kVec);
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = bias0;
    acc[m][1] = bias1;
  }
  if (x_panel != nullptr) micro_kernel<MR>(I, x, I, x_panel, ldw, acc);
  if (h_panel != nullptr) micro_kernel<MR>(H, h, H, h_panel, ldw, acc);
  if (x_part != nullptr) {
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) acc[m][v] = Simd::add(acc[m][v], load_partial(x_part[v] + m * ldx, x_valid[v]));
    }
  }
  for (int m = 0; m < MR; ++m) {
    Simd::store(tile + m * tile_width, acc[m][0]);
    Simd::store(tile + m * tile_width + kVec, acc[m][1]);
  }
}

// One row block x unit block: the input and recurrent products in registers
// (kPanel columns per micro-kernel call), stored to the L1 tile, then the cell on
// these rows and units at once.
// noinline keeps each (cell, rows) variant a function of its own, small
// enough for GCC to inline the micro-kernel and the activations into.
// T: the products' operands, float or Bf16 (x, h at strides w.I, w.H).
template <typename Cell, int MR, bool Save, typename T = float>
__attribute__((noinline)) void forward_tile(const StepPtrs& q, const T* x, const T* h,
                                            const ForwardPanels<Cell::kGates, T>& w, int64_t ub, float* tile) {
  using E = ForwardEpilogue<Cell>;
  using P = ForwardPacking<E::G>;
  static_assert(P::U == E::U, "the packing and the epilogue must agree on the unit block");
  const float* bias = w.bias_panel(ub);
  const int64_t j0 = ub * P::U, valid = std::min<int64_t>(P::U, q.hidden - j0);
  for (int c = 0; c < P::kCalls; ++c) {
    const int64_t col = c * kPanel;
    const T* xp = w.x_panel(ub, c);
    const T* hp = w.h_panel(ub, c);
    // Not fused: the input projection came precomputed in the gates buffer; these columns' part
    // of it (gate g = column / U, units j0 + column % U), added in tile_product's registers.
    const float* x_part[2] = {nullptr, nullptr};
    int64_t x_valid[2] = {0, 0};
    if (!w.fused_input) {
      for (int v = 0; v < 2; ++v) {
        const int64_t column = col + v * kVec, g = column / P::U, u = column % P::U;
        x_part[v] = q.gates + g * q.hidden + j0 + u;
        x_valid[v] = valid - u;
      }
    }
    const float* const* xa = w.fused_input ? nullptr : x_part;
    const int64_t ldx = E::G * q.hidden;
    if (E::G == 3 && col >= 2 * P::U) {
      // GRU's n gate: input and hidden parts in separate tile columns.
      tile_product<MR>(bias + col, x, w.I, xp, h, w.H, static_cast<const T*>(nullptr), w.kLdw, tile + col,
                       E::kTileWidth, xa, x_valid, ldx);
      tile_product<MR>(bias + P::kWidth + (col - 2 * P::U), x, w.I, static_cast<const T*>(nullptr), h, w.H, hp,
                       w.kLdw, tile + P::kWidth + (col - 2 * P::U), E::kTileWidth);
    } else {
      tile_product<MR>(bias + col, x, w.I, xp, h, w.H, hp, w.kLdw, tile + col, E::kTileWidth, xa, x_valid, ldx);
    }
  }
  E::template apply<MR, Save>(q, tile, j0, valid);
}

// Row blocks per group: the group's input rows and h_{t-1} copy and one unit
// block's panels stay in L1/L2 while every row block of the group multiplies
// by them, so the weights stream from L2 once per group, not once per row block.
constexpr int64_t kGroupBlocks = 3;

// The cell's view of rows [m0, m0 + mr) of the step whose tokens start at row `off`: its gates,
// output and saved tensors in the packed sequence, its running state in the batch. Shared by
// the packed (forward_impl) and in-place (small_forward_impl) drivers.
inline StepPtrs step_rows(const ForwardArgs& args, int G, int64_t off, int64_t m0, int64_t mr) {
  const int64_t H = args.H;
  StepPtrs q;
  q.batch = mr;
  q.hidden = H;
  if (args.gates != nullptr) q.gates = args.gates + (off + m0) * G * H;  // nullptr: inference, fused input
  q.h_state = args.h_state + m0 * H;
  q.out = args.output + (off + m0) * H;
  if (args.c_state != nullptr) q.c_state = args.c_state + m0 * H;
  if (args.cells != nullptr) q.cells = args.cells + (off + m0) * H;
  if (args.hn != nullptr) q.hn = args.hn + (off + m0) * H;
  return q;
}

// The small path's unit split (small_forward_impl): a call of a few rows on two or more threads (one
// row alone would give one thread all the work; a few rows leave each thread all of W_hh) splits the
// unit blocks of every step between the threads instead, each reading only its share of W_hh (and W_ih
// when fused) per step; one barrier per step (each thread's units of h_t are written before any thread
// reads h_t). Measured on the AVX2 machine (benchmarks/NOTES.md, entries 45 and 47): on the quiet
// machine, 2 threads, the split was as fast or faster in every streaming row (B = 1..8, T = 1 and 20,
// H = 64..256, no-grad and training; LSTM T=20 B=1 H=256 no-grad 669 -> 417 us), so it is the default
// whenever there are threads and a uniform batch. FUSEDRNN_CPU_SMALL_SPLIT=0 turns it off (tests check
// both ways).
constexpr int kSplitMaxParts = 4;

// A worker's progress, on a cache line of its own: the number of steps whose units it has written.
struct alignas(64) SplitProgress {
  std::atomic<int64_t> steps{0};
};

// Waits until every part has written step `steps - 1`. Spins briefly (the other core is expected to
// finish within a step's product), then yields, so that a loaded machine's descheduled worker is
// not waited for by burning the core it needs.
inline void wait_for_parts(const SplitProgress* progress, int64_t parts, int64_t steps) {
  for (int64_t p = 0; p < parts; ++p) {
    int spins = 0;
    while (progress[p].steps.load(std::memory_order_acquire) < steps) {
      if (++spins < 2048) {
        _mm_pause();
      } else {
        sched_yield();
      }
    }
  }
}

// The split pays only while the other threads run when asked: on a loaded machine (more runnable threads
// than cores) a worker may wait a whole scheduler slice for its core, and the call waits with it, in the
// per-step barrier and in the team's join. Measured on the 2-core AVX2 machine with other processes
// running (benchmarks/NOTES.md, entry 49): LSTMCell B=1 H=128 no-grad 243 us split against 64 us unsplit,
// 16-17 ms against 70-83 us with one more busy process, where torch.nn took 120-250 us. So each split call
// times itself: when it took half as long again as its first part's own work times the parts (about what
// one thread alone would have taken) and 50 us more, the split lost, and calls run unsplit for a while: 50 ms after a
// loss, twice as long after each further loss up to 2 s, half as long after a win. A lost call costs up to
// a scheduler slice (milliseconds) and a won one saves microseconds, so the wait is in time, not in calls:
// at most one losing try per wait. Both ways give the same numbers, bitwise (the split moves whole unit
// blocks between threads; tests/test_ops.py), so this choice changes only the time.
struct SplitGovernor {
  using Clock = std::chrono::steady_clock;
  static constexpr int64_t kMinWaitUs = 50'000, kMaxWaitUs = 2'000'000;
  std::atomic<int64_t> unsplit_until_us{0};  // Clock time before which calls run unsplit
  std::atomic<int64_t> wait_us{kMinWaitUs};  // how long the next loss stops the split

  static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch()).count();
  }
  bool paused() const { return now_us() < unsplit_until_us.load(std::memory_order_relaxed); }
  // Whether a split run of `parts` parts that took `elapsed`, of which the worker of part 0 worked
  // `first_part_work`, lost to running unsplit (50 us of slack: a lost call under load loses
  // milliseconds, and a quiet machine's fork and join jitter by microseconds, which must not pause a
  // split that pays).
  static bool losing(Clock::duration elapsed, Clock::duration first_part_work, int64_t parts) {
    return elapsed > first_part_work * (parts * 3) / 2 + std::chrono::microseconds(50);
  }
  // A split call's verdict: `stopped_early` (it was judged losing part way, split_loop), else by its
  // whole time.
  void record(Clock::duration elapsed, Clock::duration first_part_work, int64_t parts, bool stopped_early = false) {
    const bool lost = stopped_early || losing(elapsed, first_part_work, parts);
    const int64_t wait = wait_us.load(std::memory_order_relaxed);
    if (lost) {
      unsplit_until_us.store(now_us() + wait, std::memory_order_relaxed);
      wait_us.store(std::min(wait * 2, kMaxWaitUs), std::memory_order_relaxed);
    } else {
      wait_us.store(std::max(wait / 2, kMinWaitUs), std::memory_order_relaxed);
    }
  }
};

inline SplitGovernor& split_governor() {
  static SplitGovernor governor;
  return governor;
}

// Tests: FUSEDRNN_CPU_SPLIT_GOVERNOR=0 turns the governor off (no pause, no verdict), so that a test of
// the default rule sees its decision on a machine where the split loses (more threads than cores).
inline bool split_governor_off() {
  const char* v = std::getenv("FUSEDRNN_CPU_SPLIT_GOVERNOR");
  return v != nullptr && v[0] == '0' && v[1] == '\0';
}

// split_switch (a split's switch): cpu_engine.h.

// How many parts the unit blocks of this call may be split into (1: no split), whichever path runs it.
inline int64_t split_parts(const Schedule& sched, int64_t B, int64_t blocks, int force) {
#if !AT_PARALLEL_OPENMP
  // The per-step barrier needs every part running at once: an OpenMP team gives that, ATen's native
  // pool (shared by all callers, its chunks queued) does not, and two callers could each hold part of the
  // pool while waiting for the rest (a deadlock).
  return 1;
#endif
  const int threads = at::get_num_threads();
  if (force == 0 || threads < 2 || at::in_parallel_region() || blocks < 2) return 1;
  const std::vector<int64_t>& batch = *sched.batch;
  // The split reads h_{t-1} from the previous step's output rows: every row in every step.
  if (batch.empty() || batch.front() != B || batch.back() != B) return 1;
  if (force != 1 && !split_governor_off() && split_governor().paused()) return 1;
  return std::min<int64_t>({threads, blocks, kSplitMaxParts});
}

// The packed path's unit split (forward_impl, and backward_impl of the same calls): with few rows per
// thread the batch split leaves each thread a thin row block (small_batch, B = 4 on 2 threads: 2 rows, a
// micro-kernel of 4 accumulators, FMA-latency-bound) and all of W_hh to stream per step; split by units
// instead, each thread multiplies every row (B = 4: one 4-row block) by its share of the panels, one
// barrier per step (entries 55, 56). Only where every thread gets a part (more threads than parts would
// leave some idle while the parts each carry all rows) and a uniform batch (split_parts).
// FUSEDRNN_CPU_UNIT_SPLIT=0 turns it off, 1 forces it for any uniform batch whatever the rows and the
// governor (tests: the same numbers, bitwise, since each row's sums run in the same order in any row
// block).
// kUnitSplitMaxRowsPerThread: cpu_engine.h (the bf16 products' call-level rule reads it too).

// force: split_switch("FUSEDRNN_CPU_UNIT_SPLIT"), read once by the caller (which also passes it on as
// split_loop's `forced`).
inline int64_t packed_split_parts(const Schedule& sched, int64_t B, int64_t blocks, int force) {
  const int64_t parts = split_parts(sched, B, blocks, force);
  if (force == 1) return parts;
  if (parts < at::get_num_threads() || B > kUnitSplitMaxRowsPerThread * parts) return 1;
  return parts;
}

// Where part p of `parts` starts among n blocks (p = parts: n): as even as possible (6 blocks in 4 parts:
// 1, 2, 1, 2, not 2, 2, 2, 0), so no thread of the team idles; a worker given parts [first, last) takes
// blocks [part_bound(first), part_bound(last)).
inline int64_t part_bound(int64_t p, int64_t parts, int64_t n) { return p * n / parts; }

// The split's team loop (forward and backward): every worker runs step(k, first, last) for its parts
// [first, last) of step k (in processing order), then waits at the step's barrier; returns how many
// steps ran: all T, or fewer where the split was losing (below), after which the caller runs the rest
// unsplit from the running state (at a barrier every part of the last step run is done). After the
// last step run each worker calls finish(k, first, last) (the backward's last product), no barrier.
// The governor's rule (SplitGovernor::record) is applied every kSplitCheckSteps steps as well as at the
// end: on a loaded machine one step's barrier may wait a scheduler slice, so a long sequence (the packed
// path's calls have any length) would lose seconds before a verdict at its end. Unless forced.
constexpr int64_t kSplitCheckSteps = 16;

template <typename Step, typename Finish>
int64_t split_loop(int64_t parts, int64_t T, bool forced, const Step& step, const Finish& finish) {
  forced = forced || split_governor_off();  // no verdict either way
  SplitProgress progress[kSplitMaxParts];
  // Set by part 0's worker before it marks a step done, so every worker reads it after that step's barrier.
  std::atomic<int64_t> stop_after{T};
  using Clock = SplitGovernor::Clock;
  const Clock::time_point call_start = Clock::now();
  Clock::duration first_part_work{0};  // the work of the worker that runs part 0, without its waits
  bool lost = false;
  unit_split_calls().fetch_add(1, std::memory_order_relaxed);  // cpu_engine.h
  // Tests: FUSEDRNN_CPU_UNIT_SPLIT_TEST_STOP=n stops the split at the first check after n steps as if
  // it were losing, so that the unsplit continuation runs (its numbers must not change).
  const char* test_stop_env = std::getenv("FUSEDRNN_CPU_UNIT_SPLIT_TEST_STOP");
  const int64_t test_stop = test_stop_env != nullptr && test_stop_env[0] != '\0' ? std::atoll(test_stop_env) : T;
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    // One worker may be given several parts (fewer threads than asked for): it runs all of them
    // each step before waiting, so the barrier never waits on itself.
    const bool timed = first == 0;
    int64_t k = 0;
    for (; k < T; ++k) {
      const Clock::time_point step_start = timed ? Clock::now() : Clock::time_point{};
      step(k, first, last);
      if (timed) {
        const Clock::time_point now = Clock::now();
        first_part_work += now - step_start;
        if ((k + 1) % kSplitCheckSteps == 0 && k + 1 < T &&
            ((!forced && SplitGovernor::losing(now - call_start, first_part_work, parts)) || k + 1 >= test_stop)) {
          lost = !forced;
          stop_after.store(k + 1, std::memory_order_relaxed);
        }
      }
      for (int64_t p = first; p < last; ++p) progress[p].steps.store(k + 1, std::memory_order_release);
      wait_for_parts(progress, parts, k + 1);
      if (stop_after.load(std::memory_order_relaxed) <= k + 1) break;
    }
    finish(std::min(k, T - 1), first, last);
  });
  if (!forced) split_governor().record(Clock::now() - call_start, first_part_work, parts, lost);
  return stop_after.load(std::memory_order_relaxed);
}

// The forward's split: unit blocks in `parts` parts, all rows. block(off, h_prev, ub, tile) computes unit
// block ub of the step whose rows start at `off`, reading h_{t-1} at h_prev: step 0 reads h0, which the
// epilogues overwrite in place (a part's units while another part still multiplies by them), so a copy;
// later steps read h_{t-1} from the output rows of the step before, which nothing overwrites.
template <int kTileFloats, typename Block>
int64_t split_steps(const ForwardArgs& args, int64_t parts, int64_t blocks, bool forced, const Block& block) {
  const int64_t H = args.H, B = args.B;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T = static_cast<int64_t>(offset.size());
  std::vector<float> h0(args.h_state, args.h_state + B * H);
  return split_loop(parts, T, forced, [&](int64_t k, int64_t first, int64_t last) {
    alignas(64) float tile[kTileFloats];
    const int64_t t = args.sched.reverse ? T - 1 - k : k;
    const int64_t t_prev = args.sched.reverse ? t + 1 : t - 1;
    const float* h_prev = k == 0 ? h0.data() : args.output + offset[t_prev] * H;
    const int64_t ub_end = part_bound(last, parts, blocks);
    for (int64_t ub = part_bound(first, parts, blocks); ub < ub_end; ++ub) block(offset[t], h_prev, ub, tile);
  }, [](int64_t, int64_t, int64_t) {});
}

// The batch split's time loop (forward_impl) from step k_start: each thread its rows, all steps, no
// synchronisation. T: the products' operands (ForwardPanels): float, or Bf16, for which the group's
// h_{t-1} (and, fused, x_t) rows are rounded into bf16 copies instead of copied.
template <typename Cell, bool Save, typename T>
void forward_rows(const ForwardArgs& args, const ForwardPanels<Cell::kGates, T>& w, int64_t blocks, int64_t k_start) {
  using E = ForwardEpilogue<Cell>;
  constexpr int G = E::G;
  const int64_t H = args.H, I = args.I;
  const std::vector<int64_t>& batch = *args.sched.batch;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T_steps = static_cast<int64_t>(batch.size());
  for_each_thread_rows(args.sched, args.B, [&](int64_t lo, int64_t hi) {
    // h_{t-1} of a group of row blocks: the cells overwrite the running state
    // in place while later unit blocks still multiply by the old one.
    std::vector<T> h_prev(kGroupBlocks * kMR * w.H);
    // bf16: the group's input rows (fused input projection).
    std::vector<T> x_rows(std::is_same_v<T, float> || !w.fused_input ? 0 : kGroupBlocks * kMR * w.I);
    std::vector<float> tile(kMR * E::kTileWidth);
    std::vector<std::pair<int64_t, int64_t>> row_blocks;  // (first row, rows) of this step
    for (int64_t k = k_start; k < T_steps; ++k) {
      const int64_t t = args.sched.reverse ? T_steps - 1 - k : k;
      const int64_t end = std::min(hi, batch[t]);
      const int64_t off = offset[t];
      row_blocks.clear();
      for_each_row_block(lo, end, [&](int64_t m0, int64_t mr) { row_blocks.emplace_back(m0, mr); });
      for (size_t g0 = 0; g0 < row_blocks.size(); g0 += kGroupBlocks) {
        const size_t g1 = std::min(row_blocks.size(), g0 + kGroupBlocks);
        const int64_t first = row_blocks[g0].first;
        const int64_t rows = row_blocks[g1 - 1].first + row_blocks[g1 - 1].second - first;
        if constexpr (std::is_same_v<T, float>) {
          std::memcpy(h_prev.data(), args.h_state + first * H, rows * H * sizeof(float));
        } else {
#ifdef FUSEDRNN_ENGINE_BF16_PRODUCTS
          rows_to_bf16(args.h_state + first * H, H, rows, H, h_prev.data());
          if (w.fused_input) rows_to_bf16(args.input + (off + first) * I, I, rows, I, x_rows.data());
#endif
        }
        for (int64_t ub = 0; ub < blocks; ++ub) {
          for (size_t rb = g0; rb < g1; ++rb) {
            const int64_t m0 = row_blocks[rb].first, mr = row_blocks[rb].second;
            const StepPtrs q = step_rows(args, G, off, m0, mr);
            const T* x = nullptr;
            if (w.fused_input) {
              if constexpr (std::is_same_v<T, float>) {
                x = args.input + (off + m0) * I;
              } else {
                x = x_rows.data() + (m0 - first) * w.I;
              }
            }
            const T* h = h_prev.data() + (m0 - first) * w.H;
            with_rows(mr, [&](auto r) { forward_tile<Cell, r.value, Save, T>(q, x, h, w, ub, tile.data()); });
          }
        }
      }
    }
  });
}

// The packed weights of a call: packed here, or (args.pack_cache) the previous call's where it packed the
// same weights the same way (cpu_engine.h: PackCache). `tag`: one per instantiation and translation unit,
// so that a slot filled by another cell, operand type or instruction set is never read as this one.
template <int G, typename T>
struct CachedForwardPanels {
  const float *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr;
  int64_t H = 0, I = 0;
  ForwardPanels<G, T> w;
};

template <int G, typename T>
std::shared_ptr<const ForwardPanels<G, T>> forward_panels(const ForwardArgs& args) {
  static char tag;  // writable (.bss): never folded with another instantiation's by identical-data merging
  const bool fused = args.input != nullptr;
  const float* b_ih = fused ? args.b_ih : nullptr;
  const float* w_ih = fused ? args.w_ih : nullptr;
  using Entry = CachedForwardPanels<G, T>;
  const auto c = cached_entry<Entry>(
      args.pack_cache != nullptr ? &args.pack_cache->forward : nullptr, &tag,
      [&](const Entry& e) {
        return e.w_ih == w_ih && e.w_hh == args.w_hh && e.b_ih == b_ih && e.b_hh == args.b_hh && e.H == args.H &&
               e.I == args.I;
      },
      [&](Entry& e) {
        e = {w_ih, args.w_hh, b_ih, args.b_hh, args.H, args.I, {}};
        ForwardPanels<G, T>& w = e.w;
        w.fused_input = fused;
        if constexpr (std::is_same_v<T, float>) {
          w.H = args.H;
          w.I = args.I;
          if (fused) pack_panels<G>(args.w_ih, args.H, args.I, w.w_ih);
          pack_panels<G>(args.w_hh, args.H, args.H, w.w_hh);
        } else {
#ifdef FUSEDRNN_ENGINE_BF16_PRODUCTS
          w.H = round_up_even(args.H);
          w.I = round_up_even(args.I);
          if (fused) pack_panels_bf16<G>(args.w_ih, args.H, args.I, w.w_ih);
          pack_panels_bf16<G>(args.w_hh, args.H, args.H, w.w_hh);
#endif
        }
        pack_biases<G>(b_ih, args.b_hh, args.H, w.bias);
      });
  return std::shared_ptr<const ForwardPanels<G, T>>(c, &c->w);
}

template <typename Cell, bool Save>
void forward_impl(const ForwardArgs& args) {
  using E = ForwardEpilogue<Cell>;
  constexpr int G = E::G;
  using P = ForwardPacking<G>;
  const int64_t H = args.H;
  const int64_t blocks = (H + P::U - 1) / P::U;
  const int force = split_switch("FUSEDRNN_CPU_UNIT_SPLIT");
#ifdef FUSEDRNN_ENGINE_BF16_PRODUCTS
  // bf16 products on the batch split only, never the unit split: the caller decided for the whole layer
  // call (cpu_engine.h: bf16_products_for_call), so that no chunk's size, no thread count inside the call
  // and no timing (the governor) chooses between float32 and bf16 numbers.
  if (args.bf16_products) {
    const auto w = forward_panels<G, Bf16>(args);
    bf16_forward_calls().fetch_add(1, std::memory_order_relaxed);
    forward_rows<Cell, Save, Bf16>(args, *w, blocks, 0);
    return;
  }
#endif
  const auto panels = forward_panels<G, float>(args);
  const ForwardPanels<G>& w = *panels;
  const int64_t T = static_cast<int64_t>(args.sched.batch->size());
  int64_t k_start = 0;  // steps already run by the unit split
  const int64_t parts = packed_split_parts(args.sched, args.B, blocks, force);
  if (parts > 1) {
    k_start = split_steps<kMR * E::kTileWidth>(args, parts, blocks, force == 1,
                                               [&](int64_t off, const float* h_prev, int64_t ub, float* tile) {
      for_each_row_block(0, args.B, [&](int64_t m0, int64_t mr) {
        const StepPtrs q = step_rows(args, G, off, m0, mr);
        const float* x = w.fused_input ? args.input + (off + m0) * args.I : nullptr;
        with_rows(mr, [&](auto rows) { forward_tile<Cell, rows.value, Save>(q, x, h_prev + m0 * H, w, ub, tile); });
      });
    });
    if (k_start == T) return;
  }
  forward_rows<Cell, Save, float>(args, w, blocks, k_start);
}

// ---------------------------------------------------------------------------
// Small calls (cpu_engine.h: use_small_forward): no packing
// ---------------------------------------------------------------------------
// A cell, a one-step layer call or a short sequence of a few rows reads W_hh a
// handful of times; packing it (a [G*H, H] scatter into fresh memory) cost more
// than the whole product (benchmarks/NOTES.md, entry 15). Here the weights are
// read where they are, row-major: lane r of a vector of kVec dot products is
// W[row + r] . v, i.e. kVec consecutive units of one gate, which is the layout the
// cell epilogues above take. The same tile, the same epilogue, only the
// product differs (summation order included: not bitwise equal to the packed
// path, nor across instruction sets, whose Simd::sum_each reduce in other
// orders; each call picks its path from its shapes alone, so runs repeat).

// acc[r] += lanes of W[r] * v over k < K, for the `valid` (1..kVec) rows of w
// (row stride ld); rows past `valid` repeat the last valid one (their lanes are
// never stored). The tail of K is read with masked loads: nothing past a row.
__attribute__((always_inline)) inline void dot_rows(const float* w, int64_t ld, int64_t valid, const float* v,
                                                    int64_t K, V (&acc)[kVec]) {
  const float* r[kVec];
  for (int i = 0; i < kVec; ++i) r[i] = w + std::min<int64_t>(i, valid - 1) * ld;
  int64_t k = 0;
  for (; k + kVec <= K; k += kVec) {
    const V x = Simd::load(v + k);
    for (int i = 0; i < kVec; ++i) acc[i] = Simd::fmadd(Simd::load(r[i] + k), x, acc[i]);
  }
  if (k < K) {
    const V x = Simd::load_first(v + k, K - k);
    for (int i = 0; i < kVec; ++i) acc[i] = Simd::fmadd(Simd::load_first(r[i] + k, K - k), x, acc[i]);
  }
}

// One row block x unit block of one step, unpacked weights: the tile of
// forward_tile (same columns), then the same epilogue. x: the block's input rows
// (fused input projection) or nullptr (q.gates holds x W_ih^T + b_ih).
template <typename Cell, int MR, bool Save>
__attribute__((noinline)) void small_tile(const StepPtrs& q, const ForwardArgs& a, const float* x, const float* h,
                                          int64_t ub, float* tile) {
  using E = ForwardEpilogue<Cell>;
  constexpr int G = E::G, U = E::U;
  const int64_t H = a.H, I = a.I;
  const int64_t j0 = ub * U, valid = std::min<int64_t>(U, H - j0);
  for (int g = 0; g < G; ++g) {
    const bool split = G == 3 && g == 2;  // GRU's n gate: input and hidden parts apart
    for (int s = 0; s < U / kVec; ++s) {
      const int64_t j = j0 + s * kVec, lanes = std::min<int64_t>(kVec, H - j);
      const int64_t row = g * H + j;
      float* col = tile + g * U + s * kVec;
      float* col_h = tile + 3 * U + s * kVec;  // GRU: W_hn h + b_hn
      if (lanes <= 0) {  // past H: the epilogue reads these lanes but stores none of them
        for (int m = 0; m < MR; ++m) {
          Simd::store(col + m * E::kTileWidth, Simd::zero());
          if (split) Simd::store(col_h + m * E::kTileWidth, Simd::zero());
        }
        continue;
      }
      const V b_ih = a.b_ih != nullptr && x != nullptr ? load_partial(a.b_ih + row, lanes) : Simd::zero();
      const V b_hh = a.b_hh != nullptr ? load_partial(a.b_hh + row, lanes) : Simd::zero();
      for (int m = 0; m < MR; ++m) {
        V acc[kVec];
        for (int i = 0; i < kVec; ++i) acc[i] = Simd::zero();
        V x_part = Simd::zero();
        if (x != nullptr) {
          dot_rows(a.w_ih + row * I, I, lanes, x + m * I, I, acc);
          if (split) {
            x_part = Simd::add(Simd::sum_each(acc), b_ih);
            for (int i = 0; i < kVec; ++i) acc[i] = Simd::zero();
          }
        } else {
          x_part = load_partial(q.gates + m * G * H + row, lanes);  // x W_ih^T + b_ih, precomputed
        }
        dot_rows(a.w_hh + row * H, H, lanes, h + m * H, H, acc);
        const V sum = Simd::sum_each(acc);
        if (split) {
          Simd::store(col + m * E::kTileWidth, x_part);
          Simd::store(col_h + m * E::kTileWidth, Simd::add(sum, b_hh));
        } else if (x != nullptr) {
          Simd::store(col + m * E::kTileWidth, Simd::add(Simd::add(sum, b_ih), b_hh));
        } else {
          Simd::store(col + m * E::kTileWidth, Simd::add(x_part, Simd::add(sum, b_hh)));
        }
      }
    }
  }
  E::template apply<MR, Save>(q, tile, j0, valid);
}

// One step's unit block ub for rows [lo, end) of the small path (both its schedules): h holds h_{t-1}
// of rows lo onward.
template <typename Cell, bool Save>
inline void small_step_block(const ForwardArgs& args, int64_t off, int64_t lo, int64_t end, const float* h, int64_t ub,
                             float* tile) {
  for_each_row_block(lo, end, [&](int64_t m0, int64_t mr) {
    const StepPtrs q = step_rows(args, ForwardEpilogue<Cell>::G, off, m0, mr);
    const float* x = args.input != nullptr ? args.input + (off + m0) * args.I : nullptr;
    const float* h_rows = h + (m0 - lo) * args.H;
    with_rows(mr, [&](auto rows) { small_tile<Cell, rows.value, Save>(q, args, x, h_rows, ub, tile); });
  });
}

template <typename Cell, bool Save>
void small_forward_impl(const ForwardArgs& args) {
  using E = ForwardEpilogue<Cell>;
  const int64_t H = args.H;
  const int64_t blocks = (H + E::U - 1) / E::U;
  const std::vector<int64_t>& batch = *args.sched.batch;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T = static_cast<int64_t>(batch.size());
  const int force = split_switch("FUSEDRNN_CPU_SMALL_SPLIT");
  const int64_t parts = split_parts(args.sched, args.B, blocks, force);
  int64_t k_start = 0;  // steps already run by the unit split
  if (parts > 1) {
    k_start = split_steps<kMR * E::kTileWidth>(args, parts, blocks, force == 1,
                                               [&](int64_t off, const float* h_prev, int64_t ub, float* tile) {
      small_step_block<Cell, Save>(args, off, 0, args.B, h_prev, ub, tile);
    });
    if (k_start == T) return;
  }
  for_each_thread_rows(args.sched, args.B, [&](int64_t lo, int64_t hi) {
    // h_{t-1} of this thread's rows: the cells overwrite the running state in
    // place while later unit blocks still multiply by the old one.
    std::vector<float> h_buffer((hi - lo) * H);
    float* h_prev = h_buffer.data();
    alignas(64) float tile[kMR * E::kTileWidth];
    for (int64_t k = k_start; k < T; ++k) {
      const int64_t t = args.sched.reverse ? T - 1 - k : k;
      const int64_t end = std::min(hi, batch[t]);
      const int64_t off = offset[t];
      if (end <= lo) continue;
      std::memcpy(h_prev, args.h_state + lo * H, (end - lo) * H * sizeof(float));
      for (int64_t ub = 0; ub < blocks; ++ub) small_step_block<Cell, Save>(args, off, lo, end, h_prev, ub, tile);
    }
  });
}


// The forward of one layer call (what the instruction set's forward() runs). Without
// save_for_backward (an inference call) the epilogues store only the states and the output:
// not the activated gates, LSTM's c_t per token nor GRU's W_hn h + b_hn, which only backward
// reads (RNN saves nothing but its output either way).
template <typename Cell, bool Save>
void forward_cell(const ForwardArgs& a) {
  if (a.small) {
    small_forward_impl<Cell, Save>(a);
  } else {
    forward_impl<Cell, Save>(a);
  }
}

inline void run_forward(const ForwardArgs& a) {
  with_cell(a.cell, [&](auto cell) {
    using Cell = decltype(cell);
    constexpr bool kSavesAnything = ForwardEpilogue<Cell>::G > 1;  // RNN: nothing beyond the output
    if (kSavesAnything && a.save_for_backward) {
      forward_cell<Cell, kSavesAnything>(a);
    } else {
      forward_cell<Cell, false>(a);
    }
  });
}
