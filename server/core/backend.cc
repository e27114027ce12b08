#include "core/backend.h"

#include "absl/strings/str_cat.h"
#include "core/cpu_backend.h"

#ifdef SAE_CUDA_BACKEND
#include "core/cuda/cuda_backend.h"
#endif

namespace sae {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name) {
  if (name == "cpu") return CreateCpuBackend();
  if (name == "cuda") {
#ifdef SAE_CUDA_BACKEND
    return CreateCudaBackend();
#else
    return absl::FailedPreconditionError("backend \"cuda\": this build has no CUDA backend");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", name, "\" (cpu, cuda)"));
}

}  // namespace sae
