// Shared helpers for the test suites.
#ifndef SAE_TESTS_TESTING_TEST_UTIL_H_
#define SAE_TESTS_TESTING_TEST_UTIL_H_

#include <chrono>
#include <string>
#include <thread>

#include "core/demo_model.h"
#include "core/engine.h"

namespace sae::testing {

// The demo model + SAEs, written once per build tree (SAE_TEST_DEMO_DIR) and
// reused by every test binary; WriteDemo makes concurrent first calls safe.
const DemoLayout& Demo();

// Engine options for the demo model and all its SAEs.
EngineOptions DemoEngineOptions(const std::string& backend = "cpu", SaeEncodeForm form = SaeEncodeForm::kSaeLens);

// A fresh empty directory under the build tree's test scratch area.
std::string MakeTempDir(const std::string& name);

// Fails the test unless `got` equals `want` bit for bit: every top-k list,
// value, reconstruction error (NaN where `want` has NaN) and captured hook.
void ExpectSameResults(const std::vector<SequenceResult>& want, const std::vector<SequenceResult>& got,
                       const std::string& what);

// Submits `a` and `b` to `engine` before collecting either (what the
// executor does on a GPU), after submitting and dropping one batch, and
// expects exactly what Run(a) and Run(b) give, each collected batch timed
// with its SAE part within its total.
void ExpectOverlappedSubmitsEqualRuns(Engine* engine, const std::vector<SequenceRequest>& a,
                                      const std::vector<SequenceRequest>& b);

// Polls `condition` until it holds or `timeout` passes; returns its last value.
template <typename F>
bool WaitFor(F condition, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return condition();
}

}  // namespace sae::testing

#endif  // SAE_TESTS_TESTING_TEST_UTIL_H_
