#include "core/sae.h"

#include <cmath>
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
      {[](auto& j) { j["norm_activation"] = "token-wise"; }, "\"norm_activation\""},
      {[](auto& j) { j["d_sae"] = 100; }, "encoder.weight"},
  };
  for (const Case& c : cases) {
    const std::string dir = CopyWith(c.edit);
    absl::Status s = Load(dir);
    ASSERT_FALSE(s.ok()) << c.field;
    EXPECT_THAT(s.message(), HasSubstr(dir)) << c.field;
    EXPECT_THAT(s.message(), HasSubstr(c.field)) << s.message();
  }
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
