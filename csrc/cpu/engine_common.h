// Building blocks shared by the engine's forward and backward (engine_forward.h,
// engine_backward.h; design in cpu_engine.h): the register micro-kernel, masked
// loads and stores, the activations on arrays of vectors, and the split of the
// batch rows across threads.
//
// Written once for every vector width: this header, engine_forward.h and
// engine_backward.h are included by each instruction set's translation unit
// (engine_avx2.cpp, engine_avx512.cpp) inside a namespace of its own, after that
// file has switched the compiler's target and defined, in that namespace,
//   Simd    the vector type and its operations (AVX2: 8 lanes; AVX-512: 16),
//   kMR     the micro-tile's rows (what its register file holds),
//   cells   the cell math of csrc/cells/ compiled for that target,
// and the macro FUSEDRNN_ENGINE_SIMDLEN (= Simd::L, for `omp simd simdlen`).
// Every output element is the same chain of operations at every width (the bias,
// then one fused multiply-add per k in order; the activations lane by lane), so
// the packed paths of the two instruction sets give bitwise the same results; only
// the small-call path's in-register reduction (engine_forward.h) differs.
// No include guard and no #include: the text is compiled once per instruction set.

// Micro-tile: kMR rows x 2 vectors of columns of C in registers, the shape of
// BLIS's sgemm kernels (AVX2: 6 x 16 in 12 of the 16 ymm; AVX-512: 8 x 32 in 16
// of the 32 zmm). Per k: two loads of B, kMR broadcasts of A, 2*kMR FMAs: each B
// element loaded is used kMR times, and the independent accumulators cover the
// FMA latency.
using V = Simd::V;
constexpr int kVec = Simd::L;     // floats per vector
constexpr int kPanel = 2 * kVec;  // columns per micro-kernel call
static_assert(FUSEDRNN_ENGINE_SIMDLEN == Simd::L, "omp simd runs the cell backward at the vector's width");

// acc[m][v] += sum_k A[m * lda + k] * Bp[k * ldb + v * kVec .. + kVec] for m < MR.
template <int MR>
__attribute__((always_inline)) inline void micro_kernel(int64_t K, const float* A, int64_t lda, const float* Bp,
                                                        int64_t ldb, V (&acc)[kMR][2]) {
  V c[MR][2];
  for (int m = 0; m < MR; ++m) {
    c[m][0] = acc[m][0];
    c[m][1] = acc[m][1];
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = Simd::load(Bp);
    const V b1 = Simd::load(Bp + kVec);
    for (int m = 0; m < MR; ++m) {
      const V a = Simd::broadcast(A + m * lda + k);
      c[m][0] = Simd::fmadd(a, b0, c[m][0]);
      c[m][1] = Simd::fmadd(a, b1, c[m][1]);
    }
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = c[m][0];
    acc[m][1] = c[m][1];
  }
}

// Stores the first `valid` floats of v (all when valid >= kVec, none when <= 0);
// loads them (zeros in the other lanes). Nothing past them is read or written.
inline void store_partial(float* dst, V v, int64_t valid) {
  if (valid >= kVec) {
    Simd::store(dst, v);
  } else if (valid > 0) {
    Simd::store_first(dst, v, valid);
  }
}
inline V load_partial(const float* src, int64_t valid) {
  if (valid >= kVec) return Simd::load(src);
  if (valid > 0) return Simd::load_first(src, valid);
  return Simd::zero();
}

// ---------------------------------------------------------------------------
// Activations on arrays of vectors
// ---------------------------------------------------------------------------
// cells/cell_common.h's exp_nonpos_simd, sigmoid_simd and tanh_simd (formulas,
// accuracy and special values explained there), restated with intrinsics: the
// same operations in the same order, so the engine's forward computes bitwise
// what the per-step path's cells compute, at either width (tests/test_activations.py
// checks it over a sweep of float32 inputs, for each instruction set). Why
// intrinsics, measured on the engine's forward tile (benchmarks/NOTES.md, entry
// 12): GCC compiles the NaN-safe clamps `x < -104 ? -104 : x` to compare + blend
// pairs (it may only use min/max under -ffinite-math-only; max(-104, x) returns x
// when x is NaN, the same result), and a cell written per element runs one vector
// through a ~40-cycle chain of dependent operations at a time. Here every
// operation is applied to N independent vectors in turn, so the chains overlap.
template <int N>
using Vecs = V[N];

