#include "testing/test_util.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace sae::testing {

const DemoLayout& Demo() {
  static const DemoLayout* layout = [] {
    auto l = WriteDemo(SAE_TEST_DEMO_DIR);
    if (!l.ok()) {
      ADD_FAILURE() << "WriteDemo failed: " << l.status();
      std::abort();
    }
    return new DemoLayout(*std::move(l));
  }();
  return *layout;
}

EngineOptions DemoEngineOptions(const std::string& backend, SaeEncodeForm form) {
  EngineOptions options = EngineOptionsForDemo(Demo());
  options.backend = backend;
  options.encode_form = form;
  return options;
}

std::string MakeTempDir(const std::string& name) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(SAE_TEST_SCRATCH_DIR) / absl::StrCat(name, "-", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void ExpectSameResults(const std::vector<SequenceResult>& want, const std::vector<SequenceResult>& got,
                       const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  auto same_float = [](float a, float b) { return std::isnan(a) ? std::isnan(b) : a == b; };
  for (size_t i = 0; i < want.size(); ++i) {
    const std::string seq = absl::StrCat(what, ": sequence ", i);
    ASSERT_EQ(want[i].saes.size(), got[i].saes.size()) << seq;
    for (size_t j = 0; j < want[i].saes.size(); ++j) {
      const SaeTopK& a = want[i].saes[j];
      const SaeTopK& b = got[i].saes[j];
      EXPECT_EQ(a.k, b.k) << seq << " sae slot " << j;
      EXPECT_EQ(a.indices, b.indices) << seq << " sae slot " << j;
      EXPECT_EQ(a.values, b.values) << seq << " sae slot " << j;
      ASSERT_EQ(a.reconstruction_error.size(), b.reconstruction_error.size()) << seq << " sae slot " << j;
      for (size_t t = 0; t < a.reconstruction_error.size(); ++t) {
        EXPECT_TRUE(same_float(a.reconstruction_error[t], b.reconstruction_error[t]))
            << seq << " sae slot " << j << " token " << t << ": " << a.reconstruction_error[t] << " vs "
            << b.reconstruction_error[t];
      }
    }
    ASSERT_EQ(want[i].hooks.size(), got[i].hooks.size()) << seq;
    for (const auto& [name, act] : want[i].hooks) {
      auto it = got[i].hooks.find(name);
      ASSERT_NE(it, got[i].hooks.end()) << seq << " hook " << name;
      EXPECT_EQ(act, it->second) << seq << " hook " << name;
    }
  }
}

void ExpectOverlappedSubmitsEqualRuns(Engine* engine, const std::vector<SequenceRequest>& a,
                                      const std::vector<SequenceRequest>& b) {
  auto run_a = engine->Run(a);
  auto run_b = engine->Run(b);
  ASSERT_TRUE(run_a.ok()) << run_a.status();
  ASSERT_TRUE(run_b.ok()) << run_b.status();

  auto dropped = engine->Submit(a);
  ASSERT_TRUE(dropped.ok()) << dropped.status();
  dropped->reset();
  auto pending_a = engine->Submit(a);
  auto pending_b = engine->Submit(b);
  ASSERT_TRUE(pending_a.ok()) << pending_a.status();
  ASSERT_TRUE(pending_b.ok()) << pending_b.status();
  for (auto [pending, want, what] :
       {std::make_tuple(&*pending_a, &*run_a, "batch a"), std::make_tuple(&*pending_b, &*run_b, "batch b")}) {
    auto got = engine->Collect(std::move(*pending));
    ASSERT_TRUE(got.ok()) << what << ": " << got.status();
    ExpectSameResults(*want, *got, what);
    const RunTiming& timing = engine->last_run_timing();
    EXPECT_GT(timing.sae_seconds, 0.0) << what;
    EXPECT_LE(timing.sae_seconds, timing.total_seconds) << what;
  }
}

}  // namespace sae::testing
