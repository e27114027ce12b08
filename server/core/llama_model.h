// Llama prefill forward pass (no KV cache: the service only reads activations)
// with hook capture at R/A/M/TC points, written once against the Backend ops.
#ifndef SAE_CORE_LLAMA_MODEL_H_
#define SAE_CORE_LLAMA_MODEL_H_

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/hooks.h"
#include "core/llama_config.h"

namespace sae {

// Token ids of several sequences packed back to back.
struct PackedBatch {
  std::vector<int32_t> ids;         // [n_tokens]
  std::vector<int32_t> positions;   // [n_tokens], restarting at 0 per sequence
  std::vector<int32_t> seq_starts;  // [n_seqs + 1]

  void Append(const std::vector<int32_t>& seq_ids);
  int n_tokens() const { return static_cast<int>(ids.size()); }
  int n_seqs() const { return static_cast<int>(seq_starts.size()) - 1; }
  PackedBatch() : seq_starts{0} {}
};

// Called at each requested hook with the activations [n_tokens, d_model] in
// backend memory; valid only during the call.
using HookFn = std::function<absl::Status(const HookPoint&, const Tensor&)>;

class LlamaModel {
 public:
  // Gives Build each weight in backend memory: its Hugging Face tensor name
  // ("model.layers.3.mlp.up_proj.weight"), the shape the config implies, and
  // the dtype to hold it in.
  using WeightSource = std::function<absl::StatusOr<OwnedTensor>(const std::string& name,
                                                                 const std::vector<int64_t>& shape, DType dtype)>;

  // Loads the weights of layers 0..last_layer (all when last_layer < 0) of
  // the model `config` describes (its config.json, parsed by the caller)
  // from `model_dir` into `backend` as `weight_dtype`.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& model_dir, const LlamaConfig& config,
                                                          Backend* backend, int last_layer, DType weight_dtype);
  // The model of `config` with layers 0..n_layers-1 from `source` (Load reads
  // safetensors; sae-bench-cuda makes random weights of the 8B shapes).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Build(const LlamaConfig& config, Backend* backend, int n_layers,
                                                           DType weight_dtype, const WeightSource& source);

  const LlamaConfig& config() const { return config_; }
  int n_layers_loaded() const { return static_cast<int>(layers_.size()); }

  // Runs layers 0..(deepest hook layer) over the batch, calling on_hook at
  // every hook in `hooks` (in forward order).
  absl::Status Forward(const PackedBatch& batch, const std::set<HookPoint>& hooks, const HookFn& on_hook);

  struct Layer {
    OwnedTensor input_norm;  // [1, d]
    OwnedTensor post_norm;   // [1, d]
    OwnedTensor wq;          // [n_heads*hd, d]
    OwnedTensor wk;          // [n_kv*hd, d]
    OwnedTensor wv;          // [n_kv*hd, d]
    OwnedTensor wo;          // [d, n_heads*hd]
    OwnedTensor w_gate;      // [ffn, d]
    OwnedTensor w_up;        // [ffn, d]
    OwnedTensor w_down;      // [d, ffn]
  };
  const Layer& layer(int l) const { return layers_[l]; }
  // RoPE's inverse frequencies, [1, head_dim / 2] F32 (llama3 scaling applied).
  const OwnedTensor& inv_freq() const { return inv_freq_; }

 private:
  LlamaModel() = default;
  Backend* backend_ = nullptr;
  LlamaConfig config_;
  OwnedTensor embed_;     // [vocab, d]
  OwnedTensor inv_freq_;  // [1, hd/2]
  std::vector<Layer> layers_;
};

}  // namespace sae

#endif  // SAE_CORE_LLAMA_MODEL_H_
