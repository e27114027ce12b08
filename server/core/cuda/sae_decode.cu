// Compiles the SAE watch-list, reconstruction and relative-error kernels and launchers (see sae_decode.cuh).
#include "core/cuda/sae_decode.cuh"
