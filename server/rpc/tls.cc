#include "rpc/tls.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file.h"

namespace sae {
namespace {

// The file of `field`, with a check that it holds a PEM block whose BEGIN
// line ends in `label` ("CERTIFICATE", "PRIVATE KEY").
absl::StatusOr<std::string> ReadPem(const std::string& field, const std::string& path, const std::string& label,
                                    const std::string& what) {
  absl::StatusOr<std::string> pem = ReadFileToString(path);
  if (!pem.ok())
    return absl::Status(pem.status().code(), absl::StrCat("config: ", field, ": ", pem.status().message()));
  // "-----BEGIN CERTIFICATE-----", "-----BEGIN EC PRIVATE KEY-----", ...
  for (size_t at = pem->find("-----BEGIN "); at != std::string::npos; at = pem->find("-----BEGIN ", at + 1)) {
    const size_t end = pem->find("-----", at + 11);
    if (end != std::string::npos && absl::EndsWith(absl::string_view(*pem).substr(at + 11, end - at - 11), label)) {
      return pem;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("config: ", field, " \"", path, "\" holds no PEM ", what,
                                                 " (a \"-----BEGIN ...", label, "-----\" block)"));
}

// Whether gRPC can build a TLS server from these PEMs: its handshaker
// factory loads and cross-checks them when a port is added, which a server
// on an ephemeral loopback port, started and stopped at once, goes through.
bool GrpcAcceptsPems(const std::string& key, const std::string& cert, const std::string& client_ca) {
  grpc::SslServerCredentialsOptions options(client_ca.empty()
                                                ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                                : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_key_cert_pairs.push_back({key, cert});
  options.pem_root_certs = client_ca;
  grpc::CallbackGenericService no_methods;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(options), &port);
  builder.RegisterCallbackGenericService(&no_methods);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) return false;
  server->Shutdown();
  return true;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> GrpcServerCredentials(const v1::ServerConfig& config) {
  if (config.tls_cert_file().empty()) return grpc::InsecureServerCredentials();
  absl::StatusOr<std::string> cert = ReadPem("tls_cert_file", config.tls_cert_file(), "CERTIFICATE", "certificate");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem("tls_key_file", config.tls_key_file(), "PRIVATE KEY", "private key");
  if (!key.ok()) return key.status();
  std::string client_ca_pem;
  if (!config.tls_client_ca_file().empty()) {
    absl::StatusOr<std::string> ca =
        ReadPem("tls_client_ca_file", config.tls_client_ca_file(), "CERTIFICATE", "CA certificate");
    if (!ca.ok()) return ca.status();
    client_ca_pem = std::move(*ca);
  }
  // One trial server when all is well; a second only to tell which file
  // gRPC refused.
  if (!GrpcAcceptsPems(*key, *cert, client_ca_pem)) {
    if (client_ca_pem.empty() || !GrpcAcceptsPems(*key, *cert, "")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config: tls_key_file \"", config.tls_key_file(), "\" is not the private key of tls_cert_file \"",
          config.tls_cert_file(), "\", or one of them is malformed (gRPC's log lines above say which)"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("config: tls_client_ca_file \"", config.tls_client_ca_file(),
                     "\" holds no usable CA certificate (gRPC's log lines above say why)"));
  }
  // Re-reads the files every tls_reload_seconds; a handshake uses the last
  // pair that loaded.
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      config.tls_key_file(), config.tls_cert_file(), config.tls_client_ca_file(), config.tls_reload_seconds());
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (config.tls_client_ca_file().empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

std::string DescribeTransportSecurity(const v1::ServerConfig& config) {
  if (config.tls_cert_file().empty()) return "plaintext";
  const std::string reload = absl::StrCat("files re-read every ", config.tls_reload_seconds(), " s");
  if (config.tls_client_ca_file().empty()) return absl::StrCat("TLS, ", reload);
  return absl::StrCat("mutual TLS: client certificates required, ", reload);
}

}  // namespace sae
