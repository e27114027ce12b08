#include "rpc/executor.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "rpc/windows.h"

namespace sae {
namespace {

// How often the scheduler looks for cancelled and expired jobs while any are
// queued: cancellation frees capacity within this long.
constexpr std::chrono::milliseconds kSweepInterval(20);

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

// One submitted job. `job`, `windows`, `n_tokens` and `admitted_at` are set
// before it is shared; the rest is guarded by Executor::mu_ unless noted.
struct Executor::Pending {
  Job job;
  std::vector<Window> windows;
  int64_t n_tokens = 0;  // tokens the engine runs for all windows
  Clock::time_point admitted_at;
  int64_t tokens_held = 0;  // admitted tokens not yet released
  int next_window = 0;      // scheduler thread: next window to stage
  int windows_active = 0;   // staged or running
  int windows_done = 0;
  absl::Status failure;        // first failure; the job stops there
  bool completed = false;      // finished: its admission released, `done` queued or deferred
  int delivering = 0;          // windows being delivered outside mu_ (Finish): `done` waits for them
  bool done_deferred = false;  // completed while delivering: Finish queues `done` afterwards
  bool abandoned = false;      // failed while on a hung device: complete without its running windows
  SequenceResult merged;       // engine thread: stitched windows (no on_window)
  std::once_flag admitted_once;

  // Runs job.on_admitted, once: from the action queued when the job left the
  // admission line, or first thing in any other callback of the job, which
  // may be queued on another thread and run before that action (the
  // scheduler can drop a just-admitted job at once). Either way on_admitted
  // has returned before on_window or `done` starts, as Job promises.
  void CallOnAdmitted() {
    std::call_once(admitted_once, [this] {
      if (job.on_admitted) job.on_admitted();
    });
  }
};

absl::StatusOr<std::unique_ptr<Executor>> Executor::Create(BatchRunner runner, const ExecutorOptions& options) {
  if (!runner.start) return absl::InvalidArgumentError("executor: no batch runner");
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("executor: max_batch_tokens must be positive, got ", options.max_batch_tokens));
  }
  if (options.max_inflight_requests <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("executor: max_inflight_requests must be positive, got ", options.max_inflight_requests));
  }
  if (options.max_queued_tokens < 0 || options.max_seq_len < 0 || options.max_queue_delay.count() < 0 ||
      options.batch_timeout.count() < 0) {
    return absl::InvalidArgumentError(
        "executor: max_queued_tokens, max_seq_len, max_queue_delay and batch_timeout must be >= 0");
  }
  std::unique_ptr<Executor> e(new Executor(std::move(runner), options));
  e->scheduler_thread_ = std::thread([raw = e.get()] { raw->SchedulerLoop(); });
  e->engine_thread_ = std::thread([raw = e.get()] { raw->EngineLoop(); });
  if (options.batch_timeout.count() > 0) e->watchdog_thread_ = std::thread([raw = e.get()] { raw->WatchdogLoop(); });
  return e;
}

Executor::Executor(BatchRunner runner, const ExecutorOptions& options)
    : runner_(std::move(runner)),
      options_(options),
      metrics_(options.metrics ? options.metrics : std::make_shared<Metrics>()) {}

template <typename F>
auto Executor::Busy(F&& call) -> decltype(call()) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    busy_since_ = Clock::now();
  }
  auto result = call();
  // Under mu_: a watchdog that still sees this call busy decides before this
  // thread can deliver anything of the batch.
  std::lock_guard<std::mutex> lock(mu_);
  busy_since_.reset();
  return result;
}

BatchRunner BlockingRunner(std::function<BatchResults(const std::vector<SequenceRequest>&)> run) {
  BatchRunner runner;
  runner.start = [run = std::move(run)](const std::vector<SequenceRequest>& batch) -> absl::StatusOr<BatchCollector> {
    auto results = std::make_shared<BatchResults>(run(batch));
    return BatchCollector([results] { return std::move(*results); });
  };
  return runner;
}

