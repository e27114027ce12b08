// TLS on the gRPC port: the server credentials for ServerConfig's tls_*
// fields, after checking the PEM files with gRPC's own TLS stack.
#ifndef SAE_RPC_TLS_H_
#define SAE_RPC_TLS_H_

#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "sae/v1/config.pb.h"

namespace sae {

// Plaintext credentials when no tls_* file is set. Otherwise reads the
// files, checks that each holds what its field says (a certificate chain, its
// private key, CA certificates) and that gRPC accepts them together, and
// returns credentials that re-read them every tls_reload_seconds.
// INVALID_ARGUMENT (NOT_FOUND for a missing file) names the field and the
// file. `config` has had its defaults applied and been validated.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> GrpcServerCredentials(const v1::ServerConfig& config);

// "plaintext", "TLS, files re-read every N s" or "mutual TLS: client
// certificates required, ...", for the startup log.
std::string DescribeTransportSecurity(const v1::ServerConfig& config);

}  // namespace sae

#endif  // SAE_RPC_TLS_H_
