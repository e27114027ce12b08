// sae-server: serves sae.v1.SaeService (plus grpc.health.v1 and server
// reflection). The config file gives every setting; flags override fields.
//
//   sae-server --config=deploy/server.textproto
//   sae-server --demo --listen=127.0.0.1:50051
//   sae-server --model_dir=/models/Llama-3.1-8B --sae=/saes/L15R-8x --sae=res15=/saes/L15R-32x
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "core/demo_model.h"
#include "core/engine.h"
#include "rpc/access_log.h"
#include "rpc/config.h"
#include "rpc/executor.h"
#include "rpc/flag_util.h"
#include "rpc/hang_watchdog.h"
#include "rpc/metrics.h"
#include "rpc/service.h"
#include "rpc/tls.h"

ABSL_FLAG(std::string, config, "", "ServerConfig textproto file; the flags below override its fields");
ABSL_FLAG(std::optional<std::string>, model_dir, std::nullopt,
          "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)");
ABSL_FLAG(sae::RepeatedFlag, sae, {}, "SAE folder, \"DIR\" or \"ALIAS=DIR\"; repeatable; replaces the config's saes");
ABSL_FLAG(std::optional<std::string>, backend, std::nullopt, "cpu or cuda (default cpu)");
ABSL_FLAG(std::optional<std::string>, listen, std::nullopt,
          "gRPC address (default 0.0.0.0:50051; port 0 picks a free port)");
ABSL_FLAG(bool, demo, false,
          "serve the generated tiny demo model and all demo SAEs (when no model_dir); or config demo: true");
ABSL_FLAG(std::optional<std::string>, demo_dir, std::nullopt,
          "where --demo writes the demo model (default /tmp/sae-demo)");
ABSL_FLAG(std::optional<uint32_t>, default_k, std::nullopt,
          "features per token and SAE when a request asks for k=0 (default 16)");
ABSL_FLAG(std::optional<uint32_t>, max_k, std::nullopt, "largest k a request may ask for (default 256)");
ABSL_FLAG(std::optional<uint32_t>, max_tokens_per_request, std::nullopt, "longest request in tokens (default 2048)");
ABSL_FLAG(std::optional<uint32_t>, max_batch_tokens, std::nullopt, "tokens per executor batch (default 4096)");
ABSL_FLAG(std::optional<uint32_t>, chunk_tokens, std::nullopt, "tokens per response message by default (default 64)");
ABSL_FLAG(std::optional<uint32_t>, max_inflight_requests, std::nullopt, "requests admitted at once (default 64)");
ABSL_FLAG(bool, lm_saes_encode, false,
          "encode in the lm_saes release form instead of SAELens; or config lm_saes_encode: true");
ABSL_FLAG(std::optional<uint64_t>, max_queued_tokens, std::nullopt,
          "tokens admitted and not yet computed (default 8 * max_batch_tokens)");
ABSL_FLAG(std::optional<uint32_t>, max_queue_delay_ms, std::nullopt,
          "how long a batch that is not full may wait for more requests (default 0)");
ABSL_FLAG(std::optional<uint32_t>, max_seq_len, std::nullopt, "longest sequence per forward pass (default 2048)");
ABSL_FLAG(std::optional<std::string>, long_input_policy, std::nullopt,
          "requests longer than max_seq_len: REJECT, TRUNCATE or WINDOW (default WINDOW)");
ABSL_FLAG(std::optional<std::string>, overload_policy, std::nullopt,
          "ExtractStream when the server is full: OVERLOAD_REJECT or BACKPRESSURE (default OVERLOAD_REJECT)");
ABSL_FLAG(std::optional<uint32_t>, shutdown_grace_seconds, std::nullopt,
          "on SIGTERM, how long running requests may take to finish (default 30)");
ABSL_FLAG(std::optional<bool>, warmup, std::nullopt, "run one batch before reporting SERVING (default true)");
ABSL_FLAG(std::optional<bool>, warmup_full_batch, std::nullopt,
          "with warmup, on a GPU: first run one full batch (max_batch_tokens, every SAE at max_k), so a batch size "
          "the device cannot hold fails startup (default true)");
