// Shared between the emulator's runtime (runtime.cc) and cuBLAS (cublas.cc).
#ifndef SAE_TESTS_CUDA_EMU_EMU_INTERNAL_H_
#define SAE_TESTS_CUDA_EMU_EMU_INTERNAL_H_

#include <cstddef>
#include <functional>
#include <string>

#include "cuda_runtime_api.h"

namespace sae_emu {

// Prints "cuda emulator: <message>" and aborts: the emulator saw undefined
// behaviour a real GPU would not report reliably.
[[noreturn]] void Fatal(const std::string& message);
// Aborts unless [p, p + n) lies inside one live device (or mapped pinned) allocation.
void CheckDeviceRange(const void* p, size_t n, const char* what);
// Queues host work on a stream, in order with its kernels and copies.
cudaError_t EnqueueHostWork(cudaStream_t stream, std::function<void()> work);

}  // namespace sae_emu

#endif  // SAE_TESTS_CUDA_EMU_EMU_INTERNAL_H_
