#include "core/sae.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/cpu_backend.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/test_util.h"

namespace sae {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

TEST(HookTest, ParsesLlamaScopeNames) {
  EXPECT_EQ(ParseHookName("L15R")->Name(), "L15R");
  EXPECT_EQ(ParseHookName("L0TC")->site, HookSite::kTranscoderIn);
  EXPECT_EQ(ParseHookName("L31M")->layer, 31);
  EXPECT_FALSE(ParseHookName("L15X").ok());
  EXPECT_FALSE(ParseHookName("R15").ok());
  EXPECT_FALSE(ParseHookName("L").ok());
  EXPECT_EQ(ParseHookPointIn("blocks.18.ln2.hook_normalized")->Name(), "L18TC");
  EXPECT_EQ(ParseHookPointIn("blocks.3.hook_attn_out")->Name(), "L3A");
  EXPECT_FALSE(ParseHookPointIn("blocks.3.hook_resid_pre").ok());
  EXPECT_EQ(SaeNameFromDir("/x/y/L15R-8x/"), "L15R-8x");
}

TEST(SaeTest, LoadsTheDemoSae) {
  auto backend = CreateCpuBackend();
  const std::string dir = testing::Demo().sae_dirs[3];  // L2TC-8x
  auto s = Sae::Load(dir, "", backend.get(), SaeEncodeForm::kSaeLens);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->name(), "L2TC-8x");
  EXPECT_EQ((*s)->hook().Name(), "L2TC");
  const SaeHyperparams& hp = (*s)->hyperparams();
  EXPECT_EQ(hp.hook_point_out, "blocks.2.hook_mlp_out");
  EXPECT_FLOAT_EQ(hp.scale_in(), std::sqrt(64.0f) / hp.avg_norm_in);
  EXPECT_FLOAT_EQ((*s)->encoder().threshold, hp.jump_relu_threshold * hp.scale_in());
  EXPECT_EQ((*s)->encoder().encoder.rows, 512);
}

// The decoder is held feature-major: row i of the loaded tensor is column i
// of decoder.weight on disk, bit for bit, in F32 and BF16, at sizes that are
// not multiples of the loader's 64 x 64 transpose tiles; the lm_saes form's
// feature scale is ||column i|| / s_out.
TEST(SaeTest, LoadsTheDecoderFeatureMajor) {
  auto backend = CreateCpuBackend();
  const int d = 70, d_sae = 130;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    const std::string dir = testing::MakeTempDir("sae-feature-major") + "/L1R-8x";
    fs::create_directories(dir + "/checkpoints");
    nlohmann::json hp;
    std::ifstream(testing::Demo().sae_dirs[0] + "/hyperparams.json") >> hp;
    hp["d_model"] = d;
    hp["d_sae"] = d_sae;
    std::ofstream(dir + "/hyperparams.json") << hp.dump();
    std::vector<float> dec(static_cast<size_t>(d) * d_sae);
    for (size_t j = 0; j < dec.size(); ++j) dec[j] = std::sin(0.37f * static_cast<float>(j)) * 2.0f;
    ASSERT_TRUE(WriteSafetensors(dir + "/checkpoints/final.safetensors",
                                 {MakeTensor("encoder.weight", dtype, {d_sae, d}, std::vector<float>(d_sae * d, 0.5f)),
                                  MakeTensor("encoder.bias", dtype, {d_sae}, std::vector<float>(d_sae, 0.0f)),
                                  MakeTensor("decoder.weight", dtype, {d, d_sae}, dec),
                                  MakeTensor("decoder.bias", dtype, {d}, std::vector<float>(d, 0.0f))})
                    .ok());
    auto store = TensorStore::Open(dir + "/checkpoints/final.safetensors");
    ASSERT_TRUE(store.ok()) << store.status();
    auto disk = (*store)->Get("decoder.weight");
    ASSERT_TRUE(disk.ok());
    auto s = Sae::Load(dir, "", backend.get(), SaeEncodeForm::kLmSaes);
    ASSERT_TRUE(s.ok()) << s.status();
    const Tensor& t = (*s)->decoder().decoder;
    ASSERT_EQ(t.rows, d_sae);
    ASSERT_EQ(t.cols, d);
    ASSERT_EQ(t.dtype, dtype);
    std::vector<char> loaded(t.nbytes());
    ASSERT_TRUE(backend->CopyToHost(t, loaded.data()).ok());
    const size_t es = DTypeSize(dtype);
    const char* on_disk = static_cast<const char*>(disk->data);
    std::vector<float> col(d), scale(d_sae);
    ASSERT_TRUE(backend->CopyToHost((*s)->encoder().feature_scale, scale.data()).ok());
    for (int i = 0; i < d_sae; ++i) {
      double norm2 = 0;
      for (int c = 0; c < d; ++c) {
        const char* want = on_disk + (static_cast<size_t>(c) * d_sae + i) * es;
        ASSERT_EQ(std::memcmp(loaded.data() + (static_cast<size_t>(i) * d + c) * es, want, es), 0)
            << DTypeName(dtype) << " feature " << i << " column " << c;
        float v;
        ConvertToF32(want, dtype, 1, &v);
        norm2 += static_cast<double>(v) * v;
      }
      EXPECT_FLOAT_EQ(scale[i], static_cast<float>(std::sqrt(norm2) / (*s)->hyperparams().scale_out())) << i;
    }
  }
}

