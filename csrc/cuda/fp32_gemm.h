// The CUDA GEMMs of the layer drivers, with float32 math chosen per call the way
// torch.nn's cuDNN RNNs choose it.
//
// torch.nn's CUDA RNNs (cuDNN) use TF32 for float32 when
// torch.backends.cudnn.allow_tf32 (torch.backends.cudnn.rnn.fp32_precision) allows
// it, True by default; ATen's at::mm follows another flag,
// torch.backends.cuda.matmul.allow_tf32, False by default. fusedrnn follows the
// cuDNN RNN flag, like the module it replaces. ATen's GEMMs read their flag from
// process-wide state (and its cuBLASLt path ignores at::NoTF32Guard), so flipping
// it around our calls would race with other threads; instead every float32 GEMM
// here calls cublasGemmEx with an explicit compute type (CUBLAS_COMPUTE_32F or
// CUBLAS_COMPUTE_32F_FAST_TF32) on ATen's per-thread handle, with the handle's
// math mode set to match. Other dtypes go to ATen unchanged.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <torch/version.h>

#include <algorithm>
#include <climits>

#include "../layer/layer_forward.h"

namespace fusedrnn {

// Whether torch.nn's cuDNN RNNs may use TF32 for float32 right now.
inline bool rnn_fp32_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

// A 2-D operand as cuBLAS (column-major) sees it. A row-major X [r, c] is the
// column-major X^T with leading dimension stride(0); a column-major X (a
// transposed view such as w.t()) is itself, to be transposed by cuBLAS.
struct ColumnMajorOperand {
  bool ok = false;          // neither layout: the caller makes it contiguous
  bool transposed = false;  // cuBLAS must transpose it (X was column-major)
  int64_t ld = 0;
};

inline ColumnMajorOperand as_column_major(const at::Tensor& x) {
  const int64_t r = x.size(0), c = x.size(1);
  ColumnMajorOperand o;
  // A dimension of size 1 has no meaningful stride: any leading dimension that
  // covers the other size is valid.
  if (x.stride(1) == 1 || c == 1) {
    o.ld = r == 1 ? std::max<int64_t>(c, 1) : x.stride(0);
    if (o.ld >= std::max<int64_t>(c, 1)) {
      o.ok = true;
      return o;
    }
  }
  if (x.stride(0) == 1 || r == 1) {
    o.ld = c == 1 ? std::max<int64_t>(r, 1) : x.stride(1);
    if (o.ld >= std::max<int64_t>(r, 1)) {
      o.ok = true;
      o.transposed = true;
      return o;
    }
  }
  return o;
}

inline void check_cublas_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "fusedrnn: GEMM ", what, " = ", v, " exceeds cuBLAS's int range");
}

// out [m, n] = a [m, k] @ b [k, n] + (bias [n] broadcast over rows | out if accumulate | 0),
// float32 on CUDA, with TF32 exactly when `tf32`.
inline void fp32_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                      bool accumulate, bool tf32) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  const ColumnMajorOperand out_cm = as_column_major(out);
  if (!out_cm.ok || out_cm.transposed) {  // cuBLAS writes C column-major: go through a row-major buffer
    at::Tensor tmp = accumulate ? out.contiguous() : at::empty({m, n}, out.options());
    fp32_gemm(tmp, a, b, bias, accumulate, tf32);
    out.copy_(tmp);
    return;
  }
  if (!accumulate) {
    if (bias.defined()) {
      out.copy_(bias.expand({m, n}));
    } else if (k == 0) {
      out.zero_();
    }
  }
  if (k == 0) return;
  ColumnMajorOperand a_cm = as_column_major(a), b_cm = as_column_major(b);
  const at::Tensor a_c = a_cm.ok ? a : a.contiguous();
  const at::Tensor b_c = b_cm.ok ? b : b.contiguous();
  if (!a_cm.ok) a_cm = as_column_major(a_c);
  if (!b_cm.ok) b_cm = as_column_major(b_c);
  for (int64_t v : {m, n, k, a_cm.ld, b_cm.ld, out_cm.ld}) check_cublas_int(v, "size or leading dimension");

  // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's (m', n', k') = (n, m, k),
  // its first operand is b, its second a.
  const float alpha = 1.0f;
  const float beta = (accumulate || bias.defined()) ? 1.0f : 0.0f;
  // ATen's handle for this thread and device, bound to the current stream and
  // ATen's workspace; its math mode is reset by ATen at its own next use.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, b_cm.transposed ? CUBLAS_OP_T : CUBLAS_OP_N, a_cm.transposed ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b_c.const_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(b_cm.ld), a_c.const_data_ptr<float>(), CUDA_R_32F, static_cast<int>(a_cm.ld), &beta,
      out.data_ptr<float>(), CUDA_R_32F, static_cast<int>(out_cm.ld),
      tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// The drivers' GEMM on CUDA: float32 through fp32_gemm with the cuDNN RNN flag of
// this call, every other dtype through ATen.
inline void cuda_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                      bool accumulate) {
  if (out.scalar_type() == at::kFloat) {
    fp32_gemm(out, a, b, bias, accumulate, rnn_fp32_allows_tf32());
  } else {
    aten_matmul(out, a, b, bias, accumulate);
  }
}

}  // namespace fusedrnn
