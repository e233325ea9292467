// Test kernels for the CPU kernel runner (csrc/exec/cpu_runner.h), built by tests/test_kernel_runner.py
// into a small shared library and called through ctypes. Each body is written against the execution
// context as a real kernel is; the planted-bug ones each break exactly one rule the runner checks.
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "exec/cpu_runner.h"

namespace {

using fusedrnn::exec::CpuThread;
using fusedrnn::exec::KernelCheckError;
using fusedrnn::exec::LaunchConfig;
using fusedrnn::exec::run_kernel;

// A correct block reduction with barriers and warp shuffles: out[block] = sum of (tid + 1) over the
// block's threads, and lanes[block * threads + tid] = the value lane tid ^ lane_mask passed to an
// xor shuffle (lane-exactness). threads: a multiple of 32.
struct ReduceOk {
  int64_t* out;
  int64_t* lanes;
  int lane_mask;
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const int tid = int(ctx.thread()), n = int(ctx.block_dim());
    const auto s = ctx.template shared<int64_t>(0);
    lanes[ctx.block() * n + tid] = ctx.shfl_xor(int64_t(1000 * ctx.block() + tid), lane_mask);
    s[tid] = tid + 1;
    ctx.sync();
    for (int half = n / 2; half >= 32; half /= 2) {  // n / 2^k stays a multiple of 32 down to one warp
      if (tid < half) s[tid] = int64_t(s[tid]) + int64_t(s[tid + half]);
      ctx.sync();
    }
    if (tid < 32) {
      int64_t v = s[tid];
      for (int m = 16; m >= 1; m /= 2) v += ctx.shfl_xor(v, m);
      if (tid == 0) out[ctx.block()] = v;
    }
  }
};

// Race, read after write: each thread writes its word, then reads its (lower) neighbour's with no
// barrier between (the runner runs thread t - 1 before t, so the write comes first).
struct RaceReadAfterWrite {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const int tid = int(ctx.thread()), n = int(ctx.block_dim());
    const auto s = ctx.template shared<float>(0);
    s[tid] = float(tid);
    ctx.sync();
    s[tid] = 2.0f * float(tid);
    const float neighbour = s[(tid + n - 1) % n];  // BUG: needs a barrier before this read
    (void)neighbour;
  }
};

// Race, write after read: a shift by one without the barrier between the read and the write.
struct RaceWriteAfterRead {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const int tid = int(ctx.thread()), n = int(ctx.block_dim());
    const auto s = ctx.template shared<float>(0);
    s[tid] = float(tid);
    ctx.sync();
    const float v = s[(tid + 1) % n];
    s[tid] = v;  // BUG: thread tid - 1 read this word since the barrier
  }
};

// Race, write after write: two threads store to the same word.
struct RaceWriteAfterWrite {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    s[ctx.thread() / 2] = float(ctx.thread());  // BUG: threads 2k and 2k + 1 both write word k
  }
};

// Many readers of one word, then its writer after a barrier: no race.
struct ManyReadersOk {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    if (ctx.thread() == 0) s[0] = 1.0f;
    ctx.sync();
    const float v = s[0];
    ctx.sync();
    if (ctx.thread() == 1) s[0] = v + 1.0f;
  }
};

// Many readers of one word and a write by one of them in the same interval: a race.
struct RaceManyReaders {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    if (ctx.thread() == 0) s[0] = 1.0f;
    ctx.sync();
    const float v = s[0];
    if (ctx.thread() == ctx.block_dim() - 1) s[0] = v + 1.0f;  // BUG: every other thread read it
  }
};

// Race on half-precision neighbours inside one 4-byte word is NOT a race (2-byte granules): no error.
struct HalvesInOneWordOk {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<uint16_t>(0);
    s[ctx.thread()] = uint16_t(ctx.thread());
  }
};

// A barrier that half of the block skips.
struct MissedBarrier {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    s[ctx.thread()] = 1.0f;
    if (ctx.thread() < ctx.block_dim() / 2) ctx.sync();  // BUG: not every thread reaches it
  }
};

// Two barriers, each reached by half of the block.
struct DivergentBarriers {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    if (ctx.thread() % 2 == 0) {
      ctx.sync();  // BUG: odd threads wait at the other one
    } else {
      ctx.sync();
    }
  }
};

// Reads one element past the end of the block's shared memory.
struct OutOfBoundsRead {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    s[ctx.thread()] = 0.0f;
    ctx.sync();
    const float v = s[ctx.thread() + 1];  // BUG: the last thread reads past the end
    (void)v;
  }
};

// Writes one element before the start.
struct OutOfBoundsWrite {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<double>(0);
    s[int(ctx.thread()) - 1] = 0.0;  // BUG: thread 0 writes before the start
  }
};

