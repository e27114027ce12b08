#include "rpc/config.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <grpc/grpc.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status_macros.h"

namespace sae {
namespace {

// Keeps the first parse error (the later ones are usually consequences).
class FirstErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {
    if (!has_error_) {
      has_error_ = true;
      // The parser counts from 0; editors count from 1.
      error_ = absl::StrCat(line + 1, ":", column + 1, ": ", message);
    }
  }
  void AddWarning(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {}

  bool has_error() const { return has_error_; }
  const std::string& error() const { return error_; }

 private:
  bool has_error_ = false;
  std::string error_;
};

}  // namespace

absl::StatusOr<v1::ServerConfig> ParseServerConfig(const std::string& text, const std::string& origin) {
  v1::ServerConfig config;
  FirstErrorCollector errors;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ":", errors.has_error() ? errors.error() : std::string("cannot parse ServerConfig")));
  }
  return config;
}

absl::StatusOr<v1::ServerConfig> LoadServerConfig(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) return Prefixed("the config file ", text.status());
  return ParseServerConfig(*text, path);
}

int DefaultBatchTimeoutSeconds(const std::string& backend) { return backend == "cuda" ? 120 : 0; }

void ApplyConfigDefaults(v1::ServerConfig* config) {
  if (config->backend().empty()) config->set_backend("cpu");
  if (config->listen().empty()) config->set_listen("0.0.0.0:50051");
  if (config->demo_dir().empty()) config->set_demo_dir("/tmp/sae-demo");
  if (config->default_k() == 0) config->set_default_k(16);
  if (config->max_k() == 0) config->set_max_k(std::max<uint32_t>(256, config->default_k()));
  if (config->max_tokens_per_request() == 0) config->set_max_tokens_per_request(2048);
  if (config->max_batch_tokens() == 0) config->set_max_batch_tokens(4096);
  if (config->chunk_tokens() == 0) config->set_chunk_tokens(64);
  if (config->max_inflight_requests() == 0) config->set_max_inflight_requests(64);
  if (config->max_seq_len() == 0) config->set_max_seq_len(std::min<uint32_t>(2048, config->max_batch_tokens()));
  if (config->max_queued_tokens() == 0) {
    config->set_max_queued_tokens(
        std::max<uint64_t>(8 * static_cast<uint64_t>(config->max_batch_tokens()), config->max_tokens_per_request()));
  }
  if (config->long_input_policy() == v1::ServerConfig::LONG_INPUT_POLICY_UNSPECIFIED) {
    config->set_long_input_policy(v1::ServerConfig::WINDOW);
  }
  if (config->overload_policy() == v1::ServerConfig::OVERLOAD_POLICY_UNSPECIFIED) {
    config->set_overload_policy(v1::ServerConfig::OVERLOAD_REJECT);
  }
  if (config->shutdown_grace_seconds() == 0) config->set_shutdown_grace_seconds(30);
  if (!config->has_warmup()) config->set_warmup(true);
  if (!config->has_warmup_full_batch()) config->set_warmup_full_batch(true);
  if (!config->has_batch_timeout_seconds()) {
    config->set_batch_timeout_seconds(DefaultBatchTimeoutSeconds(config->backend()));
  }
  if (config->keepalive_time_seconds() == 0) config->set_keepalive_time_seconds(7200);
  if (config->keepalive_timeout_seconds() == 0) config->set_keepalive_timeout_seconds(20);
  if (!config->has_min_client_ping_interval_seconds()) config->set_min_client_ping_interval_seconds(10);
  if (config->tls_reload_seconds() == 0) config->set_tls_reload_seconds(60);
}

