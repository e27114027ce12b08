#include "rpc/config.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"

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
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the config file"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return ParseServerConfig(buffer.str(), path);
}

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
                                    {"max_inflight_requests", config.max_inflight_requests()}}) {
    if (value > kIntLimit) return absl::InvalidArgumentError(absl::StrCat("config: ", name, " is too large: ", value));
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
  return options;
}

ServiceOptions ServiceOptionsFromConfig(const v1::ServerConfig& config) {
  ServiceOptions options;
  options.limits.default_k = static_cast<int>(config.default_k());
  options.limits.max_k = static_cast<int>(config.max_k());
  options.limits.max_tokens_per_request = static_cast<int>(config.max_tokens_per_request());
  options.limits.chunk_tokens = static_cast<int>(config.chunk_tokens());
  options.limits.max_stream_backlog = static_cast<int>(config.max_inflight_requests());
  options.version = kServerVersion;
  return options;
}

}  // namespace sae
