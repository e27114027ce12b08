// Compiles the attention kernels and launcher (see attention.cuh).
#include "core/cuda/attention.cuh"
