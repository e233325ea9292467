// The large GEMM's loops (large_gemm.h) for one instruction set: included by engine_avx2.cpp and
// engine_avx512.cpp after engine_common.h, inside their anonymous namespace, so that it runs the
// same micro_kernel (kMR rows x kPanel columns in registers) with that file's Simd. No include
// guard and no #include: the text is compiled once per instruction set.
//
// Loops (BLIS's, with its names): columns in blocks of kLargeNc (jc), depth in blocks of kc (pc):
// B's block packed once into [kc][kPanel] strips, zero-padded past N (shared by the threads); then
// the work items, each a block of mc rows of C (ic) times a chunk of kStripsPerItem strips: A's
// block packed into [mc][kc] (row-major, contiguous: the micro-kernel's lda is kc), then per row
// block (kMR rows, ir) every strip of the chunk (jr). The row block's A (kMR x kc: 6 KB) stays in
// L1 while the chunk's strips (8 x 16 KB) stream from L2, one sequential stream per call; BLIS's
// usual order (the strip in L1, A's rows streamed from L2: kMR streams of single floats, since the
// micro-kernel reads A row by row) measured slower here (benchmarks/NOTES.md, entry 44).

// Defaults: B's strip 16 KB (half of a 32 KB L1), a chunk of strips 128 KB and A's block ~150 KB
// (AVX2: 144 x 256) in a 512 KB+ L2, B's block kc x 2048 (2 MB) in L3. kc = 256 measured at least as
// fast as 128 and 384 on this project's AVX2 machine (benchmarks/NOTES.md, entry 44); mc matters little
// in this loop order (it sets how often A is packed, against the balance of the threads' items).
constexpr int64_t kLargeKc = 4096 / kPanel;          // AVX2 256, AVX-512 128
constexpr int64_t kLargeMc = kMR * 24;
constexpr int64_t kLargeNc = 2048;
constexpr int64_t kStripsPerItem = 8;

// v[i][j] = v[j][i] (AVX: both instruction sets' files compile it; 8 x 8 is the AVX-512 file's too).
inline void transpose8x8(__m256 (&v)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// dst[x * ld + y] = src[x * sx + y * sy] for x < nx, y < ny: a strided block into a row-major one.
// Where sx == 1 (a transposed operand: W_ih^T, dG^T) 8 x 8 blocks are transposed in registers; element
// by element, the copy of dG^T took ~45% of a [512, 3200] x [3200, 128] product (perf), A's reuse
// there being only N = 128 columns.
inline void copy_strided(const float* src, int64_t sx, int64_t sy, int64_t nx, int64_t ny, float* dst, int64_t ld) {
  int64_t y = 0;
  if (sx == 1) {
    for (; y + 8 <= ny; y += 8) {
      int64_t x = 0;
      for (; x + 8 <= nx; x += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(src + (y + i) * sy + x);
        transpose8x8(v);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (x + i) * ld + y, v[i]);
      }
      for (; x < nx; ++x) {
        for (int i = 0; i < 8; ++i) dst[x * ld + y + i] = src[(y + i) * sy + x];
      }
    }
  }
  for (int64_t x = 0; x < nx; ++x) {
    for (int64_t q = y; q < ny; ++q) dst[x * ld + q] = src[x * sx + q * sy];
  }
}

// B[pc .. pc + kc, j0 .. j0 + kPanel) into dst[k * kPanel + j], zeros for columns >= N.
inline void pack_b_strip(const large_gemm::Args& g, int64_t pc, int64_t kc, int64_t j0, float* dst) {
  const int64_t valid = std::min<int64_t>(kPanel, g.N - j0);
  if (g.b_cs == 1) {
    for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * kPanel, g.B + (pc + k) * g.b_rs + j0, valid * sizeof(float));
  } else {
    copy_strided(g.B + pc * g.b_rs + j0 * g.b_cs, g.b_rs, g.b_cs, kc, valid, dst, kPanel);
  }
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t j = valid; j < kPanel; ++j) dst[k * kPanel + j] = 0.0f;
  }
}

// A[i0 .. i0 + rows, pc .. pc + kc) into dst[r * kc + k].
inline void pack_a_block(const large_gemm::Args& g, int64_t i0, int64_t rows, int64_t pc, int64_t kc, float* dst) {
  if (g.a_cs == 1) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * kc, g.A + (i0 + r) * g.a_rs + pc, kc * sizeof(float));
  } else {
    copy_strided(g.A + i0 * g.a_rs + pc * g.a_cs, g.a_rs, g.a_cs, rows, kc, dst, kc);
  }
}

