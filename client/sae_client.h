// Client side of sae.v1.SaeService: a synchronous wrapper over the stubs, the
// streaming ExtractStream API, output formatting, and the `sae-client` command
// line (RunClient), kept in a library so tools and tests can reuse them.
#ifndef SAE_CLIENT_SAE_CLIENT_H_
#define SAE_CLIENT_SAE_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "sae/v1/sae.grpc.pb.h"

namespace sae::client {

// One ExtractStream call: many requests on one stream, every response tagged
// with its request's request_id; responses of different requests may
// interleave. One thread may Send while another Reads (gRPC allows one
// writer and one reader at a time); Cancel is safe from any thread.
//
//   auto stream = client->OpenExtractStream();
//   stream->Send(a);  stream->Send(b);  stream->CloseSend();
//   v1::ExtractResponse r;
//   while (stream->Read(&r)) by_id[r.request_id()].push_back(r);
//   grpc::Status status = stream->Finish();
class ExtractStream {
 public:
  ExtractStream(v1::SaeService::Stub* stub, std::chrono::system_clock::time_point deadline);
  ExtractStream(const ExtractStream&) = delete;
  ExtractStream& operator=(const ExtractStream&) = delete;
  // Cancels a call that was not finished.
  ~ExtractStream();

  // Sends one request; false when the stream is broken (Finish says why).
  bool Send(const v1::ExtractRequest& request);
  // No more requests: the server ends the stream after the last response.
  bool CloseSend();
  // The next response of any request; false at the end of the stream.
  bool Read(v1::ExtractResponse* response);
  // After Read returned false: the status of the call.
  grpc::Status Finish();
  void Cancel() { context_.TryCancel(); }
  std::chrono::system_clock::time_point deadline() const { return context_.deadline(); }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::ExtractRequest, v1::ExtractResponse>> stream_;
  bool finished_ = false;
};

// How a SaeClient's channel keeps its connection alive.
struct ConnectOptions {
  // Sends an HTTP/2 ping once the connection has been quiet this long, also
  // during a quiet call and with no call at all, and closes the connection
  // (failing its calls with UNAVAILABLE) when the ping is not acknowledged
  // within `keepalive_timeout`. This keeps long quiet ExtractStream calls
  // through load balancers that drop idle flows, and notices a server that
  // stopped answering before the call's deadline. 0: no pings (gRPC's
  // default). sae-server accepts pings every 10 s or more by default
  // (min_client_ping_interval_seconds); pinging more often gets the
  // connection closed.
  std::chrono::milliseconds keepalive{0};
  std::chrono::milliseconds keepalive_timeout{20000};

  // TLS (for a server with tls_cert_file). Off unless `tls` is set.
  bool tls = false;
  // PEM roots the server's certificate must chain to; empty: gRPC's default
  // roots (the system's, or GRPC_DEFAULT_SSL_ROOTS_FILE_PATH).
  std::string tls_ca_pem;
  // The client's certificate chain and private key, for a server that
  // requires client certificates (tls_client_ca_file); both or neither.
  std::string tls_cert_pem;
  std::string tls_key_pem;
  // The name the server's certificate must carry when it is not the host of
  // the address (connecting by IP address, or through a tunnel).
  std::string tls_server_name;
};

// The channel arguments of `options` (and of the message size limit).
grpc::ChannelArguments ClientChannelArguments(const ConnectOptions& options);
// Plaintext, or TLS with the options' roots and client certificate.
std::shared_ptr<grpc::ChannelCredentials> ClientChannelCredentials(const ConnectOptions& options);

class SaeClient {
 public:
  // Channel to `address` ("host:port"), plaintext unless options.tls;
  // connects lazily.
  static std::unique_ptr<SaeClient> Connect(const std::string& address, const ConnectOptions& options = {});
  explicit SaeClient(std::shared_ptr<grpc::Channel> channel);

  // Every call fails with DEADLINE_EXCEEDED after this long.
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

  // Reads the whole response stream.
  grpc::Status Extract(const v1::ExtractRequest& request, std::vector<v1::ExtractResponse>* responses);
  // Calls `on_response` for every chunk as it arrives (on this thread).
  grpc::Status Extract(const v1::ExtractRequest& request,
                       const std::function<void(const v1::ExtractResponse&)>& on_response);

  // Opens an ExtractStream call that must end within the timeout (or by
  // `deadline`); see ExtractStream.
  std::unique_ptr<ExtractStream> OpenExtractStream();
  std::unique_ptr<ExtractStream> OpenExtractStream(std::chrono::system_clock::time_point deadline);

  // Runs `requests` on one ExtractStream with at most `max_in_flight` of them
  // unanswered at once (the server caps a stream's backlog), calling
  // `on_response` for every response in arrival order, on this thread.
  // Requests without a request_id are sent with their index ("0", "1", ...).
  // A request that fails arrives as a response with `error` set; the returned
  // status is the stream's own.
  grpc::Status ExtractMany(const std::vector<v1::ExtractRequest>& requests, int max_in_flight,
                           const std::function<void(const v1::ExtractResponse&)>& on_response);
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