ABSL_FLAG(std::optional<uint32_t>, batch_timeout_seconds, std::nullopt,
          "a batch not finished after this long means a hung GPU: fail, NOT_SERVING, exit 3 (default 120 on cuda, "
          "0 = off on cpu)");
ABSL_FLAG(std::optional<uint32_t>, keepalive_time_seconds, std::nullopt,
          "ping a client connection quiet this long (default 7200)");
ABSL_FLAG(std::optional<uint32_t>, keepalive_timeout_seconds, std::nullopt,
          "close a connection whose keepalive ping is not acknowledged within this long (default 20)");
ABSL_FLAG(std::optional<uint32_t>, min_client_ping_interval_seconds, std::nullopt,
          "shortest interval between client keepalive pings accepted; more often: GOAWAY too_many_pings (default "
          "10; 0: any)");
ABSL_FLAG(std::optional<uint32_t>, max_connection_age_seconds, std::nullopt,
          "send GOAWAY to connections older than this, so clients reconnect and spread over replicas (default 0: "
          "never)");
ABSL_FLAG(std::optional<uint32_t>, max_connection_age_grace_seconds, std::nullopt,
          "how long calls on a connection past its age may still run (default 0: until they end)");
ABSL_FLAG(std::optional<std::string>, tls_cert_file, std::nullopt,
          "PEM certificate chain: the gRPC port speaks TLS (with --tls_key_file)");
ABSL_FLAG(std::optional<std::string>, tls_key_file, std::nullopt, "PEM private key of --tls_cert_file");
ABSL_FLAG(std::optional<std::string>, tls_client_ca_file, std::nullopt,
          "PEM CA certificates: clients must present a certificate they signed (mutual TLS)");
ABSL_FLAG(std::optional<uint32_t>, tls_reload_seconds, std::nullopt,
          "how often the TLS files are re-read, for renewed certificates (default 60)");
ABSL_FLAG(std::optional<std::string>, access_log, std::nullopt,
          "one JSON line per finished call: \"-\" for stderr, or a file (reopened on SIGHUP)");
ABSL_FLAG(std::optional<std::string>, metrics_listen, std::nullopt,
          "Prometheus metrics address, e.g. 0.0.0.0:9464 (default: none)");
ABSL_FLAG(std::string, port_file, "", "write the bound gRPC port to this file once listening (for tests)");
ABSL_FLAG(std::string, metrics_port_file, "", "write the bound metrics port to this file once listening (for tests)");
ABSL_FLAG(std::optional<std::string>, health_listen, std::nullopt,
          "a plaintext gRPC address serving only grpc.health.v1.Health, for probes when listen uses TLS "
          "(default: none)");
ABSL_FLAG(std::string, health_port_file, "", "write the bound health probe port to this file (for tests)");