BatchRunner EngineRunner(Engine* engine, std::shared_ptr<Metrics> metrics) {
  if (metrics != nullptr) {
    std::vector<std::string> names;
    for (const auto& sae : engine->saes()) names.push_back(sae->name());
    metrics->SetSaes(names);
  }
  BatchRunner runner;
  runner.overlapped = engine->asynchronous();
  runner.device_status = [engine] { return engine->device_status(); };
  runner.start = [engine, metrics = std::move(metrics)](
                     const std::vector<SequenceRequest>& batch) -> absl::StatusOr<BatchCollector> {
    ASSIGN_OR_RETURN(Engine::Pending submitted, engine->Submit(batch));
    // A std::function must be copyable: the batch is moved out of a shared holder.
    auto pending = std::make_shared<Engine::Pending>(std::move(submitted));
    return BatchCollector([engine, metrics, pending]() -> BatchResults {
      BatchResults results = engine->Collect(std::move(*pending));
      if (metrics != nullptr) {
        // A failed batch has no device time to tell (its timing is zeroed):
        // observed, it would pull the forward quantiles down.
        if (results.ok()) {
          metrics->ObserveForward(engine->last_run_timing().total_seconds);
          metrics->ObserveSae(engine->last_run_timing().sae_seconds);
        }
        metrics->SetMemory(engine->memory());
      }
      return results;
    });
  };
  return runner;
}

Executor::~Executor() {
  Shutdown();
  if (engine_thread_.joinable()) engine_thread_.join();  // only after a hang: waits for the runner
}

void Executor::Run(Actions& actions) {
  for (auto& action : actions) action();
  actions.clear();
}

absl::Status Executor::Submit(Job job, WhenFull when_full) {
  auto pending = std::make_shared<Pending>();
  pending->windows = SplitIntoWindows(job.request.ids, options_.max_seq_len, options_.bos_id);
  for (const Window& w : pending->windows) pending->n_tokens += w.n_tokens();
  pending->job = std::move(job);
  Actions actions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!admitting_) return refusal_;
    // Nobody overtakes the admission line.
    if (line_.empty() && CanAdmitLocked(pending->n_tokens)) {
      AdmitLocked(std::move(pending), &actions);
    } else if (when_full == WhenFull::kReject) {
      if (inflight_.load() >= options_.max_inflight_requests) {
        return absl::ResourceExhaustedError(
            absl::StrCat("the server is busy: ", options_.max_inflight_requests,
                         " requests already in flight (max_inflight_requests); retry later"));
      }
      return absl::ResourceExhaustedError(absl::StrCat("the server is busy: ", queued_tokens_.load(),
                                                       " tokens already queued (max_queued_tokens ",
                                                       options_.max_queued_tokens, "); retry later"));
    } else {
      line_.push_back(std::move(pending));
      n_waiting_.store(static_cast<int>(line_.size()));
      UpdateGaugesLocked();
      // The scheduler sweeps the line for cancelled and expired jobs: poked,
      // since one idle when the line was empty waits without a timeout.
      scheduler_poked_ = true;
      scheduler_cv_.notify_one();
    }
  }
  Run(actions);
  return absl::OkStatus();
}

int Executor::staged_windows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(staged_.size());
}

bool Executor::CanAdmitLocked(int64_t n_tokens) const {
  if (inflight_.load() >= options_.max_inflight_requests) return false;
  if (options_.max_queued_tokens == 0 || queued_tokens_.load() == 0) return true;
  return queued_tokens_.load() + n_tokens <= options_.max_queued_tokens;
}

void Executor::AdmitLocked(std::shared_ptr<Pending> job, Actions* actions) {
  inflight_.fetch_add(1);
  queued_tokens_.fetch_add(job->n_tokens);
  job->tokens_held = job->n_tokens;
  job->admitted_at = Clock::now();
  if (job->job.on_admitted) actions->push_back([job] { job->CallOnAdmitted(); });
  inbox_.push_back(std::move(job));
  UpdateGaugesLocked();
  scheduler_cv_.notify_one();
}

void Executor::AdmitWaitersLocked(Actions* actions) {
  while (admitting_ && !line_.empty() && CanAdmitLocked(line_.front()->n_tokens)) {
    std::shared_ptr<Pending> next = std::move(line_.front());
    line_.pop_front();
    AdmitLocked(std::move(next), actions);
  }
  n_waiting_.store(static_cast<int>(line_.size()));
  UpdateGaugesLocked();
}

void Executor::UpdateGaugesLocked() {
  metrics_->SetInflightRequests(inflight_.load());
  metrics_->SetQueuedTokens(queued_tokens_.load());
  metrics_->SetWaitingRequests(static_cast<int64_t>(line_.size()));
}

