// Compiles the RMSNorm kernel and launcher (see rmsnorm.cuh).
#include "core/cuda/rmsnorm.cuh"
