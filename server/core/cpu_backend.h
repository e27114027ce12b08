// The CPU reference backend: plain loops plus OpenBLAS sgemm. Every CUDA op
// is validated against this one.
#ifndef SAE_CORE_CPU_BACKEND_H_
#define SAE_CORE_CPU_BACKEND_H_

#include <memory>

#include "core/backend.h"

namespace sae {

std::unique_ptr<Backend> CreateCpuBackend();

}  // namespace sae

#endif  // SAE_CORE_CPU_BACKEND_H_
