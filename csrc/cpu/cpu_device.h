// The CPU device policy of the layer drivers (csrc/layer/):
// - the per-step GEMM (matmul): few float rows in our small-GEMM kernel,
//   otherwise straight to BLAS, otherwise ATen (see benchmarks/NOTES.md);
// - the one-shot GEMMs (gemm: input projection, dX, dW): float32 in the large
//   GEMM (large_gemm.h) where it beat MKL, otherwise ATen;
// - the pointwise step: the shared per-element cell math in a loop over the
//   active rows, split across threads by at::parallel_for when a step is large
//   enough to pay for it. The inner loop over hidden units is a SIMD loop
//   (`omp simd`, compiled with -fopenmp-simd: no OpenMP runtime involved); the
//   float activations are written so that it vectorises (cells/cell_common.h).
//   Each element is independent, so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "../cells/gru_cell.h"
#include "../cells/lstm_cell.h"
#include "../cells/rnn_cell.h"
#include "../cells/step_params.h"
#include "../layer/layer_forward.h"
#include "../layer/layer_tensors.h"
#include "cpu_blas.h"
#include "cpu_engine.h"
#include "large_gemm.h"
#include "small_gemm.h"
#include "widened_layer.h"

namespace fusedrnn {

template <typename Cell>
constexpr cpu_engine::CellKind engine_cell_kind() {
  if constexpr (std::is_same_v<Cell, LstmCell>) return cpu_engine::CellKind::kLstm;
  if constexpr (std::is_same_v<Cell, GruCell>) return cpu_engine::CellKind::kGru;
  if constexpr (std::is_same_v<Cell, RnnReluCell>) return cpu_engine::CellKind::kRnnRelu;
  return cpu_engine::CellKind::kRnnTanh;
}

struct CpuDevice {
  // Nothing to select on the CPU (the CUDA policy switches to the input's device).
  struct DeviceGuard {
    explicit DeviceGuard(at::Device) {}
  };

  // The whole time loop in the recurrent engine (cpu_engine.h) for float32 on
  // a CPU with AVX2+FMA unless FUSEDRNN_CPU_ENGINE=0; false leaves it to the
  // drivers' per-step loop (other dtypes, other CPUs, FUSEDRNN_CPU_ENGINE=0;
  // the drivers keep LSTM's projection on their loop).
  static constexpr bool kSequenceEngine = true;

  // bfloat16 / float16 layers run in float32 (widened_layer.h), in chunks of time steps.
  static constexpr bool kWidensHalfTypes = true;
  static bool widens(at::ScalarType type) { return cpu_widened::takes(type); }
  template <typename... A>
  static ForwardOutputs forward_widened(A&&... a) { return cpu_widened::forward_in_chunks(std::forward<A>(a)...); }
  template <typename... A>
  static BackwardOutputs backward_widened(A&&... a) { return cpu_widened::backward_in_chunks(std::forward<A>(a)...); }

  static bool engine_takes(const at::Tensor& t) { return t.scalar_type() == at::kFloat && cpu_engine::available(); }

  // save_for_backward false (an inference call): r.gates / r.cells / r.hn come undefined and stay
  // so; the engine stores only the states and the output, and a [N, G*H] buffer exists only
  // when the input projection is not fused (it then holds x W_ih^T + b_ih, read, not rewritten).
  // RNN's r.gates is always left undefined: it is only ever that input buffer.
  template <typename Cell>
  static bool forward_sequence(ForwardOutputs& r, const at::Tensor& input, const LayerWeights& w,
                               const StepSchedule& s, bool reverse, bool save_for_backward) {
    if (!engine_takes(input)) return false;
    const at::Tensor w_hh = w.w_hh.contiguous();
    const at::Tensor b_hh = w.b_hh.defined() ? w.b_hh.contiguous() : at::Tensor();
    cpu_engine::ForwardArgs a;
    a.cell = engine_cell_kind<Cell>();
    a.B = r.h_n.size(0);
    a.H = w_hh.size(1);
    a.I = w.w_ih.size(1);
    a.sched = {&s.batch, &s.offset, reverse};
    // In a widened half-type layer call (widened_layer.h): its chunks share the packed weights, and a
    // bfloat16 layer's no-grad call may run on bf16 dot products (decided for the whole call), then on
    // the packed path.
    const cpu_widened::WidenedCall* call = cpu_widened::current_widened_call();
    a.bf16_products = call != nullptr && call->bf16_products;
    a.small = !a.bf16_products && cpu_engine::use_small_path(a.B, s.steps());
    a.pack_cache = cpu_widened::pack_cache();
    // Kept alive until the engine returns: contiguous copies only where needed.
    at::Tensor x, w_ih, b_ih;
    // Small calls: a one-step call reads W_ih in place beside W_hh (no GEMM call
    // at all); longer ones take the input projection as one GEMM over all steps.
    // input_size 0 (torch.nn's cells allow it): nothing to fuse, and the empty
    // input's data pointer is nullptr, which the engine would read as "gates
    // already hold the projection" and then add whatever the buffer held. The
    // one GEMM below writes b_ih (or zeros) for K = 0.
    const bool fuse = a.I > 0 && (a.small ? s.steps() == 1 : cpu_engine::fuse_input_projection(Cell::kGates, a.I, a.H));
    if (fuse) {
      x = input.contiguous();
      w_ih = w.w_ih.contiguous();
      b_ih = w.b_ih.defined() ? w.b_ih.contiguous() : at::Tensor();
      a.input = x.const_data_ptr<float>();
      a.w_ih = w_ih.const_data_ptr<float>();
      a.b_ih = b_ih.defined() ? b_ih.const_data_ptr<float>() : nullptr;
    }
    // The saved gates when there are any; else, unfused, a buffer for the projection alone.
    at::Tensor gates = r.gates;
    if (!fuse && !gates.defined()) gates = new_buffer({input.size(0), Cell::kGates * a.H}, input.options());
    if (!fuse) gemm(gates, input, w.w_ih.t(), w.b_ih, false);  // gates = x W_ih^T + b_ih, one large GEMM
    a.w_hh = w_hh.const_data_ptr<float>();
    a.b_hh = b_hh.defined() ? b_hh.const_data_ptr<float>() : nullptr;
    a.gates = gates.defined() ? gates.data_ptr<float>() : nullptr;
    a.save_for_backward = save_for_backward;
    a.h_state = r.h_n.data_ptr<float>();
    a.output = r.output.data_ptr<float>();
    if (r.c_n.defined()) a.c_state = r.c_n.data_ptr<float>();
    if (r.cells.defined() && r.cells.numel() > 0) a.cells = r.cells.data_ptr<float>();
    if (r.hn.defined() && r.hn.numel() > 0) a.hn = r.hn.data_ptr<float>();
    cpu_engine::forward(a);
    return true;
  }