void Executor::FailLocked(const std::shared_ptr<Pending>& job, const absl::Status& status, Actions* actions) {
  if (job->failure.ok()) job->failure = status;
  MaybeCompleteLocked(job, actions);
}

void Executor::MaybeCompleteLocked(const std::shared_ptr<Pending>& job, Actions* actions) {
  // A window still staged or running will come back (unless the device hung); `done` must be last.
  if (job->completed || (job->windows_active > 0 && !job->abandoned)) return;
  if (job->failure.ok() && job->windows_done < static_cast<int>(job->windows.size())) return;
  job->completed = true;
  // Released before the callback, so a client that reacts to its result with
  // a new request is not refused for its own finished one.
  inflight_.fetch_sub(1);
  queued_tokens_.fetch_sub(job->tokens_held);
  job->tokens_held = 0;
  AdmitWaitersLocked(actions);
  QueueDoneLocked(job, actions);
}

void Executor::QueueDoneLocked(const std::shared_ptr<Pending>& job, Actions* actions) {
  // A window of this job being delivered on the engine thread (another
  // thread may complete the job meanwhile: a cancel, a deadline, a stop)
  // comes first; then Finish queues `done`.
  if (job->delivering > 0) {
    job->done_deferred = true;
    return;
  }
  actions->push_back([job] {
    job->CallOnAdmitted();
    if (!job->failure.ok()) {
      job->job.done(job->failure);
    } else {
      job->job.done(std::move(job->merged));
    }
  });
}

absl::Status Executor::DropReason(const Pending& job, Clock::time_point now) {
  if (job.job.cancelled && job.job.cancelled->load()) return absl::CancelledError("the client cancelled the request");
  if (now >= job.job.deadline) return absl::DeadlineExceededError("the deadline passed before the request ran");
  return absl::OkStatus();
}

void Executor::SweepLocked(Clock::time_point now, Actions* actions) {
  for (auto it = line_.begin(); it != line_.end();) {
    absl::Status reason = DropReason(**it, now);
    if (reason.ok()) {
      ++it;
      continue;
    }
    std::shared_ptr<Pending> job = std::move(*it);
    it = line_.erase(it);
    // Never admitted: nothing to release.
    job->completed = true;
    job->failure = reason;
    QueueDoneLocked(job, actions);
  }
  for (const auto& job : queue_) {
    if (job->failure.ok() && !job->completed) {
      absl::Status reason = DropReason(*job, now);
      if (!reason.ok()) FailLocked(job, reason, actions);
    }
  }
  for (auto it = staged_.begin(); it != staged_.end();) {
    absl::Status reason = it->job->failure.ok() ? DropReason(*it->job, now) : it->job->failure;
    if (reason.ok()) {
      ++it;
      continue;
    }
    std::shared_ptr<Pending> job = it->job;
    staged_tokens_ -= static_cast<int64_t>(it->request.ids.size());
    it = staged_.erase(it);
    --job->windows_active;
    FailLocked(job, reason, actions);
  }
  if (staged_.empty()) staged_ready_ = false;
  n_waiting_.store(static_cast<int>(line_.size()));
  UpdateGaugesLocked();
}

void Executor::StageLocked(Actions* actions) {
  while (!queue_.empty()) {
    const std::shared_ptr<Pending>& job = queue_.front();
    if (!job->failure.ok() || job->completed || job->next_window >= static_cast<int>(job->windows.size())) {
      queue_.pop_front();
      continue;
    }
    const Window& window = job->windows[job->next_window];
    const int64_t n = window.n_tokens();
    // Arrival order; a window that alone is over budget still runs (alone).
    if (!staged_.empty() && staged_tokens_ + n > options_.max_batch_tokens) {
      staged_ready_ = true;
      return;
    }
    staged_.push_back(Slot{job, job->next_window, WindowRequest(job->job.request, window, options_.bos_id)});
    staged_tokens_ += n;
    ++job->windows_active;
    ++job->next_window;
  }
  if (staged_tokens_ >= options_.max_batch_tokens) staged_ready_ = true;
}

void Executor::FailEverythingLocked(const absl::Status& why, Actions* actions) {
  StopAdmittingLocked(why, actions);
  const absl::Status stopped = refusal_;
  for (auto& job : inbox_) queue_.push_back(std::move(job));
  inbox_.clear();
  for (Slot& slot : staged_) --slot.job->windows_active;
  for (Slot& slot : staged_) FailLocked(slot.job, stopped, actions);
  staged_.clear();
  staged_tokens_ = 0;
  staged_ready_ = false;
  for (auto& job : queue_) FailLocked(job, stopped, actions);
  queue_.clear();
  UpdateGaugesLocked();
}

