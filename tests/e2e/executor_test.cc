// The executor with a fake batch runner, independent of the model: packing to
// the token budget while a batch runs, failure isolation, admission (requests
// and tokens), backpressure, cancellation and deadlines, windows, queue delay
// and shutdown.
#include "rpc/executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "rpc/windows.h"
#include "testing/test_util.h"

namespace sae {
namespace {

using testing::WaitFor;

SequenceRequest Seq(std::vector<int32_t> ids) {
  SequenceRequest r;
  r.ids = std::move(ids);
  r.sae_indices = {0};
  r.k = 1;
  return r;
}

ExecutorOptions Options(int max_batch_tokens, int max_inflight_requests) {
  ExecutorOptions options;
  options.max_batch_tokens = max_batch_tokens;
  options.max_inflight_requests = max_inflight_requests;
  return options;
}

// Windows of 4 tokens (BOS 0 prepended to the later ones), one per batch.
ExecutorOptions OneWindowPerBatch() {
  ExecutorOptions options = Options(/*max_batch_tokens=*/4, 4);
  options.max_seq_len = 4;
  options.bos_id = 0;
  return options;
}

// Records batches; holds the runner while `hold` is set. Its result for a
// sequence has one SAE with k=1: index = the token id, value = the position
// in the sequence, so stitching and windowing can be checked.
struct FakeRunner {
  std::mutex mu;
  std::condition_variable cv;
  bool hold = false;
  int entered = 0;
  std::vector<size_t> batch_sizes;
  std::vector<std::vector<int32_t>> sequences;

  BatchRunner Runner() {
    return BlockingRunner([this](const std::vector<SequenceRequest>& batch) -> BatchResults {
      std::unique_lock<std::mutex> lock(mu);
      ++entered;
      cv.notify_all();
      cv.wait(lock, [this] { return !hold; });
      batch_sizes.push_back(batch.size());
      for (const auto& r : batch) {
        // A poisoned id fails any batch it is in, as a bad input would.
        if (!r.ids.empty() && r.ids[0] == 13) return absl::InvalidArgumentError("poisoned");
      }
      std::vector<SequenceResult> results(batch.size());
      for (size_t i = 0; i < batch.size(); ++i) {
        sequences.push_back(batch[i].ids);
        SaeTopK top;
        top.k = 1;
        for (size_t t = 0; t < batch[i].ids.size(); ++t) {
          top.indices.push_back(batch[i].ids[t]);
          top.values.push_back(static_cast<float>(t));
        }
        results[i].saes.push_back(std::move(top));
      }
      return results;
    });
  }
  void Hold() {
    std::lock_guard<std::mutex> lock(mu);
    hold = true;
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu);
    hold = false;
    cv.notify_all();
  }
  void WaitEntered(int n = 1) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return entered >= n; });
  }
  std::vector<size_t> Batches() {
    std::lock_guard<std::mutex> lock(mu);
    return batch_sizes;
  }
};

struct Outcome {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<absl::Status> statuses;
  std::vector<SequenceResult> results;
  std::vector<int> admitted_order;  // slots, in on_admitted order
  std::vector<bool> admitted_before_done;
  int n_done = 0;

  void Reserve(size_t slot) {
    std::lock_guard<std::mutex> lock(mu);
    if (statuses.size() <= slot) {
      statuses.resize(slot + 1, absl::UnknownError("not called"));
      results.resize(slot + 1);
      admitted_before_done.resize(slot + 1);
    }
  }
  Job MakeJob(SequenceRequest request, size_t slot, CancelFlag cancelled = nullptr) {
    Reserve(slot);
    Job job;
    job.request = std::move(request);
    job.cancelled = std::move(cancelled);
    job.on_admitted = [this, slot] {
      std::lock_guard<std::mutex> lock(mu);
      admitted_order.push_back(static_cast<int>(slot));
    };
    job.done = [this, slot](absl::StatusOr<SequenceResult> result) {
      std::lock_guard<std::mutex> lock(mu);
      statuses[slot] = result.status();
      if (result.ok()) results[slot] = std::move(*result);
      admitted_before_done[slot] =
          std::find(admitted_order.begin(), admitted_order.end(), static_cast<int>(slot)) != admitted_order.end();
      ++n_done;
      cv.notify_all();
    };
    return job;
  }
  void WaitDone(int n) {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return n_done >= n; }));
  }
  absl::Status Status(size_t slot) {
    std::lock_guard<std::mutex> lock(mu);
    return statuses[slot];
  }
  int Done() {
    std::lock_guard<std::mutex> lock(mu);
    return n_done;
  }
};