#ifdef FUSEDRNN_ENGINE_BF16_PRODUCTS
// The bf16 GEMM's operands (run_large_gemm<Bf16>: large_gemm::run_bf16): the float32 blocks above,
// packed into a float scratch as they are, then rounded to bf16 (vcvtneps2bf16) in the layouts of the
// bf16 micro_kernel (engine_forward.h): A [rows][kc2], B [kc2 / 2][kPanel][2], kc2 = kc rounded up to
// even, zeros past kc. Every element is still one chain (start value, then one pair of products per k
// pair in order), so the results do not depend on the threads or the blocking either.
inline std::vector<float>& large_gemm_float_scratch() {
  thread_local std::vector<float> scratch;
  return scratch;
}

inline void pack_b_strip(const large_gemm::Args& g, int64_t pc, int64_t kc, int64_t j0, Bf16* dst) {
  std::vector<float>& f = large_gemm_float_scratch();
  if (static_cast<int64_t>(f.size()) < (kc + 1) * kPanel) f.resize((kc + 1) * kPanel);
  pack_b_strip(g, pc, kc, j0, f.data());
  if (kc % 2 != 0) std::fill(f.data() + kc * kPanel, f.data() + (kc + 1) * kPanel, 0.0f);
  for (int64_t k = 0; k < kc; k += 2) {
    const float* r0 = f.data() + k * kPanel;
    Bf16* d = dst + k * kPanel;  // (k / 2) * 2 * kPanel
    for (int v = 0; v < kPanel; v += kVec) {
      const __m256i a = (__m256i)_mm512_cvtneps_pbh(Simd::load(r0 + v));
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(Simd::load(r0 + kPanel + v));
      // (a[j], b[j]) pairs: within each 128-bit lane unpack interleaves 4 columns, the permutes put the
      // lanes back in column order (columns 0-7, then 8-15).
      const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * v), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 2 * v + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}

inline void pack_a_block(const large_gemm::Args& g, int64_t i0, int64_t rows, int64_t pc, int64_t kc, Bf16* dst) {
  std::vector<float>& f = large_gemm_float_scratch();
  if (static_cast<int64_t>(f.size()) < rows * kc) f.resize(rows * kc);
  pack_a_block(g, i0, rows, pc, kc, f.data());
  rows_to_bf16(f.data(), kc, rows, kc, dst);
}
#endif  // FUSEDRNN_ENGINE_BF16_PRODUCTS

// One micro-tile: rows [i, i + MR) of C, columns [j0, j0 + kPanel) (the first `valid` stored), its
// start value per `start` (0: C, 1: bias, 2: zero), then kc multiply-adds per element. T: float, or
// Bf16 (kc even: the packed depth; ap's rows kc apart, bp's k pairs 2 * kPanel apart).
template <int MR, typename T>
inline void large_tile(const large_gemm::Args& g, int start, int64_t i, int64_t j0, int64_t valid, int64_t kc,
                       const T* ap, const T* bp) {
  V acc[kMR][2];
  float* c = g.C + i * g.ldc + j0;
  for (int m = 0; m < MR; ++m) {
    if (start == 0) {
      acc[m][0] = load_partial(c + m * g.ldc, valid);
      acc[m][1] = load_partial(c + m * g.ldc + kVec, valid - kVec);
    } else if (start == 1) {
      acc[m][0] = load_partial(g.bias + j0, valid);
      acc[m][1] = load_partial(g.bias + j0 + kVec, valid - kVec);
    } else {
      acc[m][0] = Simd::zero();
      acc[m][1] = Simd::zero();
    }
  }
  // The next tile's rows of C (the next strip, same rows: the loop order of run_large_gemm), so that
  // its loads (deep K: every k block after the first) or stores do not wait on L2 / L3 after the
  // multiply-adds; a prefetch past the matrix's end is harmless (no fault).
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < kPanel; v += 16) _mm_prefetch(reinterpret_cast<const char*>(c + m * g.ldc + kPanel + v), _MM_HINT_T0);
  }
  micro_kernel<MR>(kc, ap, kc, bp, std::is_same_v<T, float> ? kPanel : 2 * kPanel, acc);
  for (int m = 0; m < MR; ++m) {
    store_partial(c + m * g.ldc, acc[m][0], valid);
    store_partial(c + m * g.ldc + kVec, acc[m][1], valid - kVec);
  }
}

// The packed buffers, grown as needed and kept per thread (a fresh 2 MB buffer per call would be
// mapped and faulted in each time).
template <typename T = float>
inline std::vector<T>& large_gemm_buffer(int which) {
  thread_local std::vector<T> buffers[2];
  return buffers[which];
}

