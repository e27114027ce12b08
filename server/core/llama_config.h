// Hugging Face config.json of a Llama model, and the llama3 RoPE frequencies.
#ifndef SAE_CORE_LLAMA_CONFIG_H_
#define SAE_CORE_LLAMA_CONFIG_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sae {

struct RopeScaling {
  std::string rope_type;  // "llama3" or "" (none)
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  int max_position_embeddings = 0;
  std::optional<int> bos_token_id;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;

  // Parses and validates; errors name the file and the field.
  static absl::StatusOr<LlamaConfig> FromFile(const std::string& path);
  static absl::StatusOr<LlamaConfig> FromJson(const std::string& text, const std::string& origin);
  std::string ToJson() const;
};

// inv_freq[j] = theta^(-2j/head_dim), adjusted by llama3 scaling when configured.
// Computed in float32 as Hugging Face does; angles are pos * inv_freq in fp32.
std::vector<float> RopeInvFreq(const LlamaConfig& config);

}  // namespace sae

#endif  // SAE_CORE_LLAMA_CONFIG_H_
