// The extraction engine: tokenizer + model + SAEs on one backend. Used by the
// gRPC server (through the executor thread) and by sae-extract. Not
// thread-safe: one thread owns an Engine.
#ifndef SAE_CORE_ENGINE_H_
#define SAE_CORE_ENGINE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/llama_model.h"
#include "core/sae.h"
#include "tokenizer/tokenizer.h"

namespace sae {

struct SaeSpec {
  std::string dir;
  std::string alias;  // empty: the folder name
};

struct EngineOptions {
  std::string model_dir;
  std::vector<SaeSpec> saes;
  std::string backend = "cpu";
  SaeEncodeForm encode_form = SaeEncodeForm::kSaeLens;
  // Load every layer even if no SAE needs it (e.g. for hook dumps of any layer).
  bool load_all_layers = false;
};

// One sequence of a batch. Options of one request never change another
// request's results in the same batch.
struct SequenceRequest {
  std::vector<int32_t> ids;      // [n_tokens]
  std::vector<int> sae_indices;  // into Engine::saes()
  int k = 0;                     // features kept per token and SAE
  bool include_bos = false;      // features at BOS positions too
  bool capture_hooks = false;    // return the raw hook activations
  // Features with a value below this are dropped (finite, >= 0; 0 keeps every active one).
  float min_activation = 0.0f;
  // Empty, or parallel to sae_indices: for SAE j, a non-empty watch[j] means
  // only those feature indices (distinct, < d_sae) are considered, so the
  // top-k is taken among the watched features that are active.
  std::vector<std::vector<int32_t>> watch;
  // Per token and SAE: ||y - y_hat||^2 / ||y||^2 (see SaeDecoderWeights).
  bool reconstruction_error = false;
};

// Top-k features of one SAE for each token: [n_tokens, k], sorted by value
// descending; unused slots have index -1.
struct SaeTopK {
  int k = 0;
  std::vector<int32_t> indices;
  std::vector<float> values;
  // [n_tokens] when reconstruction_error was asked for, else empty; NaN at
  // the BOS positions that carry no features (include_bos = false).
  std::vector<float> reconstruction_error;

  int n_active(int token) const;
};

struct SequenceResult {
  std::vector<SaeTopK> saes;                        // parallel to sae_indices
  std::map<std::string, std::vector<float>> hooks;  // hook name -> [n_tokens, d_model]
};

// Where one batch spent its device time (measured with the backend's time
// points: on a GPU, events in the stream; on the CPU, the clock).
struct RunTiming {
  double total_seconds = 0;  // the forward pass and the SAE work of the batch
  double sae_seconds = 0;    // SAE encode/top-k, watch lists, reconstruction, hook copies
  // Rows (tokens) the SAE top-k ran on, summed over the SAEs: each SAE runs
  // on the rows of the requests that asked for its top-k, not on the batch.
  int64_t sae_topk_rows = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const LlamaConfig& model_config() const { return model_->config(); }
  const std::vector<std::unique_ptr<Sae>>& saes() const { return saes_; }
  // 0, 1, ..., saes().size() - 1: a request's sae_indices for every SAE.
  std::vector<int> all_sae_indices() const;
  const std::string& model_dir() const { return model_dir_; }
  std::string backend_name() const { return backend_->name(); }
  int n_layers_loaded() const { return model_->n_layers_loaded(); }
  // The largest request k every loaded SAE serves on this backend: a TopK
  // SAE keeps at most its top_k (checked at load), a JumpReLU SAE keeps k,
  // which the backend's top-k bounds (Backend::max_sae_top_k).
  int max_k() const;
  // Index into saes() of the SAE called `name`; NOT_FOUND lists the names.
  absl::StatusOr<int> FindSae(absl::string_view name) const;

  // Runs one packed batch: Collect(Submit(batch)). Token ids are validated (INVALID_ARGUMENT).
  absl::StatusOr<std::vector<SequenceResult>> Run(const std::vector<SequenceRequest>& batch);

  // The two halves of Run, so a caller can queue the next batch on the
  // device before it reads the last one back (the device then never waits
  // for the host between batches). Submit validates the batch and issues all
  // its device work: the forward pass, every SAE op and copies of captured
  // hooks, whose outputs stay on the device (on a GPU Submit does not wait
  // for the device, except at an SAE's first use and when a batch's input
  // copies outnumber the backend's staging slots). Collect
  // waits for them and builds the results; its read-back waits only for this
  // batch's own work (Backend::CopyToHostAfter its end point), not for a batch
  // submitted after it, which keeps computing meanwhile, and reports only the
  // device errors of the ops between its own start and end points. So batches
  // may be collected in any order (the executor re-runs the requests of a
  // failed batch one by one while the next batch is in flight); a batch that
  // is never collected only costs its device memory until it is destroyed.
  struct PendingBatch;
  struct PendingBatchDeleter {  // PendingBatch is complete only in engine.cc
    void operator()(PendingBatch* p) const;
  };
  using Pending = std::unique_ptr<PendingBatch, PendingBatchDeleter>;
  absl::StatusOr<Pending> Submit(const std::vector<SequenceRequest>& batch);
  absl::StatusOr<std::vector<SequenceResult>> Collect(Pending pending);

  // Whether Submit returns before the device has finished the batch (the
  // backend is asynchronous), i.e. whether overlapping batches pays off.
  bool asynchronous() const { return backend_->asynchronous(); }
  // OK while the backend's device is usable (Backend::DeviceStatus).
  absl::Status device_status() const { return backend_->DeviceStatus(); }
  // What the backend holds now (weights, batches in flight, pools); from the
  // thread that runs the engine.
  MemoryUsage memory() { return backend_->Memory(); }

  // Timing of the last collected batch (also of one that failed).
  const RunTiming& last_run_timing() const { return last_timing_; }

 private:
  Engine() = default;
  absl::Status Validate(const SequenceRequest& r) const;
  std::string model_dir_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<LlamaModel> model_;
  std::vector<std::unique_ptr<Sae>> saes_;
  RunTiming last_timing_;
};

}  // namespace sae

#endif  // SAE_CORE_ENGINE_H_
