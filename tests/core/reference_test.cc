// Cross-checks the C++ forward pass and SAE encoders against the independent
// float64 PyTorch reference in tests/reference/llama_reference.py (written
// from the published formulas), on the demo model with every demo SAE.
#include <cmath>
#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/engine.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/test_util.h"

namespace sae {
namespace {

struct Reference {
  std::unique_ptr<TensorStore> store;
  std::vector<float> Get(const std::string& name) const {
    auto t = store->Get(name);
    EXPECT_TRUE(t.ok()) << t.status();
    std::vector<float> v(t->numel());
    ConvertToF32(t->data, t->dtype, v.size(), v.data());
    return v;
  }
};

class ReferenceTest : public ::testing::TestWithParam<SaeEncodeForm> {
 protected:
  void SetUp() override {
    const DemoLayout& demo = testing::Demo();
    EngineOptions o = EngineOptionsForDemo(demo);
    o.encode_form = GetParam();
    auto e = Engine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = *std::move(e);

    const std::vector<std::string> texts = {
        "The cat sat on the red mat in Paris.",
        "Two dogs and three birds flew from London to Rome, and the green fish swam.", "x",
        "Numbers: one two three four five six seven; colours: blue yellow black white."};
    const std::string dir = testing::MakeTempDir(GetParam() == SaeEncodeForm::kSaeLens ? "ref-sl" : "ref-lm");
    std::ofstream in(dir + "/in.jsonl");
    for (const auto& t : texts) {
      ids_.push_back(engine_->tokenizer().Encode(t, true)->ids);
      in << nlohmann::json{{"token_ids", ids_.back()}}.dump() << "\n";
    }
    in.close();
    std::string cmd = absl::StrCat(SAE_PYTHON, " ", SAE_REFERENCE_SCRIPT, " --model ", demo.model_dir, " --input ", dir,
                                   "/in.jsonl --output ", dir, "/ref.safetensors");
    for (const auto& d : demo.sae_dirs) absl::StrAppend(&cmd, " --sae ", d);
    if (GetParam() == SaeEncodeForm::kLmSaes) cmd += " --lm-saes-form";
    cmd += " --recon-err";  // sae.<name>.recon_err.<i>, for ReconstructionErrorMatches
    // The reference is part of the evidence: a missing python3-torch fails the test.
    ASSERT_EQ(std::system(cmd.c_str()), 0)
        << "reference failed: " << cmd << "\n(needs Debian's python3-torch: apt-get install python3-torch)";
    auto store = TensorStore::Open(dir + "/ref.safetensors");
    ASSERT_TRUE(store.ok()) << store.status();
    ref_.store = *std::move(store);
  }

  // Sequence i of the test texts, asking every SAE for k features.
  SequenceRequest AllSaes(size_t i, int k) const {
    SequenceRequest r;
    r.ids = ids_[i];
    for (size_t s = 0; s < engine_->saes().size(); ++s) r.sae_indices.push_back(static_cast<int>(s));
    r.k = k;
    return r;
  }

