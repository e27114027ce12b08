// sae.v1.SaeService on the gRPC callback API. RPC threads validate and
// tokenize; the model runs only on the Executor's engine thread.
#ifndef SAE_RPC_SERVICE_H_
#define SAE_RPC_SERVICE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>

#include "core/engine.h"
#include "rpc/access_log.h"
#include "rpc/executor.h"
#include "rpc/extract_request.h"
#include "rpc/metrics.h"
#include "sae/v1/config.pb.h"
#include "sae/v1/sae.grpc.pb.h"

namespace sae {

struct ServiceOptions {
  RequestLimits limits;
  std::string version;  // reported by Info
  // Requests longer than this follow long_input_policy; 0: no limit beyond
  // limits.max_tokens_per_request. WINDOW leaves the splitting to the
  // executor (ExecutorOptions::max_seq_len must be the same).
  int max_seq_len = 0;
  v1::ServerConfig::LongInputPolicy long_input_policy = v1::ServerConfig::WINDOW;
  // ExtractStream only: Extract always answers RESOURCE_EXHAUSTED at once.
  v1::ServerConfig::OverloadPolicy overload_policy = v1::ServerConfig::OVERLOAD_REJECT;
  // Null: a private registry nobody scrapes.
  std::shared_ptr<Metrics> metrics;
  // Null: no access log.
  std::shared_ptr<AccessLog> access_log;
};

// The callback service with Extract, ExtractStream and Tokenize registered
// raw: their requests are parsed by rpc/wire.h, which answers a request
// protobuf refuses with an INVALID_ARGUMENT naming the field (and keeps a
// stream serving) where gRPC's own parsing could not.
using SaeServiceBase =
    v1::SaeService::WithRawCallbackMethod_Extract<v1::SaeService::WithRawCallbackMethod_ExtractStream<
        v1::SaeService::WithRawCallbackMethod_Tokenize<v1::SaeService::WithCallbackMethod_ListSaes<
            v1::SaeService::WithCallbackMethod_Info<v1::SaeService::Service>>>>>;

class OpenStreams;  // service.cc

class SaeServiceImpl final : public SaeServiceBase {
 public:
  explicit SaeServiceImpl(const ServiceOptions& options);
  ~SaeServiceImpl() override;

  // Starts serving; until then every RPC fails with UNAVAILABLE (the server
  // listens, and reports NOT_SERVING, while the model loads). `engine` is only
  // read (tokenizer, config, SAE list); `executor` runs it. Both must outlive
  // the server. Call once.
  void Attach(const Engine* engine, Executor* executor);

  // Shutdown: every open ExtractStream stops taking requests and finishes
  // (UNAVAILABLE; OK if the client had closed its side) once the responses
  // of the requests it took are written, and streams opened from now on end
  // at once, so grpc::Server::Shutdown need not wait out its deadline for
  // streams that clients keep open. Call after Executor::StopAdmitting
  // (requests still arriving are refused there), before Server::Shutdown.
  void Drain();
  // Calls still running at `at`, when Server::Shutdown(at) cancels them,
  // fail and are counted as UNAVAILABLE, not as cancelled by their client.
  void CutOffAt(std::chrono::system_clock::time_point at);

  // Requests: v1::ExtractRequest; responses: v1::ExtractResponse.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Extract(grpc::CallbackServerContext* context,
                                                      const grpc::ByteBuffer* request) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ExtractStream(
      grpc::CallbackServerContext* context) override;
  // Request: v1::TokenizeRequest; response: v1::TokenizeResponse.
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListSaes(grpc::CallbackServerContext* context, const v1::ListSaesRequest* request,
                                     v1::ListSaesResponse* response) override;
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* context, const v1::InfoRequest* request,
                                 v1::InfoResponse* response) override;

 private:
  bool ready() const { return ready_.load(std::memory_order_acquire); }

  ServiceOptions options_;
  // Written once by Attach before ready_ is set.
  const Engine* engine_ = nullptr;
  Executor* executor_ = nullptr;
  std::atomic<bool> ready_{false};
  std::atomic<int64_t> cut_off_ns_{std::numeric_limits<int64_t>::max()};
  std::unique_ptr<OpenStreams> open_streams_;
};

// Applies the long-input policy to a prepared request: INVALID_ARGUMENT
// naming max_seq_len (REJECT), or the first max_seq_len tokens (TRUNCATE);
// WINDOW leaves it as is.
absl::Status ApplyLongInputPolicy(const ServiceOptions& options, PreparedRequest* request);

}  // namespace sae

#endif  // SAE_RPC_SERVICE_H_
