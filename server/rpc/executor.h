// The serving engine behind the gRPC service, in the shape of
// text-embeddings-inference:
//
//   Submit (gRPC threads) --admission--> inbox --> scheduler thread --> staged batch --> engine thread
//
//  - Admission: at most max_inflight_requests requests and max_queued_tokens
//    tokens admitted at once; beyond that a job is refused at once
//    (RESOURCE_EXHAUSTED) or, with WhenFull::kWait, waits in a FIFO admission
//    line until capacity frees up (backpressure).
//  - The scheduler thread alone owns the queue. It splits long jobs into
//    windows of max_seq_len (see windows.h), drops jobs whose client cancelled
//    or whose deadline passed before they cost compute, and packs windows in
//    arrival order into the staged batch, up to max_batch_tokens.
//  - The engine thread alone calls the BatchRunner (it owns the device). It
//    takes the staged batch when it is free, so the scheduler prepares (and
//    keeps filling) the next batch while the current one runs. A staged batch
//    is taken once it is full or its oldest window waited max_queue_delay.
//    With an overlapped runner (the GPU) up to two batches are on the device:
//    the engine thread starts the next staged batch before it collects and
//    delivers the one running.
//  - The watchdog thread (with a batch_timeout) declares the device hung when
//    one runner call (starting or collecting a batch) has not returned for
//    that long: the jobs on the device and everything queued fail with
//    UNAVAILABLE, and on_device_lost is told, as for a lost device; the
//    engine thread stays stuck in the runner (see Shutdown).
#ifndef SAE_RPC_EXECUTOR_H_
#define SAE_RPC_EXECUTOR_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/engine.h"
#include "rpc/metrics.h"
#include "rpc/windows.h"

namespace sae {

using BatchResults = absl::StatusOr<std::vector<SequenceResult>>;
// Waits for a started batch and returns its results, parallel to the requests.
using BatchCollector = std::function<BatchResults()>;

// How the engine thread runs packed batches (the Engine in production, fakes
// in tests). Called only on the engine thread.
struct BatchRunner {
  // Issues one batch and returns what collects it. Fails for a bad batch.
  std::function<absl::StatusOr<BatchCollector>(const std::vector<SequenceRequest>&)> start;
  // True when `start` returns before the device has finished (a GPU queue):
  // the engine thread then starts the next batch before it collects this
  // one, so the device computes batch i+1 while the host reads back and
  // delivers batch i. False when `start` does the work itself (the CPU): a
  // second batch would only delay the first one's delivery.
  bool overlapped = false;
  // Optional. Asked after a batch failed: an error means the device is lost
  // for good (Engine::device_status), and the executor stops (see
  // ExecutorOptions::on_device_lost).
  std::function<absl::Status()> device_status;
};

// A runner whose `start` does the whole batch (tests, simple backends).
BatchRunner BlockingRunner(std::function<BatchResults(const std::vector<SequenceRequest>&)> run);

// The production runner: Engine::Submit / Engine::Collect, overlapped when
// the engine's backend is asynchronous. Records every collected batch's
// device time and its SAE share in `metrics` (may be null), and gives it the
// engine's SAE names for sae_encoded_tokens_total.
BatchRunner EngineRunner(Engine* engine, std::shared_ptr<Metrics> metrics);

using Clock = std::chrono::steady_clock;

struct ExecutorOptions {
  // Tokens packed into one batch. A single longer window still runs, alone.
  int max_batch_tokens = 8192;
  // Jobs admitted (queued or running) at once.
  int max_inflight_requests = 256;
  // Tokens admitted and not yet computed; 0: no bound. A job is always
  // admitted when nothing is queued, so one bigger than this still runs.
  int64_t max_queued_tokens = 0;
  // How long a batch that is not full may wait for more windows.
  std::chrono::microseconds max_queue_delay{0};
  // Jobs longer than this run as windows (windows.h); 0: never split.
  int max_seq_len = 0;
  // Prepended to windows after the first when the job starts with it.
  std::optional<int32_t> bos_id;
  // Where to record; null: a private registry nobody scrapes.
  std::shared_ptr<Metrics> metrics;
  // Called once, on the engine thread, when the runner reports its device
  // lost after a failed batch (BatchRunner::device_status). By then the
  // executor admits nothing more and fails whatever is queued with
  // UNAVAILABLE: nothing can run on this process again. Must not block.
  // Also called, from the watchdog thread, when the device hung.
  std::function<void(const absl::Status& fault)> on_device_lost;
  // A runner call (starting or collecting one batch) that has not returned
  // after this long means the device hung (a kernel that never ends): the
  // executor fails the batch's jobs and everything queued, and reports the
  // device lost with DEADLINE_EXCEEDED. 0: no watchdog.
  std::chrono::milliseconds batch_timeout{0};
};

// Set by the submitter when its client went away; the executor then drops
// the job instead of running it.
using CancelFlag = std::shared_ptr<std::atomic<bool>>;

struct Job {
  SequenceRequest request;
  CancelFlag cancelled;  // may be null
  // Not started by then: dropped with DEADLINE_EXCEEDED.
  Clock::time_point deadline = Clock::time_point::max();
  // Optional. Each window's result as soon as its batch finished, in request
  // order: rows for the positions [window.begin, window.end) (a prepended BOS
  // already removed). On the engine thread; must not block. When set, `done`
  // gets an empty result on success.
  std::function<void(const Window& window, SequenceResult result)> on_window;
  // Only with WhenFull::kWait: called exactly once when the job leaves the
  // admission line (admitted, or failed while waiting), before any other
  // callback; possibly from inside Submit. Must not block.
  std::function<void()> on_admitted;
  // Called exactly once, last: the result (windows stitched together unless
  // on_window is set), CANCELLED / DEADLINE_EXCEEDED when dropped,
  // UNAVAILABLE when the executor stopped first or the device was lost or
  // hung. Must not block.
  std::function<void(absl::StatusOr<SequenceResult>)> done;
};

class Executor {
 public:
  enum class WhenFull { kReject, kWait };