  std::unique_ptr<Engine> engine_;
  std::vector<std::vector<int32_t>> ids_;
  Reference ref_;
};

TEST_P(ReferenceTest, HooksMatch) {
  for (size_t i = 0; i < ids_.size(); ++i) {
    SequenceRequest r = AllSaes(i, 1);
    r.capture_hooks = true;
    auto res = engine_->Run({r});
    ASSERT_TRUE(res.ok()) << res.status();
    ASSERT_EQ((*res)[0].hooks.size(), engine_->saes().size());
    for (const auto& [name, got] : (*res)[0].hooks) {
      const std::vector<float> want = ref_.Get(absl::StrCat("hook.", name, ".", i));
      ASSERT_EQ(got.size(), want.size()) << name;
      double max_err = 0, max_ref = 0;
      for (size_t j = 0; j < got.size(); ++j) {
        max_err = std::max(max_err, std::abs(static_cast<double>(got[j]) - want[j]));
        max_ref = std::max(max_ref, std::abs(static_cast<double>(want[j])));
      }
      // fp32 forward with bf16 weights vs a float64 forward with the same weights.
      EXPECT_LE(max_err, 1e-4 * std::max(1.0, max_ref)) << name << " sequence " << i;
    }
  }
}

TEST_P(ReferenceTest, FeaturesMatch) {
  const int k = 64;
  std::vector<SequenceRequest> batch;
  for (size_t i = 0; i < ids_.size(); ++i) batch.push_back(AllSaes(i, k));
  auto res = engine_->Run(batch);
  ASSERT_TRUE(res.ok()) << res.status();
  int compared = 0;
  for (size_t i = 0; i < ids_.size(); ++i) {
    for (size_t s = 0; s < engine_->saes().size(); ++s) {
      const Sae& sae = *engine_->saes()[s];
      const int d_sae = sae.hyperparams().d_sae;
      const std::vector<float> f = ref_.Get(absl::StrCat("sae.", sae.name(), ".f.", i));
      const std::vector<float> pre = ref_.Get(absl::StrCat("sae.", sae.name(), ".pre.", i));
      const SaeTopK& got = (*res)[i].saes[s];
      const float thr = sae.encoder().threshold;
      for (size_t t = 1; t < ids_[i].size(); ++t) {  // position 0 is BOS, excluded by default
        const float* ft = f.data() + t * d_sae;
        const float* pt = pre.data() + t * d_sae;
        // Reference top-k, skipping features within float noise of the threshold.
        std::vector<std::pair<float, int>> want;
        for (int j = 0; j < d_sae; ++j)
          if (ft[j] > 0) want.emplace_back(ft[j], j);
        std::sort(want.begin(), want.end(), [](auto& a, auto& b) { return a.first > b.first; });
        std::map<int, float> got_map;
        for (int j = 0; j < got.n_active(static_cast<int>(t)); ++j)
          got_map[got.indices[t * k + j]] = got.values[t * k + j];
        for (const auto& [idx, val] : got_map) {
          EXPECT_NEAR(val, pt[idx], 1e-3 * (1 + std::abs(pt[idx]))) << sae.name() << " seq " << i << " token " << t;
          EXPECT_GT(pt[idx], thr - 1e-3 * (1 + std::abs(thr))) << sae.name() << " feature " << idx;
        }
        for (size_t j = 0; j < want.size() && j < static_cast<size_t>(k); ++j) {
          const int idx = want[j].second;
          if (std::abs(pt[idx] - thr) < 1e-3 * (1 + std::abs(thr))) continue;  // a legitimate flip
          EXPECT_TRUE(got_map.count(idx)) << sae.name() << " seq " << i << " token " << t << " misses feature " << idx;
          ++compared;
        }
      }
    }
  }
  EXPECT_GT(compared, 50);
}

// Per-token reconstruction error (form B, all active features, transcoders
// against the MLP output) vs the float64 reference's sae.<name>.recon_err.<i>.
TEST_P(ReferenceTest, ReconstructionErrorMatches) {
  std::vector<SequenceRequest> batch;
  for (size_t i = 0; i < ids_.size(); ++i) {
    batch.push_back(AllSaes(i, 1));
    batch.back().reconstruction_error = true;
  }
  auto res = engine_->Run(batch);
  ASSERT_TRUE(res.ok()) << res.status();
  int compared = 0;
  for (size_t i = 0; i < ids_.size(); ++i) {
    for (size_t s = 0; s < engine_->saes().size(); ++s) {
      const Sae& sae = *engine_->saes()[s];
      const int d_sae = sae.hyperparams().d_sae;
      const std::vector<float> want = ref_.Get(absl::StrCat("sae.", sae.name(), ".recon_err.", i));
      const std::vector<float> pre = ref_.Get(absl::StrCat("sae.", sae.name(), ".pre.", i));
      const std::vector<float>& got = (*res)[i].saes[s].reconstruction_error;
      ASSERT_EQ(got.size(), ids_[i].size()) << sae.name();
      ASSERT_EQ(want.size(), ids_[i].size()) << sae.name();
      EXPECT_TRUE(std::isnan(got[0])) << sae.name() << ": BOS is excluded by default";
      const float thr = sae.encoder().threshold;
      for (size_t t = 1; t < ids_[i].size(); ++t) {
        // One feature within float noise of the threshold may legitimately flip and move y_hat.
        bool near_threshold = false;
        for (int j = 0; j < d_sae; ++j)
          near_threshold |= std::abs(pre[t * d_sae + j] - thr) < 1e-3 * (1 + std::abs(thr));
        if (near_threshold) continue;
        EXPECT_NEAR(got[t], want[t], 1e-3 * (1 + std::abs(want[t]))) << sae.name() << " seq " << i << " token " << t;
        ++compared;
      }
    }
  }
  EXPECT_GT(compared, 50);
}

INSTANTIATE_TEST_SUITE_P(Forms, ReferenceTest, ::testing::Values(SaeEncodeForm::kSaeLens, SaeEncodeForm::kLmSaes),
                         [](const auto& info) { return info.param == SaeEncodeForm::kSaeLens ? "SaeLens" : "LmSaes"; });

}  // namespace
}  // namespace sae