// Reads shared memory no thread wrote (poisoned).
struct UninitialisedRead {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    if (ctx.thread() != 5) s[ctx.thread()] = 1.0f;
    ctx.sync();
    const float v = s[(ctx.thread() + 1) % ctx.block_dim()];  // BUG: word 5 was never written
    (void)v;
  }
};

// Fails (out of bounds) in blocks 3 and 5 only: the launch must report block 3, however many OS
// threads share the blocks.
struct FailsInBlocks3And5 {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const auto s = ctx.template shared<float>(0);
    const bool bad = ctx.block() == 3 || ctx.block() == 5;
    s[ctx.thread() + (bad ? ctx.block_dim() : 0)] = 1.0f;  // BUG in blocks 3 and 5
  }
};

// A full-mask shuffle that half of a warp skips.
struct InactiveLaneShuffle {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    float v = float(ctx.thread());
    if (ctx.thread() % 32 < 16) v = ctx.shfl_xor(v, 1);  // BUG: lanes 16..31 are inactive
    (void)v;
  }
};

// A full-mask shuffle in a block whose last warp is partial (48 threads).
struct PartialWarpShuffle {
  template <typename Ctx>
  void operator()(const Ctx& ctx) const {
    const float v = ctx.shfl_xor(float(ctx.thread()), 1);  // BUG at 48 threads: warp 1 has 16 lanes
    (void)v;
  }
};

template <typename Body>
int launch(const LaunchConfig& c, const Body& body, char* message, int capacity) {
  try {
    run_kernel(c, body);
    return 0;
  } catch (const KernelCheckError& e) {
    std::strncpy(message, e.what(), size_t(capacity) - 1);
    message[capacity - 1] = '\0';
    return 1;
  } catch (const std::exception& e) {
    std::strncpy(message, e.what(), size_t(capacity) - 1);
    message[capacity - 1] = '\0';
    return 2;
  }
}

}  // namespace

extern "C" {

// The correct kernel: 0 when the runner accepts it (out, lanes filled), else 1 / 2 with the message.
int runner_reduce(int64_t grid, int threads, int lane_mask, int64_t* out, int64_t* lanes, char* message,
                  int capacity) {
  LaunchConfig c;
  c.grid = grid;
  c.threads = threads;
  c.shared_bytes = sizeof(int64_t) * size_t(threads);
  return launch(c, ReduceOk{out, lanes, lane_mask}, message, capacity);
}

// A planted-bug (or, for halves_ok, a correct) kernel by name: 0 = no error, 1 = a check failed
// (message), 2 = another error, 3 = unknown name.
int runner_planted(const char* name, int64_t grid, int threads, char* message, int capacity) {
  LaunchConfig c;
  c.grid = grid;
  c.threads = threads;
  c.shared_bytes = sizeof(double) * size_t(threads);
  const std::string n = name;
  if (n == "race_read_after_write") return launch(c, RaceReadAfterWrite{}, message, capacity);
  if (n == "race_write_after_read") return launch(c, RaceWriteAfterRead{}, message, capacity);
  if (n == "race_write_after_write") return launch(c, RaceWriteAfterWrite{}, message, capacity);
  if (n == "race_many_readers") return launch(c, RaceManyReaders{}, message, capacity);
  if (n == "many_readers_ok") return launch(c, ManyReadersOk{}, message, capacity);
  if (n == "halves_ok") {
    c.shared_bytes = sizeof(uint16_t) * size_t(threads);
    return launch(c, HalvesInOneWordOk{}, message, capacity);
  }
  if (n == "missed_barrier") return launch(c, MissedBarrier{}, message, capacity);
  if (n == "divergent_barriers") return launch(c, DivergentBarriers{}, message, capacity);
  if (n == "out_of_bounds_read") {
    c.shared_bytes = sizeof(float) * size_t(threads);
    return launch(c, OutOfBoundsRead{}, message, capacity);
  }
  if (n == "fails_in_blocks_3_and_5") {
    c.shared_bytes = sizeof(float) * size_t(threads);
    return launch(c, FailsInBlocks3And5{}, message, capacity);
  }
  if (n == "out_of_bounds_write") return launch(c, OutOfBoundsWrite{}, message, capacity);
  if (n == "uninitialised_read") return launch(c, UninitialisedRead{}, message, capacity);
  if (n == "inactive_lane_shuffle") return launch(c, InactiveLaneShuffle{}, message, capacity);
  if (n == "partial_warp_shuffle") return launch(c, PartialWarpShuffle{}, message, capacity);
  return 3;
}

}  // extern "C"
