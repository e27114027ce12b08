#include "testing/test_util.h"

#include <unistd.h>

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

}  // namespace sae::testing
