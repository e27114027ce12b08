#include "rpc/service.h"

#include <chrono>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>

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

// The RPC's deadline on the executor's clock; max() when none was set.
Clock::time_point JobDeadline(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  const auto left = deadline - std::chrono::system_clock::now();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

// What every Extract-like reactor needs; outlives them (owned by the service).
struct Shared {
  const Engine* engine;
  Executor* executor;
  const ServiceOptions* options;
  Metrics* metrics;
};

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
      : shared_(shared), start_(Clock::now()), cancelled_(std::make_shared<std::atomic<bool>>(false)) {
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
      if (!ok) BreakLocked(absl::CancelledError("the client stopped reading"));
      action = NextActionLocked();
    }
    Do(action);
  }

  void OnCancel() override {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      BreakLocked(absl::CancelledError("the client cancelled the request"));
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
        shared_.metrics->ObserveRequest(Metrics::Rpc::kExtract, SecondsSince(start_));
        shared_.metrics->CountFailure(final_status_.code());
        Finish(ToGrpcStatus(final_status_));
        break;
    }
  }

  const Shared shared_;
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

// Bidi ExtractStream: requests are admitted as they arrive, results written
// as their windows complete (responses of different requests may interleave;
// each carries its request_id). A failing request gets an error response; the
// stream keeps serving. Under BACKPRESSURE the next read starts only once the
// current request is admitted. State is shared by gRPC threads (reads, writes,
// cancel) and the engine thread (results), so it is guarded by mu_, and
// StartRead / StartWrite / Finish are always called outside mu_.
class ExtractStreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  ExtractStreamReactor(const Shared& shared, grpc::CallbackServerContext* context)
      : shared_(shared), deadline_(JobDeadline(context)) {
    StartRead(&request_);
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
    // Last, and only when HandleRequest says so: OnReadDone for the next
    // request may run at once on another thread.
    if (HandleRequest()) StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) BreakLocked();
      action = NextActionLocked();
    }
    Do(action);
  }

  void OnCancel() override {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      BreakLocked();
      action = NextActionLocked();
    }
    Do(action);
  }

  void OnDone() override { delete this; }

 private:
  enum class Action { kNone, kWrite, kFinish };

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
    bool settled = false;      // counted in the metrics (see Settle)
  };
  using OutgoingPtr = std::shared_ptr<Outgoing>;

  // Returns whether the caller should start the next read (false: the
  // executor's on_admitted starts it, once this request is admitted).
  bool HandleRequest() {
    const Clock::time_point start = Clock::now();
    // Everything needed from request_ is taken here: once submitted, the next
    // read may overwrite it.
    v1::ExtractRequest request;
    if (absl::Status parsed = ParseMessage(request_, &request); !parsed.ok()) {
      QueueError(ReadStringField(request_, *v1::ExtractRequest::descriptor(), "request_id"), start, parsed,
                 /*releases_id=*/false);
      return true;
    }
    const std::string id = request.request_id();
    absl::StatusOr<PreparedRequest> prepared =
        id.empty() ? absl::InvalidArgumentError("request_id is required on ExtractStream") : Prepare(shared_, request);
    if (!prepared.ok()) {
      QueueError(id, start, prepared.status(), /*releases_id=*/false);
      return true;
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
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) return true;
      backlog_full = static_cast<int>(in_flight_.size()) >= shared_.options->limits.max_stream_backlog;
      duplicate = !backlog_full && !in_flight_.emplace(id, cancelled).second;
      if (!duplicate && !backlog_full) {
        ++pending_jobs_;
        outbox_.push_back(out);
      }
    }
    if (backlog_full) {
      QueueError(id, start,
                 absl::ResourceExhaustedError(absl::StrCat("this stream already has ",
                                                           shared_.options->limits.max_stream_backlog,
                                                           " requests in flight; read responses before sending more")),
                 /*releases_id=*/false);
      return true;
    }
    if (duplicate) {
      // The first request with this id keeps its slot.
      QueueError(id, start, absl::InvalidArgumentError("request_id \"" + id + "\" is already in flight on this stream"),
                 /*releases_id=*/false);
      return true;
    }
    const bool backpressure = shared_.options->overload_policy == v1::ServerConfig::BACKPRESSURE;
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
    if (backpressure) job.on_admitted = [this] { StartRead(&request_); };
    absl::Status submitted = shared_.executor->Submit(
        std::move(job), backpressure ? Executor::WhenFull::kWait : Executor::WhenFull::kReject);
    if (!submitted.ok()) {
      // No callback will come: settle the request here.
      OnJobDone(out, submitted);
      return true;
    }
    return !backpressure;
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

  void QueueError(const std::string& id, Clock::time_point start, const absl::Status& status, bool releases_id) {
    auto out = std::make_shared<Outgoing>();
    out->request_id = id;
    out->start = start;
    out->job_done = true;
    out->status = status;
    out->releases_id = releases_id;
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) {
        Settle(out);
      } else {
        outbox_.push_back(std::move(out));
      }
      action = NextActionLocked();
    }
    Do(action);
  }

  // A request is over (last response handed to the wire, or dropped): its
  // metrics, and its id may be used again.
  void Settle(const OutgoingPtr& out) {
    if (out->settled) return;
    out->settled = true;
    if (out->releases_id) in_flight_.erase(out->request_id);
    shared_.metrics->ObserveRequest(Metrics::Rpc::kExtractStream, SecondsSince(out->start));
    shared_.metrics->CountFailure(broken_ && out->status.ok() ? absl::StatusCode::kCancelled : out->status.code());
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
          Settle(*it);
          outbox_.erase(it);
          writing_ = true;
          return Action::kWrite;
        }
      }
    }
    if (!writing_ && reads_done_ && pending_jobs_ == 0 && (outbox_.empty() || broken_)) {
      finished_ = true;
      finish_cancelled_ = broken_;
      return Action::kFinish;
    }
    return Action::kNone;
  }

  // The client is gone or stopped reading: drop queued output and have the
  // executor skip this stream's jobs that have not run yet.
  void BreakLocked() {
    if (broken_) return;
    broken_ = true;
    for (auto& out : outbox_) {
      if (out->job_done) Settle(out);  // the others settle in OnJobDone
    }
    outbox_.clear();
    for (auto& [id, flag] : in_flight_) flag->store(true);
  }

  void Do(Action action) {
    switch (action) {
      case Action::kNone:
        break;
      case Action::kWrite:
        StartWrite(&response_);
        break;
      case Action::kFinish:
        // finish_cancelled_ was written under mu_ together with finished_ and
        // never changes afterwards.
        Finish(finish_cancelled_ ? grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled")
                                 : grpc::Status::OK);
        break;
    }
  }

  const Shared shared_;
  const Clock::time_point deadline_;
  grpc::ByteBuffer request_;  // target of the one outstanding read

  std::mutex mu_;
  bool reads_done_ = false;        // guarded by mu_
  bool writing_ = false;           // guarded by mu_
  bool broken_ = false;            // guarded by mu_
  bool finished_ = false;          // guarded by mu_
  bool finish_cancelled_ = false;  // set once, with finished_
  int pending_jobs_ = 0;           // guarded by mu_: submitted, `done` not called yet
  // guarded by mu_: request_id -> cancel flag, from admission until the last
  // response is handed to the wire.
  std::map<std::string, CancelFlag> in_flight_;
  std::list<OutgoingPtr> outbox_;  // guarded by mu_: admission order
  grpc::ByteBuffer response_;      // in flight until OnWriteDone
};