namespace sae {
namespace {

void Log(const std::string& line) { std::fprintf(stderr, "sae-server: %s\n", line.c_str()); }

absl::StatusOr<v1::ServerConfig> BuildConfig() {
  v1::ServerConfig config;
  const std::string path = absl::GetFlag(FLAGS_config);
  if (!path.empty()) {
    Log(absl::StrCat("reading config ", path));
    auto loaded = LoadServerConfig(path);
    if (!loaded.ok()) return loaded.status();
    config = std::move(*loaded);
  }
  if (auto v = absl::GetFlag(FLAGS_model_dir)) config.set_model_dir(*v);
  if (const std::vector<std::string> saes = absl::GetFlag(FLAGS_sae).values; !saes.empty()) {
    config.clear_saes();
    for (const std::string& spec : saes) {
      const SaeSpec parsed = ParseSaeSpec(spec);
      v1::SaeSource* source = config.add_saes();
      source->set_path(parsed.dir);
      if (!parsed.alias.empty()) source->set_alias(parsed.alias);
    }
  }
  if (auto v = absl::GetFlag(FLAGS_backend)) config.set_backend(*v);
  if (auto v = absl::GetFlag(FLAGS_listen)) config.set_listen(*v);
  if (absl::GetFlag(FLAGS_demo)) config.set_demo(true);
  if (auto v = absl::GetFlag(FLAGS_demo_dir)) config.set_demo_dir(*v);
  if (auto v = absl::GetFlag(FLAGS_default_k)) config.set_default_k(*v);
  if (auto v = absl::GetFlag(FLAGS_max_k)) config.set_max_k(*v);
  if (auto v = absl::GetFlag(FLAGS_max_tokens_per_request)) config.set_max_tokens_per_request(*v);
  if (auto v = absl::GetFlag(FLAGS_max_batch_tokens)) config.set_max_batch_tokens(*v);
  if (auto v = absl::GetFlag(FLAGS_chunk_tokens)) config.set_chunk_tokens(*v);
  if (auto v = absl::GetFlag(FLAGS_max_inflight_requests)) config.set_max_inflight_requests(*v);
  if (absl::GetFlag(FLAGS_lm_saes_encode)) config.set_lm_saes_encode(true);
  if (auto v = absl::GetFlag(FLAGS_max_queued_tokens)) config.set_max_queued_tokens(*v);
  if (auto v = absl::GetFlag(FLAGS_max_queue_delay_ms)) config.set_max_queue_delay_ms(*v);
  if (auto v = absl::GetFlag(FLAGS_max_seq_len)) config.set_max_seq_len(*v);
  if (auto v = absl::GetFlag(FLAGS_long_input_policy)) {
    v1::ServerConfig::LongInputPolicy policy;
    if (!v1::ServerConfig::LongInputPolicy_Parse(*v, &policy)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--long_input_policy=", *v, ": expected REJECT, TRUNCATE or WINDOW"));
    }
    config.set_long_input_policy(policy);
  }
  if (auto v = absl::GetFlag(FLAGS_overload_policy)) {
    v1::ServerConfig::OverloadPolicy policy;
    if (!v1::ServerConfig::OverloadPolicy_Parse(*v, &policy)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--overload_policy=", *v, ": expected OVERLOAD_REJECT or BACKPRESSURE"));
    }
    config.set_overload_policy(policy);
  }
  if (auto v = absl::GetFlag(FLAGS_shutdown_grace_seconds)) config.set_shutdown_grace_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_warmup)) config.set_warmup(*v);
  if (auto v = absl::GetFlag(FLAGS_warmup_full_batch)) config.set_warmup_full_batch(*v);
  if (auto v = absl::GetFlag(FLAGS_batch_timeout_seconds)) config.set_batch_timeout_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_keepalive_time_seconds)) config.set_keepalive_time_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_keepalive_timeout_seconds)) config.set_keepalive_timeout_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_min_client_ping_interval_seconds)) config.set_min_client_ping_interval_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_max_connection_age_seconds)) config.set_max_connection_age_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_max_connection_age_grace_seconds)) {
    config.set_max_connection_age_grace_seconds(*v);
  }
  if (auto v = absl::GetFlag(FLAGS_tls_cert_file)) config.set_tls_cert_file(*v);
  if (auto v = absl::GetFlag(FLAGS_tls_key_file)) config.set_tls_key_file(*v);
  if (auto v = absl::GetFlag(FLAGS_tls_client_ca_file)) config.set_tls_client_ca_file(*v);
  if (auto v = absl::GetFlag(FLAGS_tls_reload_seconds)) config.set_tls_reload_seconds(*v);
  if (auto v = absl::GetFlag(FLAGS_access_log)) config.set_access_log(*v);
  if (auto v = absl::GetFlag(FLAGS_metrics_listen)) config.set_metrics_listen(*v);
  if (auto v = absl::GetFlag(FLAGS_health_listen)) config.set_health_listen(*v);
  ApplyConfigDefaults(&config);
  if (absl::Status s = ValidateServerConfig(config); !s.ok()) {
    // The value may come from the file or from a flag: name both.
    if (path.empty()) return s;
    return absl::Status(s.code(), absl::StrCat(path, " (with the command-line flags applied): ", s.message()));
  }
  return config;
}

