// Argument checks shared by the backends, so every backend rejects a bad op
// call with the same message.
#ifndef SAE_CORE_OP_CHECKS_H_
#define SAE_CORE_OP_CHECKS_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/backend.h"

namespace sae {

inline absl::Status CheckF32(const Tensor& t, const char* what) {
  if (t.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be F32, got ", DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

inline absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, const char* what) {
  if (t.rows != rows || t.cols != cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has shape [", t.rows, ", ", t.cols, "], expected [", rows, ", ", cols, "]"));
  }
  return absl::OkStatus();
}

}  // namespace sae

#endif  // SAE_CORE_OP_CHECKS_H_
