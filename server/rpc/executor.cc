#include "rpc/executor.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace sae {

absl::StatusOr<std::unique_ptr<Executor>> Executor::Create(BatchRunner runner, const ExecutorOptions& options) {
  if (!runner) return absl::InvalidArgumentError("executor: no batch runner");
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("executor: max_batch_tokens must be positive, got ", options.max_batch_tokens));
  }
  if (options.max_inflight_requests <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("executor: max_inflight_requests must be positive, got ", options.max_inflight_requests));
  }
  std::unique_ptr<Executor> e(new Executor(std::move(runner), options));
  e->thread_ = std::thread([raw = e.get()] { raw->Loop(); });
  return e;
}

Executor::Executor(BatchRunner runner, const ExecutorOptions& options)
    : runner_(std::move(runner)), options_(options) {}

Executor::~Executor() { Shutdown(); }

absl::Status Executor::Submit(Job job) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (inflight_.load() >= options_.max_inflight_requests) {
    return absl::ResourceExhaustedError(absl::StrCat("the server is busy: ", options_.max_inflight_requests,
                                                     " requests already in flight; retry later"));
  }
  inflight_.fetch_add(1);
  queue_.push_back(std::move(job));
  cv_.notify_one();
  return absl::OkStatus();
}

void Executor::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  std::lock_guard<std::mutex> lock(join_mu_);
  if (thread_.joinable()) thread_.join();
}

void Executor::Complete(Job& job, absl::StatusOr<SequenceResult> result) {
  // Released before the callback, so a client that reacts to its result with
  // a new request is not refused for its own finished one.
  inflight_.fetch_sub(1);
  if (job.done) job.done(std::move(result));
}

void Executor::Loop() {
  for (;;) {
    std::vector<Job> batch;
    std::vector<Job> dropped;
    bool stop = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) {
        stop = true;
        while (!queue_.empty()) {
          dropped.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
      } else {
        // Pack in arrival order up to the token budget; a job that alone is
        // over budget still runs (by itself).
        int64_t n_tokens = 0;
        while (!queue_.empty()) {
          Job& next = queue_.front();
          if (next.cancelled && next.cancelled->load()) {
            dropped.push_back(std::move(next));
            queue_.pop_front();
            continue;
          }
          const int64_t n = static_cast<int64_t>(next.request.ids.size());
          if (!batch.empty() && n_tokens + n > options_.max_batch_tokens) break;
          n_tokens += n;
          batch.push_back(std::move(next));
          queue_.pop_front();
        }
      }
    }
    for (Job& job : dropped) {
      if (stop) {
        Complete(job, absl::UnavailableError("the server is shutting down"));
      } else {
        Complete(job, absl::CancelledError("the client cancelled the request"));
      }
    }
    if (stop) return;
    if (!batch.empty()) RunBatch(batch);
  }
}

void Executor::RunBatch(std::vector<Job>& batch) {
  std::vector<SequenceRequest> requests;
  requests.reserve(batch.size());
  for (Job& job : batch) requests.push_back(std::move(job.request));
  absl::StatusOr<std::vector<SequenceResult>> results = runner_(requests);
  if (results.ok() && results->size() != batch.size()) {
    results = absl::InternalError(
        absl::StrCat("executor: runner returned ", results->size(), " results for ", batch.size(), " requests"));
  }
  if (results.ok()) {
    for (size_t i = 0; i < batch.size(); ++i) Complete(batch[i], std::move((*results)[i]));
    return;
  }
  if (batch.size() == 1) {
    Complete(batch[0], results.status());
    return;
  }
  // Isolate the failure: each job gets its own verdict.
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::StatusOr<std::vector<SequenceResult>> single = runner_({requests[i]});
    if (single.ok() && single->size() == 1) {
      Complete(batch[i], std::move(single->front()));
    } else {
      Complete(batch[i], single.ok() ? absl::InternalError("executor: runner returned no result") : single.status());
    }
  }
}

}  // namespace sae