absl::Status ValidateServerConfig(const v1::ServerConfig& config) {
  if (config.default_k() > config.max_k()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: default_k (", config.default_k(), ") is larger than max_k (", config.max_k(), ")"));
  }
  // Keep every limit inside int (the engine's type for counts).
  constexpr uint32_t kIntLimit = 1u << 30;
  for (const auto& [name, value] : {std::pair<const char*, uint32_t>{"max_k", config.max_k()},
                                    {"max_tokens_per_request", config.max_tokens_per_request()},
                                    {"max_batch_tokens", config.max_batch_tokens()},
                                    {"chunk_tokens", config.chunk_tokens()},
                                    {"max_inflight_requests", config.max_inflight_requests()},
                                    {"max_seq_len", config.max_seq_len()}}) {
    if (value > kIntLimit) return absl::InvalidArgumentError(absl::StrCat("config: ", name, " is too large: ", value));
  }
  if (config.max_seq_len() > config.max_batch_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("config: max_seq_len (", config.max_seq_len(),
                                                   ") is larger than max_batch_tokens (", config.max_batch_tokens(),
                                                   "): a window must fit in one batch"));
  }
  if (config.max_seq_len() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: max_seq_len must be at least 2 (BOS and one token), got ", config.max_seq_len()));
  }
  if (config.max_queued_tokens() < config.max_tokens_per_request()) {
    return absl::InvalidArgumentError(absl::StrCat("config: max_queued_tokens (", config.max_queued_tokens(),
                                                   ") is smaller than max_tokens_per_request (",
                                                   config.max_tokens_per_request(), ")"));
  }
  if (config.max_queued_tokens() > (uint64_t{1} << 40)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: max_queued_tokens is too large: ", config.max_queued_tokens()));
  }
  if (config.max_queue_delay_ms() > 60000) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: max_queue_delay_ms is ", config.max_queue_delay_ms(), "; at most 60000 (one minute)"));
  }
  if (config.shutdown_grace_seconds() > 3600) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: shutdown_grace_seconds is ", config.shutdown_grace_seconds(), "; at most 3600"));
  }
  if (config.batch_timeout_seconds() > kMaxBatchTimeoutSeconds) {
    return absl::InvalidArgumentError(absl::StrCat("config: batch_timeout_seconds is ", config.batch_timeout_seconds(),
                                                   "; at most ", kMaxBatchTimeoutSeconds,
                                                   " (one day; 0 turns the watchdog off)"));
  }
  // gRPC takes these in milliseconds, as an int.
  for (const auto& [name, value] :
       {std::pair<const char*, uint32_t>{"keepalive_time_seconds", config.keepalive_time_seconds()},
        {"keepalive_timeout_seconds", config.keepalive_timeout_seconds()},
        {"min_client_ping_interval_seconds", config.min_client_ping_interval_seconds()},
        {"max_connection_age_seconds", config.max_connection_age_seconds()},
        {"max_connection_age_grace_seconds", config.max_connection_age_grace_seconds()}}) {
    if (value > kMaxConnectionSeconds) {
      return absl::InvalidArgumentError(
          absl::StrCat("config: ", name, " is ", value, "; at most ", kMaxConnectionSeconds, " (24 days)"));
    }
  }
  if (config.tls_cert_file().empty() != config.tls_key_file().empty()) {
    return absl::InvalidArgumentError(
        config.tls_cert_file().empty()
            ? "config: tls_key_file is set without tls_cert_file (the certificate it signs for)"
            : "config: tls_cert_file is set without tls_key_file (its private key)");
  }
  if (!config.tls_client_ca_file().empty() && config.tls_cert_file().empty()) {
    return absl::InvalidArgumentError(
        "config: tls_client_ca_file is set without tls_cert_file and tls_key_file (client certificates need TLS)");
  }
  if (config.tls_reload_seconds() > 86400) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: tls_reload_seconds is ", config.tls_reload_seconds(), "; at most 86400 (one day)"));
  }
  if (!v1::ServerConfig::LongInputPolicy_IsValid(config.long_input_policy()) ||
      config.long_input_policy() == v1::ServerConfig::LONG_INPUT_POLICY_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: long_input_policy has no valid value (", config.long_input_policy(), ")"));
  }
  if (!v1::ServerConfig::OverloadPolicy_IsValid(config.overload_policy()) ||
      config.overload_policy() == v1::ServerConfig::OVERLOAD_POLICY_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: overload_policy has no valid value (", config.overload_policy(), ")"));
  }
  // Port 0 (any free port) gives two different ports.
  auto same_port = [](const std::string& a, const std::string& b) {
    return !a.empty() && a == b && a.substr(a.rfind(':') + 1) != "0";
  };
  if (same_port(config.metrics_listen(), config.listen())) {
    return absl::InvalidArgumentError("config: metrics_listen must differ from listen (a separate port)");
  }
  if (same_port(config.health_listen(), config.listen()) ||
      same_port(config.health_listen(), config.metrics_listen())) {
    return absl::InvalidArgumentError(
        "config: health_listen must differ from listen and metrics_listen (a port of its own)");
  }
  if (config.model_dir().empty() && !config.demo()) {
    return absl::InvalidArgumentError("config: model_dir is empty (set model_dir, or demo: true)");
  }
  return absl::OkStatus();
}

