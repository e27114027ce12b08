#include "rpc/status_map.h"

#include <string>

namespace sae {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const int code = static_cast<int>(status.code());
  // Codes outside the canonical range (never produced by our code) become
  // UNKNOWN rather than an invalid gRPC code.
  const grpc::StatusCode grpc_code = (code > 0 && code <= static_cast<int>(grpc::StatusCode::UNAUTHENTICATED))
                                         ? static_cast<grpc::StatusCode>(code)
                                         : grpc::StatusCode::UNKNOWN;
  return grpc::Status(grpc_code, std::string(status.message()));
}

}  // namespace sae
