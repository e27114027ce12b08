#include "rpc/service.h"

#include <chrono>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/hooks.h"
#include "rpc/status_map.h"
#include "rpc/windows.h"
#include "rpc/wire.h"

namespace sae {
namespace {

const absl::Status& NotReadyStatus() {
  static const absl::Status* status = new absl::Status(absl::UnavailableError("the model is still loading"));
  return *status;
}

double SecondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The identity of the TLS client certificate (its first subject alternative
// name, else its common name); "" without one.
std::string ClientIdentity(const grpc::CallbackServerContext* context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context->auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return "";
  const std::vector<grpc::string_ref> identity = auth->GetPeerIdentity();
  return identity.empty() ? "" : std::string(identity[0].data(), identity[0].size());
}

// A call, or one request of an ExtractStream, is over: counted in the
// metrics and, with the access log on, logged. `request` (null when it was
// refused before being understood) gives the Extract fields.
void CallDone(const ServiceOptions& options, Metrics::Rpc rpc, const grpc::CallbackServerContext* context,
              double seconds, const absl::Status& status, const PreparedRequest* request = nullptr,
              const std::string& request_id = "") {
  options.metrics->RequestDone(rpc, seconds, status.code());
  if (options.access_log == nullptr) return;
  AccessRecord record;
  record.rpc = Metrics::RpcName(rpc);
  record.peer = context->peer();
  record.client = ClientIdentity(context);
  record.request_id = request != nullptr ? request->request_id : request_id;
  record.status = status;
  if (request != nullptr) {
    record.tokens = request->n_tokens();
    record.saes = request->sae_names;
    record.k = request->sequence.k;
  }
  record.seconds = seconds;
  options.access_log->Write(record);
}

// The RPC's deadline on the executor's clock; max() when none was set.
Clock::time_point JobDeadline(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  const auto left = deadline - std::chrono::system_clock::now();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

// Why a call broke off: its deadline passed or the client cancelled it;
// counted under that reason in the metrics. The client's own deadline
// usually fires first, and its cancel reaches the server a network delay
// before the server's copy of the deadline (arrival + grpc-timeout), so a
// cancel within kDeadlineSlack of the deadline counts as the deadline.
// A failed write is the same event seen earlier: the call is gone.
// What every Extract-like reactor needs; outlives them (owned by the service).
struct Shared {
  const Engine* engine;
  Executor* executor;
  const ServiceOptions* options;
  Metrics* metrics;
  // SaeServiceImpl::CutOffAt's time (system_clock nanoseconds), or max.
  const std::atomic<int64_t>* cut_off_ns;
};

// Calls that Server::Shutdown cancels when the grace period ends are
// UNAVAILABLE (the server went away), not a client's cancel.
absl::Status BrokenOff(const Shared& shared, const grpc::CallbackServerContext* context, absl::string_view what,
                       absl::string_view cancelled_why) {
  constexpr std::chrono::milliseconds kDeadlineSlack(100);
  const auto now = std::chrono::system_clock::now();
  if (std::chrono::duration_cast<std::chrono::nanoseconds>((now + kDeadlineSlack).time_since_epoch()).count() >=
      shared.cut_off_ns->load()) {
    return absl::UnavailableError(
        absl::StrCat("the server shut down before the ", what, " finished (shutdown_grace_seconds ran out)"));
  }
  if (context->deadline() <= now + kDeadlineSlack) {
    return absl::DeadlineExceededError(absl::StrCat("the deadline passed while the ", what, " ran"));
  }
  return absl::CancelledError(cancelled_why);
}

// Validation, tokenization and the long-input policy, timed.
absl::StatusOr<PreparedRequest> Prepare(const Shared& shared, const v1::ExtractRequest& request) {
  const Clock::time_point start = Clock::now();
  absl::StatusOr<PreparedRequest> prepared = PrepareRequest(*shared.engine, shared.options->limits, request);
  shared.metrics->ObserveTokenization(SecondsSince(start));
  if (!prepared.ok()) return prepared.status();
  if (absl::Status s = ApplyLongInputPolicy(*shared.options, &*prepared); !s.ok()) return s;
  return prepared;
}

// A response chunk SerializeMessage refused, as the request's error.
absl::Status ChunkTooLarge(const absl::Status& serialized) {
  return absl::Status(serialized.code(), absl::StrCat(serialized.message(),
                                                      "; ask for fewer tokens per response "
                                                      "(ExtractRequest.chunk_tokens)"));
}

// Token count covered by chunk `chunk` of `request` (its end position).
int ChunkEnd(const PreparedRequest& request, int chunk) {
  return std::min(request.n_tokens(), (chunk + 1) * request.chunk_tokens);
}

// Server-streaming Extract: one job; windows are placed into the result as
// they finish and every chunk they complete is written, the next write
// started from OnWriteDone (flow control for free). State is shared by gRPC
// threads (writes, cancel) and the engine thread (windows), so it is guarded
// by mu_; StartWrite / Finish are called outside mu_.
class ExtractReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  ExtractReactor(const Shared& shared, grpc::CallbackServerContext* context, const grpc::ByteBuffer& request_bytes)
      : shared_(shared),
        context_(context),
        start_(Clock::now()),
        cancelled_(std::make_shared<std::atomic<bool>>(false)) {
    v1::ExtractRequest request;
    if (absl::Status parsed = ParseMessage(request_bytes, &request); !parsed.ok()) {
      FinishNow(parsed);
      return;
    }
    absl::StatusOr<PreparedRequest> prepared = Prepare(shared, request);
    if (!prepared.ok()) {
      FinishNow(prepared.status());
      return;
    }
    prepared_ = std::move(*prepared);
    const Clock::time_point deadline = JobDeadline(context);
    if (deadline <= Clock::now()) {
      FinishNow(absl::DeadlineExceededError("the deadline passed before the request was queued"));
      return;
    }
    result_ = EmptyResult(prepared_.sequence);
    Job job;
    job.request = prepared_.sequence;
    job.cancelled = cancelled_;
    job.deadline = deadline;
    // The reactor outlives the job: it only finishes (and so is deleted)
    // after `done` ran.
    job.on_window = [this](const Window& window, SequenceResult result) { OnWindow(window, std::move(result)); };
    job.done = [this](absl::StatusOr<SequenceResult> result) { OnJobDone(result.status()); };
    job_pending_ = true;
    absl::Status submitted = shared.executor->Submit(std::move(job), Executor::WhenFull::kReject);
    if (!submitted.ok()) {
      job_pending_ = false;
      FinishNow(submitted);
    }
  }

  void OnWriteDone(bool ok) override {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) BreakLocked(BrokenOff(shared_, context_, "request", "the client stopped reading"));
      action = NextActionLocked();
    }
    Do(action);
  }

