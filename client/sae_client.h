// Client side of sae.v1.SaeService: a synchronous wrapper over the stubs,
// output formatting, and the `sae-client` command line (RunClient), kept in a
// library so later tools (e.g. bench subcommands) can reuse them.
#ifndef SAE_CLIENT_SAE_CLIENT_H_
#define SAE_CLIENT_SAE_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "sae/v1/sae.grpc.pb.h"

namespace sae::client {

class SaeClient {
 public:
  // Insecure channel to `address` ("host:port"); connects lazily.
  static std::unique_ptr<SaeClient> Connect(const std::string& address);
  explicit SaeClient(std::shared_ptr<grpc::Channel> channel);

  // Every call fails with DEADLINE_EXCEEDED after this long.
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

  // Reads the whole response stream.
  grpc::Status Extract(const v1::ExtractRequest& request, std::vector<v1::ExtractResponse>* responses);
  grpc::Status Tokenize(const v1::TokenizeRequest& request, v1::TokenizeResponse* response);
  grpc::Status ListSaes(v1::ListSaesResponse* response);
  grpc::Status Info(v1::InfoResponse* response);
  // `service` "" is the server as a whole.
  grpc::Status Health(const std::string& service, grpc::health::v1::HealthCheckResponse* response);

  v1::SaeService::Stub* stub() { return stub_.get(); }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  void SetDeadline(grpc::ClientContext* context) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::SaeService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
  std::chrono::milliseconds timeout_{60000};
};

// "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", ...
std::string StatusCodeName(grpc::StatusCode code);

// A token piece as a quoted, escaped literal: " cat" -> "\" cat\"".
std::string QuotePiece(const std::string& piece);

// One row per token (position, id, piece) and one line per SAE with its
// features as index:value, largest first ("-" when none fired).
std::string FormatExtractTable(const std::vector<v1::ExtractResponse>& responses);
std::string FormatTokens(const v1::TokenizeResponse& response);
std::string FormatSaes(const v1::ListSaesResponse& response);
std::string FormatInfo(const v1::InfoResponse& response);

// Proto3 JSON of `message` on one line.
std::string ToJson(const google::protobuf::Message& message);

// The sae-client command line: argv without the program name. Writes results
// to `out`, errors (gRPC code name and message) to `err`; returns the exit
// code (0 ok, 1 RPC failure or not SERVING, 2 usage).
int RunClient(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace sae::client

#endif  // SAE_CLIENT_SAE_CLIENT_H_
