// CUDA implementations of every fusedrnn op: the device-generic layer drivers
// (csrc/layer/) with the CUDA pointwise kernels. GEMMs run on cuBLAS with
// ATen's handle and the current stream (float32 through fp32_gemm.h, with the
// math torch.nn's cuDNN RNNs would use; others through ATen); the kernels launch on the
// current stream too, so the ops are correct on any stream and capturable in
// CUDA graphs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../layer/layer_ops.h"
#include "fp32_gemm.h"
#include "pointwise_launch.h"

namespace fusedrnn {

struct CudaDevice {
  using DeviceGuard = c10::cuda::OptionalCUDAGuard;

  // Every GEMM, per step or not: float32 math as torch.nn's cuDNN RNNs choose it (fp32_gemm.h).
  template <typename T>
  static void matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                     bool accumulate) {
    cuda_gemm(out, a, b, bias, accumulate);
  }

  static void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   bool accumulate) {
    cuda_gemm(out, a, b, bias, accumulate);
  }

  template <typename Cell, typename T>
  static void forward(const ForwardStepParams<T>& p) {
    const cudaError_t err = launch_forward_step<Cell, T>(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(err);
  }

  template <typename Cell, typename T>
  static void backward(const BackwardStepParams<T>& p) {
    const cudaError_t err = launch_backward_step<Cell, T>(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(err);
  }
};

}  // namespace fusedrnn

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) { fusedrnn::register_layer_ops<fusedrnn::CudaDevice>(m); }
