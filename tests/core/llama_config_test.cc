#include "core/llama_config.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sae {
namespace {

using ::testing::HasSubstr;

// The published Llama-3.1-8B config.json.
constexpr char kLlama31_8B[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})";

TEST(LlamaConfigTest, ParsesLlama31_8B) {
  auto c = LlamaConfig::FromJson(kLlama31_8B, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 14336);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->rope_scaling.rope_type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
}

TEST(LlamaConfigTest, RoundTripsThroughJson) {
  auto c = LlamaConfig::FromJson(kLlama31_8B, "config.json");
  ASSERT_TRUE(c.ok());
  auto again = LlamaConfig::FromJson(c->ToJson(), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(RopeInvFreq(*c), RopeInvFreq(*again));
}

// The llama3 rule applied by hand to three bands of the 8B model's frequencies.
TEST(LlamaConfigTest, Llama3RopeFrequenciesFollowThePublishedRule) {
  auto c = LlamaConfig::FromJson(kLlama31_8B, "config.json");
  ASSERT_TRUE(c.ok());
  const std::vector<float> inv = RopeInvFreq(*c);
  ASSERT_EQ(inv.size(), 64u);
  auto base = [](int j) { return 1.0 / std::pow(500000.0, 2.0 * j / 128.0); };
  // j = 0: wavelength 2*pi < 2048 -> unchanged.
  EXPECT_NEAR(inv[0], 1.0, 1e-7);
  // j = 63: wavelength far above 8192 -> divided by the factor 8.
  EXPECT_NEAR(inv[63], base(63) / 8.0, base(63) * 1e-5);
  // A band in between is smoothed.
  int smoothed = 0;
  for (int j = 0; j < 64; ++j) {
    const double wavelen = 2 * M_PI / base(j);
    if (wavelen >= 2048 && wavelen <= 8192) {
      const double s = (8192.0 / wavelen - 1.0) / 3.0;
      EXPECT_NEAR(inv[j], (1 - s) * base(j) / 8 + s * base(j), base(j) * 1e-5) << j;
      ++smoothed;
    }
  }
  EXPECT_GT(smoothed, 0);
}

TEST(LlamaConfigTest, ErrorsNameTheFileAndTheField) {
  struct Case {
    std::string json;
    const char* field;
  };
  const std::vector<Case> cases = {
      {R"({"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 4})",
       "\"hidden_size\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 3, "vocab_size": 4})",
       "\"num_key_value_heads\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "rope_scaling": {"rope_type": "yarn"}})",
       "\"rope_scaling.rope_type\""},
      {R"({"hidden_size": -8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4})",
       "\"hidden_size\""},
      {R"({"model_type": "mistral"})", "\"model_type\""},
      // llama3 scaling without its factor would silently be plain RoPE.
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})",
       "\"rope_scaling.factor\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "hidden_act": "gelu"})",
       "\"hidden_act\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "hidden_act": 7})",
       "\"hidden_act\""},
      // More heads than hidden units: the derived head_dim is 0.
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 16,
           "vocab_size": 4})",
       "\"head_dim\""},
      // Positive doubles that are 0 or inf as the floats the forward pass uses.
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "rope_theta": 1e300})",
       "\"rope_theta\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "rms_norm_eps": 1e-300})",
       "\"rms_norm_eps\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "bos_token_id": 1099511627776})",
       "\"bos_token_id\""},
      {R"({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 4, "bos_token_id": 4})",
       "\"bos_token_id\""},
  };
  for (const Case& c : cases) {
    auto r = LlamaConfig::FromJson(c.json, "/models/x/config.json");
    ASSERT_FALSE(r.ok()) << c.json;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("/models/x/config.json")) << c.json;
    EXPECT_THAT(r.status().message(), HasSubstr(c.field)) << c.json;
  }
  EXPECT_EQ(LlamaConfig::FromFile("/nonexistent/config.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sae
