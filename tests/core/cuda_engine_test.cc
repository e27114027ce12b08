// End to end on the tiny demo model: the CUDA backend's top-k SAE features and
// captured hooks match the CPU backend's. Skips (GTEST_SKIP) when this build
// or machine has no usable CUDA backend.
//
// Two CUDA engines per encode form:
// - default: the forward pass rounds GEMM inputs to bf16 (the CPU one is fp32
//   throughout), so hook activations differ by ~1e-2 of the row RMS after a
//   few layers, and an SAE feature whose pre-activation cancels (w.x ~ -b)
//   can move by ~10% of the row's largest value (seen on the demo: 1.47 vs
//   1.33 with 1.7 the largest). Feature values must agree within 15% of the
//   row's largest value.
// - exact (SAE_CUDA_MODEL_SPLIT=3: activations split into 3 bf16 parts, the
//   full fp32 mantissa): hooks within 1e-5 of the row RMS and feature values
//   within 1e-4 of the row's largest, i.e. only accumulation order differs.
//   This is the check that the kernels compute the right thing; the default
//   engine's looser one checks the production numerics stay close.
// In both, a feature present on one side only must sit within the tolerance
// of the other side's cut-off (the k-th value, or the JumpReLU threshold): it
// may only be a near-tie at the boundary.
#include <dlfcn.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/engine.h"
#include "core/sae.h"
#include "core/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/test_util.h"