// x = exp(x) for x <= 0 (or NaN).
template <int N>
inline void exp_nonpos_n(Vecs<N>& x) {
  const V lo = Simd::set1(-104.0f);
  const V log2e = Simd::set1(1.44269504088896341f), round = Simd::set1(12582912.0f);
  const V minus_ln2_hi = Simd::set1(-0.693359375f), ln2_lo = Simd::set1(2.12194440e-4f);
  V kr[N], r[N], p[N];
  for (int i = 0; i < N; ++i) x[i] = Simd::max(lo, x[i]);  // NaN passes
  for (int i = 0; i < N; ++i) kr[i] = Simd::fmadd(x[i], log2e, round);
  for (int i = 0; i < N; ++i) {
    const V k = Simd::sub(kr[i], round);
    r[i] = Simd::fmadd(k, ln2_lo, Simd::fmadd(k, minus_ln2_hi, x[i]));
  }
  for (int i = 0; i < N; ++i) p[i] = Simd::fmadd(Simd::set1(1.9875691500e-4f), r[i], Simd::set1(1.3981999507e-3f));
  for (int i = 0; i < N; ++i) p[i] = Simd::fmadd(p[i], r[i], Simd::set1(8.3334519073e-3f));
  for (int i = 0; i < N; ++i) p[i] = Simd::fmadd(p[i], r[i], Simd::set1(4.1665795894e-2f));
  for (int i = 0; i < N; ++i) p[i] = Simd::fmadd(p[i], r[i], Simd::set1(1.6666665459e-1f));
  for (int i = 0; i < N; ++i) p[i] = Simd::fmadd(p[i], r[i], Simd::set1(5.0000001201e-1f));
  for (int i = 0; i < N; ++i) p[i] = Simd::add(Simd::fmadd(p[i], Simd::mul(r[i], r[i]), r[i]), Simd::set1(1.0f));
  // 2^(k+64) in the exponent field (k from kr's low bits), then 2^-64.
  constexpr int32_t kBias = 191 - 0x4B400000;  // + 191 - bits(1.5 * 2^23), modulo 2^32
  for (int i = 0; i < N; ++i) {
    x[i] = Simd::mul(Simd::mul(p[i], Simd::shifted_exponent(kr[i], kBias)), Simd::set1(0x1p-64f));
  }
}

// x = (x < 0 ? e : 1) / (1 + e), e = exp(-|x|)
template <int N>
inline void sigmoid_n(Vecs<N>& x) {
  const V sign = Simd::set1(-0.0f), one = Simd::set1(1.0f);
  Vecs<N> e;
  for (int i = 0; i < N; ++i) e[i] = Simd::or_(x[i], sign);  // -|x|
  exp_nonpos_n<N>(e);
  // e where x's sign bit is set: also for x = -0, where e = 1 (the same result).
  for (int i = 0; i < N; ++i) x[i] = Simd::div(Simd::where_sign(x[i], e[i], one), Simd::add(one, e[i]));
}

