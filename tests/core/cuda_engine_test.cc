// End to end on the tiny demo model: the CUDA backend's top-k SAE features and
// captured hooks match the CPU backend's. Skips (GTEST_SKIP) when this build
// or machine has no usable CUDA backend.
//
// Tolerance: the CUDA forward pass rounds GEMM inputs to bf16 (the CPU one is
// fp32 throughout), so hook activations differ by ~1e-2 relative after a few
// layers. Feature values must agree within 5% of the row's largest value;
// a feature present on one side only must sit within that distance of the
// other side's cut-off (the k-th value, or the JumpReLU threshold), i.e. it
// may only be a near-tie at the boundary.
#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "core/engine.h"
#include "gtest/gtest.h"
#include "testing/test_util.h"

namespace sae {
namespace {

EngineOptions DemoOptions(const std::string& backend, SaeEncodeForm form) {
  const DemoLayout& demo = testing::Demo();
  EngineOptions o;
  o.model_dir = demo.model_dir;
  for (const auto& d : demo.sae_dirs) o.saes.push_back({d, ""});
  o.backend = backend;
  o.encode_form = form;
  return o;
}

struct Engines {
  std::unique_ptr<Engine> cpu, cuda;
};

class CudaEngineTest : public ::testing::TestWithParam<SaeEncodeForm> {
 protected:
  static std::map<SaeEncodeForm, Engines>* engines_;
  static std::string* skip_reason_;

  static void SetUpTestSuite() {
    engines_ = new std::map<SaeEncodeForm, Engines>();
    skip_reason_ = new std::string();
    // Only a missing library / device skips; any other failure is a test failure.
    auto probe = CreateBackend("cuda");
    if (!probe.ok()) {
      *skip_reason_ = probe.status().ToString();
      return;
    }
    probe->reset();
    for (SaeEncodeForm form : {SaeEncodeForm::kSaeLens, SaeEncodeForm::kLmSaes}) {
      auto cuda = Engine::Create(DemoOptions("cuda", form));
      ASSERT_TRUE(cuda.ok()) << cuda.status();
      auto cpu = Engine::Create(DemoOptions("cpu", form));
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      (*engines_)[form] = Engines{*std::move(cpu), *std::move(cuda)};
    }
  }
  static void TearDownTestSuite() {
    delete engines_;
    delete skip_reason_;
  }
  void SetUp() override {
    if (!skip_reason_->empty()) GTEST_SKIP() << "CUDA backend unavailable: " << *skip_reason_;
    ASSERT_EQ(engines_->count(GetParam()), 1u) << "engine creation failed in SetUpTestSuite";
    cpu_ = (*engines_)[GetParam()].cpu.get();
    cuda_ = (*engines_)[GetParam()].cuda.get();
    ASSERT_EQ(cuda_->backend_name(), "cuda");
  }

  SequenceRequest Request(const std::string& text, int k = 8, bool capture = false) {
    SequenceRequest r;
    auto enc = cpu_->tokenizer().Encode(text, true);
    EXPECT_TRUE(enc.ok());
    r.ids = enc->ids;
    for (size_t i = 0; i < cpu_->saes().size(); ++i) r.sae_indices.push_back(static_cast<int>(i));
    r.k = k;
    r.capture_hooks = capture;
    return r;
  }

  // Compares one sequence's top-k lists of one SAE (see the file comment).
  static void ExpectTopKMatch(const SaeTopK& cpu, const SaeTopK& gpu, float threshold, const std::string& what,
                              int* n_same, int* n_total) {
    ASSERT_EQ(cpu.k, gpu.k) << what;
    ASSERT_EQ(cpu.indices.size(), gpu.indices.size()) << what;
    const int k = cpu.k, n = static_cast<int>(cpu.indices.size()) / k;
    for (int t = 0; t < n; ++t) {
      std::map<int32_t, float> a, b;  // index -> value
      float scale = 0.0f;
      for (int j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(t) * k + j;
        if (cpu.indices[i] >= 0) a[cpu.indices[i]] = cpu.values[i];
        if (gpu.indices[i] >= 0) b[gpu.indices[i]] = gpu.values[i];
        scale = std::max({scale, std::abs(cpu.values[i]), std::abs(gpu.values[i])});
        if (j > 0 && gpu.indices[i] >= 0) {
          EXPECT_GE(gpu.values[i - 1], gpu.values[i]) << what << " token " << t << ": not value-descending";
        }
      }
      const float tol = 0.05f * scale + 1e-4f;
      const float cut_a = cpu.n_active(t) == k ? cpu.values[static_cast<size_t>(t) * k + k - 1] : threshold;
      const float cut_b = gpu.n_active(t) == k ? gpu.values[static_cast<size_t>(t) * k + k - 1] : threshold;
      for (const auto& [idx, v] : b) {
        auto it = a.find(idx);
        if (it != a.end()) {
          EXPECT_NEAR(v, it->second, tol) << what << " token " << t << " feature " << idx;
          ++*n_same;
        } else {
          EXPECT_LE(v, cut_a + tol) << what << " token " << t << ": feature " << idx << " only on CUDA";
        }
        ++*n_total;
      }
      for (const auto& [idx, v] : a) {
        if (b.count(idx) == 0) {
          EXPECT_LE(v, cut_b + tol) << what << " token " << t << ": feature " << idx << " missing on CUDA";
          ++*n_total;
        }
      }
    }
  }

