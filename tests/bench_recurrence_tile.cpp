// Micro-benchmark of the CPU engine's recurrence product alone (benchmarks/NOTES.md entry 43):
// per step, every row block of a thread's rows times every unit block's packed W_hh panel, the
// engine's loop order (groups of 3 row blocks, unit blocks outer, row blocks inner), the
// accumulators stored to an L1 tile (no cell), for the panel layouts and micro-tile shapes the
// entry compares: [K][G*U] (the calls' columns interleaved per k: the engine before entry 43),
// [K][16] per call (the engine since), that with a software prefetch, with all row blocks in one
// group, with one unit block's panel for all (W in L2: no L3 stream), and 12x8 / 4x24 tiles.
// The variants are interleaved rep by rep (the VM's speed moves within minutes). AVX2 + FMA
// only; one thread; thread CPU time. Not built by setup.py or the tests: a tool.
// `valgrind --tool=cachegrind --D1=32768,8,64 --LL=524288,8,64` on one variant (last argument)
// gives its simulated L1 / L2 misses.
//
//   g++ -O3 -mavx2 -mfma -std=c++17 tests/bench_recurrence_tile.cpp -o /tmp/bench_tile
//   /tmp/bench_tile [rows] [steps per rep] [reps] [H only, 0: 128, 256 and 512] [variant only]
#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <vector>

static double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

using V = __m256;
constexpr int kVec = 8;

// 6 x 16: the engine's micro_kernel (Bp rows ldb apart), optionally prefetching `ahead` floats
// down the panel stream each k.
template <int MR, int kAhead>
__attribute__((always_inline)) inline void kernel_6x16(int64_t K, const float* A, int64_t lda, const float* Bp,
                                                       int64_t ldb, V (&acc)[6][2]) {
  V c[MR][2];
  for (int m = 0; m < MR; ++m) c[m][0] = acc[m][0], c[m][1] = acc[m][1];
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (kAhead > 0) _mm_prefetch(reinterpret_cast<const char*>(Bp + kAhead), _MM_HINT_T0);
    const V b0 = _mm256_loadu_ps(Bp), b1 = _mm256_loadu_ps(Bp + kVec);
    for (int m = 0; m < MR; ++m) {
      const V a = _mm256_broadcast_ss(A + m * lda + k);
      c[m][0] = _mm256_fmadd_ps(a, b0, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(a, b1, c[m][1]);
    }
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m) acc[m][0] = c[m][0], acc[m][1] = c[m][1];
}

// 12 x 8: one B vector per k, 12 broadcasts (half the panel traffic per FLOP of 6 x 16).
template <int MR>
__attribute__((always_inline)) inline void kernel_12x8(int64_t K, const float* A, int64_t lda, const float* Bp,
                                                       int64_t ldb, V (&acc)[12]) {
  V c[MR];
  for (int m = 0; m < MR; ++m) c[m] = acc[m];
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = _mm256_loadu_ps(Bp);
    for (int m = 0; m < MR; ++m) c[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + m * lda + k), b0, c[m]);
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m) acc[m] = c[m];
}

// 4 x 24: 3 B vectors, 4 broadcasts per k.
template <int MR>
__attribute__((always_inline)) inline void kernel_4x24(int64_t K, const float* A, int64_t lda, const float* Bp,
                                                       int64_t ldb, V (&acc)[4][3]) {
  V c[MR][3];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 3; ++v) c[m][v] = acc[m][v];
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = _mm256_loadu_ps(Bp), b1 = _mm256_loadu_ps(Bp + 8), b2 = _mm256_loadu_ps(Bp + 16);
    for (int m = 0; m < MR; ++m) {
      const V a = _mm256_broadcast_ss(A + m * lda + k);
      c[m][0] = _mm256_fmadd_ps(a, b0, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(a, b1, c[m][1]);
      c[m][2] = _mm256_fmadd_ps(a, b2, c[m][2]);
    }
    Bp += ldb;
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 3; ++v) acc[m][v] = c[m][v];
}

