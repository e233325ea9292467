// bfloat16 and float16 layers on the CPU, run in float32 (issue 15 item 3; benchmarks/NOTES.md, entry 30).
//
// ATen's bfloat16 GEMMs on a CPU without AVX-512 (at::mm of [32, 128] x [128, 512]: ~1.2 GFLOP/s on
// an AVX2 Zen 3, ATen's scalar fallback, ~35x slower than float32) made the per-step path of the half
// types 10-25x slower than the float32 layer. ATen's `cpublas::brgemm` runs bfloat16 through oneDNN's micro-kernel only with B in VNNI
// layout on an avx512_core CPU, and its `pack` to that layout only with AMX (`could_pack`), so it does
// not serve the CPUs that lack both. A product of two bfloat16 (or float16) numbers is exact in float32
// (8 / 11 significant bits each, 16 / 22 in the product, float32 has 24), so the float32 engine's FMAs
// on the widened operands compute exactly what a bf16 dot-product instruction with float32
// accumulation computes, up to the order of the sums: the layer's input, states and weights are widened
// once per call, the whole layer (engine or per-step loop, whichever float32 takes) runs in float32 --
// the hidden state between steps too (torch.nn's bfloat16 rounds it to bfloat16 before every step's
// GEMM) -- and what the op returns is rounded to the layer's dtype once at the end, so the ops' contract
// (every tensor in the input's dtype, saved-for-backward included) is unchanged.
//
// FUSEDRNN_CPU_HALF=per_step (read per call) keeps the half types on the per-step path in their own
// dtype, as before this file (to compare the two, and to test that path).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "../layer/layer_tensors.h"

namespace fusedrnn::cpu_widened {

// Whether a CPU layer in dtype `t` runs widened to float32. The seam for a step GEMM on the hardware's
// bf16 dot products (AMX, AVX-512-BF16: `at::native::cpublas::brgemm` with B packed to VNNI by
// `cpublas::pack` where `could_pack(kBFloat16)`, i.e. AMX) is here: on such a CPU a bf16 engine would
// take the layer first and this would answer false for it (benchmarks/NOTES.md, entry 30, says what to
// measure there before it does).
inline bool takes(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const char* v = std::getenv("FUSEDRNN_CPU_HALF");
  if (v == nullptr || std::strcmp(v, "float32") == 0) return true;
  TORCH_CHECK(std::strcmp(v, "per_step") == 0, "fusedrnn: FUSEDRNN_CPU_HALF must be float32 or per_step, got '", v,
              "'");
  return false;
}

// Undefined (absent bias, c0 of a GRU) and empty placeholders pass through the casts as they are.
inline at::Tensor widen(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
inline at::Tensor narrow(const at::Tensor& t, at::ScalarType type) { return t.defined() ? t.to(type) : t; }

inline LayerWeights widen(const LayerWeights& w) {
  return {widen(w.w_ih), widen(w.w_hh), widen(w.b_ih), widen(w.b_hh), widen(w.w_hr)};
}

inline SavedForBackward widen(const SavedForBackward& s) {
  return {widen(s.input), widen(s.h0), widen(s.c0), widen(s.output), widen(s.gates), widen(s.cells), widen(s.hn)};
}

inline ForwardOutputs narrow(ForwardOutputs r, at::ScalarType type) {
  for (at::Tensor* t : {&r.output, &r.h_n, &r.c_n, &r.gates, &r.cells, &r.hn}) *t = narrow(*t, type);
  return r;
}

inline BackwardOutputs narrow(BackwardOutputs g, at::ScalarType type) {
  for (at::Tensor* t : {&g.grad_input, &g.grad_h0, &g.grad_c0, &g.grad_w_ih, &g.grad_w_hh, &g.grad_b_ih, &g.grad_b_hh,
                        &g.grad_w_hr}) {
    *t = narrow(*t, type);
  }
  return g;
}

}  // namespace fusedrnn::cpu_widened
