// Emulator stand-in for <cuda_runtime.h>: the runtime API plus the device
// side (kernel qualifiers, thread coordinates, barriers, warp intrinsics,
// atomics, math) that the kernel headers in server/core/cuda/ use.
#ifndef SAE_TESTS_CUDA_EMU_CUDA_RUNTIME_H_
#define SAE_TESTS_CUDA_EMU_CUDA_RUNTIME_H_

#include "cuda_runtime_api.h"
#include "sae_emu_device.h"

#endif  // SAE_TESTS_CUDA_EMU_CUDA_RUNTIME_H_