  void OnCancel() override {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      BreakLocked(BrokenOff(shared_, context_, "request", "the client cancelled the request"));
      action = NextActionLocked();
    }
    Do(action);
  }

  void OnDone() override { delete this; }

 private:
  enum class Action { kNone, kWrite, kFinish };

  // Before any job was submitted: nothing else can call in.
  void FinishNow(const absl::Status& status) {
    final_status_ = status;
    finished_ = true;
    Do(Action::kFinish);
  }

  // On the engine thread; must not block.
  void OnWindow(const Window& window, SequenceResult result) {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      PlaceWindow(window, result, prepared_.n_tokens(), &result_);
      ready_tokens_ = window.end;
      action = NextActionLocked();
    }
    Do(action);
  }

  void OnJobDone(const absl::Status& status) {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_pending_ = false;
      if (!status.ok() && final_status_.ok()) final_status_ = status;
      action = NextActionLocked();
    }
    Do(action);
  }

  void BreakLocked(const absl::Status& status) {
    if (finished_) return;  // final_status_ is being read by Do(kFinish)
    broken_ = true;
    if (final_status_.ok()) final_status_ = status;
    cancelled_->store(true);
  }

  // Decides (and reserves) the next step; the caller performs it unlocked.
  Action NextActionLocked() {
    if (finished_ || writing_) return Action::kNone;
    if (!broken_ && final_status_.ok() && next_chunk_ < prepared_.n_chunks() &&
        ChunkEnd(prepared_, next_chunk_) <= ready_tokens_) {
      const absl::Status serialized = SerializeMessage(
          BuildResponseChunk(prepared_, result_, shared_.engine->tokenizer(), next_chunk_++), &response_);
      if (serialized.ok()) {
        writing_ = true;
        return Action::kWrite;
      }
      BreakLocked(ChunkTooLarge(serialized));  // finishes once the job is done
    }
    if (!job_pending_ && (!final_status_.ok() || next_chunk_ >= prepared_.n_chunks())) {
      finished_ = true;
      return Action::kFinish;
    }
    return Action::kNone;
  }

  void Do(Action action) {
    switch (action) {
      case Action::kNone:
        break;
      case Action::kWrite:
        StartWrite(&response_);
        break;
      case Action::kFinish:
        // final_status_ no longer changes once finished_ is set.
        CallDone(*shared_.options, Metrics::Rpc::kExtract, context_, SecondsSince(start_), final_status_,
                 prepared_.sequence.ids.empty() ? nullptr : &prepared_);
        Finish(ToGrpcStatus(final_status_));
        break;
    }
  }

  const Shared shared_;
  grpc::CallbackServerContext* const context_;
  const Clock::time_point start_;
  CancelFlag cancelled_;
  PreparedRequest prepared_;  // immutable once the job is submitted

  std::mutex mu_;
  SequenceResult result_;      // guarded by mu_: [n_tokens] rows, filled window by window
  int ready_tokens_ = 0;       // guarded by mu_: positions [0, ready_tokens_) are in result_
  int next_chunk_ = 0;         // guarded by mu_
  bool job_pending_ = false;   // guarded by mu_: `done` not called yet
  bool writing_ = false;       // guarded by mu_
  bool broken_ = false;        // guarded by mu_
  bool finished_ = false;      // guarded by mu_
  absl::Status final_status_;  // guarded by mu_
  grpc::ByteBuffer response_;  // in flight until OnWriteDone
};

