// The CPU reference backend: plain loops; MatMul sums each dot product in one
// fixed order, so results are batch-invariant by construction. Every CUDA op
// is validated against this one.
#ifndef SAE_CORE_CPU_BACKEND_H_
#define SAE_CORE_CPU_BACKEND_H_

#include <memory>

#include "core/backend.h"

namespace sae {

std::unique_ptr<Backend> CreateCpuBackend();

}  // namespace sae

#endif  // SAE_CORE_CPU_BACKEND_H_
