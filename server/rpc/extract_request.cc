#include "rpc/extract_request.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "rpc/status_map.h"

namespace sae {

namespace {

// min_activation, watch lists, omit_* and reconstruction_error; needs the SAEs resolved.
absl::Status PrepareOptions(const Engine& engine, const v1::ExtractRequest& request, PreparedRequest* p) {
  const float min_activation = request.min_activation();
  if (!std::isfinite(min_activation) || min_activation < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_activation must be a finite number >= 0, got ", min_activation));
  }
  p->sequence.min_activation = min_activation;
  p->omit_pieces = request.omit_pieces();
  p->omit_offsets = request.omit_offsets();

  if (!request.watch().empty()) p->sequence.watch.assign(p->sae_names.size(), {});
  std::vector<int> watched_by(p->sae_names.size(), -1);  // slot -> index into request.watch
  for (int w = 0; w < request.watch_size(); ++w) {
    const v1::FeatureWatch& watch = request.watch(w);
    const std::string& name = watch.sae();
    const auto it = std::find(p->sae_names.begin(), p->sae_names.end(), name);
    if (it == p->sae_names.end()) {
      absl::StatusOr<int> loaded = engine.FindSae(name);
      if (!loaded.ok())
        return absl::InvalidArgumentError(absl::StrCat("watch[", w, "].sae: ", loaded.status().message()));
      return absl::InvalidArgumentError(
          absl::StrCat("watch[", w, "].sae \"", name, "\" is not one of the requested saes"));
    }
    const size_t slot = static_cast<size_t>(it - p->sae_names.begin());
    if (watched_by[slot] >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("watch[", w, "] names SAE \"", name, "\" again (already in watch[", watched_by[slot], "])"));
    }
    watched_by[slot] = w;
    if (watch.features().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("watch[", w, "] (SAE \"", name, "\") lists no features"));
    }
    if (watch.features_size() > kMaxWatchedFeaturesPerSae) {
      return absl::InvalidArgumentError(absl::StrCat("watch[", w, "] (SAE \"", name, "\") lists ",
                                                     watch.features_size(), " features; at most ",
                                                     kMaxWatchedFeaturesPerSae, " per SAE"));
    }
    const int d_sae = engine.saes()[p->sequence.sae_indices[slot]]->hyperparams().d_sae;
    absl::flat_hash_set<uint32_t> seen;
    std::vector<int32_t>& out = p->sequence.watch[slot];
    for (int f = 0; f < watch.features_size(); ++f) {
      const uint32_t feature = watch.features(f);
      if (feature >= static_cast<uint32_t>(d_sae)) {
        return absl::InvalidArgumentError(absl::StrCat("watch[", w, "].features[", f, "] = ", feature,
                                                       " is out of range for SAE \"", name, "\" (d_sae ", d_sae, ")"));
      }
      if (!seen.insert(feature).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("watch[", w, "].features[", f, "] = ", feature, " is listed twice"));
      }
      out.push_back(static_cast<int32_t>(feature));
    }
  }

  p->sequence.reconstruction_error = request.reconstruction_error();
  if (request.reconstruction_error()) {
    for (int si : p->sequence.sae_indices) {
      const absl::Status& st = engine.saes()[si]->reconstruction_status();
      if (!st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("reconstruction_error is not available for SAE \"",
                                                       engine.saes()[si]->name(), "\": ", st.message()));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

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
  RETURN_IF_ERROR(PrepareOptions(engine, request, &p));
  p.chunk_tokens = request.chunk_tokens() == 0 ? limits.chunk_tokens
                                               : static_cast<int>(std::min<uint32_t>(request.chunk_tokens(), 1u << 30));

  if (request.input_case() == v1::ExtractRequest::kText) {
    const bool add_bos = request.has_add_bos() ? request.add_bos() : true;
    // A text certainly over the limit is refused before the tokenizer spends
    // time on it (a gRPC thread would, up to ~1 s for 4 MB).
    const size_t max_token_bytes = std::max<size_t>(1, engine.tokenizer().max_token_bytes());
    if (request.text().size() > static_cast<size_t>(limits.max_tokens_per_request) * max_token_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("the text has ", request.text().size(), " bytes, more than ",
                                                     limits.max_tokens_per_request, " tokens of at most ",
                                                     max_token_bytes, " bytes each cover; max_tokens_per_request is ",
                                                     limits.max_tokens_per_request));
    }
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
    if (!request.omit_pieces) tf->set_piece(tokenizer.TokenPiece(id));
    if (!request.omit_offsets) {
      tf->set_char_start(request.offsets[t].first);
      tf->set_char_end(request.offsets[t].second);
    }
    for (size_t j = 0; j < request.sae_names.size(); ++j) {
      v1::SaeFeatures* sf = tf->add_saes();
      sf->set_sae(request.sae_names[j]);
      if (j >= result.saes.size()) continue;
      const SaeTopK& top = result.saes[j];
      // NaN marks positions without one (BOS unless include_bos).
      if (static_cast<size_t>(t) < top.reconstruction_error.size() && !std::isnan(top.reconstruction_error[t])) {
        sf->set_reconstruction_error(top.reconstruction_error[t]);
      }
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