class ExtractStreamReactor;

}  // namespace

// The service's open ExtractStreams, so that a shutdown can drain them.
class OpenStreams {
 public:
  // Registers an open stream; false once draining (the stream must drain).
  bool Add(ExtractStreamReactor* stream);
  // From the stream's OnDone, before it is deleted.
  void Remove(ExtractStreamReactor* stream);
  // Every open stream drains, and every one added from now on.
  void DrainAll();

 private:
  std::mutex mu_;
  bool draining_ = false;                    // guarded by mu_
  std::set<ExtractStreamReactor*> streams_;  // guarded by mu_
};

namespace {

// Bidi ExtractStream: requests are admitted as they arrive, results written
// as their windows complete (responses of different requests may interleave;
// each carries its request_id). A failing request gets an error response; the
// stream keeps serving. Under BACKPRESSURE the next read starts only once the
// current request is admitted. State is shared by gRPC threads (reads, writes,
// cancel) and the engine thread (results), so it is guarded by mu_, and
// StartRead / StartWrite / Finish are always called outside mu_.
class ExtractStreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  enum class Action { kNone, kWrite, kFinish };

  ExtractStreamReactor(const Shared& shared, grpc::CallbackServerContext* context, OpenStreams* open_streams)
      : shared_(shared), context_(context), deadline_(JobDeadline(context)), open_streams_(open_streams) {
    // The first read starts before the stream can be drained: no read may
    // start after the drain's Finish.
    StartRead(&request_);
    if (!open_streams_->Add(this)) Do(Drain());  // opened during a shutdown
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Action action;
      {
        std::lock_guard<std::mutex> lock(mu_);
        reads_done_ = true;
        action = NextActionLocked();
      }
      Do(action);
      return;
    }
    // Last, and only when HandleRequest reserved it: OnReadDone for the next
    // request may run at once on another thread.
    if (HandleRequest()) StartReservedRead();
  }

  void OnWriteDone(bool ok) override {
    Action action;
    bool resume_read = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) BreakLocked(BrokenOff(shared_, context_, "stream", "the client stopped reading").code());
      resume_read = ResumeReadLocked();
      action = NextActionLocked();
    }
    Do(action);
    if (resume_read) StartReservedRead();
  }

  void OnCancel() override {
    Action action;
    bool resume_read = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      BreakLocked(BrokenOff(shared_, context_, "stream", "the client cancelled the stream").code());
      // A paused read is started so that it fails and the stream can finish.
      resume_read = ResumeReadLocked();
      action = NextActionLocked();
    }
    Do(action);
    if (resume_read) StartReservedRead();
  }

  void OnDone() override {
    open_streams_->Remove(this);
    delete this;
  }

  // Server shutdown (OpenStreams::DrainAll): take no more requests, and
  // finish once the responses of those taken are written. Returns the step
  // for the caller to perform with Do, outside any lock.
  Action Drain() {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
    return NextActionLocked();
  }

  // Performs a step NextActionLocked reserved.
  void Do(Action action) {
    switch (action) {
      case Action::kNone:
        break;
      case Action::kWrite:
        StartWrite(&response_);
        break;
      case Action::kFinish:
        // finish_status_ was set under mu_ together with finished_ and never
        // changes afterwards.
        Finish(finish_status_);
        break;
    }
  }

 private:
  // One request's responses: chunks written as its windows complete, or an
  // error response.
  struct Outgoing {
    std::string request_id;
    Clock::time_point start;
    std::shared_ptr<const PreparedRequest> request;  // null for a request refused before admission
    SequenceResult result;                           // [n_tokens] rows, filled window by window
    int ready_tokens = 0;
    int next_chunk = 0;
    bool job_done = false;
    absl::Status status;       // the request's failure, written after its ready chunks
    bool releases_id = false;  // the request_id leaves the in-flight set when this is gone
    bool refused = false;      // refused before admission: counted in queued_errors_ while queued
    bool settled = false;      // counted in the metrics (see Settle)
  };
  using OutgoingPtr = std::shared_ptr<Outgoing>;

  // Returns whether the caller should start the next read, reserved with
  // ReserveReadLocked (false: the executor's on_admitted starts it once this
  // request is admitted, or reading paused, or the stream finished).
  bool HandleRequest() {
    const Clock::time_point start = Clock::now();
    // Everything needed from request_ is taken here: once submitted, the next
    // read may overwrite it.
    v1::ExtractRequest request;
    if (absl::Status parsed = ParseMessage(request_, &request); !parsed.ok()) {
      return QueueError(ReadStringField(request_, *v1::ExtractRequest::descriptor(), "request_id"), start, parsed);
    }
    const std::string id = request.request_id();
    absl::StatusOr<PreparedRequest> prepared =
        id.empty() ? absl::InvalidArgumentError("request_id is required on ExtractStream") : Prepare(shared_, request);
    if (!prepared.ok()) {
      return QueueError(id, start, prepared.status());
    }
    auto out = std::make_shared<Outgoing>();
    out->request_id = id;
    out->start = start;
    out->request = std::make_shared<const PreparedRequest>(std::move(*prepared));
    out->result = EmptyResult(out->request->sequence);
    out->releases_id = true;
    CancelFlag cancelled = std::make_shared<std::atomic<bool>>(false);
    bool duplicate = false;
    bool backlog_full = false;
    bool read_next = false;
    const bool backpressure = shared_.options->overload_policy == v1::ServerConfig::BACKPRESSURE;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) {  // drained while this request was on its way
        out->status = absl::UnavailableError("the server is shutting down");
        out->releases_id = false;  // never entered in_flight_
        Settle(out);
        return false;
      }
      if (broken_) {
        out->releases_id = false;  // never entered in_flight_
        Settle(out);
        return ReserveReadLocked();
      }
      backlog_full = static_cast<int>(in_flight_.size()) >= shared_.options->limits.max_stream_backlog;
      duplicate = !backlog_full && !in_flight_.emplace(id, cancelled).second;
      if (!duplicate && !backlog_full) {
        ++pending_jobs_;  // the stream cannot finish before this job is done
        outbox_.push_back(out);
        // The next read, started by the caller or, under backpressure, by
        // on_admitted: reserved now, so the stream cannot finish before it
        // starts (false when draining: no more requests are taken).
        read_next = ReserveReadLocked();
      }
    }
    if (backlog_full) {
      return QueueError(id, start,
                        absl::ResourceExhaustedError(
                            absl::StrCat("this stream already has ", shared_.options->limits.max_stream_backlog,
                                         " requests in flight; read responses before sending more")));
    }
    if (duplicate) {
      // The first request with this id keeps its slot and runs on. The
      // refusal is ALREADY_EXISTS, never a code the first request can end
      // with, so a client matching responses by id can tell the two apart.
      return QueueError(id, start,
                        absl::AlreadyExistsError("request_id \"" + id + "\" is already in flight on this stream; " +
                                                 "that request runs on, this one is refused"));
    }
    Job job;
    job.request = out->request->sequence;
    job.cancelled = cancelled;
    job.deadline = deadline_;
    // Finish waits for pending_jobs_ == 0, so `this` is alive when called.
    job.on_window = [this, out](const Window& window, SequenceResult result) {
      Action action;
      {
        std::lock_guard<std::mutex> lock(mu_);
        PlaceWindow(window, result, out->request->n_tokens(), &out->result);
        out->ready_tokens = window.end;
        action = NextActionLocked();
      }
      Do(action);
    };
    job.done = [this, out](absl::StatusOr<SequenceResult> result) { OnJobDone(out, result.status()); };
    // on_admitted comes before `done` (Job), which the stream may not outlive.
    if (backpressure && read_next) job.on_admitted = [this] { StartReservedRead(); };
    absl::Status submitted = shared_.executor->Submit(
        std::move(job), backpressure ? Executor::WhenFull::kWait : Executor::WhenFull::kReject);
    if (!submitted.ok()) {
      // No callback will come (on_admitted neither): settle the request here.
      OnJobDone(out, submitted);
      return read_next;
    }
    return read_next && !backpressure;
  }

  // Reserves the start of the next read: refused once the stream finished
  // (no read may start after Finish) or drains (it takes no more requests),
  // and until StartReservedRead has started it the stream does not finish.
  bool ReserveReadLocked() {
    if (finished_ || draining_) return false;
    ++reads_starting_;
    return true;
  }
  void StartReservedRead() {
    StartRead(&request_);
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --reads_starting_;
      action = NextActionLocked();  // a drain may have waited for this
    }
    Do(action);
  }

  // On the engine (or scheduler) thread; must not block.
  void OnJobDone(const OutgoingPtr& out, const absl::Status& status) {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --pending_jobs_;
      out->job_done = true;
      out->status = status;
      if (broken_) Settle(out);
      action = NextActionLocked();
    }
    Do(action);
  }

  // Queues the error response of a request refused before admission.
  // Returns whether the next read may start: at max_stream_backlog unwritten
  // refusals reading pauses until writes drain them (OnWriteDone), so a
  // client that writes but never reads is held back by HTTP/2 flow control
  // instead of growing the outbox without bound.
  bool QueueError(const std::string& id, Clock::time_point start, const absl::Status& status) {
    auto out = std::make_shared<Outgoing>();
    out->request_id = id;
    out->start = start;
    out->job_done = true;
    out->status = status;
    out->refused = true;
    Action action;
    bool read_next = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) {  // drained while this request was on its way
        Settle(out);
        return false;
      }
      if (broken_) {
        Settle(out);
        read_next = ReserveReadLocked();
      } else {
        outbox_.push_back(std::move(out));
        if (++queued_errors_ >= shared_.options->limits.max_stream_backlog) {
          read_paused_ = true;
        } else {
          read_next = ReserveReadLocked();
        }
      }
      action = NextActionLocked();
    }
    Do(action);
    return read_next;
  }

  // Whether a paused read starts again now (and reserves it): once the
  // queued refusals are below the bound, or the stream broke off.
  bool ResumeReadLocked() {
    if (!read_paused_ || (!broken_ && queued_errors_ >= shared_.options->limits.max_stream_backlog)) return false;
    read_paused_ = false;
    return ReserveReadLocked();
  }

  // A request is over (last response handed to the wire, or dropped): its
  // metrics, and its id may be used again.
  void Settle(const OutgoingPtr& out) {
    if (out->settled) return;
    out->settled = true;
    if (out->releases_id) in_flight_.erase(out->request_id);
    // Cut short by the break (its job was cancelled by BreakLocked, or it
    // had not failed): counted under the break's reason.
    const bool cut_short = out->status.ok() || out->status.code() == absl::StatusCode::kCancelled;
    CallDone(
        *shared_.options, Metrics::Rpc::kExtractStream, context_, SecondsSince(out->start),
        broken_ && cut_short ? absl::Status(break_code_, "the stream ended before this request finished") : out->status,
        out->request.get(), out->request_id);
  }

  // Decides (and reserves) the next step; the caller performs it unlocked.
  Action NextActionLocked() {
    if (finished_) return Action::kNone;
    if (!writing_ && !broken_) {
      // The first request (in admission order) with something to write.
      for (auto it = outbox_.begin(); it != outbox_.end(); ++it) {
        Outgoing& out = **it;
        const int n_chunks = out.request ? out.request->n_chunks() : 0;
        if (out.status.ok() && out.next_chunk < n_chunks &&
            ChunkEnd(*out.request, out.next_chunk) <= out.ready_tokens) {
          const absl::Status serialized = SerializeMessage(
              BuildResponseChunk(*out.request, out.result, shared_.engine->tokenizer(), out.next_chunk++), &response_);
          if (!serialized.ok()) {
            // The request fails with this error in place of the chunk; its
            // job stops at the next window.
            if (auto flag = in_flight_.find(out.request_id); flag != in_flight_.end()) flag->second->store(true);
            out.status = ChunkTooLarge(serialized);
            SerializeMessage(BuildErrorResponse(out.request_id, out.status), &response_).IgnoreError();  // small
          }
          // The last chunk ends the request (done is only set once all windows succeeded).
          if (out.next_chunk >= n_chunks || !out.status.ok()) {
            Settle(*it);
            outbox_.erase(it);
          }
          writing_ = true;
          return Action::kWrite;
        }
        if (out.job_done && !out.status.ok()) {
          SerializeMessage(BuildErrorResponse(out.request_id, out.status), &response_).IgnoreError();  // small
          if (out.refused) --queued_errors_;
          Settle(*it);
          outbox_.erase(it);
          writing_ = true;
          return Action::kWrite;
        }
      }
    }
    // Draining, a stream finishes without waiting for the client to close
    // its side (a read may be outstanding: it then fails).
    if (!writing_ && (reads_done_ || draining_) && reads_starting_ == 0 && pending_jobs_ == 0 &&
        (outbox_.empty() || broken_)) {
      finished_ = true;
      if (broken_) {
        finish_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled");
      } else if (!reads_done_) {
        finish_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                      "the server is shutting down; every request this stream took was answered");
      }
      return Action::kFinish;
    }
    return Action::kNone;
  }

  // The client is gone, stopped reading or its deadline passed (`why`, for
  // the metrics of requests it cuts short): drop queued output and have the
  // executor skip this stream's jobs that have not run yet.
  void BreakLocked(absl::StatusCode why) {
    if (broken_) return;
    broken_ = true;
    break_code_ = why;
    for (auto& out : outbox_) {
      if (out->job_done) Settle(out);  // the others settle in OnJobDone
    }
    outbox_.clear();
    queued_errors_ = 0;
    for (auto& [id, flag] : in_flight_) flag->store(true);
  }

  const Shared shared_;
  grpc::CallbackServerContext* const context_;
  const Clock::time_point deadline_;
  OpenStreams* const open_streams_;
  grpc::ByteBuffer request_;  // target of the one outstanding read

  std::mutex mu_;
  bool reads_done_ = false;     // guarded by mu_
  bool writing_ = false;        // guarded by mu_
  bool broken_ = false;         // guarded by mu_
  bool finished_ = false;       // guarded by mu_
  grpc::Status finish_status_;  // set once, with finished_
  bool draining_ = false;       // guarded by mu_
  int reads_starting_ = 0;      // guarded by mu_: reserved reads not started yet (ReserveReadLocked)
  absl::StatusCode break_code_ = absl::StatusCode::kCancelled;  // guarded by mu_: set with broken_
  int queued_errors_ = 0;     // guarded by mu_: refused requests' responses in outbox_
  bool read_paused_ = false;  // guarded by mu_: no read outstanding until ResumeReadLocked
  int pending_jobs_ = 0;      // guarded by mu_: submitted, `done` not called yet
  // guarded by mu_: request_id -> cancel flag, from admission until the last
  // response is handed to the wire.
  std::map<std::string, CancelFlag> in_flight_;
  std::list<OutgoingPtr> outbox_;  // guarded by mu_: admission order
  grpc::ByteBuffer response_;      // in flight until OnWriteDone
};