TEST(WindowsTest, SplitPrependsBosOnlyWhenTheRequestStartsWithIt) {
  const std::vector<int32_t> with_bos = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<Window> w = SplitIntoWindows(with_bos, 4, /*bos=*/0);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].begin, 0);
  EXPECT_EQ(w[0].end, 4);
  EXPECT_FALSE(w[0].bos_prepended);
  EXPECT_EQ(w[1].begin, 4);
  EXPECT_EQ(w[1].end, 7);
  EXPECT_TRUE(w[1].bos_prepended);
  EXPECT_EQ(w[2].begin, 7);
  EXPECT_EQ(w[2].end, 10);
  for (const Window& window : w) EXPECT_LE(window.n_tokens(), 4);
  EXPECT_EQ(WindowRequest(Seq(with_bos), w[1], 0).ids, (std::vector<int32_t>{0, 4, 5, 6}));

  const std::vector<int32_t> no_bos = {5, 1, 2, 3, 4, 5, 6, 7, 8};
  w = SplitIntoWindows(no_bos, 4, /*bos=*/0);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[1].begin, 4);
  EXPECT_EQ(w[1].end, 8);
  EXPECT_FALSE(w[1].bos_prepended);
  EXPECT_EQ(w[2].n_tokens(), 1);

  EXPECT_EQ(SplitIntoWindows(with_bos, 0, 0).size(), 1u);
  EXPECT_EQ(SplitIntoWindows(with_bos, 10, 0).size(), 1u);
}

TEST(ExecutorTest, PacksQueuedJobsUpToTheTokenBudgetWhileABatchRuns) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(/*max_batch_tokens=*/10, /*max_inflight_requests=*/16));
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  // Staged behind the held batch: 4 + 4 fit in 10 tokens, the third does not.
  for (size_t i = 1; i <= 3; ++i) ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1, 2, 3, 4}), i)).ok());
  ASSERT_TRUE(WaitFor([&] { return (*executor)->queued_tokens() == 13; }));
  // Admitted is not yet staged: the scheduler thread packs them.
  ASSERT_TRUE(WaitFor([&] { return (*executor)->staged_windows() == 2; }));
  fake.Release();
  outcome.WaitDone(4);
  EXPECT_EQ(fake.Batches(), (std::vector<size_t>{1, 2, 1}));
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(outcome.statuses[i].ok());
  // Results go back to their own job.
  EXPECT_EQ(outcome.results[2].saes[0].indices, (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ((*executor)->queued_tokens(), 0);
  EXPECT_EQ((*executor)->inflight(), 0);
}

TEST(ExecutorTest, OneBadJobDoesNotFailItsBatch) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(100, 16));
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

TEST(ExecutorTest, RequestAdmissionAndShutdown) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(100, 3));
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2}), 1)).ok());
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({3}), 2)).ok());
  absl::Status refused = (*executor)->Submit(outcome.MakeJob(Seq({4}), 3));
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("max_inflight_requests"), std::string::npos) << refused;
  EXPECT_EQ((*executor)->inflight(), 3);

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
  EXPECT_EQ(fake.Batches(), (std::vector<size_t>{1}));
  EXPECT_EQ((*executor)->inflight(), 0);
}

TEST(ExecutorTest, QueuedTokensAreBounded) {
  FakeRunner fake;
  fake.Hold();
  ExecutorOptions options = Options(100, 16);
  options.max_queued_tokens = 10;
  auto executor = Executor::Create(fake.Runner(), options);
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1, 2, 3, 4, 5, 6}), 0)).ok());
  fake.WaitEntered();
  absl::Status refused = (*executor)->Submit(outcome.MakeJob(Seq({1, 2, 3, 4, 5}), 1));
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.message().find("max_queued_tokens"), std::string::npos) << refused;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1, 2, 3, 4}), 2)).ok());  // exactly 10
  EXPECT_EQ((*executor)->queued_tokens(), 10);
  fake.Release();
  outcome.WaitDone(2);
  EXPECT_EQ((*executor)->queued_tokens(), 0);
  // With nothing queued, a job bigger than the bound still runs (alone).
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq(std::vector<int32_t>(12, 1)), 3)).ok());
  outcome.WaitDone(3);
  EXPECT_TRUE(outcome.Status(3).ok());
}

