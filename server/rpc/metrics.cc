#include "rpc/metrics.h"

#include <netdb.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace sae {
namespace {

// Latencies from 0.5 ms (a tiny CPU batch) to 60 s (a long request queued
// behind a full server).
prometheus::Histogram::BucketBoundaries SecondsBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

prometheus::Histogram::BucketBoundaries PowersOfTwo(double last) {
  prometheus::Histogram::BucketBoundaries buckets;
  for (double b = 1; b <= last; b *= 2) buckets.push_back(b);
  return buckets;
}

// Failure reasons: the gRPC status code, lower case. Fixed, so every series
// exists (at 0) from the first scrape and rate() works from the start.
constexpr absl::StatusCode kReasonCodes[] = {absl::StatusCode::kInvalidArgument,   absl::StatusCode::kAlreadyExists,
                                             absl::StatusCode::kResourceExhausted, absl::StatusCode::kCancelled,
                                             absl::StatusCode::kDeadlineExceeded,  absl::StatusCode::kUnavailable,
                                             absl::StatusCode::kInternal};
constexpr const char* kReasonNames[] = {"invalid_argument", "already_exists",    "resource_exhausted",
                                        "cancelled",        "deadline_exceeded", "unavailable",
                                        "internal"};
constexpr int kNumReasons = sizeof(kReasonCodes) / sizeof(kReasonCodes[0]);
// By Metrics::Rpc.
constexpr const char* kRpcNames[Metrics::kNumRpcs] = {"Extract", "ExtractStream", "Tokenize", "ListSaes", "Info"};

}  // namespace

