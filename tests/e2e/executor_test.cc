// The executor with a fake batch runner: packing, failure isolation, and
// shutdown, independent of the model.
#include "rpc/executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace sae {
namespace {

SequenceRequest Seq(std::vector<int32_t> ids) {
  SequenceRequest r;
  r.ids = std::move(ids);
  r.k = 1;
  return r;
}

// Records batches; holds the runner while `hold` is set.
struct FakeRunner {
  std::mutex mu;
  std::condition_variable cv;
  bool hold = false;
  bool entered = false;
  std::vector<size_t> batch_sizes;

  BatchRunner Runner() {
    return [this](const std::vector<SequenceRequest>& batch) -> absl::StatusOr<std::vector<SequenceResult>> {
      std::unique_lock<std::mutex> lock(mu);
      entered = true;
      cv.notify_all();
      cv.wait(lock, [this] { return !hold; });
      batch_sizes.push_back(batch.size());
      for (const auto& r : batch) {
        // A poisoned id fails any batch it is in, as a bad input would.
        if (!r.ids.empty() && r.ids[0] == 13) return absl::InvalidArgumentError("poisoned");
      }
      std::vector<SequenceResult> results(batch.size());
      for (size_t i = 0; i < batch.size(); ++i) results[i].hooks["n"] = std::vector<float>(batch[i].ids.size());
      return results;
    };
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu);
    hold = false;
    cv.notify_all();
  }
  void WaitEntered() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return entered; });
  }
};

struct Outcome {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<absl::Status> statuses;
  std::vector<size_t> n_tokens;
  int n_done = 0;

  Job MakeJob(SequenceRequest request, size_t slot, CancelFlag cancelled = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (statuses.size() <= slot) {
        statuses.resize(slot + 1);
        n_tokens.resize(slot + 1);
      }
    }
    Job job;
    job.request = std::move(request);
    job.cancelled = std::move(cancelled);
    job.done = [this, slot](absl::StatusOr<SequenceResult> result) {
      std::lock_guard<std::mutex> lock(mu);
      statuses[slot] = result.status();
      if (result.ok()) n_tokens[slot] = result->hooks["n"].size();
      ++n_done;
      cv.notify_all();
    };
    return job;
  }
  void WaitDone(int n) {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return n_done >= n; }));
  }
};

TEST(ExecutorTest, PacksQueuedJobsUpToTheTokenBudget) {
  FakeRunner fake;
  fake.hold = true;
  auto executor = Executor::Create(fake.Runner(), {/*max_batch_tokens=*/10, /*max_inflight_requests=*/16});
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  // Queued behind the held batch: 4 + 4 fit in 10 tokens, the third does not.
  for (size_t i = 1; i <= 3; ++i) ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1, 2, 3, 4}), i)).ok());
  fake.Release();
  outcome.WaitDone(4);
  EXPECT_EQ(fake.batch_sizes, (std::vector<size_t>{1, 2, 1}));
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(outcome.statuses[i].ok());
  EXPECT_EQ(outcome.n_tokens[2], 4u);  // results go back to their own job
}

TEST(ExecutorTest, OneBadJobDoesNotFailItsBatch) {
  FakeRunner fake;
  fake.hold = true;
  auto executor = Executor::Create(fake.Runner(), {100, 16});
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2, 2}), 1)).ok());
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({13}), 2)).ok());
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({3}), 3)).ok());
  fake.Release();
  outcome.WaitDone(4);
  EXPECT_TRUE(outcome.statuses[1].ok());
  EXPECT_EQ(outcome.statuses[2].code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(outcome.statuses[3].ok());
}

TEST(ExecutorTest, AdmissionCancellationAndShutdown) {
  FakeRunner fake;
  fake.hold = true;
  auto executor = Executor::Create(fake.Runner(), {100, 3});
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  auto cancelled = std::make_shared<std::atomic<bool>>(false);
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2}), 1, cancelled)).ok());
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({3}), 2)).ok());
  EXPECT_EQ((*executor)->Submit(outcome.MakeJob(Seq({4}), 3)).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ((*executor)->inflight(), 3);
  cancelled->store(true);

  std::thread stopper([&] { (*executor)->Shutdown(); });
  // Shutdown refuses new work at once, then waits for the running batch.
  while ((*executor)->Submit(outcome.MakeJob(Seq({5}), 4)).code() != absl::StatusCode::kUnavailable) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  fake.Release();
  stopper.join();
  outcome.WaitDone(3);
  EXPECT_TRUE(outcome.statuses[0].ok());
  // Queued jobs are failed, not run, once shutdown started.
  EXPECT_EQ(outcome.statuses[1].code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(outcome.statuses[2].code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake.batch_sizes, (std::vector<size_t>{1}));
  EXPECT_EQ((*executor)->inflight(), 0);
}

}  // namespace
}  // namespace sae
