// The persistent forward kernel's shape and resource limits: ONE header read by
// the kernel (csrc/cuda/persistent_*.cu), the host-side path choice
// (csrc/persistent/persistent_plan.h) and the resource test (tests/test_ptxas.py
// parses the `constexpr int k... = N;` lines below), so the three cannot drift.
//
// Layout of a CTA (see persistent_forward.h): kThreads threads; thread
// tid = unit * kKSlices + slice owns hidden unit `unit` and the k-slice
// k = slice, slice + kKSlices, slice + 2 * kKSlices, ... of every gate row of
// that unit in W_hh. The kKSlices threads of a unit are adjacent lanes of one
// warp, so their partial sums meet with log2(kKSlices) xor shuffles.
#pragma once

namespace fusedrnn {
namespace persistent {

constexpr int kThreads = 512;             // threads per CTA (one CTA per SM: __launch_bounds__(512, 1))
constexpr int kKSlices = 4;               // threads sharing one hidden unit's dot products
constexpr int kUnitSlots = 128;           // kThreads / kKSlices: the largest hidden size
constexpr int kMaxHidden = 128;           // largest H the persistent path runs
constexpr int kKPerThread = 32;           // kMaxHidden / kKSlices: weights per gate row per thread
constexpr int kMaxRegisters = 128;        // 65536 registers per SM / kThreads (ptxas must not exceed it)
constexpr int kMaxSharedBytes = 232448;   // 227 KB, sm_90's opt-in per-block limit (the plan also asks the device)
constexpr int kMaxRowsPerCta = 16;        // sequences one CTA carries; bounds the h/c state in shared memory
constexpr int kShuffleRounds = 2;         // log2(kKSlices): xor 1, xor 2

static_assert(kUnitSlots * kKSlices == kThreads, "every thread owns one (unit, k-slice) pair");
static_assert(kKPerThread * kKSlices == kMaxHidden && kUnitSlots == kMaxHidden, "one unit per thread group");
static_assert((1 << kShuffleRounds) == kKSlices, "the k-slices of a unit reduce with xor shuffles");
static_assert(32 % kKSlices == 0, "a unit's k-slices must sit in one warp");

// Gate rows held in registers (the rest in shared memory), per cell's gate count.
// A thread has at most kMaxRegisters; the loop, indices, sums and the cell
// need ~60 of them. RNN (1 gate): its 32 weights in registers. GRU (3) and
// LSTM (4): two gate rows (64 weights) in registers, the rest in shared memory
// (GRU 1 x 32 x 512 weights: 64 KB fp32; LSTM 2 x: 128 KB fp32, 64 KB half).
// All three GRU rows in registers (96) spilled (ptxas: 128 registers, 80 bytes
// of spill stores); tests/test_ptxas.py keeps this honest.
constexpr int register_gates(int gates) { return gates == 1 ? 1 : 2; }

}  // namespace persistent
}  // namespace fusedrnn
