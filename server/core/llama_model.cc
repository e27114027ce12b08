#include "core/llama_model.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/safetensors.h"

namespace sae {

void PackedBatch::Append(const std::vector<int32_t>& seq_ids) {
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    ids.push_back(seq_ids[i]);
    positions.push_back(static_cast<int32_t>(i));
  }
  seq_starts.push_back(static_cast<int32_t>(ids.size()));
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& model_dir, const LlamaConfig& c,
                                                             Backend* backend, int last_layer, DType weight_dtype) {
  if (last_layer >= c.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat(model_dir, "/config.json: a hook needs layer ", last_layer,
                                                   " but num_hidden_layers is ", c.num_hidden_layers));
  }
  const int n_load = last_layer < 0 ? c.num_hidden_layers : last_layer + 1;
  ASSIGN_OR_RETURN(auto store, TensorStore::Open(model_dir));
  return Build(
      c, backend, n_load, weight_dtype,
      [&](const std::string& name, const std::vector<int64_t>& shape, DType dtype) -> absl::StatusOr<OwnedTensor> {
        ASSIGN_OR_RETURN(HostTensor t, store->GetWithShape(name, shape));
        absl::StatusOr<OwnedTensor> up = backend->Upload(t, dtype);
        if (!up.ok()) return Prefixed(absl::StrCat(store->FileOf(name), ": tensor \"", name, "\": "), up.status());
        return up;
      });
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Build(const LlamaConfig& config, Backend* backend, int n_layers,
                                                              DType weight_dtype, const WeightSource& load) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->backend_ = backend;
  m->config_ = config;
  const LlamaConfig& c = m->config_;
  const int64_t d = c.hidden_size, hd = c.head_dim, ffn = c.intermediate_size;
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  ASSIGN_OR_RETURN(m->embed_, load("model.embed_tokens.weight", {c.vocab_size, d}, weight_dtype));
  for (int l = 0; l < n_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    Layer L;
    ASSIGN_OR_RETURN(L.input_norm, load(p + "input_layernorm.weight", {d}, DType::kF32));
    ASSIGN_OR_RETURN(L.post_norm, load(p + "post_attention_layernorm.weight", {d}, DType::kF32));
    ASSIGN_OR_RETURN(L.wq, load(p + "self_attn.q_proj.weight", {q_dim, d}, weight_dtype));
    ASSIGN_OR_RETURN(L.wk, load(p + "self_attn.k_proj.weight", {kv_dim, d}, weight_dtype));
    ASSIGN_OR_RETURN(L.wv, load(p + "self_attn.v_proj.weight", {kv_dim, d}, weight_dtype));
    ASSIGN_OR_RETURN(L.wo, load(p + "self_attn.o_proj.weight", {d, q_dim}, weight_dtype));
    ASSIGN_OR_RETURN(L.w_gate, load(p + "mlp.gate_proj.weight", {ffn, d}, weight_dtype));
    ASSIGN_OR_RETURN(L.w_up, load(p + "mlp.up_proj.weight", {ffn, d}, weight_dtype));
    ASSIGN_OR_RETURN(L.w_down, load(p + "mlp.down_proj.weight", {d, ffn}, weight_dtype));
    m->layers_.push_back(std::move(L));
  }
  const std::vector<float> inv = RopeInvFreq(c);
  ASSIGN_OR_RETURN(m->inv_freq_, backend->Alloc(DType::kF32, 1, static_cast<int64_t>(inv.size())));
  RETURN_IF_ERROR(backend->CopyFromHost(inv.data(), m->inv_freq_.get()));
  return m;
}

