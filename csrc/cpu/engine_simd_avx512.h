// The AVX-512F vector the engine's kernels are written against (engine_common.h), and the micro-tile's
// rows: shared by the AVX-512 translation units (engine_avx512.cpp; engine_avx512_bf16.cpp, the
// bfloat16 dot-product forward). Included inside each one's own namespace after its target switch,
// like engine_common.h: no include guard, no #include.

// The 16-lane vector the kernels are written against (engine_common.h): the same
// operations as the 8-lane one, lane by lane.
struct Simd {
  using V = __m512;
  static constexpr int L = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }  // 0 < n < 16
  // Masked-off lanes are neither read nor written (no fault past an array's end).
  static V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_first(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }  // b where either is NaN, as vmaxps ymm
  static V min(V a, V b) { return _mm512_min_ps(a, b); }  // b where either is NaN
  static __m512i bits(V a) { return _mm512_castps_si512(a); }
  static V or_(V a, V b) { return _mm512_castsi512_ps(_mm512_or_si512(bits(a), bits(b))); }
  static V and_(V a, V b) { return _mm512_castsi512_ps(_mm512_and_si512(bits(a), bits(b))); }
  static V andnot(V a, V b) { return _mm512_castsi512_ps(_mm512_andnot_si512(bits(a), bits(b))); }  // ~a & b
  // if_neg where x's sign bit is set (x's bits negative as an int32), else otherwise.
  static V where_sign(V x, V if_neg, V otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(bits(x), _mm512_setzero_si512()), otherwise, if_neg);
  }
  // if_less where a < b (false for NaN), else otherwise.
  static V where_less(V a, V b, V if_less, V otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), otherwise, if_less);
  }
  static V shifted_exponent(V kr, int32_t bias) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(bits(kr), _mm512_set1_epi32(bias)), 23));
  }
  // One level of sum_each: lanes l with (l / S) even get x[l] + x[l ^ S], the
  // others y[l] + y[l ^ S] (a blend, then the swap of adjacent S-lane blocks).
  template <int S>
  static V fold(V x, V y) {
    constexpr __mmask16 odd = S == 1 ? 0xAAAA : S == 2 ? 0xCCCC : S == 4 ? 0xF0F0 : 0xFF00;
    const V same = _mm512_mask_blend_ps(odd, x, y);   // x on even blocks, y on odd ones
    V other = _mm512_mask_blend_ps(odd, y, x);        // the opposite
    if constexpr (S == 1) other = _mm512_permute_ps(other, 0xB1);
    if constexpr (S == 2) other = _mm512_permute_ps(other, 0x4E);
    if constexpr (S == 4) other = _mm512_shuffle_f32x4(other, other, 0xB1);
    if constexpr (S == 8) other = _mm512_shuffle_f32x4(other, other, 0x4E);
    return _mm512_add_ps(same, other);
  }
  // Lane r = the sum of the 16 lanes of a[r]: four levels of fold, lane bit i
  // picking row bit i.
  static V sum_each(const V (&a)[L]) {
    V b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i) b[i] = fold<1>(a[2 * i], a[2 * i + 1]);
    for (int i = 0; i < 4; ++i) c[i] = fold<2>(b[2 * i], b[2 * i + 1]);
    for (int i = 0; i < 2; ++i) d[i] = fold<4>(c[2 * i], c[2 * i + 1]);
    return fold<8>(d[0], d[1]);
  }
};

constexpr int kMR = 8;