// Ends an RPC that cannot start (e.g. the model is still loading), counted.
template <typename Base>
class FailedReactor final : public Base {
 public:
  FailedReactor(const ServiceOptions& options, Metrics::Rpc rpc, const grpc::CallbackServerContext* context,
                const absl::Status& status) {
    CallDone(options, rpc, context, 0, status);
    this->Finish(ToGrpcStatus(status));
  }
  void OnDone() override { delete this; }
};

// Ends a unary call that arrived at `start`, counted.
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context, const ServiceOptions& options,
                                      Metrics::Rpc rpc, Clock::time_point start, const absl::Status& status) {
  CallDone(options, rpc, context, SecondsSince(start), status);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace

bool OpenStreams::Add(ExtractStreamReactor* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_) return false;
  streams_.insert(stream);
  return true;
}

void OpenStreams::Remove(ExtractStreamReactor* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.erase(stream);
}

void OpenStreams::DrainAll() {
  std::vector<std::pair<ExtractStreamReactor*, ExtractStreamReactor::Action>> steps;
  {
    // A stream stays alive while registered: its OnDone waits for mu_ to
    // Remove it.
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
    for (ExtractStreamReactor* stream : streams_) {
      // Only streams with a step are touched after mu_: the others may be gone.
      if (const ExtractStreamReactor::Action action = stream->Drain(); action != ExtractStreamReactor::Action::kNone) {
        steps.emplace_back(stream, action);
      }
    }
  }
  // Outside mu_, as the reactor performs its own steps. A stream whose step
  // is pending cannot reach OnDone before it is taken: its Finish (or, for a
  // write, anything that may finish it) is this very step.
  for (const auto& [stream, action] : steps) stream->Do(action);
}