TEST(ExecutorTest, CancelledQueuedJobIsDroppedAndFreesItsSlotAtOnce) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(100, 2));
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  auto cancelled = std::make_shared<std::atomic<bool>>(false);
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2}), 1, cancelled)).ok());
  EXPECT_EQ((*executor)->Submit(outcome.MakeJob(Seq({3}), 2)).code(), absl::StatusCode::kResourceExhausted);
  cancelled->store(true);
  // Freed while the running batch is still held.
  outcome.WaitDone(1);
  EXPECT_EQ(outcome.Status(1).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ((*executor)->inflight(), 1);
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({4}), 3)).ok());
  fake.Release();
  outcome.WaitDone(3);
  EXPECT_TRUE(outcome.Status(3).ok());
  for (const auto& s : fake.sequences) EXPECT_NE(s, (std::vector<int32_t>{2})) << "the cancelled job ran";
}

TEST(ExecutorTest, JobPastItsDeadlineIsDroppedBeforeRunning) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(100, 4));
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  Job late = outcome.MakeJob(Seq({2}), 1);
  late.deadline = Clock::now() + std::chrono::milliseconds(50);
  ASSERT_TRUE((*executor)->Submit(std::move(late)).ok());
  outcome.WaitDone(1);
  EXPECT_EQ(outcome.Status(1).code(), absl::StatusCode::kDeadlineExceeded);
  fake.Release();
  outcome.WaitDone(2);
  EXPECT_EQ(fake.Batches(), (std::vector<size_t>{1}));
}

// One request in flight at most, and it (slot 0, submitted to wait) is held
// inside the runner: later submitters find the executor full.
class HeldExecutorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fake.Hold();
    auto created = Executor::Create(fake.Runner(), Options(100, 1));
    ASSERT_TRUE(created.ok());
    executor = std::move(*created);
    ASSERT_TRUE(executor->Submit(outcome.MakeJob(Seq({1}), 0), Executor::WhenFull::kWait).ok());
    fake.WaitEntered();
  }

  FakeRunner fake;
  std::unique_ptr<Executor> executor;
  Outcome outcome;
};

TEST_F(HeldExecutorTest, BackpressureWaitsInLineInOrder) {
  ASSERT_TRUE(executor->Submit(outcome.MakeJob(Seq({2}), 1), Executor::WhenFull::kWait).ok());
  ASSERT_TRUE(executor->Submit(outcome.MakeJob(Seq({3}), 2), Executor::WhenFull::kWait).ok());
  EXPECT_EQ(executor->waiting(), 2);
  {
    std::lock_guard<std::mutex> lock(outcome.mu);
    EXPECT_EQ(outcome.admitted_order, (std::vector<int>{0})) << "only the first was admitted";
  }
  // Nobody overtakes the line, even a rejecting submitter.
  EXPECT_EQ(executor->Submit(outcome.MakeJob(Seq({4}), 3)).code(), absl::StatusCode::kResourceExhausted);
  fake.Release();
  outcome.WaitDone(3);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(outcome.statuses[i].ok()) << i;
    EXPECT_TRUE(outcome.admitted_before_done[i]) << i;
  }
  EXPECT_EQ(outcome.admitted_order, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(executor->waiting(), 0);
}

