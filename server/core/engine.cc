#include "core/engine.h"

#include <algorithm>
#include <set>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace sae {

int SaeTopK::n_active(int token) const {
  int n = 0;
  while (n < k && indices[static_cast<size_t>(token) * k + n] >= 0) ++n;
  return n;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> e(new Engine());
  e->model_dir_ = options.model_dir;
  ASSIGN_OR_RETURN(e->backend_, CreateBackend(options.backend));
  ASSIGN_OR_RETURN(e->tokenizer_, Tokenizer::FromFile(options.model_dir + "/tokenizer.json"));

  absl::flat_hash_set<std::string> names;
  for (const SaeSpec& spec : options.saes) {
    ASSIGN_OR_RETURN(auto s, Sae::Load(spec.dir, spec.alias, e->backend_.get(), options.encode_form));
    if (!names.insert(s->name()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(spec.dir, ": SAE name \"", s->name(), "\" is already used; give one of them an alias"));
    }
    e->saes_.push_back(std::move(s));
  }
  int last_layer = -1;
  for (const auto& s : e->saes_) last_layer = std::max(last_layer, s->hook().layer);
  if (options.load_all_layers) last_layer = -1;
  // Only the layers up to the deepest hook are ever run, so only those are loaded.
  ASSIGN_OR_RETURN(e->model_, LlamaModel::Load(options.model_dir, e->backend_.get(), last_layer, DType::kBF16));
  const LlamaConfig& c = e->model_->config();
  for (const auto& s : e->saes_) {
    if (s->hyperparams().d_model != c.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat(s->path(), "/hyperparams.json: field \"d_model\" is ",
                                                     s->hyperparams().d_model, " but the model's hidden_size is ",
                                                     c.hidden_size));
    }
    if (s->hook().layer >= c.num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat(s->path(), "/hyperparams.json: field \"hook_point_in\" names layer ",
                                                     s->hook().layer, " but the model has ", c.num_hidden_layers,
                                                     " layers"));
    }
  }
  if (e->tokenizer_->vocab_size() > c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(options.model_dir, "/tokenizer.json has ", e->tokenizer_->vocab_size(),
                                                   " tokens but config.json vocab_size is ", c.vocab_size));
  }
  return e;
}

absl::StatusOr<int> Engine::FindSae(absl::string_view name) const {
  std::vector<std::string> all;
  for (size_t i = 0; i < saes_.size(); ++i) {
    if (saes_[i]->name() == name) return static_cast<int>(i);
    all.push_back(saes_[i]->name());
  }
  return absl::NotFoundError(absl::StrCat("unknown SAE \"", name, "\"; loaded: ", absl::StrJoin(all, ", ")));
}

absl::StatusOr<std::vector<SequenceResult>> Engine::Run(const std::vector<SequenceRequest>& batch) {
  const LlamaConfig& c = model_->config();
  PackedBatch packed;
  std::set<HookPoint> hooks;
  for (const SequenceRequest& r : batch) {
    if (r.k <= 0) return absl::InvalidArgumentError("k must be positive");
    for (int32_t id : r.ids) {
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    for (int si : r.sae_indices) {
      if (si < 0 || si >= static_cast<int>(saes_.size())) return absl::InvalidArgumentError("bad SAE index");
      hooks.insert(saes_[si]->hook());
    }
    packed.Append(r.ids);
  }
  std::vector<SequenceResult> results(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) results[i].saes.resize(batch[i].sae_indices.size());

  const std::optional<int32_t> bos = tokenizer_->bos_id();
  const int64_t d = c.hidden_size;
  std::vector<float> hook_host;

  auto on_hook = [&](const HookPoint& hp, const Tensor& act) -> absl::Status {
    bool captured = false;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (!batch[i].capture_hooks) continue;
      if (!captured) {
        hook_host.resize(static_cast<size_t>(act.numel()));
        RETURN_IF_ERROR(backend_->CopyToHost(act, hook_host.data()));
        captured = true;
      }
      bool wants = false;
      for (int si : batch[i].sae_indices) wants |= saes_[si]->hook() == hp;
      if (!wants) continue;
      const size_t begin = static_cast<size_t>(packed.seq_starts[i]) * d;
      const size_t end = static_cast<size_t>(packed.seq_starts[i + 1]) * d;
      results[i].hooks[hp.Name()].assign(hook_host.begin() + begin, hook_host.begin() + end);
    }
    for (size_t s = 0; s < saes_.size(); ++s) {
      const Sae& sae = *saes_[s];
      if (!(sae.hook() == hp)) continue;
      int k_max = 0;
      for (const SequenceRequest& r : batch) {
        if (std::find(r.sae_indices.begin(), r.sae_indices.end(), static_cast<int>(s)) != r.sae_indices.end()) {
          k_max = std::max(k_max, r.k);
        }
      }
      if (k_max == 0) continue;
      ASSIGN_OR_RETURN(OwnedTensor idx, backend_->Alloc(DType::kI32, act.rows, k_max));
      ASSIGN_OR_RETURN(OwnedTensor val, backend_->Alloc(DType::kF32, act.rows, k_max));
      RETURN_IF_ERROR(backend_->SaeEncodeTopK(act, sae.encoder(), k_max, idx.get(), val.get()));
      std::vector<int32_t> idx_host(static_cast<size_t>(act.rows) * k_max);
      std::vector<float> val_host(idx_host.size());
      RETURN_IF_ERROR(backend_->CopyToHost(idx.get(), idx_host.data()));
      RETURN_IF_ERROR(backend_->CopyToHost(val.get(), val_host.data()));
      for (size_t i = 0; i < batch.size(); ++i) {
        const SequenceRequest& r = batch[i];
        for (size_t j = 0; j < r.sae_indices.size(); ++j) {
          if (r.sae_indices[j] != static_cast<int>(s)) continue;
          SaeTopK& out = results[i].saes[j];
          const int n = static_cast<int>(r.ids.size());
          out.k = r.k;
          out.indices.assign(static_cast<size_t>(n) * r.k, -1);
          out.values.assign(static_cast<size_t>(n) * r.k, 0.0f);
          for (int t = 0; t < n; ++t) {
            // SAEs never saw BOS in training: its activations are off-distribution.
            if (!r.include_bos && bos && r.ids[t] == *bos) continue;
            const size_t row = static_cast<size_t>(packed.seq_starts[i] + t) * k_max;
            std::copy_n(idx_host.begin() + row, r.k, out.indices.begin() + static_cast<size_t>(t) * r.k);
            std::copy_n(val_host.begin() + row, r.k, out.values.begin() + static_cast<size_t>(t) * r.k);
          }
        }
      }
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(model_->Forward(packed, hooks, on_hook));
  return results;
}

}  // namespace sae