// x = copysign(|x| < 0.625 ? |x| + |x|^3 P(x^2) : (1 - e) / (1 + e), x), e = exp(-2 min(|x|, 9.5)),
// for N <= kTanhGroup vectors.
template <int N>
inline void tanh_group(V* x) {
  const V sign = Simd::set1(-0.0f), one = Simd::set1(1.0f);
  Vecs<N> a, small, e;
  for (int i = 0; i < N; ++i) a[i] = Simd::andnot(sign, x[i]);
  for (int i = 0; i < N; ++i) {
    const V z = Simd::mul(a[i], a[i]);
    V p = Simd::fmadd(Simd::set1(-5.70498872745e-3f), z, Simd::set1(2.06390887954e-2f));
    p = Simd::fmadd(p, z, Simd::set1(-5.37397155531e-2f));
    p = Simd::fmadd(p, z, Simd::set1(1.33314422036e-1f));
    p = Simd::fmadd(p, z, Simd::set1(-3.33332819422e-1f));
    small[i] = Simd::fmadd(Simd::mul(p, z), a[i], a[i]);
  }
  for (int i = 0; i < N; ++i) e[i] = Simd::mul(Simd::set1(-2.0f), Simd::min(Simd::set1(9.5f), a[i]));
  exp_nonpos_n<N>(e);
  for (int i = 0; i < N; ++i) {
    const V big = Simd::div(Simd::sub(one, e[i]), Simd::add(one, e[i]));
    const V t = Simd::where_less(a[i], Simd::set1(0.625f), small[i], big);
    x[i] = Simd::or_(t, Simd::and_(x[i], sign));
  }
}

// In groups of at most 6 vectors: tanh keeps |x|, the polynomial and e live across its exp, and
// the GRU and RNN epilogues' 12 at once spilled more: 4.7 ns per 8 floats against 4.2 in groups
// (the old formula: 3.4; AVX2, L1-resident micro-benchmark, benchmarks/NOTES.md entry 14).
constexpr int kTanhGroup = 6;
template <int N>
inline void tanh_n(Vecs<N>& x) {
  constexpr int full = N / kTanhGroup * kTanhGroup;
  for (int g = 0; g < full; g += kTanhGroup) tanh_group<kTanhGroup>(x + g);
  if constexpr (full < N) tanh_group<N - full>(x + full);
}

// x = x < 0 ? 0 : x, NaN kept (as torch.relu): max(0, x) returns x when x is NaN.
template <int N>
inline void relu_n(Vecs<N>& x) {
  for (int i = 0; i < N; ++i) x[i] = Simd::max(Simd::zero(), x[i]);
}

// ---------------------------------------------------------------------------
// Packed weights kept between calls (cpu_engine.h: PackCache)
// ---------------------------------------------------------------------------

// The Entry in `slot` when it holds one of `tag`'s (one static per instantiation and translation unit:
// another cell, operand type or instruction set never reads this one's) and matches(entry) accepts it;
// else a fresh one from build(entry), stored in the slot (slot nullptr: not stored).
template <typename Entry, typename Matches, typename Build>
std::shared_ptr<const Entry> cached_entry(PackCache::Slot* slot, const void* tag, const Matches& matches,
                                          const Build& build) {
  if (slot != nullptr && slot->tag == tag) {
    auto c = std::static_pointer_cast<const Entry>(slot->entry);
    if (matches(*c)) return c;
  }
  auto c = std::make_shared<Entry>();
  build(*c);
  if (slot != nullptr) *slot = {c, tag};
  return c;
}

// ---------------------------------------------------------------------------
// From run-time values to the compile-time ones the kernels are built for
// ---------------------------------------------------------------------------

// f(std::integral_constant<int, MR>{}) for a block of `rows` (1..kMR) rows.
template <int MR = kMR, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (MR == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (rows == MR) {
    f(std::integral_constant<int, MR>{});
  } else {
    with_rows<MR - 1>(rows, f);
  }
}

// f(Cell{}) for the cell a layer runs.
template <typename F>
inline void with_cell(CellKind kind, F&& f) {
  switch (kind) {
    case CellKind::kLstm: f(cells::LstmCell{}); break;
    case CellKind::kGru: f(cells::GruCell{}); break;
    case CellKind::kRnnTanh: f(cells::RnnTanhCell{}); break;
    case CellKind::kRnnRelu: f(cells::RnnReluCell{}); break;
  }
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
