// CUDA per-step kernel of the layer-normalised gru forward (the body: csrc/cuda/layernorm_step.h).
#include "../cuda/layernorm_kernels.cuh"

FUSEDRNN_LN_INSTANTIATE(launch_ln_gru_forward, LnGruForwardParams, LnGruForward)
