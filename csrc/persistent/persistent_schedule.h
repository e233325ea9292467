// A ragged batch's step schedule (rows active at each time step, and the first
// packed row of each step) written on the device by a kernel whose only input is
// its own parameters, so the persistent kernels' schedule is safe under CUDA
// graph capture: a captured kernel node keeps a copy of its parameters, and a
// replay rewrites the schedule from them into the buffer the capture allocated
// (from the graph's memory pool). The former pinned host copy was not: a replay
// re-read a host block that had gone back to the cache.
//
// The schedule travels in run-length form: batch_sizes is non-increasing, so it
// is a few runs (value, steps) (at most one per distinct sequence length), and
// kScheduleRuns of them fit one launch's parameters (2 KB; CUDA allows 4 KB);
// a longer schedule takes several launches, each one chunk of runs.
//
// Written once against the execution context (csrc/exec/cuda_block.h): the
// `__global__` wrapper (csrc/cuda/step_schedule.cu) and the CPU runner (the
// persistent emulation, csrc/cpu/persistent_emulation.cpp) run the same body.
#pragma once

#include <cstdint>

#include "../cells/cell_common.h"  // FUSEDRNN_HOST_DEVICE

namespace fusedrnn {
namespace persistent {

constexpr int kScheduleRuns = 124;    // runs per launch: 2 x 124 x 8 bytes + the header < 2 KB of parameters
constexpr int kScheduleThreads = 128;

struct ScheduleChunk {
  int64_t first_step = 0;    // time step of the chunk's first run
  int64_t first_offset = 0;  // packed row of that step (the sum of batch_sizes before it)
  int64_t steps = 0;         // steps covered by this chunk (the sum of its counts)
  int64_t total_steps = 0;   // T: the row length of the [2, T] schedule below
  int64_t runs = 0;          // runs used, <= kScheduleRuns
  int64_t batch[kScheduleRuns] = {};  // rows active in each run's steps
  int64_t count[kScheduleRuns] = {};  // steps in each run
  int64_t* schedule = nullptr;        // [2, total_steps] out: batch sizes, then offsets
};

static_assert(sizeof(ScheduleChunk) <= 4096, "a chunk is one kernel's parameters: CUDA's limit is 4 KB");

struct FillSchedule {
  // One thread per step of the chunk (grid-stride): find its run by a scan over the chunk's
  // runs (a handful; the parameters are in the constant cache), then batch and offset.
  template <typename Ctx>
  FUSEDRNN_HOST_DEVICE static void run(const Ctx& ctx, const ScheduleChunk& c) {
    for (int64_t i = ctx.block() * int64_t(ctx.block_dim()) + ctx.thread(); i < c.steps;
         i += int64_t(ctx.grid_dim()) * ctx.block_dim()) {
      int64_t start = 0, offset = c.first_offset, run = 0;
      while (run + 1 < c.runs && i >= start + c.count[run]) {
        offset += c.batch[run] * c.count[run];
        start += c.count[run];
        ++run;
      }
      const int64_t t = c.first_step + i;
      c.schedule[t] = c.batch[run];
      c.schedule[c.total_steps + t] = offset + c.batch[run] * (i - start);
    }
  }

  FUSEDRNN_HOST_DEVICE static int64_t blocks(int64_t steps) {
    const int64_t b = (steps + kScheduleThreads - 1) / kScheduleThreads;
    return b < 1 ? 1 : (b > 1024 ? 1024 : b);
  }
};

// The chunks of a non-increasing batch_sizes [steps], handed one by one to `emit(const ScheduleChunk&)`.
template <typename Emit>
void schedule_chunks(const int64_t* batch_sizes, int64_t steps, int64_t* schedule, Emit&& emit) {
  ScheduleChunk c;
  c.total_steps = steps;
  c.schedule = schedule;
  int64_t offset = 0;
  for (int64_t t = 0; t < steps;) {
    int64_t n = 1;
    while (t + n < steps && batch_sizes[t + n] == batch_sizes[t]) ++n;
    if (c.runs == kScheduleRuns) {
      emit(c);
      c.first_step += c.steps;
      c.first_offset = offset;
      c.steps = 0;
      c.runs = 0;
    }
    c.batch[c.runs] = batch_sizes[t];
    c.count[c.runs] = n;
    ++c.runs;
    c.steps += n;
    offset += batch_sizes[t] * n;
    t += n;
  }
  if (c.runs > 0) emit(c);
}

}  // namespace persistent
}  // namespace fusedrnn