// A job waiting in the admission line whose deadline passes, or whose caller
// cancels, leaves the line within the sweep interval (20 ms), while the batch
// ahead still runs: the scheduler, idle when the job joined the line, must
// wake up for it.
TEST_F(HeldExecutorTest, WaitersInLineAreSweptWhileTheBatchRuns) {
  Job late = outcome.MakeJob(Seq({2}), 1);
  late.deadline = Clock::now() + std::chrono::milliseconds(50);
  ASSERT_TRUE(executor->Submit(std::move(late), Executor::WhenFull::kWait).ok());
  CancelFlag cancel = std::make_shared<std::atomic<bool>>(false);
  ASSERT_TRUE(executor->Submit(outcome.MakeJob(Seq({3}), 2, cancel), Executor::WhenFull::kWait).ok());
  EXPECT_EQ(executor->waiting(), 2);
  cancel->store(true);
  const Clock::time_point start = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return outcome.Done() == 2; }, std::chrono::milliseconds(1000)))
      << "the waiters are still in line with the batch ahead running";
  EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(500));
  EXPECT_EQ(outcome.Status(1).code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(outcome.Status(2).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(executor->waiting(), 0);
  fake.Release();
  outcome.WaitDone(3);
  EXPECT_TRUE(outcome.Status(0).ok());
}

// A job admitted from the line while a batch is delivered has its
// on_admitted queued on the engine thread, after that batch's on_window
// callbacks; the scheduler may drop the job (here: cancelled meanwhile) and
// run its `done` first on its own thread. on_admitted must still come first
// (ExtractStream's read reservation depends on it; the stream may be gone
// after `done`).
TEST(ExecutorTest, OnAdmittedComesBeforeDoneOfAJobDroppedAsItIsAdmitted) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(100, 1));
  ASSERT_TRUE(executor.ok());
  CancelFlag cancel_waiter = std::make_shared<std::atomic<bool>>(false);
  std::atomic<bool> waiter_done{false};
  Job first;
  first.request = Seq({1, 2});
  first.on_window = [&](const Window&, SequenceResult) {
    // The waiter was admitted just before this (first's slot is free); its
    // on_admitted is queued behind this callback. Cancelled now, the
    // scheduler drops it within its sweep interval.
    cancel_waiter->store(true);
    WaitFor([&] { return waiter_done.load(); }, std::chrono::milliseconds(300));
  };
  first.done = [](absl::StatusOr<SequenceResult>) {};
  std::atomic<bool> admitted{false};
  std::atomic<bool> done_before_admitted{false};
  absl::Status waiter_status;
  Job waiter;
  waiter.request = Seq({3, 4});
  waiter.cancelled = cancel_waiter;
  waiter.on_admitted = [&] { admitted = true; };
  waiter.done = [&](absl::StatusOr<SequenceResult> result) {
    done_before_admitted = !admitted.load();
    waiter_status = result.status();
    waiter_done = true;
  };
  ASSERT_TRUE((*executor)->Submit(std::move(first), Executor::WhenFull::kWait).ok());
  fake.WaitEntered();
  ASSERT_TRUE((*executor)->Submit(std::move(waiter), Executor::WhenFull::kWait).ok());
  EXPECT_EQ((*executor)->waiting(), 1);
  fake.Release();
  ASSERT_TRUE(WaitFor([&] { return waiter_done.load(); }));
  EXPECT_EQ(waiter_status.code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE(done_before_admitted.load()) << "done ran before on_admitted";
}

TEST(ExecutorTest, StopAdmittingFailsTheLineAndFinishesAdmittedJobs) {
  FakeRunner fake;
  fake.Hold();
  auto executor = Executor::Create(fake.Runner(), Options(100, 1));
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  fake.WaitEntered();
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2}), 1), Executor::WhenFull::kWait).ok());
  (*executor)->StopAdmitting();
  outcome.WaitDone(1);
  EXPECT_EQ(outcome.Status(1).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(outcome.admitted_before_done[1]) << "on_admitted comes first even on failure";
  EXPECT_EQ((*executor)->Submit(outcome.MakeJob(Seq({3}), 2)).code(), absl::StatusCode::kUnavailable);
  fake.Release();
  outcome.WaitDone(2);
  EXPECT_TRUE(outcome.Status(0).ok());
}

TEST(ExecutorTest, LongJobRunsAsWindowsStitchedOrStreamedInOrder) {
  FakeRunner fake;
  auto executor = Executor::Create(fake.Runner(), OneWindowPerBatch());
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  const std::vector<int32_t> ids = {0, 11, 12, 13, 14, 15, 16, 17, 18, 19};
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq(ids), 0)).ok());
  outcome.WaitDone(1);
  ASSERT_TRUE(outcome.statuses[0].ok()) << outcome.statuses[0];
  // One window per batch (budget 4); later windows start with BOS.
  EXPECT_EQ(fake.sequences, (std::vector<std::vector<int32_t>>{{0, 11, 12, 13}, {0, 14, 15, 16}, {0, 17, 18, 19}}));
  // Stitched: the prepended BOS rows are gone; positions restart per window.
  EXPECT_EQ(outcome.results[0].saes[0].indices, ids);
  EXPECT_EQ(outcome.results[0].saes[0].values, (std::vector<float>{0, 1, 2, 3, 1, 2, 3, 1, 2, 3}));

  // Streamed: one callback per window, in order, before done.
  std::mutex mu;
  std::vector<std::pair<int, int>> windows;
  std::vector<int32_t> streamed;
  Job job = outcome.MakeJob(Seq(ids), 1);
  job.on_window = [&](const Window& window, SequenceResult result) {
    std::lock_guard<std::mutex> lock(mu);
    windows.push_back({window.begin, window.end});
    streamed.insert(streamed.end(), result.saes[0].indices.begin(), result.saes[0].indices.end());
  };
  ASSERT_TRUE((*executor)->Submit(std::move(job)).ok());
  outcome.WaitDone(2);
  ASSERT_TRUE(outcome.Status(1).ok());
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(windows, (std::vector<std::pair<int, int>>{{0, 4}, {4, 7}, {7, 10}}));
  EXPECT_EQ(streamed, ids);
}