// SIGINT / SIGTERM: the handler only writes the signal number to a pipe
// (async-signal-safe); a watcher thread reads it, so shutdown runs as ordinary
// code. A handler rather than a blocked mask plus sigwait, because library
// threads started before main (a BLAS or CUDA runtime pool) would not have the mask.
int g_signal_pipe[2] = {-1, -1};

void OnSignal(int sig) {
  const unsigned char byte = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &byte, 1);
}

class SignalWaiter {
 public:
  SignalWaiter() {
    if (pipe(g_signal_pipe) != 0) {
      std::perror("sae-server: pipe");
      std::exit(1);
    }
    struct sigaction action = {};
    action.sa_handler = OnSignal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGHUP, &action, nullptr);
    std::thread([this] {
      unsigned char byte = 0;
      for (;;) {
        if (read(g_signal_pipe[0], &byte, 1) != 1) continue;
        if (byte != SIGHUP) break;
        std::vector<std::function<void()>> on_hangup;
        {
          std::lock_guard<std::mutex> lock(mu_);
          on_hangup = on_hangup_;
        }
        for (const auto& handler : on_hangup) handler();
      }
      std::lock_guard<std::mutex> lock(mu_);
      signal_ = byte;
      if (!serving_) {
        // Nothing to drain yet (still loading): leave at once.
        std::fprintf(stderr, "sae-server: signal %d during startup, exiting\n", signal_);
        std::_Exit(1);
      }
      cv_.notify_all();
    }).detach();
  }

  void SetServing() {
    std::lock_guard<std::mutex> lock(mu_);
    serving_ = true;
  }

  // Something SIGHUP does (on the watcher thread, in the order added).
  void OnHangup(std::function<void()> handler) {
    std::lock_guard<std::mutex> lock(mu_);
    on_hangup_.push_back(std::move(handler));
  }

  // Wakes Wait as a signal would, with kDeviceLost.
  static constexpr int kDeviceLost = -1;
  void DeviceLost() {
    std::lock_guard<std::mutex> lock(mu_);
    if (signal_ == 0) signal_ = kDeviceLost;
    cv_.notify_all();
  }

  int Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return signal_ != 0; });
    return signal_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int signal_ = 0;
  bool serving_ = false;
  std::vector<std::function<void()>> on_hangup_;
};

// After the executor's watchdog found the GPU hung: its engine thread is
// stuck in the GPU, and destroying the executor, freeing device memory or the
// CUDA context would wait for it too, so leave without releasing anything.
[[noreturn]] void ExitHung() {
  Log("stopped after the GPU hung; exiting without releasing it (exit status 3)");
  std::_Exit(3);
}

// Writes `port` to `path` via a temporary name, so a reader never sees half a number.
void WritePortFile(const std::string& path, int port) {
  if (path.empty()) return;
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << port << "\n";
  std::rename(tmp.c_str(), path.c_str());
}

// The text of both warm-ups (the full batch repeats its tokens).
constexpr char kWarmUpText[] = "The quick brown fox jumps over the lazy dog.";

// One short request through the executor, as a client would send it: the
// first real request then does not pay for lazy initialisation (allocator
// pools, BLAS threads, CUDA kernels and handles).
absl::Status WarmUp(const Engine& engine, Executor* executor) {
  absl::StatusOr<Encoding> enc = engine.tokenizer().Encode(kWarmUpText, true);
  if (!enc.ok()) return enc.status();
  Job job;
  job.request.ids = enc->ids;
  job.request.sae_indices = engine.all_sae_indices();
  job.request.k = 1;
  std::mutex mu;
  std::condition_variable cv;
  std::optional<absl::Status> result;
  job.done = [&](absl::StatusOr<SequenceResult> r) {
    std::lock_guard<std::mutex> lock(mu);
    result = r.status();
    cv.notify_all();
  };
  if (absl::Status s = executor->Submit(std::move(job)); !s.ok()) return s;
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return result.has_value(); });
  return *result;
}

