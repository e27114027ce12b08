#include "core/backend.h"

#include "absl/strings/str_cat.h"
#include "core/cpu_backend.h"
#include "core/cuda/cuda_backend.h"

namespace sae {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name) {
  if (name == "cpu") return CreateCpuBackend();
  // Builds without nvcc have no libsae_cuda.so of their own, but still load
  // one named by $SAE_CUDA_BACKEND_LIB.
  if (name == "cuda") return CreateCudaBackend();
  return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", name, "\" (cpu, cuda)"));
}

}  // namespace sae
