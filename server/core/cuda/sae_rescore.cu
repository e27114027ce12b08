// Compiles the exact-rescoring SAE kernels and launchers (see sae_rescore.cuh).
#include "core/cuda/sae_rescore.cuh"