class SaeErrorTest : public ::testing::Test {
 protected:
  // A copy of a demo SAE with its hyperparams.json edited by `edit`.
  std::string CopyWith(const std::function<void(nlohmann::json&)>& edit) {
    const std::string dir = testing::MakeTempDir("sae-bad") + "/L1R-8x";
    fs::copy(testing::Demo().sae_dirs[0], dir, fs::copy_options::recursive);
    nlohmann::json hp;
    std::ifstream(dir + "/hyperparams.json") >> hp;
    edit(hp);
    std::ofstream(dir + "/hyperparams.json") << hp.dump();
    return dir;
  }
  absl::Status Load(const std::string& dir) {
    return Sae::Load(dir, "", backend_.get(), SaeEncodeForm::kSaeLens).status();
  }
  std::unique_ptr<Backend> backend_ = CreateCpuBackend();
};

TEST_F(SaeErrorTest, HyperparamErrorsNameTheFileAndField) {
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    const char* field;
  };
  const std::vector<Case> cases = {
      {[](auto& j) { j.erase("d_sae"); }, "\"d_sae\""},
      {[](auto& j) { j["act_fn"] = "relu"; }, "\"act_fn\""},
      {[](auto& j) { j.erase("jump_relu_threshold"); }, "\"jump_relu_threshold\""},
      {[](auto& j) { j["hook_point_in"] = "blocks.1.hook_resid_pre"; }, "\"hook_point_in\""},
      {[](auto& j) { j.erase("dataset_average_activation_norm"); }, "\"dataset_average_activation_norm\""},
      {[](auto& j) { j["dataset_average_activation_norm"]["in"] = 0; }, "\"dataset_average_activation_norm.in\""},
      // Positive doubles that are 0 or inf as floats (no feature, or only biases, would ever fire).
      {[](auto& j) { j["dataset_average_activation_norm"]["in"] = 1e-60; }, "\"dataset_average_activation_norm.in\""},
      {[](auto& j) { j["dataset_average_activation_norm"]["out"] = 1e60; }, "\"dataset_average_activation_norm.out\""},
      {[](auto& j) { j["dataset_average_activation_norm"]["in"] = 1e-40; }, "\"dataset_average_activation_norm.in\""},
      {[](auto& j) { j["jump_relu_threshold"] = 1e300; }, "\"jump_relu_threshold\""},
      // A top_k beyond d_sae made every request allocate [tokens, top_k] on the CPU.
      {[](auto& j) {
         j["act_fn"] = "topk";
         j["top_k"] = 1 << 30;
       },
       "\"top_k\""},
      {[](auto& j) { j["norm_activation"] = "token-wise"; }, "\"norm_activation\""},
      {[](auto& j) { j["d_sae"] = 100; }, "encoder.weight"},
      {[](auto& j) { j["d_model"] = 4294967360; }, "\"d_model\""},  // 2^32 + 64 must not wrap to 64
      {[](auto& j) { j["apply_decoder_bias_to_pre_encoder"] = true; }, "\"apply_decoder_bias_to_pre_encoder\""},
      {[](auto& j) { j["use_decoder_bias"] = false; }, "\"use_decoder_bias\""},
  };
  for (const Case& c : cases) {
    const std::string dir = CopyWith(c.edit);
    absl::Status s = Load(dir);
    ASSERT_FALSE(s.ok()) << c.field;
    EXPECT_THAT(s.message(), HasSubstr(dir)) << c.field;
    EXPECT_THAT(s.message(), HasSubstr(c.field)) << s.message();
  }
}

// A weight stored as integers is refused at load, naming the file, the
// tensor and its dtype (the CPU would compute with the integers; CUDA failed
// every request without saying which SAE).
TEST_F(SaeErrorTest, NonFloatWeightIsNamed) {
  const std::string dir = CopyWith([](auto&) {});
  auto store = TensorStore::Open(dir + "/checkpoints/final.safetensors");
  ASSERT_TRUE(store.ok());
  std::vector<TensorToWrite> kept;
  for (const char* name : {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}) {
    HostTensor t = *(*store)->Get(name);
    if (std::string(name) == "encoder.weight") {
      kept.push_back({name, DType::kI32, t.shape, std::string(static_cast<size_t>(t.numel()) * 4, '\1')});
    } else {
      kept.push_back({name, t.dtype, t.shape, std::string(static_cast<const char*>(t.data), t.nbytes())});
    }
  }
  store->reset();
  ASSERT_TRUE(WriteSafetensors(dir + "/checkpoints/final.safetensors", kept).ok());
  absl::Status s = Load(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("final.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("\"encoder.weight\" has dtype I32"));
}

TEST_F(SaeErrorTest, MissingTensorIsNamed) {
  const std::string dir = CopyWith([](auto&) {});
  auto store = TensorStore::Open(dir + "/checkpoints/final.safetensors");
  ASSERT_TRUE(store.ok());
  std::vector<TensorToWrite> keep;
  for (const char* name : {"encoder.weight", "encoder.bias", "decoder.weight"}) {
    HostTensor t = *(*store)->Get(name);
    keep.push_back({name, t.dtype, t.shape, std::string(static_cast<const char*>(t.data), t.nbytes())});
  }
  store->reset();
  ASSERT_TRUE(WriteSafetensors(dir + "/checkpoints/final.safetensors", keep).ok());
  absl::Status s = Load(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("\"decoder.bias\""));
  EXPECT_THAT(s.message(), HasSubstr("final.safetensors"));
}

}  // namespace
}  // namespace sae