// A long job whose next window is still queued fails on the scheduler thread
// (here: cancelled) while its previous window is being delivered on the
// engine thread: `done` waits until that on_window has returned (the caller
// may be gone after `done`).
TEST(ExecutorTest, DoneWaitsForTheWindowBeingDelivered) {
  FakeRunner fake;
  auto executor = Executor::Create(fake.Runner(), OneWindowPerBatch());
  ASSERT_TRUE(executor.ok());
  CancelFlag cancelled = std::make_shared<std::atomic<bool>>(false);
  std::atomic<bool> in_window{false}, done_during_window{false}, done{false};
  absl::Status status;
  Job job;
  job.request = Seq({0, 11, 12, 13, 14, 15, 16, 17, 18, 19});  // 3 windows, one per batch
  job.cancelled = cancelled;
  job.on_window = [&](const Window&, SequenceResult) {
    in_window = true;
    cancelled->store(true);  // the scheduler's sweep drops the windows still queued
    WaitFor([&] { return done.load(); }, std::chrono::milliseconds(300));
    in_window = false;
  };
  job.done = [&](absl::StatusOr<SequenceResult> result) {
    done_during_window = in_window.load();
    status = result.status();
    done = true;
  };
  ASSERT_TRUE((*executor)->Submit(std::move(job)).ok());
  ASSERT_TRUE(WaitFor([&] { return done.load(); }));
  EXPECT_EQ(status.code(), absl::StatusCode::kCancelled) << status;
  EXPECT_FALSE(done_during_window.load()) << "done ran while on_window was running";
}

TEST(ExecutorTest, MaxQueueDelayGathersABatch) {
  FakeRunner fake;
  ExecutorOptions options = Options(100, 8);
  options.max_queue_delay = std::chrono::milliseconds(1000);
  auto executor = Executor::Create(fake.Runner(), options);
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  const auto start = Clock::now();
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2}), 1)).ok());
  outcome.WaitDone(2);
  EXPECT_EQ(fake.Batches(), (std::vector<size_t>{2})) << "the engine was idle, yet the first job waited for company";
  EXPECT_GE(Clock::now() - start, std::chrono::milliseconds(900));
  // A full batch does not wait.
  const auto full_start = Clock::now();
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq(std::vector<int32_t>(100, 1)), 2)).ok());
  outcome.WaitDone(3);
  EXPECT_LT(Clock::now() - full_start, std::chrono::milliseconds(500));
}

// One SAE with k=1 per sequence: index = the token id, value 1.
std::vector<SequenceResult> EchoResults(const std::vector<SequenceRequest>& batch) {
  std::vector<SequenceResult> results(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    SaeTopK top;
    top.k = 1;
    top.indices = batch[i].ids;
    top.values.assign(batch[i].ids.size(), 1.0f);
    results[i].saes.push_back(std::move(top));
  }
  return results;
}

// A runner that logs when each batch (named by its first token) is started
// and collected. While `hold_start` / `hold_collect` is set, starting /
// collecting the batch named 1 waits.
struct LoggingRunner {
  std::mutex mu;
  std::condition_variable cv;
  bool hold_start = false;
  bool hold_collect = false;
  std::vector<std::string> events;

