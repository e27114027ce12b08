#include "testing/test_util.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>

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

}  // namespace sae::testing