struct Metrics::Failures {
  prometheus::Counter* by_reason[kNumReasons];
  prometheus::Counter* other;
};

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()), failures_(std::make_unique<Failures>()) {
  auto& request = prometheus::BuildHistogram()
                      .Name("sae_request_duration_seconds")
                      .Help(
                          "Time from a request's arrival to its last response, by RPC (ExtractStream: per request) "
                          "and outcome (ok, or error: refused, failed, cancelled, deadline exceeded)")
                      .Register(*registry_);
  for (int rpc = 0; rpc < kNumRpcs; ++rpc) {
    request_ok_[rpc] = &request.Add({{"rpc", kRpcNames[rpc]}, {"outcome", "ok"}}, SecondsBuckets());
    request_error_[rpc] = &request.Add({{"rpc", kRpcNames[rpc]}, {"outcome", "error"}}, SecondsBuckets());
  }
  tokenization_ = &prometheus::BuildHistogram()
                       .Name("sae_tokenization_seconds")
                       .Help("Validation and tokenization of one request")
                       .Register(*registry_)
                       .Add({}, SecondsBuckets());
  queue_time_ = &prometheus::BuildHistogram()
                     .Name("sae_queue_time_seconds")
                     .Help("Time a window waited from admission to the start of its batch")
                     .Register(*registry_)
                     .Add({}, SecondsBuckets());
  forward_ = &prometheus::BuildHistogram()
                  .Name("sae_forward_seconds")
                  .Help("Engine time of one batch: model forward including the SAE encoders at their hooks")
                  .Register(*registry_)
                  .Add({}, SecondsBuckets());
  sae_ =
      &prometheus::BuildHistogram()
           .Name("sae_encode_seconds")
           .Help(
               "SAE time of one engine run: encode + top-k, watch lists, reconstruction (part of sae_forward_seconds)")
           .Register(*registry_)
           .Add({}, SecondsBuckets());
  batch_tokens_ = &prometheus::BuildHistogram()
                       .Name("sae_batch_tokens")
                       .Help("Tokens per batch run by the engine")
                       .Register(*registry_)
                       .Add({}, PowersOfTwo(65536));
  batch_sequences_ = &prometheus::BuildHistogram()
                          .Name("sae_batch_requests")
                          .Help("Sequences (requests or windows of long requests) per batch run by the engine")
                          .Register(*registry_)
                          .Add({}, PowersOfTwo(1024));
  tokens_ = &prometheus::BuildCounter()
                 .Name("sae_tokens_total")
                 .Help("Request tokens whose features were computed")
                 .Register(*registry_)
                 .Add({});
  sae_tokens_family_ = &prometheus::BuildCounter()
                            .Name("sae_encoded_tokens_total")
                            .Help("Request tokens whose features were computed, by SAE (name as in ListSaes)")
                            .Register(*registry_);
  inflight_ = &prometheus::BuildGauge()
                   .Name("sae_inflight_requests")
                   .Help("Requests admitted and not finished (queued or running)")
                   .Register(*registry_)
                   .Add({});
  queued_tokens_ = &prometheus::BuildGauge()
                        .Name("sae_queued_tokens")
                        .Help("Tokens admitted whose features are not computed yet")
                        .Register(*registry_)
                        .Add({});
  waiting_ = &prometheus::BuildGauge()
                  .Name("sae_admission_waiting_requests")
                  .Help("ExtractStream requests held back by backpressure, waiting for admission")
                  .Register(*registry_)
                  .Add({});
  memory_ = &prometheus::BuildGauge()
                 .Name("sae_backend_memory_bytes")
                 .Help(
                     "Memory of the compute backend, by kind: tensors (live weights and activations), reserved "
                     "(held from the device: pool, scratch, staging), device_total, device_free; updated after "
                     "every batch; kinds the backend cannot tell (the CPU's device figures) are absent")
                 .Register(*registry_);
  auto& failures = prometheus::BuildCounter()
                       .Name("sae_request_failures_total")
                       .Help("Requests that ended with an error, by reason (the gRPC status code)")
                       .Register(*registry_);
  for (int i = 0; i < kNumReasons; ++i) failures_->by_reason[i] = &failures.Add({{"reason", kReasonNames[i]}});
  failures_->other = &failures.Add({{"reason", "other"}});
  serving_ = &prometheus::BuildGauge()
                  .Name("sae_serving")
                  .Help(
                      "1 while the server reports SERVING on its health service, 0 while it loads, drains or "
                      "after a device failure")
                  .Register(*registry_)
                  .Add({});
  access_log_dropped_ = &prometheus::BuildCounter()
                             .Name("sae_access_log_dropped_lines_total")
                             .Help(
                                 "Access-log lines dropped because the file (or standard error) was not taking "
                                 "them and 4 MiB were already queued")
                             .Register(*registry_)
                             .Add({});
  auto& tls_reloads = prometheus::BuildCounter()
                          .Name("sae_tls_reloads_total")
                          .Help(
                              "Changes found in the TLS files by their periodic re-read, by result: served (new "
                              "connections get them) or refused (gRPC's TLS stack does not accept them together; "
                              "the last files that passed are still served)")
                          .Register(*registry_);
  tls_served_ = &tls_reloads.Add({{"result", "served"}});
  tls_refused_ = &tls_reloads.Add({{"result", "refused"}});
  tls_files_refused_ = &prometheus::BuildGauge()
                            .Name("sae_tls_files_refused")
                            .Help(
                                "1 while the TLS files on disk are ones the re-read refused (new connections get "
                                "the last files that passed), else 0")
                            .Register(*registry_)
                            .Add({});
  tls_not_after_ = &prometheus::BuildGauge()
                        .Name("sae_tls_certificate_expiration_timestamp_seconds")
                        .Help(
                            "When the TLS certificate new connections get expires (notAfter of the first "
                            "certificate of tls_cert_file), in seconds since the epoch; absent without TLS")
                        .Register(*registry_);
  // The conventional name (Prometheus client libraries export it), so
  // changes() counts restarts the way dashboards and rules expect.
  prometheus::BuildGauge()
      .Name("process_start_time_seconds")
      .Help("Start time of the process since the Unix epoch, in seconds")
      .Register(*registry_)
      .Add({})
      .Set(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
}

Metrics::~Metrics() = default;

void Metrics::RequestDone(Rpc rpc, double seconds, absl::StatusCode code) {
  const int i = static_cast<int>(rpc);
  (code == absl::StatusCode::kOk ? request_ok_ : request_error_)[i]->Observe(seconds);
  if (code == absl::StatusCode::kOk) return;
  for (int r = 0; r < kNumReasons; ++r) {
    if (kReasonCodes[r] == code) {
      failures_->by_reason[r]->Increment();
      return;
    }
  }
  failures_->other->Increment();
}
void Metrics::ObserveTokenization(double seconds) { tokenization_->Observe(seconds); }
void Metrics::ObserveQueueTime(double seconds) { queue_time_->Observe(seconds); }
void Metrics::ObserveForward(double seconds) { forward_->Observe(seconds); }
void Metrics::SetMemory(const MemoryUsage& usage) {
  for (auto [kind, bytes] : {std::pair<const char*, int64_t>{"tensors", usage.tensors},
                             {"reserved", usage.reserved},
                             {"device_total", usage.device_total},
                             {"device_free", usage.device_free}}) {
    if (bytes >= 0) memory_->Add({{"kind", kind}}).Set(static_cast<double>(bytes));
  }
}
void Metrics::ObserveSae(double seconds) { sae_->Observe(seconds); }
void Metrics::ObserveBatch(int64_t n_tokens, int n_sequences) {
  batch_tokens_->Observe(static_cast<double>(n_tokens));
  batch_sequences_->Observe(n_sequences);
}
void Metrics::AddTokens(int64_t n) { tokens_->Increment(static_cast<double>(n)); }
void Metrics::SetSaes(const std::vector<std::string>& names) {
  sae_tokens_.clear();
  for (const std::string& name : names) sae_tokens_.push_back(&sae_tokens_family_->Add({{"sae", name}}));
}
void Metrics::AddSaeTokens(const std::vector<int>& sae_indices, int64_t n) {
  for (const int i : sae_indices) {
    if (i >= 0 && static_cast<size_t>(i) < sae_tokens_.size()) sae_tokens_[i]->Increment(static_cast<double>(n));
  }
}
void Metrics::SetInflightRequests(int64_t n) { inflight_->Set(static_cast<double>(n)); }
void Metrics::SetQueuedTokens(int64_t n) { queued_tokens_->Set(static_cast<double>(n)); }
void Metrics::SetWaitingRequests(int64_t n) { waiting_->Set(static_cast<double>(n)); }
void Metrics::SetServing(bool serving) { serving_->Set(serving ? 1 : 0); }
void Metrics::AccessLogLineDropped() { access_log_dropped_->Increment(); }

void Metrics::SetTlsCertificateNotAfter(int64_t seconds_since_epoch) {
  tls_not_after_->Add({}).Set(static_cast<double>(seconds_since_epoch));
}

void Metrics::TlsFilesReread(bool served) {
  (served ? tls_served_ : tls_refused_)->Increment();
  tls_files_refused_->Set(served ? 0 : 1);
}

namespace {

// The address a connection to a listener bound to `address` ("host:port",
// "[v6]:port", "port") goes to: the host, or loopback for a wildcard.
std::string LoopbackOrHost(const std::string& address) {
  if (!address.empty() && address.front() == '[') {
    const std::string host = address.substr(1, address.find(']') - 1);
    return host == "::" ? "::1" : host;
  }
  const size_t colon = address.rfind(':');
  const std::string host = colon == std::string::npos ? "" : address.substr(0, colon);
  return host.empty() || host == "0.0.0.0" ? "127.0.0.1" : host;
}

// Connects to host:port and hangs up at once; nothing when the host is not
// a numeric address or nothing listens.
void ConnectAndClose(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return;
  const int fd = socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    connect(fd, found->ai_addr, found->ai_addrlen);
    close(fd);
  }
  freeaddrinfo(found);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& address,
                                                                    std::shared_ptr<prometheus::Registry> registry) {
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  try {
    // Two worker threads: scrapes are rare and cheap.
    server->exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/2);
  } catch (const std::exception& e) {
    // civetweb reports bind failures by throwing; nothing else here throws.
    return absl::InvalidArgumentError(absl::StrCat("config: metrics_listen \"", address, "\": ", e.what()));
  }
  server->exposer_->RegisterCollectable(registry);
  const std::vector<int> ports = server->exposer_->GetListeningPorts();
  if (ports.empty())
    return absl::InvalidArgumentError(absl::StrCat("config: metrics_listen \"", address, "\": no port"));
  server->port_ = ports.front();
  server->wake_host_ = LoopbackOrHost(address);
  return server;
}

MetricsServer::~MetricsServer() {
  if (exposer_ == nullptr) return;  // Start failed: nothing listens
  // civetweb's listener looks for a stop between polls of its socket, which
  // time out every 2 s: closing would wait out the current one (on average
  // 1 s, counted against the pod's termination grace). A connection ends the
  // poll, so one is made every 20 ms until the listener has stopped; those
  // accepted before the stop are read to their end by a worker, at once.
  std::atomic<bool> closed{false};
  std::thread waker([this, &closed] {
    while (!closed.load()) {
      ConnectAndClose(wake_host_, port_);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  exposer_.reset();
  closed = true;
  waker.join();
}

const char* Metrics::RpcName(Rpc rpc) { return kRpcNames[static_cast<int>(rpc)]; }

}  // namespace sae
