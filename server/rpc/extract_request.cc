#include "rpc/extract_request.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "rpc/status_map.h"

namespace sae {

absl::StatusOr<PreparedRequest> PrepareRequest(const Engine& engine, const RequestLimits& limits,
                                               const v1::ExtractRequest& request) {
  PreparedRequest p;
  p.request_id = request.request_id();
  if (request.input_case() == v1::ExtractRequest::INPUT_NOT_SET) {
    return absl::InvalidArgumentError("the request has neither text nor token_ids");
  }

  // SAEs: in request order; empty means all loaded ones.
  if (request.saes().empty()) {
    for (size_t i = 0; i < engine.saes().size(); ++i) {
      p.sequence.sae_indices.push_back(static_cast<int>(i));
      p.sae_names.push_back(engine.saes()[i]->name());
    }
  } else {
    absl::flat_hash_set<std::string> seen;
    for (const std::string& name : request.saes()) {
      absl::StatusOr<int> index = engine.FindSae(name);
      // An unknown name is the caller's mistake, whatever the engine calls it.
      if (!index.ok()) return absl::InvalidArgumentError(index.status().message());
      if (!seen.insert(name).second) {
        return absl::InvalidArgumentError(absl::StrCat("SAE \"", name, "\" is listed twice"));
      }
      p.sequence.sae_indices.push_back(*index);
      p.sae_names.push_back(name);
    }
  }
  if (p.sequence.sae_indices.empty()) return absl::InvalidArgumentError("the server has no SAE loaded");

  const int k = request.k() == 0 ? limits.default_k : static_cast<int>(std::min<uint32_t>(request.k(), 1u << 30));
  if (k > limits.max_k) {
    return absl::InvalidArgumentError(absl::StrCat("k=", request.k(), " is larger than max_k=", limits.max_k));
  }
  p.sequence.k = k;
  p.sequence.include_bos = request.include_bos();
  p.chunk_tokens = request.chunk_tokens() == 0 ? limits.chunk_tokens
                                               : static_cast<int>(std::min<uint32_t>(request.chunk_tokens(), 1u << 30));

  if (request.input_case() == v1::ExtractRequest::kText) {
    const bool add_bos = request.has_add_bos() ? request.add_bos() : true;
    // INVALID_ARGUMENT on invalid UTF-8, with the byte offset.
    ASSIGN_OR_RETURN(Encoding enc, engine.tokenizer().Encode(request.text(), add_bos));
    p.sequence.ids = std::move(enc.ids);
    p.offsets = std::move(enc.offsets);
  } else {
    const int64_t vocab = engine.model_config().vocab_size;
    const auto& ids = request.token_ids().ids();
    for (int i = 0; i < ids.size(); ++i) {
      if (static_cast<int64_t>(ids[i]) >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("token_ids[", i, "] = ", ids[i], " is outside the vocabulary [0, ", vocab, ")"));
      }
    }
    p.sequence.ids.assign(ids.begin(), ids.end());
    p.offsets.assign(p.sequence.ids.size(), {0, 0});
  }
  if (p.sequence.ids.empty()) return absl::InvalidArgumentError("the request has no tokens");
  if (p.n_tokens() > limits.max_tokens_per_request) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the request has ", p.n_tokens(), " tokens; max_tokens_per_request is ", limits.max_tokens_per_request));
  }
  return p;
}

v1::ExtractResponse BuildResponseChunk(const PreparedRequest& request, const SequenceResult& result,
                                       const Tokenizer& tokenizer, int chunk) {
  v1::ExtractResponse response;
  response.set_request_id(request.request_id);
  const int n = request.n_tokens();
  const int begin = std::min(n, chunk * request.chunk_tokens);
  const int end = std::min(n, begin + request.chunk_tokens);
  response.set_total_tokens(static_cast<uint32_t>(n));
  response.set_done(end == n);
  for (int t = begin; t < end; ++t) {
    v1::TokenFeatures* tf = response.add_tokens();
    const int32_t id = request.sequence.ids[t];
    tf->set_position(static_cast<uint32_t>(t));
    tf->set_token_id(static_cast<uint32_t>(id));
    tf->set_piece(tokenizer.TokenPiece(id));
    tf->set_char_start(request.offsets[t].first);
    tf->set_char_end(request.offsets[t].second);
    for (size_t j = 0; j < request.sae_names.size(); ++j) {
      v1::SaeFeatures* sf = tf->add_saes();
      sf->set_sae(request.sae_names[j]);
      if (j >= result.saes.size()) continue;
      const SaeTopK& top = result.saes[j];
      const size_t row = static_cast<size_t>(t) * top.k;
      if (top.k <= 0 || top.indices.size() < row + top.k) continue;
      for (int slot = 0; slot < top.k; ++slot) {
        const int32_t index = top.indices[row + slot];
        if (index < 0) break;  // the engine packs active features first
        sf->add_indices(static_cast<uint32_t>(index));
        sf->add_values(top.values[row + slot]);
      }
    }
  }
  return response;
}

v1::ExtractResponse BuildErrorResponse(const std::string& request_id, const absl::Status& status) {
  v1::ExtractResponse response;
  response.set_request_id(request_id);
  response.set_done(true);
  const grpc::Status mapped = ToGrpcStatus(status);
  response.mutable_error()->set_code(static_cast<int32_t>(mapped.error_code()));
  response.mutable_error()->set_message(mapped.error_message());
  return response;
}

}  // namespace sae
