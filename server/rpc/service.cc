#include "rpc/service.h"

#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/hooks.h"
#include "rpc/status_map.h"

namespace sae {
namespace {

const absl::Status& NotReadyStatus() {
  static const absl::Status* status = new absl::Status(absl::UnavailableError("the model is still loading"));
  return *status;
}

// Server-streaming Extract: one job, its result written chunk by chunk, each
// next chunk built and started from OnWriteDone (flow control for free).
class ExtractReactor final : public grpc::ServerWriteReactor<v1::ExtractResponse> {
 public:
  ExtractReactor(const Engine* engine, Executor* executor, const RequestLimits& limits,
                 const v1::ExtractRequest& request)
      : engine_(engine), cancelled_(std::make_shared<std::atomic<bool>>(false)) {
    absl::StatusOr<PreparedRequest> prepared = PrepareRequest(*engine, limits, request);
    if (!prepared.ok()) {
      Finish(ToGrpcStatus(prepared.status()));
      return;
    }
    prepared_ = std::move(*prepared);
    Job job;
    job.request = prepared_.sequence;
    job.cancelled = cancelled_;
    // The reactor outlives the job: it only finishes (and so is deleted)
    // after this callback ran.
    job.done = [this](absl::StatusOr<SequenceResult> result) { OnResult(std::move(result)); };
    absl::Status submitted = executor->Submit(std::move(job));
    if (!submitted.ok()) Finish(ToGrpcStatus(submitted));
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client stopped reading"));
      return;
    }
    WriteNext();
  }

  void OnCancel() override { cancelled_->store(true); }

  void OnDone() override { delete this; }

 private:
  // On the executor thread; must not block.
  void OnResult(absl::StatusOr<SequenceResult> result) {
    if (!result.ok()) {
      Finish(ToGrpcStatus(result.status()));
      return;
    }
    result_ = std::move(*result);
    WriteNext();
  }

  // Writes are strictly sequential (next one from OnWriteDone), so no lock.
  void WriteNext() {
    if (next_chunk_ >= prepared_.n_chunks()) {
      Finish(grpc::Status::OK);
      return;
    }
    response_ = BuildResponseChunk(prepared_, result_, engine_->tokenizer(), next_chunk_++);
    StartWrite(&response_);
  }

