// Shared helpers for the test suites.
#ifndef SAE_TESTS_TESTING_TEST_UTIL_H_
#define SAE_TESTS_TESTING_TEST_UTIL_H_

#include <string>

#include "core/demo_model.h"

namespace sae::testing {

// The demo model + SAEs, written once per build tree (SAE_TEST_DEMO_DIR) and
// reused by every test binary; WriteDemo makes concurrent first calls safe.
const DemoLayout& Demo();

// A fresh empty directory under the build tree's test scratch area.
std::string MakeTempDir(const std::string& name);

}  // namespace sae::testing

#endif  // SAE_TESTS_TESTING_TEST_UTIL_H_
