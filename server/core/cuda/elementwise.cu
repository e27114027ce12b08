// Compiles the elementwise kernels and launchers (see elementwise.cuh).
#include "core/cuda/elementwise.cuh"
