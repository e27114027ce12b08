// The executor: one thread owns the Engine (and with it the device). gRPC
// threads submit already-tokenized jobs; the executor packs everything queued
// up to a token budget into one batch, runs it and calls each job back.
#ifndef SAE_RPC_EXECUTOR_H_
#define SAE_RPC_EXECUTOR_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/engine.h"

namespace sae {

// Runs one packed batch; results are parallel to the requests. Called only
// on the executor thread (Engine::Run in production, a fake in tests).
using BatchRunner = std::function<absl::StatusOr<std::vector<SequenceResult>>(const std::vector<SequenceRequest>&)>;

struct ExecutorOptions {
  // Tokens packed into one batch. A single longer job still runs, alone.
  int max_batch_tokens = 8192;
  // Jobs admitted (queued or running) at once; more are refused.
  int max_inflight_requests = 256;
};

// Set by the submitter when its client went away; the executor then drops
// the job instead of running it.
using CancelFlag = std::shared_ptr<std::atomic<bool>>;

struct Job {
  SequenceRequest request;
  CancelFlag cancelled;  // may be null
  // Called exactly once, on the executor thread (or in Shutdown): the result,
  // CANCELLED when dropped, UNAVAILABLE when the executor shut down first.
  // Must not block: it runs between batches.
  std::function<void(absl::StatusOr<SequenceResult>)> done;
};

class Executor {
 public:
  static absl::StatusOr<std::unique_ptr<Executor>> Create(BatchRunner runner, const ExecutorOptions& options);
  // Shuts down (see Shutdown).
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Never blocks. RESOURCE_EXHAUSTED when max_inflight_requests jobs are
  // already admitted, UNAVAILABLE after Shutdown; on error `job.done` is not
  // called.
  absl::Status Submit(Job job);

  // Finishes the batch that is running, fails every queued job with
  // UNAVAILABLE and joins the thread. Idempotent.
  void Shutdown();

  // Jobs admitted and not yet called back.
  int inflight() const { return inflight_.load(); }

 private:
  Executor(BatchRunner runner, const ExecutorOptions& options);
  void Loop();
  // Runs `batch` and calls every job back; a failed batch of several jobs is
  // retried one job at a time so one bad job cannot fail the others.
  void RunBatch(std::vector<Job>& batch);
  void Complete(Job& job, absl::StatusOr<SequenceResult> result);

  const BatchRunner runner_;
  const ExecutorOptions options_;
  std::atomic<int> inflight_{0};

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;  // guarded by mu_
  bool stopping_ = false;  // guarded by mu_
  std::mutex join_mu_;     // serializes concurrent Shutdown calls
  std::thread thread_;
};

}  // namespace sae

#endif  // SAE_RPC_EXECUTOR_H_
