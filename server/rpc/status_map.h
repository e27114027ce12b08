// The one place where internal errors (absl::Status) become gRPC statuses.
#ifndef SAE_RPC_STATUS_MAP_H_
#define SAE_RPC_STATUS_MAP_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace sae {

// absl and gRPC both use the google.rpc.Code numbering, so the code is kept
// as is; the message is passed through unchanged.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace sae

#endif  // SAE_RPC_STATUS_MAP_H_
