// The CPU recurrent engine: the whole time loop of one layer and direction in
// float32, with the recurrent GEMM and the cell fused (csrc/cpu/engine_forward.h,
// engine_backward.h).
//
//   forward, per step and block of rows: h_{t-1} W_hh^T + b_hh (and, where
//     fuse_input_projection says so, x_t W_ih^T + b_ih) in registers, else plus
//     the input projection computed before, stored to an L1 tile,
//     then the cell (the vector form of cells/*_cell.h) on the same units at
//     once: the pre-activations never leave L1.
//   backward, per step and block of rows: the cell backward (Cell::backward),
//     then dh_{t-1} = dgates_h W_hh while those gate gradients are in L1.
//
// Threads split the batch rows; each runs its rows' whole time loop with no
// synchronisation between steps (sequences are independent). A uniform batch of
// few rows per thread splits the hidden units instead, with one barrier per step
// (engine_forward.h: split_parts, split_steps; forward only). W_hh is packed
// once per call into the panels the micro-kernel streams. Each output element
// is computed by the same sequence of operations whatever the thread count, the
// row blocking or the vector width, so results are bitwise reproducible (and do
// not even depend on the number of threads, nor, outside the small-call path, on
// the instruction set).
//
// The kernels are written once against a vector type and compiled per
// instruction set in its own translation unit (engine_avx2.cpp: 8 lanes,
// engine_avx512.cpp: 16 lanes), chosen at run time: isa(). This header is what
// the rest of the library sees: plain pointers and sizes, no cell headers and no
// intrinsics, so nothing compiled for AVX2 or AVX-512 leaks into code that runs
// on CPUs without it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace fusedrnn {
namespace cpu_engine {

enum class CellKind { kLstm, kGru, kRnnTanh, kRnnRelu };

// The instruction sets the engine is compiled for.
enum class Isa { kNone, kAvx2, kAvx512 };

// The one the engine runs on this call: the widest this CPU has (AVX-512F, else
// AVX2+FMA, else none; checked once), capped by FUSEDRNN_CPU_ISA=avx2|avx512
// (read on every call, so that a test or a benchmark runs both paths in one
// process on an AVX-512 machine; a cap above what the CPU has changes nothing).
// Any other value of FUSEDRNN_CPU_ISA is an error (c10::Error: RuntimeError).
Isa isa();
const char* isa_name(Isa isa);

// True when isa() is not kNone and the engine is not switched off with
// FUSEDRNN_CPU_ENGINE=0 (read on every call, so a benchmark or a test can
// compare both paths in one process).
bool available();

// One layer, one direction; every matrix row-major and contiguous. Rows of a
// step are the schedule's: step t holds batch[t] rows at packed rows
// offset[t] .. offset[t] + batch[t] (csrc/layer/checks.h: StepSchedule).
struct Schedule {
  const std::vector<int64_t>* batch = nullptr;
  const std::vector<int64_t>* offset = nullptr;
  bool reverse = false;
};

// Packed weights kept from one engine call to the next by a caller that runs several calls on the same
// weights: the chunks of time steps of a widened half-type layer (widened_layer.h), each an engine call
// of its own, which otherwise repacked W_ih and W_hh for every chunk (fastrnns, bf16 training: 100
// chunks of one step, 8 MB packed per chunk; benchmarks/NOTES.md, entry 57). The engine keeps in a slot
// its packing of the last call (its own type, `tag` naming it) with the source pointers and sizes; a
// call whose weights match reuses it. The caller guarantees that the weights' values do not change while
// the cache lives (its lifetime: one layer call, on the caller's float32 copies of the weights).
struct PackCache {
  struct Slot {
    std::shared_ptr<void> entry;
    const void* tag = nullptr;
  };
  Slot forward, backward;
};

struct ForwardArgs {
  CellKind cell = CellKind::kLstm;
  int64_t B = 0, H = 0, I = 0;  // batch, hidden, input features
  Schedule sched;
  // The input projection: either the engine computes it per step (input, w_ih,
  // b_ih given: fuse_input_projection() said so), or input is nullptr and
  // `gates` holds x W_ih^T + b_ih on entry (one large GEMM by the caller).
  // [N, I] the layer's input, packed rows, or nullptr. Never fused at I = 0
  // (an empty tensor's data pointer is nullptr too): cpu_device.h.
  const float* input = nullptr;
  const float* w_ih = nullptr;   // [G*H, I]
  const float* b_ih = nullptr;   // [G*H] or nullptr
  const float* w_hh = nullptr;   // [G*H, H]
  const float* b_hh = nullptr;   // [G*H] or nullptr
  // [N, G*H] out: activated gates (in: see input). Without save_for_backward only the input
  // (when not fused; read, never written) or nullptr (fused input: no buffer at all).
  float* gates = nullptr;
  float* h_state = nullptr;     // [B, H] h0 in, final states out
  float* c_state = nullptr;     // [B, H] LSTM: c0 in, final cell states out
  float* output = nullptr;      // [N, H]
  float* cells = nullptr;       // [N, H] LSTM: c_t (unused without save_for_backward)
  float* hn = nullptr;          // [N, H] GRU: W_hn h_{t-1} + b_hn (unused without save_for_backward)
  // False for a call no gradient will be taken of (the inference ops, csrc/ops.cpp): the
  // epilogues then store only the states and the output, not what backward alone reads
  // (gates, cells, hn). The output and states are bitwise the same either way.
  bool save_for_backward = true;
  // The small-call path (use_small_path): w_ih / w_hh read in place, row-major,
  // nothing packed. Needs w_hh (and, with input, w_ih) contiguous.
  bool small = false;
  // A bfloat16 layer's no-grad call (its w_ih, w_hh and input are bf16 values in float32) that
  // bf16_products_for_call took: the packed path's products on the CPU's bf16 dot products
  // (engine_forward.h, engine_avx512_bf16.cpp; h_{t-1} rounded to bf16 for the product each step), never
  // the unit split; where bf16_dot_products() says no, the float32 products.
  bool bf16_products = false;
  PackCache* pack_cache = nullptr;  // nullptr: pack for this call alone
};

struct BackwardArgs {
  CellKind cell = CellKind::kLstm;
  int64_t B = 0, H = 0;
  Schedule sched;
  const float* w_hh = nullptr;       // [G*H, H]
  const float* gates = nullptr;      // [N, G*H] saved activated gates
  const float* grad_output = nullptr;  // [N, H]
  // [N, H] h_t; RNN: for the derivative; GRU: h_{t-1} of the next step's rows.
  const float* output = nullptr;
  const float* cells = nullptr;      // [N, H] LSTM: c_t (and c_{t-1} of the next step's rows)
  // [B, H] the initial states, for rows whose previous state is not in output /
  // cells (layer_backward.h: previous_rows): GRU h0, LSTM c0.
  const float* h0 = nullptr;
  const float* c0 = nullptr;
  const float* hn = nullptr;         // [N, H] GRU
  float* grad_h_state = nullptr;     // [B, H] dh_T in, dh0 out
  float* grad_c_state = nullptr;     // [B, H] LSTM: dc_T in, dc0 out
  // [N, G*H] out. RNN: may be grad_output itself (each element is read, then written).
  float* grad_gates = nullptr;
  float* grad_gates_h = nullptr;     // [B, 3H] GRU only: the hidden side, one step at a time
  bool small = false;                // use_small_path: W_hh read in place when H allows it
  // false: the first step's dh_{t-1} = dgates_h W_hh (dh0 alone) is skipped; grad_h_state is then
  // not dh0 and nothing may read it.
  bool need_grad_h0 = true;
  PackCache* pack_cache = nullptr;  // nullptr: pack for this call alone
};

// Whether forward should compute the input projection inside its tiles: while both packed weight
// matrices fit in half of this core's L2 cache, or once W_hh alone does not (and all the weights
// are within kFuseInputMaxWeightBytes). In between, on the 512 KB-L2 Zen 3, fusing measured slower
// for the sentiment GRU and LSTM (350 and 467 KB of weights, W_hh 196 and 256 KB), whose weights
// then no longer stay in L2 from one step to the next (benchmarks/NOTES.md, entry 12); at larger
// hidden sizes it measured 1.2-1.4x faster inference on the Zen 3 (fastrnns, entry 12) and the Zen 4
// (H = 256 .. 768, entry 54). FUSEDRNN_CPU_FUSE_INPUT=1 or 0 forces it.
constexpr int64_t kFuseInputMaxWeightBytes = int64_t{16} << 20;
bool fuse_input_projection(int gates, int64_t input_size, int64_t hidden_size);

// Whether a call is small enough that packing W_hh would cost more than it
// saves: at most 8 rows and 32 tokens (a cell, a one-token decoding step, a
// short sequence of one or two rows). Such calls read the weights in place (forward)
// and skip the backward's panel copy where H is a multiple of the panel width.
// Measured rule: benchmarks/NOTES.md, entry 15. FUSEDRNN_CPU_SMALL=1 or 0
// forces it (tests run both ways).
bool use_small_path(int64_t batch, int64_t steps);

// Whether a call with ForwardArgs::bf16_products runs on bf16 dot products: isa() is AVX-512 and the CPU
// has AVX512_BF16 (vdpbf16ps: Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later), unless
// FUSEDRNN_CPU_BF16_DOT=0 (read on every call: tests and benchmarks compare both ways in one process;
// only 0 or 1, 1 changing nothing where the CPU lacks them).
bool bf16_dot_products();

// The packed path's unit split takes uniform batches of at most this many rows per thread
// (engine_forward.h: packed_split_parts).
constexpr int64_t kUnitSplitMaxRowsPerThread = 4;

// A split's switch (FUSEDRNN_CPU_UNIT_SPLIT, FUSEDRNN_CPU_SMALL_SPLIT): -1 unset or empty (the default
// rule), 0 off, 1 forced (whatever the governor says: tests). Anything else is an error, not a guess
// (read before any parallel region).
int split_switch(const char* name);

// Whether a bfloat16 layer call of `batch` rows and `steps` steps (`uniform`: every step all rows), one no
// gradient is taken of (widened_layer.h asks only for those), runs its forward on bf16 dot products:
// bf16_dot_products(), and the call is neither a small call (use_small_path) nor one the unit split's
// rule takes (a uniform batch of at most kUnitSplitMaxRowsPerThread rows per thread on 2+ threads,
// FUSEDRNN_CPU_UNIT_SPLIT=1 any uniform one; there float32 products split by units measured faster,
// benchmarks/NOTES.md entry 57). Decided from the call's shapes and thread count alone, never by the
// split governor's timing: such a call then runs on the packed path, never split.
bool bf16_products_for_call(int64_t batch, int64_t steps, bool uniform);

// Run on isa()'s kernels; call only when available().
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);

// Forward and backward calls of one layer and direction that ran (some of) their steps with the units
// split across threads (engine_forward.h: split_loop), every path and instruction set: for tests, through
// ctypes.
std::atomic<int64_t>& unit_split_calls();
// Forward calls of one layer and direction that ran on bf16 dot products (tests, through ctypes).
std::atomic<int64_t>& bf16_forward_calls();

}  // namespace cpu_engine
}  // namespace fusedrnn
