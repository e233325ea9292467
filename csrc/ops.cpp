// Every fusedrnn operator's schema, in one place.
//
// Each op covers ONE layer in ONE direction over a whole sequence. Activations
// are packed and time-major: `input` is [tokens, input_size], and the CPU int64
// tensor `batch_sizes` [steps] says how many sequences are active at each step
// (non-increasing: sequences sorted by decreasing length, exactly as in a
// PackedSequence). A full-length batch of B sequences of T steps is
// input.reshape(T * B, I) with batch_sizes = [B] * T. `reverse` runs the
// sequence backwards (the second direction of a bidirectional layer).
//
// A full-length batch may also be passed as the modules hold it: input
// [T, B, input_size] (batch_sizes then holds B T times) and the states h0 / c0
// as [1, B, *]. Outputs then come back in the same form (output [T, B, P],
// h_n / c_n [1, B, *]; gates, cells and hn stay [tokens, *]), and a backward op
// takes its gradients and saved output in the forward's shapes and returns
// grad_input and grad_h0 / grad_c0 in those of input and h0. Either form can be
// used for the sequence and for the states independently. It spares a one-step
// call from Python the four view calls around the op (benchmarks/NOTES.md, 36).
//
// Forward ops return, after the outputs, what their backward needs (the
// activated gates; LSTM: the cell states; GRU: W_hn h + b_hn), so backward
// never recomputes the forward. Backward ops return a gradient for every
// differentiable input; bias gradients are returned even without a bias
// (callers drop them), grad_w_hr is empty without projection, and grad_input
// is empty when need_grad_input is false (its GEMM, a sixth of an LSTM's
// training FLOPs, is skipped: a first layer fed raw features needs none).
// Likewise grad_h0 is empty when need_grad_h0 is false: the first step's
// dh_{t-1} = dgates W_hh, which only dh0 needs, is skipped (a cell or one-step
// call from a zero or detached state: a second read of W_hh). grad_c0 is always
// returned (LSTM: dc0 = dc_1 * f_1, pointwise, nothing to save).
//
// Implementations: cpu/register_cpu.cpp (CPU), cuda/register_cuda.cpp (CUDA).
// Fake kernels and autograd are registered in Python (fusedrnn/_ops.py); eager training calls use
// the same formulas as C++ autograd Functions (autograd/eager_autograd.cpp, its own ops eager_*).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedrnn, m) {
  m.def(
      "lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor batch_sizes, bool reverse, bool need_grad_input, "
      "Tensor output, Tensor gates, Tensor cells, bool need_grad_h0=True) -> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr)");
  m.def(
      "gru_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n, Tensor gates, Tensor hn)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor batch_sizes, bool reverse, bool need_grad_input, Tensor output, Tensor gates, Tensor hn, "
      "bool need_grad_h0=True) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  // The forward of a call no gradient will be taken of (torch.no_grad, inference_mode, nothing
  // requiring grad: fusedrnn/_ops.py chooses): the same output and final states, bitwise, without
  // computing and storing what only backward reads (LSTM's gates and cells, GRU's gates and hn).
  // Not differentiable. RNN's forward ops save nothing but their output: no inference twin.
  m.def(
      "lstm_inference(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "gru_inference(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_tanh_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_tanh_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor batch_sizes, bool reverse, bool need_grad_input, Tensor output, bool need_grad_h0=True) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  m.def(
      "rnn_relu_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_relu_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, "
      "Tensor batch_sizes, bool reverse, bool need_grad_input, Tensor output, bool need_grad_h0=True) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  // Test-only (csrc/cpu/persistent_emulation.cpp): the persistent CUDA forward's phase functions run
  // on the CPU, thread by thread (extra = LSTM cells, GRU hn, else empty); and its path choice with
  // given device limits, returning [ok, rows_per_cta, grid, shared_bytes].
  m.def(
      "persistent_emulate_forward(str cell, Tensor input, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor batch_sizes, bool reverse, int rows_per_cta) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor extra)");
  m.def(
      "persistent_plan(str cell, int hidden, int batch, ScalarType dtype, bool projection, int sm_count, "
      "int shared_optin, int registers_per_block, int kernel_registers, int kernel_max_threads) -> int[]");
}

// `import fusedrnn._C` loads this library, whose static initialisers register
// the ops above; the module itself only carries build facts.
#ifndef FUSEDRNN_TORCH_VERSION
#define FUSEDRNN_TORCH_VERSION "unknown"
#endif
#ifndef FUSEDRNN_CUDA_ARCHS
#define FUSEDRNN_CUDA_ARCHS ""
#endif

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fusedrnn compiled operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "TORCH_VERSION", FUSEDRNN_TORCH_VERSION);
  PyModule_AddStringConstant(module, "CUDA_ARCHS", FUSEDRNN_CUDA_ARCHS);
  // at::parallel_for is compiled into this library (ATen/ParallelOpenMP.h is a
  // header): without OpenMP here every CPU thread split in csrc/ runs serially.
#ifdef _OPENMP
  PyModule_AddStringConstant(module, "CPU_PARALLEL", "OpenMP");
#else
  PyModule_AddStringConstant(module, "CPU_PARALLEL", "none");
#endif
#ifdef FUSEDRNN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
  // The CUDA forward paths compiled in (csrc/cuda/register_cuda.cpp chooses; FUSEDRNN_CUDA_PATH forces).
  PyModule_AddStringConstant(module, "CUDA_PATHS", "per_step,persistent");
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