namespace sae {
namespace {

struct Engines {
  std::unique_ptr<Engine> cpu, cuda, cuda_exact, cuda_f32_activations;
};

constexpr float kDefaultTol = 0.15f;  // of the row's largest feature value
constexpr float kExactTol = 1e-4f;

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
      auto cuda = Engine::Create(testing::DemoEngineOptions("cuda", form));
      ASSERT_TRUE(cuda.ok()) << cuda.status();
      setenv("SAE_CUDA_MODEL_SPLIT", "3", 1);  // read when the backend is created
      auto cuda_exact = Engine::Create(testing::DemoEngineOptions("cuda", form));
      unsetenv("SAE_CUDA_MODEL_SPLIT");
      ASSERT_TRUE(cuda_exact.ok()) << cuda_exact.status();
      setenv("SAE_CUDA_BF16_ACTIVATIONS", "0", 1);
      auto cuda_f32 = Engine::Create(testing::DemoEngineOptions("cuda", form));
      unsetenv("SAE_CUDA_BF16_ACTIVATIONS");
      ASSERT_TRUE(cuda_f32.ok()) << cuda_f32.status();
      auto cpu = Engine::Create(testing::DemoEngineOptions("cpu", form));
      ASSERT_TRUE(cpu.ok()) << cpu.status();
      (*engines_)[form] = Engines{*std::move(cpu), *std::move(cuda), *std::move(cuda_exact), *std::move(cuda_f32)};
    }
  }
  static void TearDownTestSuite() {
    delete engines_;
    delete skip_reason_;
  }
  void SetUp() override {
    if (!skip_reason_->empty()) {
      // ctest's emulated-CUDA entry sets this: there a missing backend is a failure, not a skip.
      if (std::getenv("SAE_TEST_REQUIRE_CUDA") != nullptr) FAIL() << "CUDA backend unavailable: " << *skip_reason_;
      GTEST_SKIP() << "CUDA backend unavailable: " << *skip_reason_;
    }
    ASSERT_EQ(engines_->count(GetParam()), 1u) << "engine creation failed in SetUpTestSuite";
    cpu_ = (*engines_)[GetParam()].cpu.get();
    cuda_ = (*engines_)[GetParam()].cuda.get();
    cuda_exact_ = (*engines_)[GetParam()].cuda_exact.get();
    cuda_f32_activations_ = (*engines_)[GetParam()].cuda_f32_activations.get();
    ASSERT_EQ(cuda_->backend_name(), "cuda");
  }

  SequenceRequest Request(const std::string& text, int k = 8, bool capture = false) {
    SequenceRequest r;
    auto enc = cpu_->tokenizer().Encode(text, true);
    EXPECT_TRUE(enc.ok());
    r.ids = enc->ids;
    r.sae_indices = cpu_->all_sae_indices();
    r.k = k;
    r.capture_hooks = capture;
    return r;
  }

  // Compares one sequence's top-k lists of one SAE (see the file comment).
  static void ExpectTopKMatch(const SaeTopK& cpu, const SaeTopK& gpu, float threshold, float rel_tol,
                              const std::string& what, int* n_same, int* n_total) {
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
      const float tol = rel_tol * scale + 1e-5f;
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

  // Runs `batch` on the CPU engine and on `cuda` (default: the default engine).
  void ExpectRunsMatch(const std::vector<SequenceRequest>& batch, Engine* cuda = nullptr, float rel_tol = kDefaultTol) {
    auto a = cpu_->Run(batch);
    auto b = (cuda != nullptr ? cuda : cuda_)->Run(batch);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    int same = 0, total = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      for (size_t j = 0; j < batch[i].sae_indices.size(); ++j) {
        const Sae& sae = *cpu_->saes()[batch[i].sae_indices[j]];
        ExpectTopKMatch((*a)[i].saes[j], (*b)[i].saes[j], sae.encoder().threshold, rel_tol,
                        "seq " + std::to_string(i) + " " + sae.name(), &same, &total);
      }
    }
    // Boundary near-ties are allowed, but not many: nearly every feature agrees.
    EXPECT_GE(same, 0.9 * total) << same << " of " << total << " features agree";
  }

  // Every hook of `text` on `cuda` against the CPU, within rel_rms of each row's RMS.
  void ExpectHooksMatch(const std::string& text, Engine* cuda, double rel_rms) {
    SequenceRequest r = Request(text, 4, /*capture=*/true);
    auto a = cpu_->Run({r});
    auto b = cuda->Run({r});
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
      int bad = 0;
      for (size_t t = 0; t * d < va.size() && bad < 3; ++t) {
        double ss = 0;
        for (int c = 0; c < d; ++c) ss += static_cast<double>(va[t * d + c]) * va[t * d + c];
        const double rms = std::sqrt(ss / d);
        for (int c = 0; c < d && bad < 3; ++c) {
          if (std::abs(va[t * d + c] - vb[t * d + c]) > rel_rms * rms + 1e-6) {
            ADD_FAILURE() << name << " token " << t << " dim " << c << ": cpu " << va[t * d + c] << " cuda "
                          << vb[t * d + c] << " (row rms " << rms << ")";
            ++bad;
          }
        }
      }
    }
  }

  static std::string LongText() {
    std::string longer;
    for (int i = 0; i < 40; ++i) longer += " the red fish and the blue bird swim";
    return longer;
  }

  Engine* cpu_ = nullptr;
  Engine* cuda_ = nullptr;
  Engine* cuda_exact_ = nullptr;
  Engine* cuda_f32_activations_ = nullptr;  // SAE_CUDA_BF16_ACTIVATIONS=0
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
  const std::string longer = LongText();
  ExpectRunsMatch({Request("x"), Request(longer, 32), Request("Paris is big."), Request(longer.substr(0, 200))});
}