absl::Status ApplyLongInputPolicy(const ServiceOptions& options, PreparedRequest* request) {
  if (options.max_seq_len <= 0 || request->n_tokens() <= options.max_seq_len) return absl::OkStatus();
  switch (options.long_input_policy) {
    case v1::ServerConfig::REJECT:
      return absl::InvalidArgumentError(absl::StrCat("the request has ", request->n_tokens(),
                                                     " tokens; max_seq_len is ", options.max_seq_len,
                                                     " and long_input_policy is REJECT"));
    case v1::ServerConfig::TRUNCATE:
      request->sequence.ids.resize(static_cast<size_t>(options.max_seq_len));
      request->offsets.resize(static_cast<size_t>(options.max_seq_len));
      return absl::OkStatus();
    default:
      return absl::OkStatus();  // WINDOW: the executor splits it
  }
}

SaeServiceImpl::SaeServiceImpl(const ServiceOptions& options)
    : options_(options), open_streams_(std::make_unique<OpenStreams>()) {
  if (!options_.metrics) options_.metrics = std::make_shared<Metrics>();
}

SaeServiceImpl::~SaeServiceImpl() = default;

void SaeServiceImpl::Drain() { open_streams_->DrainAll(); }

void SaeServiceImpl::CutOffAt(std::chrono::system_clock::time_point at) {
  cut_off_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(at.time_since_epoch()).count());
}

