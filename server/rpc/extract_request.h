// Turning an ExtractRequest into an engine SequenceRequest (validation and
// tokenization, on the gRPC thread) and an engine result back into response
// chunks. Shared by Extract and ExtractStream so both behave the same.
#ifndef SAE_RPC_EXTRACT_REQUEST_H_
#define SAE_RPC_EXTRACT_REQUEST_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "sae/v1/sae.pb.h"

namespace sae {

// Server limits and defaults that apply to each request.
struct RequestLimits {
  int default_k = 16;
  int max_k = 256;
  int max_tokens_per_request = 2048;
  int chunk_tokens = 64;
  // Requests of one ExtractStream admitted and not yet fully handed to the
  // wire; bounds what a client that writes but never reads can pile up.
  int max_stream_backlog = 64;
};

// Most features one FeatureWatch may list (documented in sae.proto).
constexpr int kMaxWatchedFeaturesPerSae = 4096;

struct PreparedRequest {
  std::string request_id;
  SequenceRequest sequence;
  std::vector<std::pair<uint32_t, uint32_t>> offsets;  // [n_tokens], code points; (0, 0) for token_ids
  std::vector<std::string> sae_names;                  // parallel to sequence.sae_indices
  int chunk_tokens = 0;
  bool omit_pieces = false;
  bool omit_offsets = false;

  int n_tokens() const { return static_cast<int>(sequence.ids.size()); }
  int n_chunks() const { return (n_tokens() + chunk_tokens - 1) / chunk_tokens; }
};

// Validates `request` against the loaded engine and the limits, and tokenizes
// text input. Every failure is INVALID_ARGUMENT with a message saying what to
// fix. Reads only the engine's immutable parts (tokenizer, config, SAE list),
// so it is safe on any thread.
absl::StatusOr<PreparedRequest> PrepareRequest(const Engine& engine, const RequestLimits& limits,
                                               const v1::ExtractRequest& request);

// Response `chunk` (0-based) of a finished request: tokens
// [chunk * chunk_tokens, ...), done on the last chunk. Only active features
// are listed, in the engine's order (value descending). Pieces and offsets
// unless omitted; reconstruction_error where the engine computed one.
v1::ExtractResponse BuildResponseChunk(const PreparedRequest& request, const SequenceResult& result,
                                       const Tokenizer& tokenizer, int chunk);

// The in-stream error response of a failed ExtractStream request.
v1::ExtractResponse BuildErrorResponse(const std::string& request_id, const absl::Status& status);

}  // namespace sae

#endif  // SAE_RPC_EXTRACT_REQUEST_H_
