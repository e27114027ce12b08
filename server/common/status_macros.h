// absl::Status helpers used at every boundary.
#ifndef SAE_COMMON_STATUS_MACROS_H_
#define SAE_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#define SAE_CONCAT_INNER_(a, b) a##b
#define SAE_CONCAT_(a, b) SAE_CONCAT_INNER_(a, b)

// Returns from the current function when `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                  \
  do {                                         \
    ::absl::Status sae_status_ = (expr);       \
    if (!sae_status_.ok()) return sae_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` unwraps an absl::StatusOr<T>.
#define ASSIGN_OR_RETURN(lhs, expr) SAE_ASSIGN_OR_RETURN_IMPL_(SAE_CONCAT_(sae_statusor_, __LINE__), lhs, expr)
#define SAE_ASSIGN_OR_RETURN_IMPL_(var, lhs, expr) \
  auto var = (expr);                               \
  if (!var.ok()) return std::move(var).status();   \
  lhs = std::move(var).value()

namespace sae {

// `status` with `prefix` before its message, same code (OK stays OK): to say
// which file or tensor a lower layer's error is about.
inline absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

}  // namespace sae

#endif  // SAE_COMMON_STATUS_MACROS_H_