// One batch of max_batch_tokens tokens (windows of at most max_seq_len, each
// from BOS), every SAE at max_k, straight through the engine before its
// executor thread starts. RESOURCE_EXHAUSTED names max_batch_tokens.
absl::Status RunFullBatch(Engine& engine, const v1::ServerConfig& config) {
  absl::StatusOr<Encoding> enc = engine.tokenizer().Encode(kWarmUpText, false);
  if (!enc.ok()) return enc.status();
  if (enc->ids.empty()) return absl::InternalError("warm-up text has no tokens");
  const std::optional<int32_t> bos = engine.tokenizer().bos_id();
  const int64_t total = config.max_batch_tokens();
  const int64_t window = config.max_seq_len() > 0 ? std::min<int64_t>(config.max_seq_len(), total) : total;
  const std::vector<int> every_sae = engine.all_sae_indices();
  std::vector<SequenceRequest> batch;
  for (int64_t placed = 0; placed < total; placed += window) {
    SequenceRequest r;
    const int64_t n = std::min(window, total - placed);
    for (int64_t t = 0; t < n; ++t) {
      r.ids.push_back(t == 0 && bos ? *bos : enc->ids[static_cast<size_t>(t) % enc->ids.size()]);
    }
    r.sae_indices = every_sae;
    r.k = static_cast<int>(config.max_k());
    batch.push_back(std::move(r));
  }
  absl::StatusOr<std::vector<SequenceResult>> results = engine.Run(batch);
  if (results.status().code() == absl::StatusCode::kResourceExhausted) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "config: max_batch_tokens (", total, ") does not fit the device: a full batch (every SAE at max_k ",
        config.max_k(), ") failed with ", results.status().message(), "; lower max_batch_tokens"));
  }
  return results.status();
}

// What the server tells of its state, always together: the health services
// (the gRPC port's and, with health_listen, the probe port's; overall and
// for the SAE service) and the sae_serving metric.
struct ServingState {
  std::vector<grpc::HealthCheckServiceInterface*> health;
  std::string service;
  Metrics* metrics = nullptr;

  void Set(bool serving) const {
    for (grpc::HealthCheckServiceInterface* h : health) {
      h->SetServingStatus(service, serving);
      h->SetServingStatus(serving);
    }
    metrics->SetServing(serving);
  }
  // NOT_SERVING for good (shutdown): Watch calls get it and end.
  void Shutdown() const {
    for (grpc::HealthCheckServiceInterface* h : health) h->Shutdown();
    metrics->SetServing(false);
  }
};

