#include "core/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <set>
#include <tuple>

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

namespace {

// An SAE's d_model and hook layer against the model's config.json.
absl::Status CheckSaeFitsModel(const Sae& s, const LlamaConfig& c) {
  if (s.hyperparams().d_model != c.hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(s.path(), "/hyperparams.json: field \"d_model\" is ",
                                                   s.hyperparams().d_model, " but the model's hidden_size is ",
                                                   c.hidden_size));
  }
  if (s.hook().layer >= c.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat(s.path(), "/hyperparams.json: field \"hook_point_in\" names layer ",
                                                   s.hook().layer, " but the model has ", c.num_hidden_layers,
                                                   " layers"));
  }
  return absl::OkStatus();
}

}  // namespace

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
  // Each SAE against the model's config before the model loads, so a
  // mismatch names the SAE's file and field.
  ASSIGN_OR_RETURN(const LlamaConfig config, LlamaConfig::FromFile(options.model_dir + "/config.json"));
  for (const auto& s : e->saes_) RETURN_IF_ERROR(CheckSaeFitsModel(*s, config));
  int last_layer = -1;
  for (const auto& s : e->saes_) last_layer = std::max(last_layer, s->hook().layer);
  if (options.load_all_layers) last_layer = -1;
  // Only the layers up to the deepest hook are ever run, so only those are loaded.
  ASSIGN_OR_RETURN(e->model_, LlamaModel::Load(options.model_dir, config, e->backend_.get(), last_layer, DType::kBF16));
  if (e->tokenizer_->vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(options.model_dir, "/tokenizer.json has ",
                                                   e->tokenizer_->vocab_size(),
                                                   " tokens but config.json vocab_size is ", config.vocab_size));
  }
  return e;
}

int Engine::max_k() const {
  int limit = std::numeric_limits<int>::max();
  for (const auto& s : saes_) {
    if (s->encoder().max_active == 0) limit = std::min(limit, backend_->max_sae_top_k(s->hyperparams().d_model));
  }
  return limit;
}

std::vector<int> Engine::all_sae_indices() const {
  std::vector<int> indices(saes_.size());
  std::iota(indices.begin(), indices.end(), 0);
  return indices;
}

absl::StatusOr<int> Engine::FindSae(absl::string_view name) const {
  std::vector<std::string> all;
  for (size_t i = 0; i < saes_.size(); ++i) {
    if (saes_[i]->name() == name) return static_cast<int>(i);
    all.push_back(saes_[i]->name());
  }
  return absl::NotFoundError(absl::StrCat("unknown SAE \"", name, "\"; loaded: ", absl::StrJoin(all, ", ")));
}

absl::Status Engine::Validate(const SequenceRequest& r) const {
  const LlamaConfig& c = model_->config();
  if (r.k <= 0) return absl::InvalidArgumentError("k must be positive");
  for (int32_t id : r.ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  for (int si : r.sae_indices) {
    if (si < 0 || si >= static_cast<int>(saes_.size())) return absl::InvalidArgumentError("bad SAE index");
  }
  if (!std::isfinite(r.min_activation) || r.min_activation < 0) {
    return absl::InvalidArgumentError(absl::StrCat("min_activation must be finite and >= 0, got ", r.min_activation));
  }
  if (!r.watch.empty() && r.watch.size() != r.sae_indices.size()) {
    return absl::InvalidArgumentError("watch must be empty or have one list per requested SAE");
  }
  for (size_t j = 0; j < r.watch.size(); ++j) {
    const Sae& sae = *saes_[r.sae_indices[j]];
    absl::flat_hash_set<int32_t> seen;
    for (int32_t f : r.watch[j]) {
      if (f < 0 || f >= sae.hyperparams().d_sae) {
        return absl::InvalidArgumentError(absl::StrCat("watched feature ", f, " of SAE \"", sae.name(),
                                                       "\" is outside [0, ", sae.hyperparams().d_sae, ")"));
      }
      if (!seen.insert(f).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("watched feature ", f, " of SAE \"", sae.name(), "\" is listed twice"));
      }
    }
  }
  if (r.reconstruction_error) {
    for (int si : r.sae_indices) {
      const absl::Status& st = saes_[si]->reconstruction_status();
      if (!st.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("SAE \"", saes_[si]->name(), "\" has no reconstruction error: ", st.message()));
      }
    }
  }
  return absl::OkStatus();
}