  static absl::StatusOr<std::unique_ptr<Executor>> Create(BatchRunner runner, const ExecutorOptions& options);
  // Shuts down (see Shutdown).
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Never blocks. kReject: RESOURCE_EXHAUSTED when the admission limits are
  // reached; kWait: the job waits its turn instead. UNAVAILABLE once
  // admission stopped. On error no callback of `job` is called.
  absl::Status Submit(Job job, WhenFull when_full = WhenFull::kReject);

  // New jobs get UNAVAILABLE and jobs waiting for admission fail with it;
  // admitted jobs keep running. For graceful shutdown. Idempotent.
  void StopAdmitting();

  // Stops admitting, finishes the batch that is running, fails every other
  // job with UNAVAILABLE and joins the threads. Idempotent. After the
  // watchdog found the device hung it returns without the engine thread,
  // which is stuck in the runner (and so is the destructor's join of it,
  // until the runner returns): a server exits the process instead.
  void Shutdown();

  // The watchdog found the device hung (ExecutorOptions::batch_timeout).
  bool hung() const;

  // Jobs admitted and not yet called back.
  int inflight() const { return inflight_.load(); }
  // Tokens admitted and not computed yet.
  int64_t queued_tokens() const { return queued_tokens_.load(); }
  // Jobs in the admission line.
  int waiting() const { return n_waiting_.load(); }
  // Windows staged for the next batch.
  int staged_windows() const;

 private:
  struct Pending;
  // One window staged or running.
  struct Slot {
    std::shared_ptr<Pending> job;
    int window = 0;
    SequenceRequest request;
  };
  using Actions = std::vector<std::function<void()>>;

  Executor(BatchRunner runner, const ExecutorOptions& options);
  // A batch started on the runner, not yet collected.
  struct Started {
    std::vector<Slot> live;
    std::vector<SequenceRequest> requests;
    absl::StatusOr<BatchCollector> collect;
  };
  void SchedulerLoop();
  void EngineLoop();
  void WatchdogLoop();
  // Runs a runner call, marked as busy for the watchdog.
  template <typename F>
  auto Busy(F&& call) -> decltype(call());
  // Takes the staged batch (mu_ held); drops the windows nobody wants any more.
  std::vector<Slot> TakeStagedLocked(Actions* actions);
  Started Start(std::vector<Slot> live);
  // Collects a started batch, then accounts for and delivers its windows.
  void Finish(Started started);
  // The batch's results; a failed batch of several windows is rerun one
  // window at a time so one bad request cannot fail the others.
  std::vector<absl::StatusOr<SequenceResult>> CollectIsolated(Started& started);