enum Layout { kInterleaved, kContiguous, kContiguousPrefetch, kOneBlock, k12x8, k4x24 };
static const char* layout_name(int l) {
  switch (l) {
    case kInterleaved: return "6x16 [K][G*U] (main)";
    case kContiguous: return "6x16 [K][16] per call";
    case kContiguousPrefetch: return "6x16 [K][16] + prefetch";
    case kOneBlock: return "6x16 main, 1 panel (L2)";
    case k12x8: return "12x8 [K][8] per call";
    case k4x24: return "4x24 [K][24] per call";
  }
  return "?";
}

static int g_group = 3;  // row blocks per group (the engine's kGroupBlocks)

struct Shape {
  int G, U, H, rows;
};

// One step of the engine's loop over rows [0, rows) in even blocks of at most `mr_max`.
template <int Layout>
static void step(const Shape& s, const float* w, const float* h, float* tile) {
  const int width = s.G * s.U, H = s.H;
  const int blocks = (H + s.U - 1) / s.U;
  const int mr_max = Layout == k12x8 ? 12 : Layout == k4x24 ? 4 : 6;
  const int nblocks = (s.rows + mr_max - 1) / mr_max;
  std::vector<std::pair<int, int>> rb;
  for (int i = 0, m0 = 0; i < nblocks; ++i) {
    const int mr = s.rows / nblocks + (i < s.rows % nblocks ? 1 : 0);
    rb.emplace_back(m0, mr);
    m0 += mr;
  }
  const int group = g_group;
  for (size_t g0 = 0; g0 < rb.size(); g0 += group) {
    const size_t g1 = std::min(rb.size(), g0 + group);
    for (int ub = 0; ub < blocks; ++ub) {
      const float* panel = w + (Layout == kOneBlock ? 0 : int64_t(ub) * H * width);
      for (size_t r = g0; r < g1; ++r) {
        const float* a = h + rb[r].first * H;
        const int mr = rb[r].second;
        if constexpr (Layout == k12x8) {
          for (int c = 0; c < width / 8; ++c) {
            V acc[12];
            for (auto& x : acc) x = _mm256_setzero_ps();
            const float* bp = panel + int64_t(c) * H * 8;
            switch (mr) {
#define CASE(n) case n: kernel_12x8<n>(H, a, H, bp, 8, acc); break;
              CASE(12) CASE(11) CASE(10) CASE(9) CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
            }
            for (int m = 0; m < mr; ++m) _mm256_storeu_ps(tile + m * width + c * 8, acc[m]);
          }
        } else if constexpr (Layout == k4x24) {
          for (int c = 0; c < width / 24; ++c) {
            V acc[4][3];
            for (auto& x : acc)
              for (auto& y : x) y = _mm256_setzero_ps();
            const float* bp = panel + int64_t(c) * H * 24;
            switch (mr) {
              case 4: kernel_4x24<4>(H, a, H, bp, 24, acc); break;
              case 3: kernel_4x24<3>(H, a, H, bp, 24, acc); break;
              case 2: kernel_4x24<2>(H, a, H, bp, 24, acc); break;
              case 1: kernel_4x24<1>(H, a, H, bp, 24, acc); break;
            }
            for (int m = 0; m < mr; ++m)
              for (int v = 0; v < 3; ++v) _mm256_storeu_ps(tile + m * width + c * 24 + v * 8, acc[m][v]);
          }
        } else {
          for (int c = 0; c < width / 16; ++c) {
            V acc[6][2];
            for (auto& x : acc) x[0] = x[1] = _mm256_setzero_ps();
            const bool contiguous = Layout == kContiguous || Layout == kContiguousPrefetch;
            const float* bp = contiguous ? panel + int64_t(c) * H * 16 : panel + c * 16;
            const int64_t ldb = contiguous ? 16 : width;
            constexpr int ahead = Layout == kContiguousPrefetch ? 16 * 8 : 0;  // 8 k (lines) ahead
            switch (mr) {
#define CASE(n) case n: kernel_6x16<n, ahead>(H, a, H, bp, ldb, acc); break;
              CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
#undef CASE
            }
            for (int m = 0; m < mr; ++m) {
              _mm256_storeu_ps(tile + m * width + c * 16, acc[m][0]);
              _mm256_storeu_ps(tile + m * width + c * 16 + 8, acc[m][1]);
            }
          }
        }
      }
    }
  }
}