  // h0 / c0: contiguous initial states; the engine reads each step's previous
  // states from them and from output / cells (no [N, H] gather). dgates_h: GRU's
  // [B, 3H] hidden-side gate gradients of one step. need_grad_h0 false: dh_state is left unfinished
  // (the first step's product with W_hh, which only dh0 needs, is skipped).
  template <typename Cell>
  static bool backward_sequence(const at::Tensor& grad_output, const SavedForBackward& saved, const LayerWeights& w,
                                const StepSchedule& s, bool reverse, const at::Tensor& h0, const at::Tensor& c0,
                                at::Tensor& dh_state, at::Tensor& dc_state, at::Tensor& dgates, at::Tensor& dgates_h,
                                bool need_grad_h0) {
    if (!engine_takes(grad_output)) return false;
    const at::Tensor w_hh = w.w_hh.contiguous();
    cpu_engine::BackwardArgs a;
    a.cell = engine_cell_kind<Cell>();
    a.B = dh_state.size(0);
    a.H = w_hh.size(1);
    a.sched = {&s.batch, &s.offset, reverse};
    a.small = cpu_engine::use_small_path(a.B, s.steps());
    a.w_hh = w_hh.const_data_ptr<float>();
    a.gates = saved.gates.defined() ? saved.gates.const_data_ptr<float>() : nullptr;
    a.grad_output = grad_output.const_data_ptr<float>();
    a.output = saved.output.const_data_ptr<float>();
    if (saved.c0.defined()) {
      a.cells = saved.cells.const_data_ptr<float>();
      a.c0 = c0.const_data_ptr<float>();
      a.grad_c_state = dc_state.data_ptr<float>();
    }
    if (Cell::kGates == 3) {
      a.h0 = h0.const_data_ptr<float>();
      a.hn = saved.hn.const_data_ptr<float>();
      a.grad_gates_h = dgates_h.data_ptr<float>();
    }
    a.grad_h_state = dh_state.data_ptr<float>();
    a.grad_gates = dgates.data_ptr<float>();
    a.need_grad_h0 = need_grad_h0;
    a.pack_cache = cpu_widened::pack_cache();
    cpu_engine::backward(a);
    return true;
  }

  // A 2-D tensor read as row-major through raw pointers: unit column stride and
  // its row stride. The stride of a size-1 dimension is arbitrary (torch calls
  // a [1, N] view with strides (1, 1) contiguous, e.g. W_hh^T at proj/hidden
  // size 1), and BLAS rejects a leading dimension below the row length, so a
  // single row reports the row length instead.
  static bool unit_columns(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }
  static int64_t row_stride(const at::Tensor& t) {
    return t.size(0) <= 1 ? std::max<int64_t>(t.stride(0), t.size(1)) : t.stride(0);
  }

