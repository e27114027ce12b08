#include "core/engine.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>

#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/test_util.h"

namespace sae {
namespace {

using ::testing::HasSubstr;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto e = Engine::Create(testing::DemoEngineOptions());
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
    r.sae_indices = engine_->all_sae_indices();
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
        EXPECT_EQ(a.values[t * a.k + j], b.values[t * b.k + j]);  // bit for bit
      }
  };
  for (size_t s = 0; s < engine_->saes().size(); ++s) {
    expect_same(alone[2].saes[s], (*mixed)[0].saes[s], 8);
    expect_same(alone[0].saes[s], (*mixed)[1].saes[s], 8);
  }
  expect_same(alone[1].saes[4], (*mixed)[2].saes[0], 3);
  expect_same(alone[1].saes[0], (*mixed)[2].saes[1], 3);
}

// Each SAE's top-k runs on the rows of the requests that asked for it only
// (in runs of adjacent requests), not on the whole batch, with the same
// results bit for bit as each request alone.
TEST_F(EngineTest, SaeTopKRunsOnlyOnTheRowsThatAskForIt) {
  std::vector<SequenceRequest> batch = {Request("The cat sat on the mat."), Request("Paris is big."),
                                        Request("One two three, the dog ran.")};
  batch[0].sae_indices = {0};
  batch[1].sae_indices = {4};
  batch[2].sae_indices = {4, 0};
  auto mixed = engine_->Run(batch);
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  const int64_t n0 = static_cast<int64_t>(batch[0].ids.size()), n1 = static_cast<int64_t>(batch[1].ids.size()),
                n2 = static_cast<int64_t>(batch[2].ids.size());
  // SAE 0: requests 0 and 2 (two runs); SAE 4: requests 1 and 2 (one run).
  EXPECT_EQ(engine_->last_run_timing().sae_topk_rows, (n0 + n2) + (n1 + n2));
  for (size_t i = 0; i < batch.size(); ++i) {
    auto alone = engine_->Run({batch[i]});
    ASSERT_TRUE(alone.ok()) << alone.status();
    for (size_t j = 0; j < batch[i].sae_indices.size(); ++j) {
      EXPECT_EQ((*alone)[0].saes[j].indices, (*mixed)[i].saes[j].indices) << "request " << i << " slot " << j;
      EXPECT_EQ((*alone)[0].saes[j].values, (*mixed)[i].saes[j].values) << "request " << i << " slot " << j;
    }
  }
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

// ---- per-request options: min_activation, watch lists, reconstruction error ----

// (index, value) of token t's reported features.
std::vector<std::pair<int32_t, float>> Reported(const SaeTopK& s, int t) {
  std::vector<std::pair<int32_t, float>> out;
  for (int j = 0; j < s.n_active(t); ++j) out.emplace_back(s.indices[t * s.k + j], s.values[t * s.k + j]);
  return out;
}

TEST_F(EngineTest, MinActivationDropsOnlyFeaturesBelowIt) {
  SequenceRequest r = Request("The red cat and the dog in Paris.", 16);
  auto all = engine_->Run({r});
  ASSERT_TRUE(all.ok()) << all.status();
  // A cut inside the observed range, equal to one reported value (which must survive).
  const SaeTopK& l1r = (*all)[0].saes[0];
  std::vector<float> vals;
  for (size_t t = 0; t < r.ids.size(); ++t)
    for (const auto& [i, v] : Reported(l1r, static_cast<int>(t))) vals.push_back(v);
  ASSERT_GT(vals.size(), 4u);
  std::sort(vals.begin(), vals.end());
  r.min_activation = vals[vals.size() / 2];
  auto cut = engine_->Run({r});
  ASSERT_TRUE(cut.ok()) << cut.status();
  int dropped = 0, kept = 0;
  for (size_t s = 0; s < engine_->saes().size(); ++s) {
    for (int t = 0; t < static_cast<int>(r.ids.size()); ++t) {
      std::vector<std::pair<int32_t, float>> want;
      for (const auto& f : Reported((*all)[0].saes[s], t)) {
        if (f.second >= r.min_activation) {
          want.push_back(f);
        } else {
          ++dropped;
        }
      }
      EXPECT_EQ(Reported((*cut)[0].saes[s], t), want) << "sae " << s << " token " << t;
      kept += static_cast<int>(want.size());
    }
  }
  EXPECT_GT(dropped, 0);
  EXPECT_GT(kept, 0);
}

TEST_F(EngineTest, WatchListReportsWatchedFeaturesOutsideTheGlobalTopK) {
  SequenceRequest full = Request("The red cat and the green dog flew to Rome and Paris.", 512);
  full.sae_indices = {0, 4};  // L1R-8x (d_sae 512), L3R-32x (d_sae 2048)
  auto all = engine_->Run({full});
  ASSERT_TRUE(all.ok()) << all.status();
  // Watch, for L1R only, features that fire somewhere but never rank first, plus some that never fire.
  const SaeTopK& every = (*all)[0].saes[0];
  std::set<int32_t> firing, first;
  for (int t = 0; t < static_cast<int>(full.ids.size()); ++t) {
    const auto rep = Reported(every, t);
    for (const auto& f : rep) firing.insert(f.first);
    if (!rep.empty()) first.insert(rep[0].first);
  }
  std::vector<int32_t> watch;
  for (int32_t f : firing)
    if (!first.count(f) && watch.size() < 12) watch.push_back(f);
  for (int32_t f = 0; f < 512 && watch.size() < 20; ++f)
    if (!firing.count(f)) watch.push_back(f);
  ASSERT_GE(watch.size(), 13u);
  std::reverse(watch.begin(), watch.end());  // the engine must not rely on the caller's order

  SequenceRequest r = full;
  r.k = 2;
  r.watch = {watch, {}};  // no list for L3R: its global top-k as usual
  auto got = engine_->Run({r});
  ASSERT_TRUE(got.ok()) << got.status();
  const std::set<int32_t> watched(watch.begin(), watch.end());
  int reported_outside_top_k = 0;
  for (int t = 0; t < static_cast<int>(r.ids.size()); ++t) {
    std::vector<std::pair<int32_t, float>> want;
    for (const auto& f : Reported(every, t))
      if (watched.count(f.first) && want.size() < 2) want.push_back(f);  // already value-descending
    const auto have = Reported((*got)[0].saes[0], t);
    ASSERT_EQ(have.size(), want.size()) << "token " << t;
    for (size_t j = 0; j < want.size(); ++j) {
      EXPECT_EQ(have[j].first, want[j].first) << "token " << t << " slot " << j;
      EXPECT_NEAR(have[j].second, want[j].second, 1e-4f * (1 + std::abs(want[j].second)));
      const auto global = Reported(every, t);
      const auto global_end = global.begin() + std::min<size_t>(2, global.size());
      reported_outside_top_k +=
          std::none_of(global.begin(), global_end, [&](const auto& f) { return f.first == have[j].first; });
    }
    auto l3r_top2 = Reported((*all)[0].saes[1], t);
    l3r_top2.resize(std::min<size_t>(2, l3r_top2.size()));
    EXPECT_EQ(Reported((*got)[0].saes[1], t), l3r_top2) << "token " << t;
  }
  EXPECT_GT(reported_outside_top_k, 0) << "some watched feature must be reported outside the global top 2";

  // With a cut, watched features below it disappear too.
  r.min_activation = 1e9f;
  auto none = engine_->Run({r});
  ASSERT_TRUE(none.ok());
  for (int t = 0; t < static_cast<int>(r.ids.size()); ++t) EXPECT_EQ((*none)[0].saes[0].n_active(t), 0);
}

// The reconstruction error of every demo SAE recomputed on the host in double
// from the captured hooks and the SAE files: y_hat over ALL active features
// (not the top-k), the transcoder against the MLP output of its layer.
TEST_F(EngineTest, ReconstructionErrorMatchesAHostComputation) {
  SequenceRequest r = Request("The cat sat on the red mat in Rome.", 1);
  r.capture_hooks = true;  // L1R, L2A, L2M, L2TC, L3R: every input and every target
  r.reconstruction_error = true;
  auto res = engine_->Run({r});
  ASSERT_TRUE(res.ok()) << res.status();
  const auto& hooks = (*res)[0].hooks;
  const int n = static_cast<int>(r.ids.size()), d = 64;
  for (size_t s = 0; s < engine_->saes().size(); ++s) {
    const Sae& sae = *engine_->saes()[s];
    const SaeHyperparams& hp = sae.hyperparams();
    auto store = TensorStore::Open(sae.path() + "/checkpoints/final.safetensors");
    ASSERT_TRUE(store.ok()) << store.status();
    auto host = [&](const char* name) {
      HostTensor t = *(*store)->Get(name);
      std::vector<float> v(static_cast<size_t>(t.numel()));
      ConvertToF32(t.data, t.dtype, v.size(), v.data());
      return v;
    };
    const auto w_enc = host("encoder.weight"), b_enc = host("encoder.bias"), w_dec = host("decoder.weight"),
               b_dec = host("decoder.bias");
    const std::string in_name = sae.hook().Name();
    const std::string out_name =
        sae.hook().site == HookSite::kTranscoderIn ? HookPoint{sae.hook().layer, HookSite::kMlp}.Name() : in_name;
    const std::vector<float>& x = hooks.at(in_name);
    const std::vector<float>& y = hooks.at(out_name);
    const std::vector<float>& err = (*res)[0].saes[s].reconstruction_error;
    ASSERT_EQ(err.size(), static_cast<size_t>(n)) << sae.name();
    EXPECT_TRUE(std::isnan(err[0])) << sae.name() << ": BOS carries no reconstruction error by default";
    const double s_in = hp.scale_in(), s_out = hp.scale_out(), thr = hp.jump_relu_threshold * s_in;
    for (int t = 1; t < n; ++t) {
      std::vector<double> y_hat(d);
      for (int c = 0; c < d; ++c) y_hat[c] = b_dec[c];
      double margin = 1e300;
      for (int i = 0; i < hp.d_sae; ++i) {
        double h = b_enc[i];
        for (int c = 0; c < d; ++c) h += s_in * w_enc[static_cast<size_t>(i) * d + c] * x[t * d + c];
        margin = std::min(margin, std::abs(h - thr));
        if (h <= thr) continue;
        for (int c = 0; c < d; ++c) y_hat[c] += h * w_dec[static_cast<size_t>(c) * hp.d_sae + i];
      }
      if (margin < 1e-4) continue;  // a flip at the threshold is legitimate
      double num = 0, den = 0;
      for (int c = 0; c < d; ++c) {
        const double diff = y[t * d + c] - y_hat[c] / s_out;
        num += diff * diff;
        den += static_cast<double>(y[t * d + c]) * y[t * d + c];
      }
      EXPECT_NEAR(err[t], num / den, 1e-4 * (1 + num / den)) << sae.name() << " token " << t;
    }
  }
  // Not asked: no errors.
  r.reconstruction_error = false;
  auto plain = engine_->Run({r});
  ASSERT_TRUE(plain.ok());
  for (const auto& s : (*plain)[0].saes) EXPECT_TRUE(s.reconstruction_error.empty());
  // include_bos: BOS gets one too.
  r.reconstruction_error = true;
  r.include_bos = true;
  auto bos = engine_->Run({r});
  ASSERT_TRUE(bos.ok());
  for (const auto& s : (*bos)[0].saes) EXPECT_TRUE(std::isfinite(s.reconstruction_error[0]));
}

// One request's options never change another's results in the same batch,
// and a transcoder's extra target hook is not handed to requests that did not ask.
TEST_F(EngineTest, OptionsAreBatchInvariant) {
  SequenceRequest plain = Request("The cat sat on the mat.");
  plain.sae_indices = {3, 0};
  plain.capture_hooks = true;
  SequenceRequest options = Request("Two green birds flew over London.", 4);
  options.min_activation = 2.0f;  // demo features fire above 1: this drops some
  options.watch = std::vector<std::vector<int32_t>>(engine_->saes().size());
  options.watch[0] = {5, 1, 40, 300, 17, 2, 99};
  options.watch[3] = {0, 7, 250, 511};
  options.reconstruction_error = true;
  SequenceRequest bos = Request("Paris and Rome.", 3);
  bos.include_bos = true;
  bos.reconstruction_error = true;
  bos.sae_indices = {3, 2};

  std::vector<SequenceResult> alone;
  for (const SequenceRequest& r : {plain, options, bos}) {
    auto res = engine_->Run({r});
    ASSERT_TRUE(res.ok()) << res.status();
    alone.push_back((*res)[0]);
  }
  auto mixed = engine_->Run({bos, plain, options});
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  const std::vector<const SequenceResult*> batched = {&(*mixed)[1], &(*mixed)[2], &(*mixed)[0]};
  for (size_t q = 0; q < alone.size(); ++q) {
    ASSERT_EQ(alone[q].saes.size(), batched[q]->saes.size());
    for (size_t s = 0; s < alone[q].saes.size(); ++s) {
      const SaeTopK& a = alone[q].saes[s];
      const SaeTopK& b = batched[q]->saes[s];
      EXPECT_EQ(a.indices, b.indices) << "request " << q << " sae slot " << s;
      ASSERT_EQ(a.values.size(), b.values.size());
      for (size_t j = 0; j < a.values.size(); ++j) EXPECT_EQ(a.values[j], b.values[j]);
      ASSERT_EQ(a.reconstruction_error.size(), b.reconstruction_error.size()) << "request " << q;
      for (size_t t = 0; t < a.reconstruction_error.size(); ++t) {
        if (std::isnan(a.reconstruction_error[t])) {
          EXPECT_TRUE(std::isnan(b.reconstruction_error[t]));
        } else {
          EXPECT_EQ(a.reconstruction_error[t], b.reconstruction_error[t]);
        }
      }
    }
  }
  int options_reported = 0;
  for (const SaeTopK& s : batched[1]->saes)
    for (size_t t = 0; t < options.ids.size(); ++t) options_reported += s.n_active(static_cast<int>(t));
  EXPECT_GT(options_reported, 0) << "the options request must report something to compare";
  EXPECT_TRUE(batched[0]->saes[0].reconstruction_error.empty()) << "the plain request did not ask";
  std::vector<std::string> plain_hooks;
  for (const auto& [name, act] : batched[0]->hooks) plain_hooks.push_back(name);
  EXPECT_THAT(plain_hooks, ::testing::ElementsAre("L1R", "L2TC"));
  EXPECT_TRUE(std::isfinite(batched[2]->saes[0].reconstruction_error[0])) << "include_bos: BOS has an error";
  EXPECT_TRUE(std::isnan(batched[1]->saes[0].reconstruction_error[0]));
}

// Requests that use every output the engine gathers after the forward pass:
// top-k, watch lists, reconstruction errors and captured hooks.
std::vector<SequenceRequest> EveryOutput(const std::vector<SequenceRequest>& base, size_t n_saes) {
  std::vector<SequenceRequest> out = base;
  out[0].capture_hooks = true;
  out[0].reconstruction_error = true;
  if (out.size() > 1) {
    out[1].watch = std::vector<std::vector<int32_t>>(n_saes);
    out[1].watch[0] = {3, 17, 42, 101, 7};
  }
  return out;
}

// Submit / Collect are Run's two halves: two batches in flight at once give
// what two Runs give, and a batch never collected costs nothing else.
TEST_F(EngineTest, SubmitAndCollectOverlappedEqualRun) {
  EXPECT_FALSE(engine_->asynchronous()) << "the CPU backend computes each op before it returns";
  const size_t n_saes = engine_->saes().size();
  testing::ExpectOverlappedSubmitsEqualRuns(
      engine_, EveryOutput({Request("The cat sat on the mat."), Request("Two green birds flew over London.")}, n_saes),
      EveryOutput({Request("One two three, the dog ran.", 5)}, n_saes));
}

TEST_F(EngineTest, SubmitRejectsBadTokenIdsBeforeAnyWork) {
  SequenceRequest r = Request("x");
  r.ids.push_back(engine_->model_config().vocab_size);
  EXPECT_EQ(engine_->Submit({r}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, RejectsBadOptions) {
  struct Case {
    const char* name;
    std::function<void(SequenceRequest*)> edit;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"NaN min_activation", [](SequenceRequest* r) { r->min_activation = std::nanf(""); }, "min_activation"},
      {"negative min_activation", [](SequenceRequest* r) { r->min_activation = -1; }, "min_activation"},
      {"infinite min_activation",
       [](SequenceRequest* r) { r->min_activation = std::numeric_limits<float>::infinity(); }, "min_activation"},
      {"watch not parallel", [](SequenceRequest* r) { r->watch = {{1}}; }, "one list per requested SAE"},
      {"feature >= d_sae",
       [](SequenceRequest* r) {
         r->watch = {{512}, {}, {}, {}, {}};
       },
       "outside [0, 512)"},
      {"negative feature",
       [](SequenceRequest* r) {
         r->watch = {{-1}, {}, {}, {}, {}};
       },
       "outside"},
      {"duplicate feature",
       [](SequenceRequest* r) {
         r->watch = {{}, {3, 4, 3}, {}, {}, {}};
       },
       "listed twice"},
  };
  for (const Case& c : cases) {
    SequenceRequest r = Request("x");
    c.edit(&r);
    auto res = engine_->Run({Request("fine"), r});
    EXPECT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(res.status().message(), HasSubstr(c.message)) << c.name;
  }
}

// An SAE whose hook_point_out cannot be read in the same pass still extracts
// features; only reconstruction errors are refused, naming the field.
TEST(EngineLoadTest, ReconstructionErrorNeedsAUsableHookPointOut) {
  const std::string dir = testing::MakeTempDir("bad-hook-out") + "/L1R-8x";
  std::filesystem::copy(testing::Demo().sae_dirs[0], dir, std::filesystem::copy_options::recursive);
  nlohmann::json hp;
  std::ifstream(dir + "/hyperparams.json") >> hp;
  hp["hook_point_out"] = "blocks.3.hook_resid_post";  // a later layer: not available in the same pass
  std::ofstream(dir + "/hyperparams.json") << hp.dump();
  EngineOptions o = testing::DemoEngineOptions();
  o.saes = {{dir, ""}};
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  SequenceRequest r;
  r.ids = (*e)->tokenizer().Encode("The cat.", true)->ids;
  r.sae_indices = {0};
  r.k = 4;
  EXPECT_TRUE((*e)->Run({r}).ok());
  r.reconstruction_error = true;
  auto res = (*e)->Run({r});
  EXPECT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(res.status().message(), HasSubstr("hook_point_out"));
}

// An SAE hooked deeper than the model has layers is refused naming the SAE's
// file and field (it named the model's config.json, as the model loaded first).
TEST(EngineLoadTest, HookBeyondTheModelNamesTheSae) {
  const std::string dir = testing::MakeTempDir("deep-hook") + "/L40R-8x";
  std::filesystem::copy(testing::Demo().sae_dirs[0], dir, std::filesystem::copy_options::recursive);
  nlohmann::json hp;
  std::ifstream(dir + "/hyperparams.json") >> hp;
  hp["hook_point_in"] = "blocks.40.hook_resid_post";
  hp["hook_point_out"] = "blocks.40.hook_resid_post";
  std::ofstream(dir + "/hyperparams.json") << hp.dump();
  EngineOptions o = testing::DemoEngineOptions();
  o.saes = {{dir, ""}};
  auto e = Engine::Create(o);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(e.status().message(), HasSubstr(dir + "/hyperparams.json: field \"hook_point_in\" names layer 40"));
}

TEST(EngineLoadTest, LoadsOnlyTheLayersItNeeds) {
  EngineOptions o = testing::DemoEngineOptions();
  o.saes = {{testing::Demo().sae_dirs[0], "first"}};  // L1R
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->n_layers_loaded(), 2);
  EXPECT_EQ((*e)->saes()[0]->name(), "first");
}

TEST(EngineLoadTest, DuplicateSaeNamesAreAnError) {
  EngineOptions o = testing::DemoEngineOptions();
  o.saes = {{testing::Demo().sae_dirs[0], ""}, {testing::Demo().sae_dirs[0], ""}};
  auto e = Engine::Create(o);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(e.status().message(), HasSubstr("alias"));
}

TEST(EngineLoadTest, UnknownBackendIsAnError) {
  EngineOptions o = testing::DemoEngineOptions();
  o.backend = "tpu";
  EXPECT_THAT(Engine::Create(o).status().message(), HasSubstr("unknown backend"));
}

// lm_saes form: value = ||d_i|| * h / s_out, compared with theta directly.
TEST(EngineLoadTest, LmSaesFormScalesByDecoderNormOverScaleOut) {
  auto sl = Engine::Create(testing::DemoEngineOptions("cpu", SaeEncodeForm::kSaeLens));
  auto lm = Engine::Create(testing::DemoEngineOptions("cpu", SaeEncodeForm::kLmSaes));
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