// T: the products' operand type, float, or Bf16 (large_gemm::run_bf16: both operands rounded to bf16).
template <typename T = float>
void run_large_gemm(const large_gemm::Args& g) {
  const int64_t M = g.M, N = g.N, K = g.K;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // no products: C keeps its values (accumulate) or becomes the bias or zeros
    if (g.accumulate) return;
    for (int64_t i = 0; i < M; ++i) {
      float* c = g.C + i * g.ldc;
      if (g.bias != nullptr) {
        std::memcpy(c, g.bias, N * sizeof(float));
      } else {
        std::fill(c, c + N, 0.0f);
      }
    }
    return;
  }
  const int64_t KC = g.kc > 0 ? g.kc : kLargeKc;
  // Row blocks: at most mc rows, as even as possible, and enough of them (with the column chunks)
  // for the threads to share evenly; a multiple of kMR unless M is smaller.
  const int threads = at::get_num_threads();
  int64_t mc = g.mc > 0 ? g.mc : kLargeMc;
  const int64_t jc_strips = (std::min(N, kLargeNc) + kPanel - 1) / kPanel;
  const int64_t chunks_max = (jc_strips + kStripsPerItem - 1) / kStripsPerItem;
  if (g.mc <= 0 && threads > 1) {
    const int64_t want_blocks = (4 * threads + chunks_max - 1) / chunks_max;
    mc = std::min(mc, std::max<int64_t>(kMR, (M + want_blocks - 1) / want_blocks));
  }
  int64_t ic_blocks = (M + mc - 1) / mc;
  mc = (M + ic_blocks - 1) / ic_blocks;
  if (g.mc <= 0) mc = std::min(M, (mc + kMR - 1) / kMR * kMR);
  ic_blocks = (M + mc - 1) / mc;

  // One parallel region per column block (one in all for N <= kLargeNc), not two per depth block: at
  // K = 3200 (the weight gradients) that was 50 fork / joins a product, each a wait on the slower
  // thread, which a shared machine stretches (benchmarks/NOTES.md, entry 51). Each thread packs the
  // strips of B its own items use (all of them unless its items lie in one chunk): twice B's packing
  // with two threads, K x N copies against M x N x K multiply-adds. The operations per element are
  // unchanged (same chain, same order), so the results are bitwise those of one region per block.
  for (int64_t jc = 0; jc < N; jc += kLargeNc) {
    const int64_t nc = std::min(kLargeNc, N - jc);
    const int64_t strips = (nc + kPanel - 1) / kPanel;
    const int64_t chunks = (strips + kStripsPerItem - 1) / kStripsPerItem;
    at::parallel_for(0, ic_blocks * chunks, 1, [&](int64_t begin, int64_t end) {
      // The strips this thread's items use: one chunk's run of them, or all.
      int64_t s_lo = 0, s_hi = strips;
      const int64_t c_first = begin % chunks, c_last = (end - 1) % chunks;
      if (end - begin < chunks && c_first <= c_last) {
        s_lo = c_first * kStripsPerItem;
        s_hi = std::min(strips, (c_last + 1) * kStripsPerItem);
      }
      std::vector<T>& bbuf = large_gemm_buffer<T>(0);
      std::vector<T>& abuf = large_gemm_buffer<T>(1);
      constexpr int64_t kDepthStep = std::is_same_v<T, float> ? 1 : 2;  // bf16: k in pairs
      const int64_t kc_max = (std::min(KC, K) + kDepthStep - 1) / kDepthStep * kDepthStep;
      if (static_cast<int64_t>(bbuf.size()) < strips * kc_max * kPanel) bbuf.resize(strips * kc_max * kPanel);
      if (static_cast<int64_t>(abuf.size()) < mc * kc_max) abuf.resize(mc * kc_max);
      T* const bp = bbuf.data();
      T* const ap = abuf.data();
      for (int64_t pc = 0; pc < K; pc += KC) {
        // kc: this depth block's k; kp: its packed depth (bf16: rounded up to even, zeros past kc).
        const int64_t kc = std::min(KC, K - pc), kp = (kc + kDepthStep - 1) / kDepthStep * kDepthStep;
        const int start = pc > 0 || g.accumulate ? 0 : g.bias != nullptr ? 1 : 2;
        for (int64_t s = s_lo; s < s_hi; ++s) pack_b_strip(g, pc, kc, jc + s * kPanel, bp + s * kp * kPanel);
        int64_t packed = -1;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t ic = item / chunks, chunk = item % chunks;
          const int64_t i0 = ic * mc, rows = std::min(mc, M - i0);
          if (ic != packed) {
            pack_a_block(g, i0, rows, pc, kc, ap);
            packed = ic;
          }
          const int64_t s_end = std::min(strips, (chunk + 1) * kStripsPerItem);
          for_each_row_block(0, rows, [&](int64_t r0, int64_t mr) {
            with_rows(mr, [&](auto MR) {
              for (int64_t s = chunk * kStripsPerItem; s < s_end; ++s) {
                const int64_t j0 = jc + s * kPanel;
                large_tile<MR>(g, start, i0 + r0, j0, std::min<int64_t>(kPanel, N - j0), kp, ap + r0 * kp,
                               bp + s * kp * kPanel);
              }
            });
          });
        }
      }
    });
  }
}