void SaeServiceImpl::Attach(const Engine* engine, Executor* executor) {
  engine_ = engine;
  executor_ = executor;
  ready_.store(true, std::memory_order_release);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* SaeServiceImpl::Extract(grpc::CallbackServerContext* context,
                                                                    const grpc::ByteBuffer* request) {
  if (!ready()) {
    return new FailedReactor<grpc::ServerWriteReactor<grpc::ByteBuffer>>(options_, Metrics::Rpc::kExtract, context,
                                                                         NotReadyStatus());
  }
  return new ExtractReactor(Shared{engine_, executor_, &options_, options_.metrics.get(), &cut_off_ns_}, context,
                            *request);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* SaeServiceImpl::ExtractStream(
    grpc::CallbackServerContext* context) {
  if (!ready()) {
    return new FailedReactor<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>>(
        options_, Metrics::Rpc::kExtractStream, context, NotReadyStatus());
  }
  return new ExtractStreamReactor(Shared{engine_, executor_, &options_, options_.metrics.get(), &cut_off_ns_}, context,
                                  open_streams_.get());
}

grpc::ServerUnaryReactor* SaeServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* request_bytes,
                                                   grpc::ByteBuffer* response_bytes) {
  const Clock::time_point start = Clock::now();
  auto finish = [&](const absl::Status& status) {
    return FinishUnary(context, options_, Metrics::Rpc::kTokenize, start, status);
  };
  if (!ready()) return finish(NotReadyStatus());
  v1::TokenizeRequest request;
  if (absl::Status parsed = ParseMessage(*request_bytes, &request); !parsed.ok()) return finish(parsed);
  const Tokenizer& tokenizer = engine_->tokenizer();
  absl::StatusOr<Encoding> enc = tokenizer.Encode(request.text(), request.has_add_bos() ? request.add_bos() : true);
  if (!enc.ok()) return finish(enc.status());
  v1::TokenizeResponse response;
  for (size_t i = 0; i < enc->ids.size(); ++i) {
    v1::Token* token = response.add_tokens();
    token->set_id(static_cast<uint32_t>(enc->ids[i]));
    token->set_piece(tokenizer.TokenPiece(enc->ids[i]));
    token->set_char_start(enc->offsets[i].first);
    token->set_char_end(enc->offsets[i].second);
  }
  return finish(SerializeMessage(response, response_bytes));
}

grpc::ServerUnaryReactor* SaeServiceImpl::ListSaes(grpc::CallbackServerContext* context,
                                                   const v1::ListSaesRequest* request, v1::ListSaesResponse* response) {
  const Clock::time_point start = Clock::now();
  if (!ready()) return FinishUnary(context, options_, Metrics::Rpc::kListSaes, start, NotReadyStatus());
  for (const auto& sae : engine_->saes()) {
    const SaeHyperparams& hp = sae->hyperparams();
    v1::SaeInfo* info = response->add_saes();
    info->set_name(sae->name());
    info->set_hook(sae->hook().Name());
    info->set_layer(static_cast<uint32_t>(sae->hook().layer));
    info->set_site(std::string(HookSiteLetter(sae->hook().site)));
    info->set_d_model(static_cast<uint32_t>(hp.d_model));
    info->set_d_sae(static_cast<uint32_t>(hp.d_sae));
    info->set_act_fn(hp.act_fn);
    info->set_threshold(hp.jump_relu_threshold);
    info->set_hook_point_in(hp.hook_point_in);
    info->set_hook_point_out(hp.hook_point_out);
    info->set_path(sae->path());
  }
  return FinishUnary(context, options_, Metrics::Rpc::kListSaes, start, absl::OkStatus());
}

grpc::ServerUnaryReactor* SaeServiceImpl::Info(grpc::CallbackServerContext* context, const v1::InfoRequest* request,
                                               v1::InfoResponse* response) {
  const Clock::time_point start = Clock::now();
  if (!ready()) return FinishUnary(context, options_, Metrics::Rpc::kInfo, start, NotReadyStatus());
  const LlamaConfig& config = engine_->model_config();
  response->set_model_path(engine_->model_dir());
  response->set_backend(engine_->backend_name());
  response->set_n_layers(static_cast<uint32_t>(config.num_hidden_layers));
  response->set_d_model(static_cast<uint32_t>(config.hidden_size));
  response->set_vocab_size(static_cast<uint32_t>(config.vocab_size));
  response->set_n_layers_run(static_cast<uint32_t>(engine_->n_layers_loaded()));
  response->set_default_k(static_cast<uint32_t>(options_.limits.default_k));
  response->set_max_k(static_cast<uint32_t>(options_.limits.max_k));
  response->set_max_tokens_per_request(static_cast<uint32_t>(options_.limits.max_tokens_per_request));
  if (std::optional<int32_t> bos = engine_->tokenizer().bos_id())
    response->set_bos_token_id(static_cast<uint32_t>(*bos));
  response->set_version(options_.version);
  return FinishUnary(context, options_, Metrics::Rpc::kInfo, start, absl::OkStatus());
}

}  // namespace sae