  // The helpers below run with mu_ held; callbacks are queued in `actions`
  // and run after mu_ is released.
  bool CanAdmitLocked(int64_t n_tokens) const;
  void AdmitLocked(std::shared_ptr<Pending> job, Actions* actions);
  void AdmitWaitersLocked(Actions* actions);
  void FailLocked(const std::shared_ptr<Pending>& job, const absl::Status& status, Actions* actions);
  void MaybeCompleteLocked(const std::shared_ptr<Pending>& job, Actions* actions);
  // CANCELLED / DEADLINE_EXCEEDED for a job that should not run; OK otherwise.
  static absl::Status DropReason(const Pending& job, Clock::time_point now);
  void SweepLocked(Clock::time_point now, Actions* actions);
  void StageLocked(Actions* actions);
  // Refuses new jobs from now on with `why` (unless already refusing) and
  // fails the admission line with it.
  void StopAdmittingLocked(const absl::Status& why, Actions* actions);
  // Queues a completed job's `done` (with its failure, else its result), or
  // defers it to Finish while a window of the job is being delivered.
  void QueueDoneLocked(const std::shared_ptr<Pending>& job, Actions* actions);
  // Fails every job not yet on the engine thread and stops admitting.
  void FailEverythingLocked(const absl::Status& why, Actions* actions);
  // The device failed for good: stop admitting, fail what is queued, tell
  // on_device_lost. The first report wins. Engine thread.
  void DeviceLost(const absl::Status& fault);
  // DeviceLost's part under mu_; false when the device was already lost.
  bool DeviceLostLocked(const absl::Status& fault, Actions* actions);
  // What jobs get once the device failed with `fault`.
  static absl::Status DeviceFailedStatus(const absl::Status& fault);
  void UpdateGaugesLocked();
  static void Run(Actions& actions);

  const BatchRunner runner_;
  const ExecutorOptions options_;
  std::shared_ptr<Metrics> metrics_;
  std::atomic<int> inflight_{0};
  std::atomic<int64_t> queued_tokens_{0};
  std::atomic<int> n_waiting_{0};

  mutable std::mutex mu_;
  std::condition_variable scheduler_cv_;
  std::condition_variable engine_cv_;
  bool admitting_ = true;                       // guarded by mu_
  absl::Status refusal_;                        // guarded by mu_: why Submit refuses once !admitting_
  absl::Status device_fault_;                   // guarded by mu_: the device was lost (not OK)
  bool stopping_ = false;                       // guarded by mu_
  bool scheduler_poked_ = false;                // guarded by mu_: the engine took a batch
  std::deque<std::shared_ptr<Pending>> line_;   // guarded by mu_: waiting for admission
  std::deque<std::shared_ptr<Pending>> inbox_;  // guarded by mu_: admitted, not yet seen by the scheduler
  // The scheduler thread's queue: only it touches this (with mu_ held, for
  // the per-job state it reads).
  std::deque<std::shared_ptr<Pending>> queue_;
  std::vector<Slot> staged_;   // guarded by mu_: the next batch
  int64_t staged_tokens_ = 0;  // guarded by mu_
  bool staged_ready_ = false;  // guarded by mu_: full, or waited max_queue_delay
  // The jobs of each batch started and not yet finished, oldest first.
  std::deque<std::vector<std::shared_ptr<Pending>>> on_device_;  // guarded by mu_
  // When the runner call in progress began; none between calls.
  std::optional<Clock::time_point> busy_since_;  // guarded by mu_
  bool hung_ = false;                            // guarded by mu_
  bool engine_exited_ = false;                   // guarded by mu_
  std::condition_variable engine_exit_cv_;       // engine_exited_ or hung_ changed
  std::mutex join_mu_;                           // serializes concurrent Shutdown calls
  std::thread scheduler_thread_;
  std::thread engine_thread_;
  std::thread watchdog_thread_;
};

}  // namespace sae

#endif  // SAE_RPC_EXECUTOR_H_