  const Engine* engine_;
  CancelFlag cancelled_;
  PreparedRequest prepared_;
  SequenceResult result_;
  int next_chunk_ = 0;
  v1::ExtractResponse response_;  // in flight until OnWriteDone
};

// Bidi ExtractStream: requests are admitted as they arrive, results written
// as they complete. A failing request gets an error response; the stream
// keeps serving. State is shared by gRPC threads (reads, writes, cancel) and
// the executor thread (results), so it is guarded by mu_, and StartWrite /
// Finish are always called outside mu_.
class ExtractStreamReactor final : public grpc::ServerBidiReactor<v1::ExtractRequest, v1::ExtractResponse> {
 public:
  ExtractStreamReactor(const Engine* engine, Executor* executor, const RequestLimits& limits)
      : engine_(engine), executor_(executor), limits_(limits) {
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
    HandleRequest(request_);
    // Last: OnReadDone for the next request may run at once on another thread.
    StartRead(&request_);
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

  // One request's responses waiting to be written.
  struct Outgoing {
    std::shared_ptr<const PreparedRequest> request;  // null for an error response
    SequenceResult result;
    int next_chunk = 0;
    v1::ExtractResponse error;
    bool releases_id = false;  // the request_id leaves the in-flight set when written
  };

  void HandleRequest(const v1::ExtractRequest& request) {
    const std::string& id = request.request_id();
    absl::StatusOr<PreparedRequest> prepared =
        id.empty() ? absl::InvalidArgumentError("request_id is required on ExtractStream")
                   : PrepareRequest(*engine_, limits_, request);
    if (!prepared.ok()) {
      QueueError(id, prepared.status(), /*releases_id=*/false);
      return;
    }
    auto admitted = std::make_shared<const PreparedRequest>(std::move(*prepared));
    CancelFlag cancelled = std::make_shared<std::atomic<bool>>(false);
    bool duplicate = false;
    bool backlog_full = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) return;
      backlog_full = static_cast<int>(in_flight_.size()) >= limits_.max_stream_backlog;
      duplicate = !backlog_full && !in_flight_.emplace(id, cancelled).second;
      if (!duplicate && !backlog_full) ++pending_jobs_;
    }
    if (backlog_full) {
      QueueError(id,
                 absl::ResourceExhaustedError(absl::StrCat("this stream already has ", limits_.max_stream_backlog,
                                                           " requests in flight; read responses before sending more")),
                 /*releases_id=*/false);
      return;
    }
    if (duplicate) {
      // The first request with this id keeps its slot.
      QueueError(id, absl::InvalidArgumentError("request_id \"" + id + "\" is already in flight on this stream"),
                 /*releases_id=*/false);
      return;
    }
    Job job;
    job.request = admitted->sequence;
    job.cancelled = cancelled;
    // Finish waits for pending_jobs_ == 0, so `this` is alive when called.
    job.done = [this, admitted](absl::StatusOr<SequenceResult> result) { OnResult(admitted, std::move(result)); };
    absl::Status submitted = executor_->Submit(std::move(job));
    if (!submitted.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        --pending_jobs_;
      }
      QueueError(id, submitted, /*releases_id=*/true);
    }
  }

  // On the executor thread; must not block.
  void OnResult(const std::shared_ptr<const PreparedRequest>& request, absl::StatusOr<SequenceResult> result) {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --pending_jobs_;
      if (broken_) {
        in_flight_.erase(request->request_id);
      } else {
        Outgoing out;
        out.releases_id = true;
        if (result.ok()) {
          out.request = request;
          out.result = std::move(*result);
        } else {
          out.error = BuildErrorResponse(request->request_id, result.status());
        }
        outbox_.push_back(std::move(out));
      }
      action = NextActionLocked();
    }
    Do(action);
  }

  void QueueError(const std::string& id, const absl::Status& status, bool releases_id) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) {
        if (releases_id) in_flight_.erase(id);
      } else {
        Outgoing out;
        out.error = BuildErrorResponse(id, status);
        out.releases_id = releases_id;
        outbox_.push_back(std::move(out));
      }
    }
    Do(NextAction());
  }

  Action NextAction() {
    std::lock_guard<std::mutex> lock(mu_);
    return NextActionLocked();
  }

  // Decides (and reserves) the next step; the caller performs it unlocked.
  Action NextActionLocked() {
    if (finished_) return Action::kNone;
    if (!writing_ && !broken_ && !outbox_.empty()) {
      Outgoing& front = outbox_.front();
      bool last = true;
      if (front.request) {
        response_ = BuildResponseChunk(*front.request, front.result, engine_->tokenizer(), front.next_chunk++);
        last = front.next_chunk >= front.request->n_chunks();
      } else {
        response_ = std::move(front.error);
      }
      if (last) {
        if (front.releases_id) in_flight_.erase(response_.request_id());
        outbox_.pop_front();
      }
      writing_ = true;
      return Action::kWrite;
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
    broken_ = true;
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

  const Engine* engine_;
  Executor* executor_;
  const RequestLimits limits_;
  v1::ExtractRequest request_;  // target of the one outstanding read

  std::mutex mu_;
  bool reads_done_ = false;        // guarded by mu_
  bool writing_ = false;           // guarded by mu_
  bool broken_ = false;            // guarded by mu_
  bool finished_ = false;          // guarded by mu_
  bool finish_cancelled_ = false;  // set once, with finished_
  int pending_jobs_ = 0;           // guarded by mu_: submitted, not yet called back
  // guarded by mu_: request_id -> cancel flag, from admission until the last
  // response is handed to the wire.
  std::map<std::string, CancelFlag> in_flight_;
  std::deque<Outgoing> outbox_;   // guarded by mu_
  v1::ExtractResponse response_;  // in flight until OnWriteDone
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

void SaeServiceImpl::Attach(const Engine* engine, Executor* executor) {
  engine_ = engine;
  executor_ = executor;
  ready_.store(true, std::memory_order_release);
}

grpc::ServerWriteReactor<v1::ExtractResponse>* SaeServiceImpl::Extract(grpc::CallbackServerContext* context,
                                                                       const v1::ExtractRequest* request) {
  if (!ready()) return new FailedReactor<grpc::ServerWriteReactor<v1::ExtractResponse>>(NotReadyStatus());
  return new ExtractReactor(engine_, executor_, options_.limits, *request);
}

grpc::ServerBidiReactor<v1::ExtractRequest, v1::ExtractResponse>* SaeServiceImpl::ExtractStream(
    grpc::CallbackServerContext* context) {
  if (!ready()) {
    return new FailedReactor<grpc::ServerBidiReactor<v1::ExtractRequest, v1::ExtractResponse>>(NotReadyStatus());
  }
  return new ExtractStreamReactor(engine_, executor_, options_.limits);
}

grpc::ServerUnaryReactor* SaeServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                   const v1::TokenizeRequest* request, v1::TokenizeResponse* response) {
  if (!ready()) return FinishUnary(context, NotReadyStatus());
  const Tokenizer& tokenizer = engine_->tokenizer();
  absl::StatusOr<Encoding> enc = tokenizer.Encode(request->text(), request->has_add_bos() ? request->add_bos() : true);
  if (!enc.ok()) return FinishUnary(context, enc.status());
  for (size_t i = 0; i < enc->ids.size(); ++i) {
    v1::Token* token = response->add_tokens();
    token->set_id(static_cast<uint32_t>(enc->ids[i]));
    token->set_piece(tokenizer.TokenPiece(enc->ids[i]));
    token->set_char_start(enc->offsets[i].first);
    token->set_char_end(enc->offsets[i].second);
  }
  return FinishUnary(context, absl::OkStatus());
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
