// Every Prometheus metric of sae-server, declared (name, help, buckets) in
// metrics.cc and nowhere else. Call sites use the typed accessors below, so no
// metric name string appears outside metrics.cc. All methods are thread-safe.
#ifndef SAE_RPC_METRICS_H_
#define SAE_RPC_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/backend.h"

namespace prometheus {
class Counter;
class Exposer;
template <typename T>
class Family;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace sae {

class Metrics {
 public:
  enum class Rpc { kExtract, kExtractStream, kTokenize, kListSaes, kInfo };
  // "Extract", "ExtractStream", ...: the method's name, as in the rpc label.
  static const char* RpcName(Rpc rpc);
  static constexpr int kNumRpcs = 5;

  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  // One finished call (ExtractStream: one request of the stream; a stream
  // refused before it could take any, one), from arrival to its last
  // response: sae_request_duration_seconds{rpc, outcome="ok"|"error"}, and a
  // failure counted under its reason when `code` is not OK.
  void RequestDone(Rpc rpc, double seconds, absl::StatusCode code);
  // Validation and tokenization of one request, on the gRPC thread.
  void ObserveTokenization(double seconds);
  // One window, from admission to the start of the batch that runs it.
  void ObserveQueueTime(double seconds);
  // One batch through the engine (model forward, which in Engine::Run also
  // runs the SAE encoders at their hooks).
  void ObserveForward(double seconds);
  // The SAE part of one engine run (Engine::last_run_timing().sae_seconds).
  void ObserveSae(double seconds);
  // Size of one batch: tokens and sequences (windows).
  void ObserveBatch(int64_t n_tokens, int n_sequences);
  // Request tokens whose features were computed.
  void AddTokens(int64_t n);
  // The engine's SAEs, in its order: sae_encoded_tokens_total{sae} gets a
  // series per name, at 0 (EngineRunner sets them before any batch runs).
  void SetSaes(const std::vector<std::string>& names);
  // `n` request tokens whose features were computed for each SAE of
  // `sae_indices` (indices into SetSaes' names).
  void AddSaeTokens(const std::vector<int>& sae_indices, int64_t n);

  // Backend memory (Backend::Memory): sae_backend_memory_bytes{kind=...};
  // a kind the backend cannot tell (-1) is not exported.
  void SetMemory(const MemoryUsage& usage);

  void SetInflightRequests(int64_t n);
  void SetQueuedTokens(int64_t n);
  void SetWaitingRequests(int64_t n);

  // sae_serving: 1 while the health service reports SERVING (after the load
  // and the warm-up), 0 while loading, draining or after a device failure.
  void SetServing(bool serving);

  // One access-log line dropped because the file was not taking lines
  // (sae_access_log_dropped_lines_total; the series exists from the start).
  void AccessLogLineDropped();

  // The TLS files were found changed on a re-read: served to new connections,
  // or refused (sae_tls_reloads_total{result}); sae_tls_files_refused is 1
  // from a refusal until files that pass are served.
  void TlsFilesReread(bool served);
  // sae_tls_certificate_expiration_timestamp_seconds: notAfter of the
  // certificate new connections get (the series exists only with TLS).
  void SetTlsCertificateNotAfter(int64_t seconds_since_epoch);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Histogram* request_ok_[kNumRpcs];     // by Rpc
  prometheus::Histogram* request_error_[kNumRpcs];  // by Rpc
  prometheus::Histogram* tokenization_;
  prometheus::Histogram* queue_time_;
  prometheus::Histogram* forward_;
  prometheus::Histogram* sae_;
  prometheus::Histogram* batch_tokens_;
  prometheus::Histogram* batch_sequences_;
  prometheus::Counter* tokens_;
  prometheus::Family<prometheus::Counter>* sae_tokens_family_;
  std::vector<prometheus::Counter*> sae_tokens_;  // by SAE index; set before batches run, read-only after
  prometheus::Gauge* inflight_;
  prometheus::Gauge* queued_tokens_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* serving_;
  prometheus::Counter* access_log_dropped_;
  prometheus::Counter* tls_served_;
  prometheus::Counter* tls_refused_;
  prometheus::Gauge* tls_files_refused_;
  prometheus::Family<prometheus::Gauge>* tls_not_after_;
  prometheus::Family<prometheus::Gauge>* memory_;
  struct Failures;
  std::unique_ptr<Failures> failures_;
};

// The HTTP endpoint (GET /metrics, text exposition format) of a registry.
//
// prometheus-cpp serves through civetweb, whose worker threads ask for
// ~100 KiB stacks; glibc carves static TLS out of the stack, so once a library
// with a large static TLS block (libcublasLt) is linked, those threads fail to
// start. sae-server avoids it twice: the CUDA backend is dlopen'ed (its TLS is
// dynamic), and thread_stack.cc raises any requested stack below 1 MiB.
class MetricsServer {
 public:
  // `address` "host:port" (port 0: any free port). INVALID_ARGUMENT naming
  // metrics_listen when it cannot listen there.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& address,
                                                              std::shared_ptr<prometheus::Registry> registry);
  // Closes the endpoint in tens of milliseconds, not civetweb's up to 2 s.
  ~MetricsServer();

  int port() const { return port_; }

 private:
  MetricsServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::string wake_host_;  // where a connection reaches the listener (see ~MetricsServer)
};

}  // namespace sae

#endif  // SAE_RPC_METRICS_H_