// With fp32-faithful GEMM inputs the CUDA engine must match the CPU up to
// accumulation order, hooks and features alike, over a long packed batch.
TEST_P(CudaEngineTest, ExactModeMatchesCpuClosely) {
  const std::string longer = LongText();
  ExpectRunsMatch({Request("x"), Request(longer, 32), Request("Paris is big."), Request(longer.substr(0, 200))},
                  cuda_exact_, kExactTol);
  ExpectHooksMatch(longer, cuda_exact_, 1e-5);
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
  // bf16 GEMM inputs: a few 1e-3 of the row's RMS per layer.
  ExpectHooksMatch("The cat and the dog.", cuda_, 3e-2);
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
      ExpectTopKMatch((*alone)[0].saes[j], (*together)[i].saes[j], sae.encoder().threshold, kDefaultTol, sae.name(),
                      &same, &total);
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

// GEMM-only activations kept in BF16 (normed inputs, attention output,
// silu * up: the default) give bit-identical results to keeping them in F32
// and rounding them before each GEMM, for every output: top-k, watch lists,
// reconstruction errors and every captured hook (the transcoder input too).
TEST_P(CudaEngineTest, Bf16GemmInputsEqualF32RoundedAtTheGemm) {
  {  // the two engines' backends do differ
    auto bf16_backend = CreateBackend("cuda");
    setenv("SAE_CUDA_BF16_ACTIVATIONS", "0", 1);
    auto f32_backend = CreateBackend("cuda");
    unsetenv("SAE_CUDA_BF16_ACTIVATIONS");
    ASSERT_TRUE(bf16_backend.ok() && f32_backend.ok());
    EXPECT_EQ((*bf16_backend)->gemm_input_dtype(), DType::kBF16);
    EXPECT_EQ((*f32_backend)->gemm_input_dtype(), DType::kF32);
  }
  const size_t n_saes = cuda_->saes().size();
  std::vector<SequenceRequest> batch = {Request("The cat sat on the mat.", 8, /*capture=*/true),
                                        Request(LongText().substr(0, 400), 16)};
  batch[0].reconstruction_error = true;
  batch[1].reconstruction_error = true;
  batch[1].watch = std::vector<std::vector<int32_t>>(n_saes);
  batch[1].watch[0] = {3, 17, 42, 101, 7};
  auto bf16 = cuda_->Run(batch);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  auto f32 = cuda_f32_activations_->Run(batch);
  ASSERT_TRUE(f32.ok()) << f32.status();
  testing::ExpectSameResults(*f32, *bf16, "bf16 GEMM inputs");
}

// Two batches queued on the device before either is read back (what the
// executor does on a GPU) give exactly what two Runs give, with every output
// the engine gathers after the forward pass: top-k, watch lists,
// reconstruction errors and captured hooks. A batch never collected leaves
// nothing behind.
TEST_P(CudaEngineTest, OverlappedBatchesEqualSeparateRuns) {
  EXPECT_TRUE(cuda_->asynchronous());
  const size_t n_saes = cuda_->saes().size();
  std::vector<SequenceRequest> a = {Request("The cat sat on the mat."), Request(LongText().substr(0, 300), 16)};
  a[0].capture_hooks = true;
  a[0].reconstruction_error = true;
  a[1].watch = std::vector<std::vector<int32_t>>(n_saes);
  a[1].watch[0] = {3, 17, 42, 101, 7};
  std::vector<SequenceRequest> b = {Request("One two three, the dog ran.", 5)};
  b[0].reconstruction_error = true;
  testing::ExpectOverlappedSubmitsEqualRuns(cuda_, a, b);
}

// Submit queues a whole batch without waiting for the device, captured hooks,
// watch lists and reconstruction errors included (after a warm-up: an SAE's
// first use measures its value bounds on the device). Only the CPU emulator
// can tell, by counting the queued ops the host ran because it waited.
TEST_P(CudaEngineTest, SubmitNeverWaitsForTheDevice) {
  const char* lib = std::getenv("SAE_CUDA_BACKEND_LIB");
  if (lib == nullptr || std::string(lib).find("sae_cuda_emu") == std::string::npos) {
    GTEST_SKIP() << "only the CUDA emulator counts host waits (SAE_CUDA_BACKEND_LIB)";
  }
  void* handle = dlopen(lib, RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(handle, nullptr) << dlerror();
  const auto ops_run_for_host = reinterpret_cast<uint64_t (*)()>(dlsym(handle, "SaeEmuOpsRunForHost"));
  ASSERT_NE(ops_run_for_host, nullptr) << dlerror();
  const size_t n_saes = cuda_->saes().size();
  std::vector<SequenceRequest> a = {Request("The cat sat on the mat.", 8, /*capture=*/true),
                                    Request(LongText().substr(0, 300), 16)};
  a[0].reconstruction_error = true;
  a[1].watch = std::vector<std::vector<int32_t>>(n_saes);
  a[1].watch[0] = {3, 17, 42, 101, 7};
  auto want = cuda_->Run(a);  // the warm-up, and the results to expect
  ASSERT_TRUE(want.ok()) << want.status();
  auto first = cuda_->Submit(a);
  ASSERT_TRUE(first.ok()) << first.status();
  const uint64_t before = ops_run_for_host();
  auto second = cuda_->Submit(a);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(ops_run_for_host(), before) << "Submit made the host wait for device work queued before it";
  auto got_first = cuda_->Collect(*std::move(first));
  ASSERT_TRUE(got_first.ok()) << got_first.status();
  auto got_second = cuda_->Collect(*std::move(second));
  ASSERT_TRUE(got_second.ok()) << got_second.status();
  testing::ExpectSameResults(*want, *got_first, "first submit");
  testing::ExpectSameResults(*want, *got_second, "second submit");
  EXPECT_FALSE((*got_second)[0].hooks.empty());
  dlclose(handle);
}

INSTANTIATE_TEST_SUITE_P(Forms, CudaEngineTest, ::testing::Values(SaeEncodeForm::kSaeLens, SaeEncodeForm::kLmSaes),
                         [](const auto& info) {
                           return std::string(info.param == SaeEncodeForm::kSaeLens ? "SaeLens" : "LmSaes");
                         });

// A TopK SAE whose top_k the device's top-k cannot hold (more candidates
// than its shared memory per block) is refused at load, naming the file and
// the field, instead of failing every request that reaches it; at the limit
// it loads. A JumpReLU SAE keeps the request's k, so the engine's max_k (what
// the server checks its config's max_k against) is the backend's limit.
TEST(CudaSaeLoadTest, TopKBeyondTheDeviceIsRefusedNamingTheField) {
  auto backend = CreateBackend("cuda");
  if (!backend.ok()) {
    if (std::getenv("SAE_TEST_REQUIRE_CUDA") != nullptr) FAIL() << backend.status();
    GTEST_SKIP() << "no usable CUDA backend: " << backend.status();
  }
  const int d = 16;
  const int limit = (*backend)->max_sae_top_k(d);
  ASSERT_GE(limit, 1);
  ASSERT_LE(limit, 8192);
  const int d_sae = limit + 1;
  const std::string dir = testing::MakeTempDir("sae-topk-limit") + "/L1R-8x";
  std::filesystem::create_directories(dir + "/checkpoints");
  ASSERT_TRUE(WriteSafetensors(dir + "/checkpoints/final.safetensors",
                               {MakeTensor("encoder.weight", DType::kBF16, {d_sae, d},
                                           std::vector<float>(static_cast<size_t>(d_sae) * d, 0.25f)),
                                MakeTensor("encoder.bias", DType::kF32, {d_sae}, std::vector<float>(d_sae, 0.0f)),
                                MakeTensor("decoder.weight", DType::kBF16, {d, d_sae},
                                           std::vector<float>(static_cast<size_t>(d_sae) * d, 0.25f)),
                                MakeTensor("decoder.bias", DType::kF32, {d}, std::vector<float>(d, 0.0f))})
                  .ok());
  nlohmann::json hp;
  std::ifstream(testing::Demo().sae_dirs[0] + "/hyperparams.json") >> hp;
  hp["d_model"] = d;
  hp["d_sae"] = d_sae;
  hp["act_fn"] = "topk";
  for (const int top_k : {limit + 1, limit}) {
    hp["top_k"] = top_k;
    std::ofstream(dir + "/hyperparams.json") << hp.dump();
    auto sae = Sae::Load(dir, "", backend->get(), SaeEncodeForm::kSaeLens);
    if (top_k == limit) {
      EXPECT_TRUE(sae.ok()) << sae.status();
      continue;
    }
    EXPECT_EQ(sae.status().code(), absl::StatusCode::kFailedPrecondition) << sae.status();
    const std::string want = dir + "/hyperparams.json: field \"top_k\" is " + std::to_string(top_k);
    EXPECT_NE(sae.status().message().find(want), std::string::npos) << sae.status();
    EXPECT_NE(sae.status().message().find("at most " + std::to_string(limit)), std::string::npos) << sae.status();
  }

  auto engine = Engine::Create(testing::DemoEngineOptions("cuda", SaeEncodeForm::kSaeLens));
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->max_k(), (*backend)->max_sae_top_k((*engine)->model_config().hidden_size));
  auto cpu = Engine::Create(testing::DemoEngineOptions("cpu", SaeEncodeForm::kSaeLens));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->max_k(), std::numeric_limits<int>::max());
}

}  // namespace
}  // namespace sae