struct Variant {
  int layout, group;
};

template <int L>
static void steps_of(const Shape& s, const float* w, const float* h, float* tile, int steps) {
  for (int i = 0; i < steps; ++i) step<L>(s, w, h, tile);
}

static void run_variant(const Variant& v, const Shape& s, const float* w, const float* h, float* tile, int steps) {
  g_group = v.group;
  switch (v.layout) {
    case kInterleaved: steps_of<kInterleaved>(s, w, h, tile, steps); break;
    case kContiguous: steps_of<kContiguous>(s, w, h, tile, steps); break;
    case kContiguousPrefetch: steps_of<kContiguousPrefetch>(s, w, h, tile, steps); break;
    case kOneBlock: steps_of<kOneBlock>(s, w, h, tile, steps); break;
    case k12x8: steps_of<k12x8>(s, w, h, tile, steps); break;
    case k4x24: steps_of<k4x24>(s, w, h, tile, steps); break;
  }
}

int main(int argc, char** argv) {
  const int rows = argc > 1 ? atoi(argv[1]) : 32;
  const int steps = argc > 2 ? atoi(argv[2]) : 20;
  const int reps = argc > 3 ? atoi(argv[3]) : 9;
  const int hidden_only = argc > 4 ? atoi(argv[4]) : 0;
  const int variant_only = argc > 5 ? atoi(argv[5]) : -1;  // for cachegrind: one variant
  const Variant variants[] = {{kInterleaved, 3}, {kContiguous, 3}, {kContiguous, 1000}, {kContiguousPrefetch, 3},
                              {kOneBlock, 3},    {k12x8, 3},       {k4x24, 3}};
  struct Cell { const char* name; int G, U; } cells[] = {{"LSTM", 4, 8}, {"GRU", 3, 16}, {"RNN", 1, 16}};
  printf("rows %d, %d steps per rep, %d reps interleaved; GF/s of the min time (of the median)\n", rows, steps, reps);
  for (const Cell& cell : cells) {
    for (int H : {128, 256, 512}) {
      if (hidden_only != 0 && H != hidden_only) continue;
      const Shape s{cell.G, cell.U, H, rows};
      const int64_t blocks = (H + s.U - 1) / s.U;
      std::vector<float> w(blocks * H * s.G * s.U + 64), h(rows * H), tile(12 * 64);
      for (size_t i = 0; i < w.size(); ++i) w[i] = 1e-3f * float(i % 97);
      for (size_t i = 0; i < h.size(); ++i) h[i] = 1e-2f * float(i % 13);
      const double flop = 2.0 * rows * H * double(s.G * H) * steps;
      std::vector<std::vector<double>> t(std::size(variants));
      for (int rep = 0; rep < reps; ++rep) {
        for (size_t v = 0; v < std::size(variants); ++v) {
          if (variants[v].layout == k4x24 && (s.G * s.U) % 24 != 0) continue;
          if (variant_only >= 0 && static_cast<int>(v) != variant_only) continue;
          const double t0 = thread_seconds();
          run_variant(variants[v], s, w.data(), h.data(), tile.data(), steps);
          t[v].push_back(thread_seconds() - t0);
        }
      }
      printf("%-4s H=%3d W=%5.0f KB\n", cell.name, H, w.size() * 4 / 1024.0);
      for (size_t v = 0; v < std::size(variants); ++v) {
        if (t[v].empty()) continue;
        std::sort(t[v].begin(), t[v].end());
        printf("    %-28s groups %4d: %6.1f (%6.1f)\n", layout_name(variants[v].layout), variants[v].group,
               flop / t[v][0] * 1e-9, flop / t[v][t[v].size() / 2] * 1e-9);
      }
    }
  }
}