namespace {

constexpr float kNotComputed = std::numeric_limits<float>::quiet_NaN();

// SAEs never saw BOS in training: its activations are off-distribution.
// Whether SAE slot j of r takes its top-k among a watch list.
bool HasWatchList(const SequenceRequest& r, size_t j) { return !r.watch.empty() && !r.watch[j].empty(); }

bool SkipsPosition(const SequenceRequest& r, int t, std::optional<int32_t> bos) {
  return !r.include_bos && bos && r.ids[t] == *bos;
}

// Copies token t's candidates (value-descending, index -1 ends them) into
// out's row t, dropping values below min_activation (0: keep all).
void FillRow(const SequenceRequest& r, int t, const int32_t* idx, const float* val, int n_cand, SaeTopK* out) {
  int32_t* oi = out->indices.data() + static_cast<size_t>(t) * r.k;
  float* ov = out->values.data() + static_cast<size_t>(t) * r.k;
  int n = 0;
  for (int c = 0; c < n_cand && n < r.k && idx[c] >= 0; ++c) {
    if (r.min_activation > 0 && val[c] < r.min_activation) break;  // sorted: the rest are smaller
    oi[n] = idx[c];
    ov[n] = val[c];
    ++n;
  }
}

void InitTopK(const SequenceRequest& r, SaeTopK* out) {
  const size_t n = r.ids.size();
  out->k = r.k;
  out->indices.assign(n * r.k, -1);
  out->values.assign(n * r.k, 0.0f);
}

}  // namespace

// Device outputs of a submitted batch, read back by Collect.
struct Engine::PendingBatch {
  std::vector<SequenceRequest> batch;
  PackedBatch packed;
  std::vector<SequenceResult> results;  // shaped by Submit, filled by Collect
  struct TopK {  // one SAE's top-k [all rows of the batch, k]; computed on the rows of the requests that take it
    size_t sae;
    int k;
    OwnedTensor idx, val;
  };
  struct Watched {  // request seq, SAE slot: its watch list's values [n_tokens, m]
    size_t seq, slot;
    OwnedTensor val;
  };
  struct Error {  // request seq, SAE slot: per-token relative error [n_tokens, 1]
    size_t seq, slot;
    OwnedTensor err;
  };
  struct Capture {  // request seq, hook name: a copy of its rows of the hook [n_tokens, d_model]
    size_t seq;
    std::string hook;
    OwnedTensor act;
  };
  std::vector<TopK> topk;
  int64_t topk_rows = 0;  // RunTiming::sae_topk_rows
  std::vector<Capture> captures;
  std::vector<Watched> watched;
  std::vector<Error> errors;
  // Device time points: the whole batch, and around each hook's SAE work.
  std::vector<std::pair<int64_t, int64_t>> sae_spans;
  int64_t start = -1, end = -1;
  Backend* backend = nullptr;

  ~PendingBatch() {  // points of a batch never collected
    for (auto [a, b] : sae_spans) {
      backend->ReleaseTimePoint(a);
      backend->ReleaseTimePoint(b);
    }
    if (start >= 0) backend->ReleaseTimePoint(start);
    if (end >= 0) backend->ReleaseTimePoint(end);
  }
};

void Engine::PendingBatchDeleter::operator()(PendingBatch* p) const { delete p; }

absl::StatusOr<std::vector<SequenceResult>> Engine::Run(const std::vector<SequenceRequest>& batch) {
  ASSIGN_OR_RETURN(Pending pending, Submit(batch));
  return Collect(std::move(pending));
}

