#include "core/llama_config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sae {
namespace {

using json = nlohmann::json;

absl::Status FieldError(const std::string& origin, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": field \"", field, "\": ", what));
}

absl::Status GetInt(const json& j, const std::string& origin, const char* field, bool required, int* out) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    return required ? FieldError(origin, field, "missing") : absl::OkStatus();
  }
  if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > (1ll << 30)) {
    return FieldError(origin, field, "must be a positive integer");
  }
  *out = it->get<int>();
  return absl::OkStatus();
}

absl::Status GetDouble(const json& j, const std::string& origin, const char* field, double* out) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  // The forward pass uses it as a float: 1e-300 or 1e300 would become 0 or inf there.
  const float as_float = it->is_number() ? it->get<float>() : 0.0f;
  if (!(std::isfinite(as_float) && as_float > 0)) {
    return FieldError(origin, field, "must be a positive number in float range");
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaConfig> LlamaConfig::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
  return FromJson(text, path);
}

absl::StatusOr<LlamaConfig> LlamaConfig::FromJson(const std::string& text, const std::string& origin) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(origin, ": not a JSON object"));
  LlamaConfig c;
  if (auto it = j.find("model_type"); it != j.end() && (!it->is_string() || it->get<std::string>() != "llama")) {
    return FieldError(origin, "model_type", absl::StrCat("must be \"llama\", got ", it->dump()));
  }
  RETURN_IF_ERROR(GetInt(j, origin, "hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(GetInt(j, origin, "intermediate_size", true, &c.intermediate_size));
  RETURN_IF_ERROR(GetInt(j, origin, "num_hidden_layers", true, &c.num_hidden_layers));
  RETURN_IF_ERROR(GetInt(j, origin, "num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(GetInt(j, origin, "num_key_value_heads", false, &c.num_key_value_heads));
  RETURN_IF_ERROR(GetInt(j, origin, "vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(GetInt(j, origin, "max_position_embeddings", false, &c.max_position_embeddings));
  c.head_dim = c.hidden_size / c.num_attention_heads;
  RETURN_IF_ERROR(GetInt(j, origin, "head_dim", false, &c.head_dim));
  if (c.head_dim == 0) {  // derived: more heads than hidden units
    return FieldError(origin, "head_dim",
                      absl::StrCat("missing, and hidden_size / num_attention_heads (", c.hidden_size, " / ",
                                   c.num_attention_heads, ") is 0"));
  }
  RETURN_IF_ERROR(GetDouble(j, origin, "rms_norm_eps", &c.rms_norm_eps));
  RETURN_IF_ERROR(GetDouble(j, origin, "rope_theta", &c.rope_theta));
  if (auto it = j.find("bos_token_id"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() >= c.vocab_size) {
      return FieldError(origin, "bos_token_id",
                        absl::StrCat("must be a token id below vocab_size (", c.vocab_size, "), got ", it->dump()));
    }
    c.bos_token_id = it->get<int>();
  }
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && it->is_boolean())
    c.tie_word_embeddings = it->get<bool>();
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return FieldError(
        origin, "num_key_value_heads",
        absl::StrCat(c.num_key_value_heads, " does not divide num_attention_heads ", c.num_attention_heads));
  }
  if (c.head_dim % 2 != 0) return FieldError(origin, "head_dim", "must be even for RoPE");
  if (auto it = j.find("hidden_act"); it != j.end() && !(it->is_string() && it->get<std::string>() == "silu")) {
    return FieldError(origin, "hidden_act", absl::StrCat("only \"silu\" is supported, got ", it->dump()));
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return FieldError(origin, "rope_scaling", "must be an object or null");
    const json& rs = *it;
    auto type = rs.find("rope_type");
    if (type == rs.end()) type = rs.find("type");
    if (type == rs.end() || !type->is_string()) return FieldError(origin, "rope_scaling.rope_type", "missing");
    c.rope_scaling.rope_type = type->get<std::string>();
    if (c.rope_scaling.rope_type == "default") {
      c.rope_scaling.rope_type.clear();
    } else if (c.rope_scaling.rope_type != "llama3") {
      return FieldError(origin, "rope_scaling.rope_type",
                        absl::StrCat("only \"llama3\" is supported, got \"", c.rope_scaling.rope_type, "\""));
    } else {
      // All four are required, as in transformers: a missing factor would silently mean plain RoPE.
      for (const char* field : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
        if (!rs.contains(field) || rs[field].is_null()) {
          return FieldError(origin, absl::StrCat("rope_scaling.", field), "missing (required for rope_type llama3)");
        }
      }
      RETURN_IF_ERROR(GetDouble(rs, origin + " rope_scaling", "factor", &c.rope_scaling.factor));
      RETURN_IF_ERROR(GetDouble(rs, origin + " rope_scaling", "low_freq_factor", &c.rope_scaling.low_freq_factor));
      RETURN_IF_ERROR(GetDouble(rs, origin + " rope_scaling", "high_freq_factor", &c.rope_scaling.high_freq_factor));
      RETURN_IF_ERROR(GetInt(rs, origin + " rope_scaling", "original_max_position_embeddings", false,
                             &c.rope_scaling.original_max_position_embeddings));
      if (!(c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor)) {
        return FieldError(origin, "rope_scaling.high_freq_factor", "must exceed low_freq_factor");
      }
    }
  }
  return c;
}

std::string LlamaConfig::ToJson() const {
  json j = {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"hidden_act", "silu"},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_key_value_heads", num_key_value_heads},
            {"head_dim", head_dim},
            {"vocab_size", vocab_size},
            {"rms_norm_eps", rms_norm_eps},
            {"rope_theta", rope_theta},
            {"max_position_embeddings", max_position_embeddings},
            {"tie_word_embeddings", tie_word_embeddings},
            {"torch_dtype", "bfloat16"}};
  if (bos_token_id) j["bos_token_id"] = *bos_token_id;
  if (rope_scaling.rope_type == "llama3") {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling.factor},
                         {"low_freq_factor", rope_scaling.low_freq_factor},
                         {"high_freq_factor", rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  }
  return j.dump(2);
}

std::vector<float> RopeInvFreq(const LlamaConfig& c) {
  // Every step in float32 and in the order Hugging Face's
  // _compute_llama3_parameters uses, so the frequencies match HF's to the ulp.
  const int half = c.head_dim / 2;
  std::vector<float> inv(half);
  const RopeScaling& rs = c.rope_scaling;
  const float factor = static_cast<float>(rs.factor);
  const float low = static_cast<float>(rs.low_freq_factor);
  const float high = static_cast<float>(rs.high_freq_factor);
  const float old_ctx = static_cast<float>(rs.original_max_position_embeddings);
  const float low_freq_wavelen = old_ctx / low;
  const float high_freq_wavelen = old_ctx / high;
  for (int j = 0; j < half; ++j) {
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(c.head_dim);
    float f = 1.0f / std::pow(static_cast<float>(c.rope_theta), exponent);
    if (rs.rope_type == "llama3") {
      const float wavelen = static_cast<float>(2.0 * M_PI) / f;
      if (wavelen > low_freq_wavelen) {
        f = f / factor;
      } else if (!(wavelen < high_freq_wavelen)) {
        const float smooth = (old_ctx / wavelen - low) / (high - low);
        f = (1.0f - smooth) * f / factor + smooth * f;
      }
    }
    inv[j] = f;
  }
  return inv;
}

}  // namespace sae