absl::Status LlamaModel::Forward(const PackedBatch& batch, const std::set<HookPoint>& hooks, const HookFn& on_hook) {
  if (hooks.empty()) return absl::OkStatus();
  const int last = hooks.rbegin()->layer;
  if (last >= n_layers_loaded()) {
    return absl::FailedPreconditionError(
        absl::StrCat("hook at layer ", last, " but only ", n_layers_loaded(), " layers are loaded"));
  }
  const LlamaConfig& c = config_;
  const int64_t n = batch.n_tokens();
  if (n == 0) return absl::OkStatus();
  for (int32_t id : batch.ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  int max_len = 0;
  for (int s = 0; s < batch.n_seqs(); ++s) max_len = std::max(max_len, batch.seq_starts[s + 1] - batch.seq_starts[s]);

  Backend* b = backend_;
  const int64_t d = c.hidden_size, hd = c.head_dim, ffn = c.intermediate_size;
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  const float eps = static_cast<float>(c.rms_norm_eps);

  ASSIGN_OR_RETURN(OwnedTensor ids, b->Alloc(DType::kI32, n, 1));
  ASSIGN_OR_RETURN(OwnedTensor pos, b->Alloc(DType::kI32, n, 1));
  ASSIGN_OR_RETURN(OwnedTensor starts, b->Alloc(DType::kI32, batch.n_seqs() + 1, 1));
  RETURN_IF_ERROR(b->CopyFromHost(batch.ids.data(), ids.get()));
  RETURN_IF_ERROR(b->CopyFromHost(batch.positions.data(), pos.get()));
  RETURN_IF_ERROR(b->CopyFromHost(batch.seq_starts.data(), starts.get()));

  // Tensors only a GEMM reads (normed inputs, attention output, silu * up)
  // are kept in the backend's GEMM input dtype; hooks see F32 only.
  const DType gin = b->gemm_input_dtype();
  ASSIGN_OR_RETURN(OwnedTensor x, b->Alloc(DType::kF32, n, d));  // residual stream
  ASSIGN_OR_RETURN(OwnedTensor h, b->Alloc(gin, n, d));          // normed input
  ASSIGN_OR_RETURN(OwnedTensor q, b->Alloc(DType::kF32, n, q_dim));
  ASSIGN_OR_RETURN(OwnedTensor k, b->Alloc(DType::kF32, n, kv_dim));
  ASSIGN_OR_RETURN(OwnedTensor v, b->Alloc(DType::kF32, n, kv_dim));
  ASSIGN_OR_RETURN(OwnedTensor attn, b->Alloc(gin, n, q_dim));
  auto hooks_site = [&](HookSite site) {
    return std::any_of(hooks.begin(), hooks.end(), [site](const HookPoint& hp) { return hp.site == site; });
  };
  OwnedTensor proj;  // o_proj / down_proj output, where hooked (else they add into x directly)
  if (hooks_site(HookSite::kAttn) || hooks_site(HookSite::kMlp)) {
    ASSIGN_OR_RETURN(proj, b->Alloc(DType::kF32, n, d));
  }
  ASSIGN_OR_RETURN(OwnedTensor gate, b->Alloc(DType::kF32, n, ffn));
  ASSIGN_OR_RETURN(OwnedTensor up, b->Alloc(DType::kF32, n, ffn));
  OwnedTensor act_own, tc_own;  // silu(gate) * up; the transcoder input hook's F32 buffer
  if (gin != DType::kF32) {
    ASSIGN_OR_RETURN(act_own, b->Alloc(gin, n, ffn));
    if (hooks_site(HookSite::kTranscoderIn)) {
      ASSIGN_OR_RETURN(tc_own, b->Alloc(DType::kF32, n, d));
    }
  }
  const Tensor act = gin == DType::kF32 ? gate.get() : act_own.get();  // F32: in place over gate
  const Tensor tc_in = gin == DType::kF32 ? h.get() : tc_own.get();

  auto hook = [&](int layer, HookSite site, const Tensor& t) -> absl::Status {
    HookPoint hp{layer, site};
    if (hooks.count(hp) == 0) return absl::OkStatus();
    return on_hook(hp, t);
  };
  // x += in . w^T (o_proj, down_proj): through `proj` when the sublayer's
  // output is hooked at `site`, else added into x in the GEMM itself.
  auto add_projection = [&](int layer, HookSite site, const Tensor& in, const Tensor& w) -> absl::Status {
    if (hooks.count(HookPoint{layer, site}) == 0) return b->MatMulAdd(in, w, x.get());
    RETURN_IF_ERROR(b->MatMul(in, w, proj.get()));
    RETURN_IF_ERROR(hook(layer, site, proj.get()));
    return b->Add(x.get(), proj.get(), x.get());
  };

  RETURN_IF_ERROR(b->Embed(embed_.get(), ids.get(), x.get()));
  for (int l = 0; l <= last; ++l) {
    const Layer& L = layers_[l];
    RETURN_IF_ERROR(b->RmsNorm(x.get(), L.input_norm.get(), eps, h.get()));
    RETURN_IF_ERROR(b->MatMulShared(h.get(), {L.wq.get(), L.wk.get(), L.wv.get()}, {q.get(), k.get(), v.get()}));
    RETURN_IF_ERROR(b->Rope(q.get(), pos.get(), inv_freq_.get(), static_cast<int>(hd)));
    RETURN_IF_ERROR(b->Rope(k.get(), pos.get(), inv_freq_.get(), static_cast<int>(hd)));
    RETURN_IF_ERROR(b->Attention(q.get(), k.get(), v.get(), starts.get(), batch.n_seqs(), max_len,
                                 c.num_attention_heads, c.num_key_value_heads, static_cast<int>(hd), attn.get()));
    RETURN_IF_ERROR(add_projection(l, HookSite::kAttn, attn.get(), L.wo.get()));  // x is now resid_mid
    if (hooks.count(HookPoint{l, HookSite::kTranscoderIn})) {
      RETURN_IF_ERROR(b->RmsNorm(x.get(), Tensor(), eps, tc_in));
      RETURN_IF_ERROR(hook(l, HookSite::kTranscoderIn, tc_in));
    }
    RETURN_IF_ERROR(b->RmsNorm(x.get(), L.post_norm.get(), eps, h.get()));
    RETURN_IF_ERROR(b->MatMulShared(h.get(), {L.w_gate.get(), L.w_up.get()}, {gate.get(), up.get()}));
    RETURN_IF_ERROR(b->SiluMul(gate.get(), up.get(), act));
    RETURN_IF_ERROR(add_projection(l, HookSite::kMlp, act, L.w_down.get()));
    RETURN_IF_ERROR(hook(l, HookSite::kResid, x.get()));
  }
  return absl::OkStatus();
}

}  // namespace sae
