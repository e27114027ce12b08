// sae.v1.SaeService on the gRPC callback API. RPC threads validate and
// tokenize; the model runs only on the Executor's thread.
#ifndef SAE_RPC_SERVICE_H_
#define SAE_RPC_SERVICE_H_

#include <atomic>
#include <string>

#include "core/engine.h"
#include "rpc/executor.h"
#include "rpc/extract_request.h"
#include "sae/v1/sae.grpc.pb.h"

namespace sae {

struct ServiceOptions {
  RequestLimits limits;
  std::string version;  // reported by Info
};

class SaeServiceImpl final : public v1::SaeService::CallbackService {
 public:
  explicit SaeServiceImpl(const ServiceOptions& options) : options_(options) {}

  // Starts serving; until then every RPC fails with UNAVAILABLE (the server
  // listens, and reports NOT_SERVING, while the model loads). `engine` is only
  // read (tokenizer, config, SAE list); `executor` runs it. Both must outlive
  // the server. Call once.
  void Attach(const Engine* engine, Executor* executor);

  grpc::ServerWriteReactor<v1::ExtractResponse>* Extract(grpc::CallbackServerContext* context,
                                                         const v1::ExtractRequest* request) override;
  grpc::ServerBidiReactor<v1::ExtractRequest, v1::ExtractResponse>* ExtractStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context, const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ListSaes(grpc::CallbackServerContext* context, const v1::ListSaesRequest* request,
                                     v1::ListSaesResponse* response) override;
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* context, const v1::InfoRequest* request,
                                 v1::InfoResponse* response) override;

 private:
  bool ready() const { return ready_.load(std::memory_order_acquire); }

  const ServiceOptions options_;
  // Written once by Attach before ready_ is set.
  const Engine* engine_ = nullptr;
  Executor* executor_ = nullptr;
  std::atomic<bool> ready_{false};
};

}  // namespace sae

#endif  // SAE_RPC_SERVICE_H_