  BatchRunner Runner(bool overlapped) {
    BatchRunner runner;
    runner.overlapped = overlapped;
    runner.start = [this](const std::vector<SequenceRequest>& batch) -> absl::StatusOr<BatchCollector> {
      const int32_t name = batch.front().ids.front();
      Log("start", name, &hold_start);
      return BatchCollector([this, batch, name]() -> BatchResults {
        Log("collect", name, &hold_collect);
        return EchoResults(batch);
      });
    };
    return runner;
  }
  void Log(const char* what, int32_t name, const bool* hold) {
    std::unique_lock<std::mutex> lock(mu);
    events.push_back(absl::StrCat(what, " ", name));
    cv.notify_all();
    if (name == 1) cv.wait(lock, [hold] { return !*hold; });
  }
  void Set(bool* flag, bool value) {
    std::lock_guard<std::mutex> lock(mu);
    *flag = value;
    cv.notify_all();
  }
  // With hold_start set: submits jobs 0 ({1}) and 1 ({2}) so that batch 2 is
  // staged while "start 1" waits, then lets starting go, so an overlapped
  // runner has both batches on the device.
  ::testing::AssertionResult StartTwoBatches(Executor* executor, Outcome* outcome) {
    if (!executor->Submit(outcome->MakeJob(Seq({1}), 0)).ok() || !WaitEvents(1)) {
      return ::testing::AssertionFailure() << "batch 1 did not start";
    }
    if (!executor->Submit(outcome->MakeJob(Seq({2}), 1)).ok() ||
        !WaitFor([&] { return executor->staged_windows() == 1; })) {
      return ::testing::AssertionFailure() << "batch 2 was not staged";
    }
    Set(&hold_start, false);
    return ::testing::AssertionSuccess();
  }
  bool WaitEvents(size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return events.size() >= n; });
  }
  std::vector<std::string> Events() {
    std::lock_guard<std::mutex> lock(mu);
    return events;
  }
};

// On a GPU the next batch is queued on the device before the running one is
// read back; on the CPU that would only delay the first batch's results.
TEST(ExecutorTest, OverlappedRunnerStartsTheNextBatchBeforeCollectingTheRunningOne) {
  for (bool overlapped : {true, false}) {
    SCOPED_TRACE(overlapped ? "overlapped" : "blocking");
    LoggingRunner runner;
    runner.hold_start = true;
    auto executor = Executor::Create(runner.Runner(overlapped), Options(100, 16));
    ASSERT_TRUE(executor.ok());
    Outcome outcome;
    ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
    ASSERT_TRUE(runner.WaitEvents(1));
    ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2, 3}), 1)).ok());
    ASSERT_TRUE(WaitFor([&] { return (*executor)->staged_windows() == 1; }));
    runner.Set(&runner.hold_start, false);
    outcome.WaitDone(2);
    const std::vector<std::string> want =
        overlapped ? std::vector<std::string>{"start 1", "start 2", "collect 1", "collect 2"}
                   : std::vector<std::string>{"start 1", "collect 1", "start 2", "collect 2"};
    EXPECT_EQ(runner.Events(), want);
    ASSERT_TRUE(outcome.Status(0).ok());
    ASSERT_TRUE(outcome.Status(1).ok());
    EXPECT_EQ(outcome.results[1].saes[0].indices, (std::vector<int32_t>{2, 3}));
    EXPECT_EQ((*executor)->inflight(), 0);
    EXPECT_EQ((*executor)->queued_tokens(), 0);
  }
}

// Shutdown finishes both batches on the device, in order.
TEST(ExecutorTest, ShutdownFinishesBothOverlappedBatches) {
  LoggingRunner runner;
  runner.hold_start = true;
  runner.hold_collect = true;
  auto executor = Executor::Create(runner.Runner(/*overlapped=*/true), Options(100, 16));
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE(runner.StartTwoBatches(executor->get(), &outcome));
  // start 1, start 2, collect 1 (held); on failure the batches are let go.
  if (!runner.WaitEvents(3)) {
    runner.Set(&runner.hold_collect, false);
    (*executor)->Shutdown();
    FAIL() << "the second batch did not start while the first was on the device";
  }
  std::thread stopper([&] { (*executor)->Shutdown(); });
  ASSERT_TRUE(WaitFor([&] { return !(*executor)->Submit(outcome.MakeJob(Seq({5}), 2)).ok(); }));
  runner.Set(&runner.hold_collect, false);
  stopper.join();
  outcome.WaitDone(2);
  EXPECT_TRUE(outcome.Status(0).ok());
  EXPECT_TRUE(outcome.Status(1).ok());
  EXPECT_EQ(runner.Events(), (std::vector<std::string>{"start 1", "start 2", "collect 1", "collect 2"}));
}