void Executor::SchedulerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  Actions actions;
  for (;;) {
    if (stopping_) {
      FailEverythingLocked(absl::UnavailableError("the server is shutting down"), &actions);
      engine_cv_.notify_all();
      lock.unlock();
      Run(actions);
      return;
    }
    // A lost device runs nothing more: whatever is queued or arrives fails.
    if (!device_fault_.ok()) FailEverythingLocked(refusal_, &actions);
    for (auto& job : inbox_) queue_.push_back(std::move(job));
    inbox_.clear();
    scheduler_poked_ = false;
    const Clock::time_point now = Clock::now();
    SweepLocked(now, &actions);
    StageLocked(&actions);
    Clock::time_point wake = Clock::time_point::max();
    if (!staged_.empty() && !staged_ready_) {
      const Clock::time_point oldest = staged_.front().job->admitted_at;
      if (now - oldest >= options_.max_queue_delay) {
        staged_ready_ = true;
      } else {
        wake = oldest + options_.max_queue_delay;
      }
    }
    if (staged_ready_) engine_cv_.notify_one();
    if (!line_.empty() || !queue_.empty() || !staged_.empty()) wake = std::min(wake, now + kSweepInterval);
    if (!actions.empty()) {
      lock.unlock();
      Run(actions);
      lock.lock();
      continue;
    }
    auto woken = [this] { return stopping_ || !inbox_.empty() || scheduler_poked_; };
    if (wake == Clock::time_point::max()) {
      scheduler_cv_.wait(lock, woken);
    } else {
      scheduler_cv_.wait_until(lock, wake, woken);
    }
  }
}

std::vector<absl::StatusOr<SequenceResult>> Executor::CollectIsolated(Started& started) {
  const std::vector<SequenceRequest>& requests = started.requests;
  auto run = [this](const std::vector<SequenceRequest>& batch, absl::StatusOr<BatchCollector> collect) {
    BatchResults results = collect.ok() ? Busy(*collect) : BatchResults(collect.status());
    if (results.ok() && results->size() != batch.size()) {
      results = absl::InternalError(
          absl::StrCat("executor: runner returned ", results->size(), " results for ", batch.size(), " requests"));
    }
    // Batch sizes are observed per batch that ran, as the forward time is:
    // a failed batch is not, each request retried alone is.
    if (results.ok()) {
      int64_t n_tokens = 0;
      for (const SequenceRequest& r : batch) n_tokens += static_cast<int64_t>(r.ids.size());
      metrics_->ObserveBatch(n_tokens, static_cast<int>(batch.size()));
    }
    return results;
  };
  std::vector<absl::StatusOr<SequenceResult>> out;
  out.reserve(requests.size());
  BatchResults results = run(requests, std::move(started.collect));
  if (results.ok()) {
    for (SequenceResult& r : *results) out.push_back(std::move(r));
    return out;
  }
  bool device_failed = runner_.device_status && !runner_.device_status().ok();
  {
    std::lock_guard<std::mutex> lock(mu_);
    device_failed = device_failed || !device_fault_.ok();
  }
  if (requests.size() == 1 || device_failed) {  // nothing to isolate, or nothing can run any more
    out.assign(requests.size(), results.status());
    return out;
  }
  // Isolate the failure: each window gets its own verdict.
  for (const SequenceRequest& request : requests) {
    const std::vector<SequenceRequest> single = {request};
    BatchResults one = run(single, Busy([&] { return runner_.start(single); }));
    out.push_back(one.ok() ? absl::StatusOr<SequenceResult>(std::move(one->front()))
                           : absl::StatusOr<SequenceResult>(one.status()));
  }
  return out;
}

