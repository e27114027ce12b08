// Compiles the RoPE kernel and launcher (see rope.cuh).
#include "core/cuda/rope.cuh"
