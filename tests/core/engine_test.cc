#include "core/engine.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/test_util.h"

namespace sae {
namespace {

using ::testing::HasSubstr;

EngineOptions DemoOptions(SaeEncodeForm form = SaeEncodeForm::kSaeLens) {
  const DemoLayout& demo = testing::Demo();
  EngineOptions o;
  o.model_dir = demo.model_dir;
  for (const auto& d : demo.sae_dirs) o.saes.push_back({d, ""});
  o.encode_form = form;
  return o;
}

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto e = Engine::Create(DemoOptions());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = e->release();
  }
  static void TearDownTestSuite() { delete engine_; }

  std::vector<int32_t> Ids(const std::string& text) {
    auto enc = engine_->tokenizer().Encode(text, true);
    EXPECT_TRUE(enc.ok());
    return enc->ids;
  }
  SequenceRequest Request(const std::string& text, int k = 8) {
    SequenceRequest r;
    r.ids = Ids(text);
    for (size_t i = 0; i < engine_->saes().size(); ++i) r.sae_indices.push_back(static_cast<int>(i));
    r.k = k;
    return r;
  }
  static Engine* engine_;
};
Engine* EngineTest::engine_ = nullptr;

TEST_F(EngineTest, LoadsTheDemoSaes) {
  std::vector<std::string> names;
  for (const auto& s : engine_->saes()) names.push_back(s->name());
  EXPECT_THAT(names, ::testing::ElementsAre("L1R-8x", "L2A-8x", "L2M-8x", "L2TC-8x", "L3R-32x"));
  EXPECT_EQ(engine_->saes()[4]->hyperparams().d_sae, 64 * 32);
  EXPECT_EQ(engine_->saes()[3]->hook().site, HookSite::kTranscoderIn);
  auto missing = engine_->FindSae("L9R-8x");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("L1R-8x"));
}

TEST_F(EngineTest, ConceptFeaturesFireOnTheirTokens) {
  const DemoLayout& demo = testing::Demo();
  ASSERT_GE(demo.concepts.size(), 3u);
  const std::string text = " The" + demo.concepts[0].words[0] + " and the" + demo.concepts[1].words[0] + " house in" +
                           demo.concepts[2].words[0] + ".";
  SequenceRequest r = Request(text, 5);
  auto results = engine_->Run({r});
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t c = 0; c < 3; ++c) {
    const auto& concept_def = demo.concepts[c];
    auto id = engine_->tokenizer().Encode(concept_def.words[0], false);
    ASSERT_TRUE(id.ok());
    const auto pos = std::find(r.ids.begin(), r.ids.end(), id->ids[0]) - r.ids.begin();
    ASSERT_LT(pos, static_cast<long>(r.ids.size()));
    // The residual-stream SAE right after layer 1 puts the concept first.
    const SaeTopK& l1r = (*results)[0].saes[0];
    EXPECT_EQ(l1r.indices[pos * l1r.k], concept_def.feature) << concept_def.label;
  }
}

TEST_F(EngineTest, BatchInvariance) {
  const std::vector<std::string> texts = {"The cat sat on the mat.", "Paris is big.",
                                          "One two three four five six seven eight nine ten, the dog ran."};
  std::vector<SequenceResult> alone;
  for (const auto& t : texts) {
    auto r = engine_->Run({Request(t)});
    ASSERT_TRUE(r.ok());
    alone.push_back((*r)[0]);
  }
  // Mixed batch, different order, one request with a subset of SAEs and a different k.
  std::vector<SequenceRequest> batch = {Request(texts[2]), Request(texts[0]), Request(texts[1])};
  batch[2].sae_indices = {4, 0};
  batch[2].k = 3;
  auto mixed = engine_->Run(batch);
  ASSERT_TRUE(mixed.ok());
  auto expect_same = [](const SaeTopK& a, const SaeTopK& b, int k) {
    const int n = static_cast<int>(a.indices.size()) / a.k;
    for (int t = 0; t < n; ++t)
      for (int j = 0; j < k; ++j) {
        EXPECT_EQ(a.indices[t * a.k + j], b.indices[t * b.k + j]) << "token " << t << " slot " << j;
        EXPECT_NEAR(a.values[t * a.k + j], b.values[t * b.k + j], 1e-5f * (1 + std::abs(a.values[t * a.k + j])));
      }
  };
  for (size_t s = 0; s < engine_->saes().size(); ++s) {
    expect_same(alone[2].saes[s], (*mixed)[0].saes[s], 8);
    expect_same(alone[0].saes[s], (*mixed)[1].saes[s], 8);
  }
  expect_same(alone[1].saes[4], (*mixed)[2].saes[0], 3);
  expect_same(alone[1].saes[0], (*mixed)[2].saes[1], 3);
}