std::vector<Executor::Slot> Executor::TakeStagedLocked(Actions* actions) {
  // Take the staged batch; the scheduler starts filling the next one.
  std::vector<Slot> batch = std::move(staged_);
  staged_.clear();
  staged_tokens_ = 0;
  staged_ready_ = false;
  scheduler_poked_ = true;
  scheduler_cv_.notify_one();
  // Last chance to skip a window nobody wants any more.
  const Clock::time_point now = Clock::now();
  std::vector<Slot> live;
  for (Slot& slot : batch) {
    absl::Status reason = slot.job->failure.ok() ? DropReason(*slot.job, now) : slot.job->failure;
    if (reason.ok()) {
      metrics_->ObserveQueueTime(Seconds(now - slot.job->admitted_at));
      live.push_back(std::move(slot));
    } else {
      --slot.job->windows_active;
      FailLocked(slot.job, reason, actions);
    }
  }
  return live;
}

Executor::Started Executor::Start(std::vector<Slot> live) {
  Started started;
  started.requests.reserve(live.size());
  for (Slot& slot : live) started.requests.push_back(std::move(slot.request));
  started.live = std::move(live);
  started.collect = Busy([&] { return runner_.start(started.requests); });
  return started;
}

void Executor::EngineLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  Actions actions;
  std::optional<Started> running;  // started, not yet collected
  for (;;) {
    // Nothing new starts on a lost device (the scheduler fails what is staged).
    auto staged = [this] { return staged_ready_ && !staged_.empty() && device_fault_.ok(); };
    if (!running) engine_cv_.wait(lock, [&] { return stopping_ || staged(); });
    // With an overlapped runner the next batch goes to the device before the
    // running one is collected; stopping starts nothing new.
    std::optional<Started> next;
    if (!stopping_ && staged() && (!running || runner_.overlapped)) {
      std::vector<Slot> live = TakeStagedLocked(&actions);
      if (!live.empty()) {
        std::vector<std::shared_ptr<Pending>>& jobs = on_device_.emplace_back();
        for (const Slot& slot : live) jobs.push_back(slot.job);
      }
      lock.unlock();
      Run(actions);
      if (!live.empty()) next = Start(std::move(live));
      lock.lock();
    }
    if (running) {
      lock.unlock();
      Finish(std::move(*running));
      lock.lock();
    }
    running = std::move(next);
    if (stopping_ && !running) {
      engine_exited_ = true;
      engine_exit_cv_.notify_all();
      return;
    }
  }
}

void Executor::WatchdogLoop() {
  // Checks a few times per timeout (at most once a second, at least every 1 ms).
  const auto poll = std::clamp<std::chrono::milliseconds>(options_.batch_timeout / 8, std::chrono::milliseconds(1),
                                                          std::chrono::milliseconds(1000));
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // Runs until the engine thread is gone: Shutdown waits for it, and a hang must still be found then.
    if (engine_exit_cv_.wait_for(lock, poll, [this] { return engine_exited_; })) return;
    if (!busy_since_) continue;
    const Clock::duration busy = Clock::now() - *busy_since_;
    if (busy < options_.batch_timeout) continue;
    // Decided and acted on under mu_, while the call is still in progress:
    // nothing of the batches on the device has been delivered.
    const absl::Status fault = absl::DeadlineExceededError(
        absl::StrFormat("a batch has been on the device for %.1f s, longer than the batch timeout (%.1f s): the GPU "
                        "is presumed hung",
                        Seconds(busy), Seconds(options_.batch_timeout)));
    Actions actions;
    const bool first = DeviceLostLocked(fault, &actions);
    hung_ = true;
    // The engine thread will not come back to finish its batches: their jobs are answered now.
    const absl::Status failed = DeviceFailedStatus(fault);
    for (const auto& jobs : on_device_) {
      for (const std::shared_ptr<Pending>& job : jobs) {
        job->abandoned = true;
        FailLocked(job, failed, &actions);
      }
    }
    engine_exit_cv_.notify_all();  // Shutdown stops waiting for the engine thread
    lock.unlock();
    Run(actions);
    if (first && options_.on_device_lost) options_.on_device_lost(fault);
    return;
  }
}