// Ends an RPC that cannot start (e.g. the model is still loading).
template <typename Base>
class FailedReactor final : public Base {
 public:
  explicit FailedReactor(const absl::Status& status) { this->Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace

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

SaeServiceImpl::SaeServiceImpl(const ServiceOptions& options) : options_(options) {
  if (!options_.metrics) options_.metrics = std::make_shared<Metrics>();
}

void SaeServiceImpl::Attach(const Engine* engine, Executor* executor) {
  engine_ = engine;
  executor_ = executor;
  ready_.store(true, std::memory_order_release);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* SaeServiceImpl::Extract(grpc::CallbackServerContext* context,
                                                                    const grpc::ByteBuffer* request) {
  if (!ready()) return new FailedReactor<grpc::ServerWriteReactor<grpc::ByteBuffer>>(NotReadyStatus());
  return new ExtractReactor(Shared{engine_, executor_, &options_, options_.metrics.get()}, context, *request);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* SaeServiceImpl::ExtractStream(
    grpc::CallbackServerContext* context) {
  if (!ready()) return new FailedReactor<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>>(NotReadyStatus());
  return new ExtractStreamReactor(Shared{engine_, executor_, &options_, options_.metrics.get()}, context);
}

grpc::ServerUnaryReactor* SaeServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* request_bytes,
                                                   grpc::ByteBuffer* response_bytes) {
  if (!ready()) return FinishUnary(context, NotReadyStatus());
  v1::TokenizeRequest request;
  if (absl::Status parsed = ParseMessage(*request_bytes, &request); !parsed.ok()) return FinishUnary(context, parsed);
  const Tokenizer& tokenizer = engine_->tokenizer();
  absl::StatusOr<Encoding> enc = tokenizer.Encode(request.text(), request.has_add_bos() ? request.add_bos() : true);
  if (!enc.ok()) return FinishUnary(context, enc.status());
  v1::TokenizeResponse response;
  for (size_t i = 0; i < enc->ids.size(); ++i) {
    v1::Token* token = response.add_tokens();
    token->set_id(static_cast<uint32_t>(enc->ids[i]));
    token->set_piece(tokenizer.TokenPiece(enc->ids[i]));
    token->set_char_start(enc->offsets[i].first);
    token->set_char_end(enc->offsets[i].second);
  }
  return FinishUnary(context, SerializeMessage(response, response_bytes));
}

grpc::ServerUnaryReactor* SaeServiceImpl::ListSaes(grpc::CallbackServerContext* context,
                                                   const v1::ListSaesRequest* request, v1::ListSaesResponse* response) {
  if (!ready()) return FinishUnary(context, NotReadyStatus());
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
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* SaeServiceImpl::Info(grpc::CallbackServerContext* context, const v1::InfoRequest* request,
                                               v1::InfoResponse* response) {
  if (!ready()) return FinishUnary(context, NotReadyStatus());
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
  return FinishUnary(context, absl::OkStatus());
}

}  // namespace sae
