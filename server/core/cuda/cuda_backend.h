// The CUDA backend lives in its own shared library, libsae_cuda.so, which
// CreateBackend("cuda") loads with dlopen at run time. Why: linking
// cudart/cuBLASLt into the server binary makes civetweb's 100 KiB thread
// stacks fail (cuBLASLt's static TLS is too large), and a server binary that
// never links CUDA also starts on machines without a GPU.
//
// Load order (cuda_loader.cc): $SAE_CUDA_BACKEND_LIB, then libsae_cuda.so
// next to the executable, then <exe dir>/../lib/, then the build tree, then
// the dynamic linker's search path. A missing library or device is
// FAILED_PRECONDITION naming what was tried.
#ifndef SAE_CORE_CUDA_CUDA_BACKEND_H_
#define SAE_CORE_CUDA_CUDA_BACKEND_H_

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "core/backend.h"

// Bumped whenever Backend (its vtable included), Tensor, OwnedTensor,
// SaeEncoderWeights or SaeDecoderWeights change layout, so a stale
// libsae_cuda.so is refused instead of crashing. 2: SaeEncodeSelected,
// SaeReconstruct and RelativeSquaredError joined the vtable. 3: device time
// points (RecordTimePoint, SecondsBetween, ReleaseTimePoint), asynchronous()
// and DeviceStatus(). 4: MatMulShared, MatMulAdd, Copy, CopyToHostAfter,
// gemm_input_dtype() and Memory() (with MemoryUsage). 5: SaeDecoderWeights'
// decoder is feature-major [d_sae, d_model]. 6: max_sae_top_k(), and
// CopyToHostAfter takes the batch's first point (`since`). 7: SaeExactRows().
#define SAE_CUDA_BACKEND_ABI_VERSION 7

extern "C" {
// The library's one C entry point. On success returns 0 and stores a new
// backend in *out (the caller owns it). Otherwise returns an
// absl::StatusCode value and writes a NUL-terminated message into err.
typedef int (*SaeCudaBackendCreateFn)(int abi_version, sae::Backend** out, char* err, size_t err_len);
int SaeCudaBackendCreate(int abi_version, sae::Backend** out, char* err, size_t err_len);
}

namespace sae {

// Loads libsae_cuda.so (once per process; never unloaded) and creates a
// backend on the CUDA device $SAE_CUDA_DEVICE (default 0).
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend();

}  // namespace sae

#endif  // SAE_CORE_CUDA_CUDA_BACKEND_H_