absl::StatusOr<Engine::Pending> Engine::Submit(const std::vector<SequenceRequest>& batch) {
  const LlamaConfig& c = model_->config();
  Pending p(new PendingBatch());
  p->backend = backend_.get();
  p->batch = batch;
  std::set<HookPoint> hooks;
  for (const SequenceRequest& r : batch) {
    RETURN_IF_ERROR(Validate(r));
    for (int si : r.sae_indices) {
      hooks.insert(saes_[si]->hook());
      // A transcoder's target (the MLP output) is only run for those who ask.
      if (r.reconstruction_error) hooks.insert(saes_[si]->hook_out());
    }
    p->packed.Append(r.ids);
  }
  const PackedBatch& packed = p->packed;
  std::vector<SequenceResult>& results = p->results;
  results.resize(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    results[i].saes.resize(batch[i].sae_indices.size());
    for (SaeTopK& out : results[i].saes) {
      InitTopK(batch[i], &out);
      if (batch[i].reconstruction_error) out.reconstruction_error.assign(batch[i].ids.size(), kNotComputed);
    }
  }

  auto seq_rows = [&](const Tensor& act, size_t i) {
    return act.Rows(packed.seq_starts[i], packed.seq_starts[i + 1] - packed.seq_starts[i]);
  };

  // A reconstruction waiting for its target hook (a transcoder's input buffer
  // is reused before the MLP output exists, so y_hat is kept instead).
  struct PendingError {
    size_t seq;
    size_t slot;
    HookPoint target;
    OwnedTensor y_hat;  // [n_tokens of seq, d_model]
  };
  std::vector<PendingError> pending;
  auto finish_error = [&](PendingError& e, const Tensor& target) -> absl::Status {
    const int64_t n = static_cast<int64_t>(batch[e.seq].ids.size());
    ASSIGN_OR_RETURN(OwnedTensor err, backend_->Alloc(DType::kF32, n, 1));
    RETURN_IF_ERROR(backend_->RelativeSquaredError(e.y_hat.get(), seq_rows(target, e.seq), err.get()));
    p->errors.push_back(PendingBatch::Error{e.seq, e.slot, std::move(err)});
    return absl::OkStatus();
  };

  // Queues the SAE work of one hook; its outputs stay on the device until
  // Collect. Captured activations are copied on the device (the hook's
  // buffer is overwritten later in the forward pass) and read back in
  // Collect too, so a capture never makes the host wait here.
  auto hook_work = [&](const HookPoint& hp, const Tensor& act) -> absl::Status {
    for (size_t i = 0; i < batch.size(); ++i) {
      if (!batch[i].capture_hooks) continue;
      bool wants = false;
      for (int si : batch[i].sae_indices) wants |= saes_[si]->hook() == hp;
      if (!wants) continue;
      const Tensor rows = seq_rows(act, i);
      PendingBatch::Capture cap{i, hp.Name(), OwnedTensor()};
      ASSIGN_OR_RETURN(cap.act, backend_->Alloc(DType::kF32, rows.rows, rows.cols));
      RETURN_IF_ERROR(backend_->Copy(rows, cap.act.get()));
      p->captures.push_back(std::move(cap));
    }
    for (auto it = pending.begin(); it != pending.end();) {
      if (!(it->target == hp)) {
        ++it;
        continue;
      }
      RETURN_IF_ERROR(finish_error(*it, act));
      it = pending.erase(it);
    }
    for (size_t s = 0; s < saes_.size(); ++s) {
      const Sae& sae = *saes_[s];
      if (!(sae.hook() == hp)) continue;
      // The requests that take this SAE's top-k (not a watch list), and their largest k.
      std::vector<bool> takes(batch.size(), false);
      int k_max = 0;
      for (size_t i = 0; i < batch.size(); ++i) {
        for (size_t j = 0; j < batch[i].sae_indices.size(); ++j) {
          if (batch[i].sae_indices[j] == static_cast<int>(s) && !HasWatchList(batch[i], j)) {
            takes[i] = true;
            k_max = std::max(k_max, batch[i].k);
          }
        }
      }
      if (k_max > 0) {
        PendingBatch::TopK t{s, k_max, OwnedTensor(), OwnedTensor()};
        ASSIGN_OR_RETURN(t.idx, backend_->Alloc(DType::kI32, act.rows, k_max));
        ASSIGN_OR_RETURN(t.val, backend_->Alloc(DType::kF32, act.rows, k_max));
        // Only over the rows of those requests, a run of adjacent ones at a
        // time (sequences are packed in order): with SAEs each asked for by
        // other requests, every SAE would otherwise encode the whole batch.
        // Collect reads no other row.
        for (size_t i = 0; i < batch.size();) {
          if (!takes[i]) {
            ++i;
            continue;
          }
          size_t end = i + 1;
          while (end < batch.size() && takes[end]) ++end;
          const int64_t first = packed.seq_starts[i], n = packed.seq_starts[end] - first;
          RETURN_IF_ERROR(backend_->SaeEncodeTopK(act.Rows(first, n), sae.encoder(), k_max, t.idx->Rows(first, n),
                                                  t.val->Rows(first, n)));
          p->topk_rows += n;
          i = end;
        }
        p->topk.push_back(std::move(t));
      }
      for (size_t i = 0; i < batch.size(); ++i) {
        const SequenceRequest& r = batch[i];
        for (size_t j = 0; j < r.sae_indices.size(); ++j) {
          if (r.sae_indices[j] != static_cast<int>(s)) continue;
          if (HasWatchList(batch[i], j)) {
            // The watched features' values on this request's rows; the top-k among them is taken in Collect.
            const std::vector<int32_t>& ids = r.watch[j];
            const int64_t n = static_cast<int64_t>(r.ids.size()), m = static_cast<int64_t>(ids.size());
            ASSIGN_OR_RETURN(OwnedTensor ids_dev, backend_->Alloc(DType::kI32, 1, m));
            PendingBatch::Watched w{i, j, OwnedTensor()};
            ASSIGN_OR_RETURN(w.val, backend_->Alloc(DType::kF32, n, m));
            RETURN_IF_ERROR(backend_->CopyFromHost(ids.data(), ids_dev.get()));
            RETURN_IF_ERROR(backend_->SaeEncodeSelected(seq_rows(act, i), sae.encoder(), ids_dev.get(), w.val.get()));
            p->watched.push_back(std::move(w));
          }
          if (r.reconstruction_error) {
            const int64_t n = static_cast<int64_t>(r.ids.size());
            PendingError e{i, j, sae.hook_out(), OwnedTensor()};
            ASSIGN_OR_RETURN(e.y_hat, backend_->Alloc(DType::kF32, n, c.hidden_size));
            RETURN_IF_ERROR(backend_->SaeReconstruct(seq_rows(act, i), sae.encoder(), sae.decoder(), e.y_hat.get()));
            if (e.target == hp) {
              RETURN_IF_ERROR(finish_error(e, act));
            } else {
              pending.push_back(std::move(e));
            }
          }
        }
      }
    }
    return absl::OkStatus();
  };
  auto on_hook = [&](const HookPoint& hp, const Tensor& act) -> absl::Status {
    ASSIGN_OR_RETURN(const int64_t before, backend_->RecordTimePoint());
    const absl::Status status = hook_work(hp, act);
    absl::StatusOr<int64_t> after = backend_->RecordTimePoint();
    if (!after.ok()) {
      backend_->ReleaseTimePoint(before);
      return after.status();
    }
    p->sae_spans.emplace_back(before, *after);
    return status;
  };
  ASSIGN_OR_RETURN(p->start, backend_->RecordTimePoint());
  RETURN_IF_ERROR(model_->Forward(packed, hooks, on_hook));
  if (!pending.empty()) {
    return absl::InternalError(absl::StrCat("reconstruction target ", pending.front().target.Name(), " never ran"));
  }
  ASSIGN_OR_RETURN(p->end, backend_->RecordTimePoint());
  return p;
}

