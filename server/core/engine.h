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

// One sequence of a batch.
struct SequenceRequest {
  std::vector<int32_t> ids;       // [n_tokens]
  std::vector<int> sae_indices;   // into Engine::saes()
  int k = 0;                      // features kept per token and SAE
  bool include_bos = false;       // features at BOS positions too
  bool capture_hooks = false;     // return the raw hook activations
};

// Top-k features of one SAE for each token: [n_tokens, k], sorted by value
// descending; unused slots have index -1.
struct SaeTopK {
  int k = 0;
  std::vector<int32_t> indices;
  std::vector<float> values;

  int n_active(int token) const;
};

struct SequenceResult {
  std::vector<SaeTopK> saes;                          // parallel to sae_indices
  std::map<std::string, std::vector<float>> hooks;    // hook name -> [n_tokens, d_model]
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const LlamaConfig& model_config() const { return model_->config(); }
  const std::vector<std::unique_ptr<Sae>>& saes() const { return saes_; }
  const std::string& model_dir() const { return model_dir_; }
  std::string backend_name() const { return backend_->name(); }
  int n_layers_loaded() const { return model_->n_layers_loaded(); }
  // Index into saes() of the SAE called `name`; NOT_FOUND lists the names.
  absl::StatusOr<int> FindSae(absl::string_view name) const;

  // Runs one packed batch. Token ids are validated (INVALID_ARGUMENT).
  absl::StatusOr<std::vector<SequenceResult>> Run(const std::vector<SequenceRequest>& batch);

 private:
  Engine() = default;
  std::string model_dir_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<LlamaModel> model_;
  std::vector<std::unique_ptr<Sae>> saes_;
};

}  // namespace sae

#endif  // SAE_CORE_ENGINE_H_