void Executor::Finish(Started started) {
  std::vector<absl::StatusOr<SequenceResult>> results = CollectIsolated(started);
  // A failed batch may have been the device itself failing.
  const bool failed = std::any_of(results.begin(), results.end(), [](const auto& r) { return !r.ok(); });
  if (failed && runner_.device_status) {
    if (absl::Status fault = runner_.device_status(); !fault.ok()) DeviceLost(fault);
  }
  const std::vector<Slot>& live = started.live;
  // Account first, then deliver outside mu_ (callbacks may write to gRPC),
  // then run the `done` actions: a finished request's admission slot is
  // free before its last chunk can reach the client (who may send the next
  // request at once), and `done` still comes after every window, also when
  // the job fails (on another thread) while one is being delivered. A job
  // that had failed before gets nothing more.
  Actions actions;
  std::vector<bool> deliver(live.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < live.size(); ++i) {
      deliver[i] = results[i].ok() && live[i].job->failure.ok();
      if (deliver[i]) ++live[i].job->delivering;
    }
    for (size_t i = 0; i < live.size(); ++i) {
      const std::shared_ptr<Pending>& job = live[i].job;
      if (job->abandoned) continue;  // completed, its tokens released, when the device was found hung
      --job->windows_active;
      const int64_t released = job->windows[live[i].window].n_tokens();
      job->tokens_held -= released;
      queued_tokens_.fetch_sub(released);
      if (!results[i].ok()) {
        FailLocked(job, results[i].status(), &actions);
      } else {
        ++job->windows_done;
        MaybeCompleteLocked(job, &actions);
      }
    }
    AdmitWaitersLocked(&actions);
    if (!on_device_.empty()) on_device_.pop_front();  // this batch's jobs (none if it started nothing)
  }
  for (size_t i = 0; i < live.size(); ++i) {
    if (!deliver[i]) continue;
    Pending& job = *live[i].job;
    const Window& window = job.windows[live[i].window];
    SequenceResult window_result = std::move(*results[i]);
    DropPrependedRow(window, &window_result);
    metrics_->AddTokens(window.end - window.begin);
    metrics_->AddSaeTokens(job.job.request.sae_indices, window.end - window.begin);
    if (job.job.on_window) {
      job.CallOnAdmitted();
      job.job.on_window(window, std::move(window_result));
    } else if (job.windows.size() == 1) {
      job.merged = std::move(window_result);
    } else {
      if (live[i].window == 0) job.merged = EmptyResult(job.job.request);
      PlaceWindow(window, window_result, static_cast<int>(job.job.request.ids.size()), &job.merged);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < live.size(); ++i) {
      const std::shared_ptr<Pending>& job = live[i].job;
      if (!deliver[i] || --job->delivering > 0 || !job->done_deferred) continue;
      job->done_deferred = false;
      QueueDoneLocked(job, &actions);
    }
  }
  Run(actions);
}

void Executor::StopAdmitting() {
  Actions actions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    StopAdmittingLocked(absl::UnavailableError("the server is shutting down"), &actions);
  }
  Run(actions);
}

void Executor::StopAdmittingLocked(const absl::Status& why, Actions* actions) {
  if (admitting_) refusal_ = why;
  admitting_ = false;
  for (auto& job : line_) {
    job->completed = true;
    job->failure = refusal_;
    QueueDoneLocked(job, actions);
  }
  line_.clear();
  n_waiting_.store(0);
  UpdateGaugesLocked();
}

absl::Status Executor::DeviceFailedStatus(const absl::Status& fault) {
  return absl::UnavailableError(
      absl::StrCat("the server's GPU failed and it must restart; retry on another replica (", fault.message(), ")"));
}

bool Executor::DeviceLostLocked(const absl::Status& fault, Actions* actions) {
  if (!device_fault_.ok()) return false;  // reported once
  device_fault_ = fault;
  StopAdmittingLocked(DeviceFailedStatus(fault), actions);
  scheduler_cv_.notify_one();  // it fails everything queued
  return true;
}

void Executor::DeviceLost(const absl::Status& fault) {
  Actions actions;
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    first = DeviceLostLocked(fault, &actions);
  }
  Run(actions);
  if (first && options_.on_device_lost) options_.on_device_lost(fault);
}

void Executor::Shutdown() {
  StopAdmitting();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  scheduler_cv_.notify_all();
  engine_cv_.notify_all();
  std::lock_guard<std::mutex> join_lock(join_mu_);
  if (scheduler_thread_.joinable()) scheduler_thread_.join();
  bool exited = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    engine_exit_cv_.wait(lock, [this] { return engine_exited_ || hung_; });
    exited = engine_exited_;
  }
  if (exited && engine_thread_.joinable()) engine_thread_.join();
  if (watchdog_thread_.joinable()) watchdog_thread_.join();  // it returns once the engine exited or hung
}

bool Executor::hung() const {
  std::lock_guard<std::mutex> lock(mu_);
  return hung_;
}

}  // namespace sae