absl::StatusOr<std::vector<SequenceResult>> Engine::Collect(Pending p) {
  last_timing_ = RunTiming();
  const std::vector<SequenceRequest>& batch = p->batch;
  const PackedBatch& packed = p->packed;
  std::vector<SequenceResult>& results = p->results;
  const std::optional<int32_t> bos = tokenizer_->bos_id();

  // First the batch's own device error codes (a bad input found on the
  // device), even when it has nothing to copy back.
  RETURN_IF_ERROR(backend_->CopyToHostAfter(Tensor(), nullptr, p->start, p->end));
  std::vector<int32_t> idx_host;
  std::vector<float> val_host;
  for (const PendingBatch::TopK& t : p->topk) {
    idx_host.resize(static_cast<size_t>(t.idx->numel()));
    val_host.resize(idx_host.size());
    RETURN_IF_ERROR(backend_->CopyToHostAfter(t.idx.get(), idx_host.data(), p->start, p->end));
    RETURN_IF_ERROR(backend_->CopyToHostAfter(t.val.get(), val_host.data(), p->start, p->end));
    for (size_t i = 0; i < batch.size(); ++i) {
      const SequenceRequest& r = batch[i];
      for (size_t j = 0; j < r.sae_indices.size(); ++j) {
        if (r.sae_indices[j] != static_cast<int>(t.sae) || HasWatchList(r, j)) continue;
        for (int tok = 0; tok < static_cast<int>(r.ids.size()); ++tok) {
          if (SkipsPosition(r, tok, bos)) continue;
          const size_t row = static_cast<size_t>(packed.seq_starts[i] + tok) * t.k;
          FillRow(r, tok, idx_host.data() + row, val_host.data() + row, r.k, &results[i].saes[j]);
        }
      }
    }
  }

  // Watch lists: the top-k among the watched features of each row.
  std::vector<std::pair<float, int32_t>> cand;
  std::vector<int32_t> top_i;
  std::vector<float> top_v;
  for (const PendingBatch::Watched& w : p->watched) {
    const SequenceRequest& r = batch[w.seq];
    const std::vector<int32_t>& ids = r.watch[w.slot];
    const int64_t n = static_cast<int64_t>(r.ids.size()), m = static_cast<int64_t>(ids.size());
    std::vector<float> val(static_cast<size_t>(n * m));
    RETURN_IF_ERROR(backend_->CopyToHostAfter(w.val.get(), val.data(), p->start, p->end));
    for (int t = 0; t < n; ++t) {
      if (SkipsPosition(r, t, bos)) continue;
      cand.clear();
      for (int64_t f = 0; f < m; ++f) {
        const float v = val[static_cast<size_t>(t * m + f)];
        if (v != 0.0f) cand.emplace_back(v, ids[f]);  // the op reports 0 for inactive features
      }
      const size_t keep = std::min<size_t>(r.k, cand.size());
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      top_i.resize(keep);
      top_v.resize(keep);
      for (size_t q = 0; q < keep; ++q) std::tie(top_v[q], top_i[q]) = cand[q];
      FillRow(r, t, top_i.data(), top_v.data(), static_cast<int>(keep), &results[w.seq].saes[w.slot]);
    }
  }

  for (const PendingBatch::Capture& cap : p->captures) {
    std::vector<float>& host = results[cap.seq].hooks[cap.hook];
    host.resize(static_cast<size_t>(cap.act->numel()));
    RETURN_IF_ERROR(backend_->CopyToHostAfter(cap.act.get(), host.data(), p->start, p->end));
  }

  for (const PendingBatch::Error& e : p->errors) {
    const SequenceRequest& r = batch[e.seq];
    const int64_t n = static_cast<int64_t>(r.ids.size());
    std::vector<float> err(static_cast<size_t>(n));
    RETURN_IF_ERROR(backend_->CopyToHostAfter(e.err.get(), err.data(), p->start, p->end));
    std::vector<float>& out = results[e.seq].saes[e.slot].reconstruction_error;
    for (int t = 0; t < n; ++t) out[t] = SkipsPosition(r, t, bos) ? kNotComputed : err[t];
  }

  // Device time; every point is released here (SecondsBetween) even on error.
  absl::Status timing = absl::OkStatus();
  for (auto& [a, b] : p->sae_spans) {
    absl::StatusOr<double> s = backend_->SecondsBetween(a, b);
    a = b = -1;
    if (s.ok()) {
      last_timing_.sae_seconds += *s;
    } else if (timing.ok()) {
      timing = s.status();
    }
  }
  p->sae_spans.clear();
  absl::StatusOr<double> total = backend_->SecondsBetween(p->start, p->end);
  p->start = p->end = -1;
  if (total.ok()) last_timing_.total_seconds = *total;
  last_timing_.sae_topk_rows = p->topk_rows;
  RETURN_IF_ERROR(timing);
  RETURN_IF_ERROR(total.status());
  return std::move(p->results);
}

}  // namespace sae
