// ServerConfig: loading from a textproto, defaults, validation, and the
// engine / executor / service options derived from it.
#ifndef SAE_RPC_CONFIG_H_
#define SAE_RPC_CONFIG_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "rpc/executor.h"
#include "rpc/service.h"
#include "sae/v1/config.pb.h"

namespace sae {

// The version reported by Info.
inline constexpr char kServerVersion[] = "0.1.0";

// Parses a ServerConfig textproto. Errors name the file, the line and column,
// and the field the parser choked on.
absl::StatusOr<v1::ServerConfig> LoadServerConfig(const std::string& path);
// Same for text already in memory; `origin` names it in errors.
absl::StatusOr<v1::ServerConfig> ParseServerConfig(const std::string& text, const std::string& origin);

// batch_timeout_seconds (sae-server) and --batch_timeout_seconds
// (sae-extract): the default for a backend (the hung-GPU watchdog is on with
// cuda, off on the CPU) and the largest value accepted.
int DefaultBatchTimeoutSeconds(const std::string& backend);
inline constexpr int kMaxBatchTimeoutSeconds = 86400;

// The largest value of each connection setting (keepalive_time_seconds,
// max_connection_age_seconds, ...): gRPC takes them as int milliseconds.
inline constexpr uint32_t kMaxConnectionSeconds = 2147483;

// Fills unset (zero / empty) fields with the defaults.
void ApplyConfigDefaults(v1::ServerConfig* config);

// Checks the limits (after defaults); errors name the field.
absl::Status ValidateServerConfig(const v1::ServerConfig& config);

// model_dir and saes must be set (demo resolved by the caller).
EngineOptions EngineOptionsFromConfig(const v1::ServerConfig& config);
// The caller adds what the config cannot know: bos_id (from the loaded
// tokenizer) and the shared metrics.
ExecutorOptions ExecutorOptionsFromConfig(const v1::ServerConfig& config);
ServiceOptions ServiceOptionsFromConfig(const v1::ServerConfig& config);
// The gRPC server's channel arguments for the connection settings (keepalive,
// client ping policy, connection age), as (name, value) pairs for
// grpc::ServerBuilder::AddChannelArgument.
std::vector<std::pair<std::string, int>> GrpcServerChannelArgs(const v1::ServerConfig& config);

}  // namespace sae

#endif  // SAE_RPC_CONFIG_H_