// A failed batch whose runner then reports the device lost stops the
// executor for good: on_device_lost once, queued jobs and new submissions get
// UNAVAILABLE saying why, nothing else runs.
TEST(ExecutorTest, LostDeviceFailsEverythingQueuedAndRefusesNewJobs) {
  FakeRunner fake;
  fake.Hold();
  std::atomic<bool> lost{false};
  BatchRunner runner = fake.Runner();
  runner.device_status = [&lost]() -> absl::Status {
    return lost.load() ? absl::InternalError("cuda copy to host: cudaErrorIllegalAddress") : absl::OkStatus();
  };
  std::mutex mu;
  std::vector<std::string> reports;
  ExecutorOptions options = Options(2, 16);  // one 2-token job per batch
  options.on_device_lost = [&](const absl::Status& fault) {
    std::lock_guard<std::mutex> lock(mu);
    reports.push_back(std::string(fault.message()));
  };
  auto executor = Executor::Create(std::move(runner), options);
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({13, 1}), 0)).ok());  // fails, as the device would
  fake.WaitEntered();
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2, 2}), 1)).ok());
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({3, 3}), 2)).ok());
  lost = true;
  fake.Release();
  outcome.WaitDone(3);
  EXPECT_EQ(outcome.Status(0).code(), absl::StatusCode::kInvalidArgument);
  for (size_t i : {1, 2}) {
    EXPECT_EQ(outcome.Status(i).code(), absl::StatusCode::kUnavailable) << outcome.Status(i);
    EXPECT_NE(outcome.Status(i).message().find("cudaErrorIllegalAddress"), std::string::npos) << outcome.Status(i);
  }
  const absl::Status refused = (*executor)->Submit(outcome.MakeJob(Seq({4}), 3));
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(refused.message().find("GPU failed"), std::string::npos) << refused;
  EXPECT_EQ(fake.Batches(), (std::vector<size_t>{1})) << "nothing runs after the device is lost";
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(reports, (std::vector<std::string>{"cuda copy to host: cudaErrorIllegalAddress"}));
  EXPECT_EQ((*executor)->inflight(), 0);
}

// A runner call that does not return within batch_timeout (a kernel that
// never ends blocks the read-back) means a hung device: the watchdog fails
// the jobs of both batches on the device and what is queued with
// UNAVAILABLE, reports the device lost once with DEADLINE_EXCEEDED, and
// Shutdown returns without the stuck engine thread. If the runner ever
// returns, nothing is delivered twice.
TEST(ExecutorTest, WatchdogFailsEverythingWhenTheDeviceHangs) {
  LoggingRunner runner;
  runner.hold_start = true;
  runner.hold_collect = true;
  std::mutex mu;
  std::vector<absl::Status> reports;
  ExecutorOptions options = Options(1, 16);  // one token per batch
  // Long enough for the setup below (a few ms) while the held "start 1" is timed too.
  options.batch_timeout = std::chrono::milliseconds(2000);
  options.on_device_lost = [&](const absl::Status& fault) {
    std::lock_guard<std::mutex> lock(mu);
    reports.push_back(fault);
  };
  auto executor = Executor::Create(runner.Runner(/*overlapped=*/true), options);
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE(
      runner.StartTwoBatches(executor->get(), &outcome));  // start 2 (both on the device), collect 1 never returns
  ASSERT_TRUE(runner.WaitEvents(3));
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({3}), 2)).ok());  // queued behind them
  outcome.WaitDone(3);
  for (size_t i : {0, 1, 2}) {
    EXPECT_EQ(outcome.Status(i).code(), absl::StatusCode::kUnavailable) << i << ": " << outcome.Status(i);
    EXPECT_NE(outcome.Status(i).message().find("presumed hung"), std::string::npos) << outcome.Status(i);
  }
  EXPECT_TRUE((*executor)->hung());
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(reports.size(), 1u);
    EXPECT_EQ(reports[0].code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_NE(reports[0].message().find("longer than the batch timeout (2.0 s)"), std::string::npos) << reports[0];
  }
  EXPECT_EQ((*executor)->Submit(outcome.MakeJob(Seq({4}), 3)).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*executor)->inflight(), 0);
  EXPECT_EQ((*executor)->queued_tokens(), 0);
  std::atomic<bool> stopped{false};
  std::thread stopper([&] {
    (*executor)->Shutdown();
    stopped = true;
  });
  const bool returned = WaitFor([&] { return stopped.load(); });
  runner.Set(&runner.hold_collect, false);  // the device comes back: the engine thread can end
  stopper.join();
  EXPECT_TRUE(returned) << "Shutdown waited for the hung engine thread";
  executor->reset();  // joins the engine thread
  EXPECT_EQ(outcome.Done(), 3);
  EXPECT_EQ(runner.Events(), (std::vector<std::string>{"start 1", "start 2", "collect 1", "collect 2"}));
}