TEST_F(EngineTest, BosCarriesNoFeaturesUnlessAsked) {
  SequenceRequest r = Request("The dog.");
  ASSERT_EQ(r.ids[0], *engine_->tokenizer().bos_id());
  auto without = engine_->Run({r});
  ASSERT_TRUE(without.ok());
  for (const auto& s : (*without)[0].saes) EXPECT_EQ(s.n_active(0), 0);
  r.include_bos = true;
  auto with = engine_->Run({r});
  ASSERT_TRUE(with.ok());
  int active = 0;
  for (const auto& s : (*with)[0].saes) active += s.n_active(0);
  EXPECT_GT(active, 0);
}

TEST_F(EngineTest, RejectsBadTokenIds) {
  SequenceRequest r = Request("x");
  r.ids.push_back(engine_->model_config().vocab_size);
  auto res = engine_->Run({r});
  EXPECT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(res.status().message(), HasSubstr("outside the vocabulary"));
  r.ids.back() = -1;
  EXPECT_EQ(engine_->Run({r}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, CapturesHooks) {
  SequenceRequest r = Request("The cat.");
  r.sae_indices = {0, 3};
  r.capture_hooks = true;
  auto res = engine_->Run({r});
  ASSERT_TRUE(res.ok());
  const auto& hooks = (*res)[0].hooks;
  ASSERT_EQ(hooks.size(), 2u);
  EXPECT_EQ(hooks.at("L1R").size(), r.ids.size() * 64);
  // The transcoder input is RMS-normalised without a weight: mean square 1.
  const auto& tc = hooks.at("L2TC");
  for (size_t t = 0; t < r.ids.size(); ++t) {
    double ss = 0;
    for (int c = 0; c < 64; ++c) ss += tc[t * 64 + c] * tc[t * 64 + c];
    EXPECT_NEAR(ss / 64, 1.0, 1e-3);
  }
}

TEST(EngineLoadTest, LoadsOnlyTheLayersItNeeds) {
  EngineOptions o = DemoOptions();
  o.saes = {{testing::Demo().sae_dirs[0], "first"}};  // L1R
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->n_layers_loaded(), 2);
  EXPECT_EQ((*e)->saes()[0]->name(), "first");
}

TEST(EngineLoadTest, DuplicateSaeNamesAreAnError) {
  EngineOptions o = DemoOptions();
  o.saes = {{testing::Demo().sae_dirs[0], ""}, {testing::Demo().sae_dirs[0], ""}};
  auto e = Engine::Create(o);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(e.status().message(), HasSubstr("alias"));
}

TEST(EngineLoadTest, UnknownBackendIsAnError) {
  EngineOptions o = DemoOptions();
  o.backend = "tpu";
  EXPECT_THAT(Engine::Create(o).status().message(), HasSubstr("unknown backend"));
}

// lm_saes form: value = ||d_i|| * h / s_out, compared with theta directly.
TEST(EngineLoadTest, LmSaesFormScalesByDecoderNormOverScaleOut) {
  auto sl = Engine::Create(DemoOptions(SaeEncodeForm::kSaeLens));
  auto lm = Engine::Create(DemoOptions(SaeEncodeForm::kLmSaes));
  ASSERT_TRUE(sl.ok() && lm.ok());
  SequenceRequest r;
  r.ids = (*sl)->tokenizer().Encode("The red cat in Rome.", true)->ids;
  r.sae_indices = {0};
  r.k = 512;
  auto a = (*sl)->Run({r});
  auto b = (*lm)->Run({r});
  ASSERT_TRUE(a.ok() && b.ok());
  const SaeHyperparams& hp = (*sl)->saes()[0]->hyperparams();
  const float s_out = hp.scale_out();
  int compared = 0;
  for (size_t t = 1; t < r.ids.size(); ++t) {
    std::map<int, float> lm_vals;
    for (int j = 0; j < r.k; ++j)
      if ((*b)[0].saes[0].indices[t * r.k + j] >= 0)
        lm_vals[(*b)[0].saes[0].indices[t * r.k + j]] = (*b)[0].saes[0].values[t * r.k + j];
    for (int j = 0; j < r.k; ++j) {
      const int idx = (*a)[0].saes[0].indices[t * r.k + j];
      if (idx < 0) break;
      const float v = (*a)[0].saes[0].values[t * r.k + j];
      // Demo decoder columns have unit norm (bf16-rounded).
      if (v / s_out > hp.jump_relu_threshold * 1.01f) {
        ASSERT_TRUE(lm_vals.count(idx)) << "token " << t << " feature " << idx;
        EXPECT_NEAR(lm_vals[idx], v / s_out, 1e-2f * std::abs(v / s_out));
        ++compared;
      }
    }
  }
  EXPECT_GT(compared, 0);
}

}  // namespace
}  // namespace sae
