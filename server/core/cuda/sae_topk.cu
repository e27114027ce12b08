// Compiles the SAE encode + top-k kernel and launcher (see sae_topk.cuh).
#include "core/cuda/sae_topk.cuh"
