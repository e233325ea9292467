// Launchers of the layer-normalised cells' CUDA per-step kernels (bodies: layernorm_step.h), callable
// from host C++ compiled by the ordinary compiler: parameters and a stream in, an error code out.
// One block per row of the step (lncuda::row_threads(hidden) threads); a step with no rows launches
// nothing. `shared_optin_bytes` is the device's opt-in limit of dynamic shared memory per block: a
// row whose shared memory (two values per hidden unit for the LSTM forward, one for its backward)
// exceeds it returns cudaErrorInvalidConfiguration before launching (the host names the limit).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "layernorm_step.h"

namespace fusedrnn {
namespace lncuda {

template <typename S>
cudaError_t launch_ln_lstm_forward(const LnLstmForwardParams<S>& p, size_t shared_optin_bytes, cudaStream_t stream);
template <typename S>
cudaError_t launch_ln_lstm_backward(const LnLstmBackwardParams<S>& p, size_t shared_optin_bytes, cudaStream_t stream);
template <typename S>
cudaError_t launch_ln_gru_forward(const LnGruForwardParams<S>& p, size_t shared_optin_bytes, cudaStream_t stream);
template <typename S>
cudaError_t launch_ln_gru_backward(const LnGruBackwardParams<S>& p, size_t shared_optin_bytes, cudaStream_t stream);

}  // namespace lncuda
}  // namespace fusedrnn