  void ExpectRunsMatch(const std::vector<SequenceRequest>& batch) {
    auto a = cpu_->Run(batch);
    auto b = cuda_->Run(batch);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    int same = 0, total = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      for (size_t j = 0; j < batch[i].sae_indices.size(); ++j) {
        const Sae& sae = *cpu_->saes()[batch[i].sae_indices[j]];
        ExpectTopKMatch((*a)[i].saes[j], (*b)[i].saes[j], sae.encoder().threshold,
                        "seq " + std::to_string(i) + " " + sae.name(), &same, &total);
      }
    }
    // Boundary near-ties are allowed, but not many: nearly every feature agrees.
    EXPECT_GE(same, 0.9 * total) << same << " of " << total << " features agree";
  }

  Engine* cpu_ = nullptr;
  Engine* cuda_ = nullptr;
};

std::map<SaeEncodeForm, Engines>* CudaEngineTest::engines_ = nullptr;
std::string* CudaEngineTest::skip_reason_ = nullptr;

TEST_P(CudaEngineTest, TopKFeaturesMatchCpu) {
  const DemoLayout& demo = testing::Demo();
  std::string concepts;
  for (const auto& c : demo.concepts) concepts += " the" + c.words[0] + " and";
  ExpectRunsMatch({Request("The cat sat on the mat."), Request(concepts, 16),
                   Request("One two three four five six seven eight nine ten, the dog ran.", 3)});
}

TEST_P(CudaEngineTest, LongPackedBatchMatchesCpu) {
  // Several sequences of different lengths (one long: many attention tiles).
  std::string longer;
  for (int i = 0; i < 40; ++i) longer += " the red fish and the blue bird swim";
  ExpectRunsMatch({Request("x"), Request(longer, 32), Request("Paris is big."), Request(longer.substr(0, 200))});
}

TEST_P(CudaEngineTest, ConceptFeaturesFireOnTheirTokens) {
  const DemoLayout& demo = testing::Demo();
  ASSERT_GE(demo.concepts.size(), 3u);
  const std::string text = " The" + demo.concepts[0].words[0] + " and the" + demo.concepts[1].words[0] + " house in" +
                           demo.concepts[2].words[0] + ".";
  SequenceRequest r = Request(text, 5);
  auto results = cuda_->Run({r});
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t c = 0; c < 3; ++c) {
    auto id = cuda_->tokenizer().Encode(demo.concepts[c].words[0], false);
    ASSERT_TRUE(id.ok());
    const auto pos = std::find(r.ids.begin(), r.ids.end(), id->ids[0]) - r.ids.begin();
    ASSERT_LT(pos, static_cast<long>(r.ids.size()));
    const SaeTopK& l1r = (*results)[0].saes[0];
    EXPECT_EQ(l1r.indices[pos * l1r.k], demo.concepts[c].feature) << demo.concepts[c].label;
  }
}

TEST_P(CudaEngineTest, CapturedHooksMatchCpu) {
  SequenceRequest r = Request("The cat and the dog.", 4, /*capture=*/true);
  auto a = cpu_->Run({r});
  auto b = cuda_->Run({r});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  const auto& ha = (*a)[0].hooks;
  const auto& hb = (*b)[0].hooks;
  ASSERT_EQ(ha.size(), hb.size());
  const int d = cpu_->model_config().hidden_size;
  for (const auto& [name, va] : ha) {
    ASSERT_TRUE(hb.count(name)) << name;
    const auto& vb = hb.at(name);
    ASSERT_EQ(va.size(), vb.size()) << name;
    for (size_t t = 0; t * d < va.size(); ++t) {
      double ss = 0;
      for (int c = 0; c < d; ++c) ss += static_cast<double>(va[t * d + c]) * va[t * d + c];
      const double rms = std::sqrt(ss / d);
      int bad = 0;
      for (int c = 0; c < d && bad < 3; ++c) {
        // bf16 GEMM inputs: a few 1e-3 of the row's RMS per layer.
        if (std::abs(va[t * d + c] - vb[t * d + c]) > 3e-2 * rms + 1e-5) {
          ADD_FAILURE() << name << " token " << t << " dim " << c << ": cpu " << va[t * d + c] << " cuda "
                        << vb[t * d + c] << " (row rms " << rms << ")";
          ++bad;
        }
      }
    }
  }
}

TEST_P(CudaEngineTest, BatchedEqualsSingleWithinTolerance) {
  const std::vector<std::string> texts = {"The cat sat on the mat.", "Paris is big.", "One two three, the dog ran."};
  std::vector<SequenceRequest> batch;
  for (const auto& t : texts) batch.push_back(Request(t));
  auto together = cuda_->Run(batch);
  ASSERT_TRUE(together.ok()) << together.status();
  for (size_t i = 0; i < texts.size(); ++i) {
    auto alone = cuda_->Run({batch[i]});
    ASSERT_TRUE(alone.ok()) << alone.status();
    int same = 0, total = 0;
    for (size_t j = 0; j < batch[i].sae_indices.size(); ++j) {
      const Sae& sae = *cuda_->saes()[batch[i].sae_indices[j]];
      ExpectTopKMatch((*alone)[0].saes[j], (*together)[i].saes[j], sae.encoder().threshold, sae.name(), &same, &total);
    }
    EXPECT_GE(same, 0.95 * total);
  }
}

TEST_P(CudaEngineTest, RejectsBadTokenIds) {
  SequenceRequest r = Request("x");
  r.ids.push_back(cuda_->model_config().vocab_size);
  EXPECT_EQ(cuda_->Run({r}).status().code(), absl::StatusCode::kInvalidArgument);
  // The backend is still usable afterwards.
  EXPECT_TRUE(cuda_->Run({Request("The cat.")}).ok());
}

INSTANTIATE_TEST_SUITE_P(Forms, CudaEngineTest, ::testing::Values(SaeEncodeForm::kSaeLens, SaeEncodeForm::kLmSaes),
                         [](const auto& info) {
                           return std::string(info.param == SaeEncodeForm::kSaeLens ? "SaeLens" : "LmSaes");
                         });

}  // namespace
}  // namespace sae
