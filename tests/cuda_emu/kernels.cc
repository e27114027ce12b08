// The CUDA kernels and launchers of server/core/cuda/, compiled unchanged by
// the host compiler against the emulator's headers (include/).
#include "core/cuda/attention.cuh"
#include "core/cuda/elementwise.cuh"
#include "core/cuda/rmsnorm.cuh"
#include "core/cuda/rope.cuh"
#include "core/cuda/sae_decode.cuh"
#include "core/cuda/sae_rescore.cuh"
#include "core/cuda/sae_topk.cuh"