EngineOptions EngineOptionsFromConfig(const v1::ServerConfig& config) {
  EngineOptions options;
  options.model_dir = config.model_dir();
  options.backend = config.backend();
  options.encode_form = config.lm_saes_encode() ? SaeEncodeForm::kLmSaes : SaeEncodeForm::kSaeLens;
  for (const v1::SaeSource& source : config.saes()) options.saes.push_back({source.path(), source.alias()});
  return options;
}

ExecutorOptions ExecutorOptionsFromConfig(const v1::ServerConfig& config) {
  ExecutorOptions options;
  options.max_batch_tokens = static_cast<int>(config.max_batch_tokens());
  options.max_inflight_requests = static_cast<int>(config.max_inflight_requests());
  options.max_queued_tokens = static_cast<int64_t>(config.max_queued_tokens());
  options.max_queue_delay = std::chrono::milliseconds(config.max_queue_delay_ms());
  // Only WINDOW lets a request longer than max_seq_len reach the executor.
  options.max_seq_len = static_cast<int>(config.max_seq_len());
  options.batch_timeout = std::chrono::seconds(config.batch_timeout_seconds());
  return options;
}

std::vector<std::pair<std::string, int>> GrpcServerChannelArgs(const v1::ServerConfig& config) {
  auto ms = [](uint32_t seconds) { return static_cast<int>(seconds * 1000); };
  std::vector<std::pair<std::string, int>> args = {
      {GRPC_ARG_KEEPALIVE_TIME_MS, ms(config.keepalive_time_seconds())},
      {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(config.keepalive_timeout_seconds())},
      // The server's own pings keep going on a quiet connection (gRPC stops
      // after 2 without data), and also probe connections with no call.
      {GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0},
      {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1},
      {GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, ms(config.min_client_ping_interval_seconds())},
  };
  // 0: no ping is too frequent, so none is a strike.
  if (config.min_client_ping_interval_seconds() == 0) args.emplace_back(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  if (config.max_connection_age_seconds() > 0) {
    args.emplace_back(GRPC_ARG_MAX_CONNECTION_AGE_MS, ms(config.max_connection_age_seconds()));
    if (config.max_connection_age_grace_seconds() > 0) {
      args.emplace_back(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, ms(config.max_connection_age_grace_seconds()));
    }
  }
  return args;
}

ServiceOptions ServiceOptionsFromConfig(const v1::ServerConfig& config) {
  ServiceOptions options;
  options.limits.default_k = static_cast<int>(config.default_k());
  options.limits.max_k = static_cast<int>(config.max_k());
  options.limits.max_tokens_per_request = static_cast<int>(config.max_tokens_per_request());
  options.limits.chunk_tokens = static_cast<int>(config.chunk_tokens());
  options.limits.max_stream_backlog = static_cast<int>(config.max_inflight_requests());
  options.max_seq_len = static_cast<int>(config.max_seq_len());
  options.long_input_policy = config.long_input_policy();
  options.overload_policy = config.overload_policy();
  options.version = kServerVersion;
  return options;
}

}  // namespace sae