// A device already reported lost (a failed batch) can still hang in the
// batch after it: the watchdog answers that batch's jobs all the same, and
// Shutdown does not wait for the stuck engine thread; on_device_lost is told
// once, of the first fault.
TEST(ExecutorTest, WatchdogStillActsAfterTheDeviceWasReportedLost) {
  std::mutex mu;
  std::condition_variable cv;
  bool entered_1 = false, go = false, release = false;
  std::atomic<bool> lost{false};
  BatchRunner runner;
  runner.overlapped = true;
  runner.device_status = [&]() -> absl::Status {
    return lost.load() ? absl::InternalError("cudaErrorIllegalAddress") : absl::OkStatus();
  };
  runner.start = [&](const std::vector<SequenceRequest>& batch) -> absl::StatusOr<BatchCollector> {
    const int32_t name = batch.front().ids.front();
    std::unique_lock<std::mutex> lock(mu);
    if (name == 1) {
      entered_1 = true;
      cv.notify_all();
      cv.wait(lock, [&] { return go; });  // until batch 2 is staged: both go on the device
    }
    return BatchCollector([&, name, n = batch.size()]() -> BatchResults {
      if (name == 1) {
        lost = true;
        return absl::InternalError("cudaErrorIllegalAddress");
      }
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return release; });  // batch 2 hangs
      return std::vector<SequenceResult>(n);
    });
  };
  std::atomic<int> reports{0};
  ExecutorOptions options = Options(1, 16);
  options.batch_timeout = std::chrono::milliseconds(1000);  // the held "start 1" is timed too
  options.on_device_lost = [&](const absl::Status& fault) {
    EXPECT_EQ(fault.message(), "cudaErrorIllegalAddress");
    ++reports;
  };
  auto executor = Executor::Create(std::move(runner), options);
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({1}), 0)).ok());
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return entered_1; }));
  }
  ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({2}), 1)).ok());
  ASSERT_TRUE(WaitFor([&] { return (*executor)->staged_windows() == 1; }));  // batch 2, while "start 1" waits
  {
    std::lock_guard<std::mutex> lock(mu);
    go = true;
    cv.notify_all();
  }
  outcome.WaitDone(2);
  EXPECT_EQ(outcome.Status(0).code(), absl::StatusCode::kInternal) << outcome.Status(0);
  EXPECT_EQ(outcome.Status(1).code(), absl::StatusCode::kUnavailable) << outcome.Status(1);
  EXPECT_NE(outcome.Status(1).message().find("presumed hung"), std::string::npos) << outcome.Status(1);
  EXPECT_TRUE((*executor)->hung());
  EXPECT_EQ(reports.load(), 1);
  std::atomic<bool> stopped{false};
  std::thread stopper([&] {
    (*executor)->Shutdown();
    stopped = true;
  });
  const bool returned = WaitFor([&] { return stopped.load(); });
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
    cv.notify_all();
  }
  stopper.join();
  EXPECT_TRUE(returned) << "Shutdown waited for the hung engine thread";
  executor->reset();
  EXPECT_EQ(outcome.Done(), 2);
}

// The timeout bounds each runner call, not the work behind it: a stream of
// batches that each finish in time runs on, however long it lasts in all.
TEST(ExecutorTest, WatchdogLetsBatchesThatFinishInTimeRun) {
  std::atomic<int> batches{0};
  BatchRunner runner = BlockingRunner([&](const std::vector<SequenceRequest>& batch) -> BatchResults {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ++batches;
    return EchoResults(batch);
  });
  std::atomic<int> lost{0};
  ExecutorOptions options = Options(1, 16);  // one token per batch
  options.batch_timeout = std::chrono::milliseconds(500);
  options.on_device_lost = [&](const absl::Status&) { ++lost; };
  auto executor = Executor::Create(std::move(runner), options);
  ASSERT_TRUE(executor.ok());
  Outcome outcome;
  for (int i = 0; i < 10; ++i) ASSERT_TRUE((*executor)->Submit(outcome.MakeJob(Seq({i}), i)).ok());
  outcome.WaitDone(10);  // about 1 s of batches, twice the timeout
  for (size_t i = 0; i < 10; ++i) EXPECT_TRUE(outcome.Status(i).ok()) << i << ": " << outcome.Status(i);
  EXPECT_EQ(batches.load(), 10);
  EXPECT_EQ(lost.load(), 0);
  EXPECT_FALSE((*executor)->hung());
}

}  // namespace
}  // namespace sae