int Main(int argc, char** argv) {
  SignalWaiter signals;
  absl::SetProgramUsageMessage("Serves SAE features of a Llama model over gRPC (sae.v1.SaeService).");
  std::vector<std::string> args = PrepareArgs(argc, argv, {"sae"});
  std::vector<char*> merged_argv = ToArgv(args);
  absl::ParseCommandLine(static_cast<int>(args.size()), merged_argv.data());

  absl::StatusOr<v1::ServerConfig> config_or = BuildConfig();
  if (!config_or.ok()) {
    Log(std::string(config_or.status().message()));
    return 1;
  }
  v1::ServerConfig config = std::move(*config_or);

  // One registry for the executor and the service; scraped on its own port.
  auto metrics = std::make_shared<Metrics>();
  std::unique_ptr<MetricsServer> metrics_server;
  if (!config.metrics_listen().empty()) {
    absl::StatusOr<std::unique_ptr<MetricsServer>> started =
        MetricsServer::Start(config.metrics_listen(), metrics->registry());
    if (!started.ok()) {
      Log(std::string(started.status().message()));
      return 1;
    }
    metrics_server = std::move(*started);
    Log(absl::StrCat("metrics on ", config.metrics_listen(), " (port ", metrics_server->port(), "), GET /metrics"));
    WritePortFile(absl::GetFlag(FLAGS_metrics_port_file), metrics_server->port());
  }

  auto valid_until = [](int64_t not_after) {
    return absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", absl::FromUnixSeconds(not_after), absl::UTCTimeZone());
  };
  absl::StatusOr<std::unique_ptr<ServerTls>> tls =
      ServerTls::Start(config, [metrics, valid_until](const ServerTls::Reload& reload) {
        metrics->TlsFilesReread(reload.served);
        if (reload.served) {
          metrics->SetTlsCertificateNotAfter(reload.not_after);
          Log(absl::StrCat("TLS files changed: new connections get them (certificate valid until ",
                           valid_until(reload.not_after), ")"));
        } else {
          Log(absl::StrCat("TLS files changed but refused: ", reload.problem,
                           "; new connections still get the last files that passed"));
        }
      });
  if (!tls.ok()) {
    Log(std::string(tls.status().message()));
    return 1;
  }
  // Outlives the servers (their TLS watcher reads the files it holds):
  // declared before them, and shared with the SIGHUP handler, which
  // `signals` (declared first, so destroyed after them) holds.
  const std::shared_ptr<ServerTls> server_tls = *std::move(tls);
  if (!config.tls_cert_file().empty()) {
    signals.OnHangup([server_tls] {
      Log("SIGHUP: re-reading the TLS files");
      server_tls->Reread().IgnoreError();  // the observer tells what it found
    });
    metrics->SetTlsCertificateNotAfter(server_tls->certificate_not_after());
    Log(absl::StrCat("TLS certificate valid until ", valid_until(server_tls->certificate_not_after())));
  }
  std::shared_ptr<AccessLog> access_log;
  if (!config.access_log().empty()) {
    absl::StatusOr<std::unique_ptr<AccessLog>> opened =
        AccessLog::Open(config.access_log(), [metrics] { metrics->AccessLogLineDropped(); });
    if (!opened.ok()) {
      Log(std::string(opened.status().message()));
      return 1;
    }
    access_log = std::move(*opened);
    signals.OnHangup([access_log] {  // logrotate moved the file away
      const absl::Status reopened = access_log->Reopen();
      Log(reopened.ok() ? "SIGHUP: access log reopened"
                        : absl::StrCat("SIGHUP: ", reopened.message(), "; still writing to the old file"));
    });
    Log(absl::StrCat("access log: ", config.access_log() == "-" ? "standard error" : config.access_log()));
  }

  // Listen first so health checks can say NOT_SERVING while the model loads.
  ServiceOptions service_options = ServiceOptionsFromConfig(config);
  service_options.metrics = metrics;
  service_options.access_log = access_log;
  SaeServiceImpl service(service_options);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen(), server_tls->credentials(), &port);
  for (const auto& [name, value] : GrpcServerChannelArgs(config)) builder.AddChannelArgument(name, value);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    Log(absl::StrCat("cannot listen on ", config.listen()));
    return 1;
  }
  const std::string service_name = v1::SaeService::service_full_name();
  ServingState serving{{server->GetHealthCheckService()}, service_name, metrics.get()};
  // The probe port: a server of its own with no service registered, so it
  // answers the default health service (and the reflection plugin, which
  // gRPC adds to every server of the process) and nothing else.
  std::unique_ptr<grpc::Server> probe_server;
  if (!config.health_listen().empty()) {
    grpc::ServerBuilder probe_builder;
    int probe_port = 0;
    probe_builder.AddListeningPort(config.health_listen(), grpc::InsecureServerCredentials(), &probe_port);
    probe_server = probe_builder.BuildAndStart();
    if (!probe_server || probe_port == 0) {
      Log(absl::StrCat("config: health_listen \"", config.health_listen(), "\": cannot listen there"));
      return 1;
    }
    serving.health.push_back(probe_server->GetHealthCheckService());
    Log(absl::StrCat("health probes on ", config.health_listen(), " (port ", probe_port,
                     ", plaintext, grpc.health.v1.Health only)"));
    WritePortFile(absl::GetFlag(FLAGS_health_port_file), probe_port);
  }
  serving.Set(false);
  Log(absl::StrCat("listening on ", config.listen(), " (port ", port, ", ", DescribeTransportSecurity(config),
                   "), health NOT_SERVING while loading"));
  std::string age = "none";
  if (config.max_connection_age_seconds() > 0) {
    const uint32_t grace = config.max_connection_age_grace_seconds();
    age = absl::StrCat(config.max_connection_age_seconds(), " s (grace ",
                       grace == 0 ? std::string("until calls end") : absl::StrCat(grace, " s"), ")");
  }
  Log(absl::StrCat("connections: keepalive ping after ", config.keepalive_time_seconds(), " s quiet (timeout ",
                   config.keepalive_timeout_seconds(), " s); client pings accepted every ",
                   config.min_client_ping_interval_seconds(), " s or more; max connection age ", age));
  WritePortFile(absl::GetFlag(FLAGS_port_file), port);

  if (config.demo() && config.model_dir().empty()) {
    Log(absl::StrCat("writing the demo model to ", config.demo_dir()));
    absl::StatusOr<DemoLayout> demo = WriteDemo(config.demo_dir());
    if (!demo.ok()) {
      Log(std::string(demo.status().message()));
      return 1;
    }
    config.set_model_dir(demo->model_dir);
    if (config.saes().empty()) {
      for (const std::string& dir : demo->sae_dirs) config.add_saes()->set_path(dir);
    }
  }

  EngineOptions engine_options = EngineOptionsFromConfig(config);
  Log(absl::StrCat("loading model ", engine_options.model_dir, " and ", engine_options.saes.size(),
                   " SAE(s) on backend ", engine_options.backend));
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(engine_options);
  if (!engine.ok()) {
    Log(std::string(engine.status().message()));
    return 1;
  }
  if (static_cast<int64_t>(config.max_k()) > (*engine)->max_k()) {
    Log(absl::StrCat("config: max_k (", config.max_k(), ") is larger than ", (*engine)->max_k(),
                     ", the most features per token the ", (*engine)->backend_name(),
                     " backend's SAE top-k holds on this device; lower max_k"));
    return 1;
  }
  std::vector<std::string> names;
  for (const auto& sae : (*engine)->saes()) names.push_back(sae->name() + " (" + sae->hook().Name() + ")");
  Log(absl::StrCat("loaded ", (*engine)->model_config().num_hidden_layers, "-layer model (running ",
                   (*engine)->n_layers_loaded(), " layers) with SAEs: ", absl::StrJoin(names, ", ")));

  Engine* engine_ptr = engine->get();
  const MemoryUsage memory = engine_ptr->memory();
  metrics->SetMemory(memory);  // the engine thread updates it after every batch
  auto mib = [](int64_t bytes) { return absl::StrFormat("%.1f MiB", bytes / 1048576.0); };
  std::string memory_line = absl::StrCat("backend memory: ", mib(memory.tensors), " in tensors");
  if (memory.reserved >= 0) absl::StrAppend(&memory_line, ", ", mib(memory.reserved), " reserved");
  if (memory.device_total >= 0) {
    absl::StrAppend(&memory_line, "; device ", mib(memory.device_free), " free of ", mib(memory.device_total));
  }
  Log(memory_line);
  if (config.warmup() && config.warmup_full_batch() && engine_ptr->asynchronous()) {
    const auto start = std::chrono::steady_clock::now();
    // It runs before the executor and its watchdog: a GPU that hangs here
    // ends the process the same way.
    HangWatchdog watchdog(
        std::chrono::seconds(config.batch_timeout_seconds()), [](const std::string& what, double busy) {
          Log(absl::StrFormat(
              "device lost: %s has been on the device for %.1f s, longer than batch_timeout_seconds: the "
              "GPU is presumed hung; NOT_SERVING, exiting",
              what, busy));
          ExitHung();
        });
    watchdog.Begin("the full-batch warm-up");
    const absl::Status s = RunFullBatch(*engine_ptr, config);
    watchdog.End();
    if (!s.ok()) {
      Log(absl::StrCat("full-batch warm-up failed: ", s.message()));
      return 1;
    }
    Log(absl::StrCat("full-batch warm-up: ", config.max_batch_tokens(), " tokens in ",
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s"));
  }
  ExecutorOptions executor_options = ExecutorOptionsFromConfig(config);
  executor_options.bos_id = engine_ptr->tokenizer().bos_id();
  executor_options.metrics = metrics;
  executor_options.on_device_lost = [&signals, serving](const absl::Status& fault) {
    // Nothing can run on this process again: fail readiness at once, then
    // shut down and exit non-zero so the orchestrator starts a fresh one.
    Log(absl::StrCat("device lost: ", fault.message(), "; NOT_SERVING, exiting"));
    serving.Set(false);
    signals.DeviceLost();
  };
  absl::StatusOr<std::unique_ptr<Executor>> executor =
      Executor::Create(EngineRunner(engine_ptr, metrics), executor_options);
  if (!executor.ok()) {
    Log(std::string(executor.status().message()));
    return 1;
  }
  if (config.warmup()) {
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status s = WarmUp(*engine_ptr, executor->get()); !s.ok()) {
      Log(absl::StrCat("warm-up failed: ", s.message()));
      if ((*executor)->hung()) ExitHung();
      return 1;
    }
    Log(absl::StrCat("warm-up done in ",
                     std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), " s"));
  }
  service.Attach(engine->get(), executor->get());
  serving.Set(true);
  signals.SetServing();
  Log(absl::StrCat("SERVING ", service_name, " (max_batch_tokens=", config.max_batch_tokens(),
                   ", max_seq_len=", config.max_seq_len(), ", max_inflight_requests=", config.max_inflight_requests(),
                   ", max_queued_tokens=", config.max_queued_tokens(), ", max_queue_delay_ms=",
                   config.max_queue_delay_ms(), ", batch_timeout_seconds=", config.batch_timeout_seconds(), ")"));

  const int sig = signals.Wait();
  const bool device_lost = sig == SignalWaiter::kDeviceLost;
  const int grace = static_cast<int>(config.shutdown_grace_seconds());
  Log(absl::StrCat(device_lost ? "device lost" : absl::StrCat("signal ", sig),
                   ": NOT_SERVING, refusing new requests, draining for up to ", grace, " s"));
  // Load balancers stop sending first; then new requests (also on open
  // streams) are refused while admitted ones finish, and open streams end
  // once their responses are written.
  serving.Shutdown();
  const auto cut_off = std::chrono::system_clock::now() + std::chrono::seconds(grace);
  service.CutOffAt(cut_off);
  (*executor)->StopAdmitting();
  service.Drain();
  // Waits for running RPCs until the grace period ends, then cancels them
  // (the executor drops their jobs). The executor keeps running meanwhile, so
  // it stops only after the server stopped taking and finishing calls.
  server->Shutdown(cut_off);
  (*executor)->Shutdown();
  server->Wait();
  if ((*executor)->hung()) ExitHung();
  if (probe_server) probe_server->Shutdown(std::chrono::system_clock::now());  // a probe's call is cut off
  server.reset();
  probe_server.reset();
  executor->reset();
  metrics_server.reset();
  engine->reset();
  Log(device_lost ? "stopped after a device failure (exit status 3)" : "stopped");
  return device_lost ? 3 : 0;
}

}  // namespace
}  // namespace sae

int main(int argc, char** argv) { return sae::Main(argc, argv); }