  // The per-step GEMM: a few float rows in our small-GEMM kernel (small_gemm.h),
  // otherwise straight to BLAS for float and double (cpu_blas.h), else ATen.
  template <typename T>
  static void matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                     bool accumulate) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const bool row_major = unit_columns(out) && unit_columns(a) && unit_columns(b) &&
                             (!bias.defined() || bias.is_contiguous());
      if constexpr (std::is_same_v<T, float>) {
        if (row_major && a.size(0) >= kSmallGemmMinRows && a.size(0) <= kSmallGemmMaxRows) {
          small_gemm(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), row_stride(a),
                     b.const_data_ptr<float>(), row_stride(b), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                     accumulate, out.data_ptr<float>(), row_stride(out));
          return;
        }
      }
      if (row_major && blas_matmul<T>(a.size(0), b.size(1), a.size(1), a.template const_data_ptr<T>(), row_stride(a),
                                      b.template const_data_ptr<T>(), row_stride(b),
                                      bias.defined() ? bias.template const_data_ptr<T>() : nullptr, accumulate,
                                      out.template data_ptr<T>(), row_stride(out))) {
        return;
      }
    }
    aten_matmul(out, a, b, bias, accumulate);
  }

  // The drivers' other GEMMs (input projection, projection, weight gradients): float32 products of
  // many rows in the large GEMM (large_gemm.h: blocked around the engine's micro-kernel, operands read
  // through their strides, so W_ih^T and dG^T need no copy), where it measured faster than MKL
  // (large_gemm::worth; FUSEDRNN_CPU_GEMM=mkl keeps ATen for all); everything else through ATen.
  static void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   bool accumulate) {
    const bool large = takes_large_gemm(out, a, b, bias);
    if ((large || takes_bf16_gemm(out, a, b, bias)) && in_bf16_backward()) {
      // A bfloat16 layer's backward (dX, dW_ih, dW_hh) on a CPU with bf16 dot products: the large GEMM on
      // vdpbf16ps, its packing rounding the operands (the weights and the saved input and output are bf16
      // values already; the gate gradients are not, as in torch.nn's bf16 backward, whose are bf16), the
      // sums and C float32. 1.15-1.22x faster training steps than the float32 large GEMM where that one
      // takes the product; where MKL would have (fastrnns' 64-row dX), about MKL's float32 rate x 4
      // (benchmarks/NOTES.md entry 57).
      large_gemm::run_bf16(large_gemm_args(out, a, b, bias, accumulate));
      return;
    }
    if (large) {
      large_gemm::run(large_gemm_args(out, a, b, bias, accumulate));
      return;
    }
    aten_matmul(out, a, b, bias, accumulate);
  }
  static large_gemm::Args large_gemm_args(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                          const at::Tensor& bias, bool accumulate) {
    large_gemm::Args g;
    g.M = a.size(0);
    g.N = b.size(1);
    g.K = a.size(1);
    g.A = a.const_data_ptr<float>();
    g.a_rs = a.stride(0);
    g.a_cs = a.stride(1);
    g.B = b.const_data_ptr<float>();
    g.b_rs = b.stride(0);
    g.b_cs = b.stride(1);
    g.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    g.accumulate = accumulate;
    g.C = out.data_ptr<float>();
    g.ldc = row_stride(out);
    return g;
  }
  // In the backward of a bfloat16 layer (widened_layer.h: WidenedCall::bf16_gemms) with bf16 dot products
  // on this CPU (ATen's bf16 GEMM ran a ~1 GFLOP/s fallback on the AVX2 Zen 3): every float32 product the
  // large GEMM takes, and the others of at least kBf16GemmMinWork multiply-adds (fewer: the packing costs
  // what bf16 saves).
  static constexpr int64_t kBf16GemmMinWork = int64_t{1} << 18;
  static bool in_bf16_backward() {
    const cpu_widened::WidenedCall* call = cpu_widened::current_widened_call();
    return call != nullptr && call->bf16_gemms && cpu_engine::bf16_dot_products();
  }
  static bool takes_bf16_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& bias) {
    return out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
           (!bias.defined() || (bias.scalar_type() == at::kFloat && bias.is_contiguous())) && unit_columns(out) &&
           a.size(0) * b.size(1) * a.size(1) >= kBf16GemmMinWork;
  }
  static bool takes_large_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& bias) {
    return out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
           (!bias.defined() || (bias.scalar_type() == at::kFloat && bias.is_contiguous())) && unit_columns(out) &&
           large_gemm::worth(a.size(0), b.size(1), a.size(1)) && large_gemm::enabled();
  }

  // Rows per task: about 16k elements, below which threading costs more than it saves.
  static int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden)); }

  // One step over the active rows, forward or backward (apply_cell picks by the params type).
  template <typename Cell, typename Params>
  static void run_step(const Params& p) {
    at::parallel_for(0, p.batch, grain(p.hidden), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Params q = p;  // a local copy: stores cannot alias its fields
#pragma omp simd
        for (int64_t j = 0; j < q.hidden; ++j) apply_cell<Cell>(q, b, j);
      }
    });
  }

  template <typename Cell, typename T>
  static void forward(const ForwardStepParams<T>& p) {
    run_step<Cell>(p);
  }

  template <typename Cell, typename T>
  static void backward(const BackwardStepParams<T>& p) {
    run_step<Cell>(p);
  }
};

}  // namespace fusedrnn
