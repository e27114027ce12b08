#include "core/sae.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status_macros.h"
#include "core/safetensors.h"
#include "nlohmann/json.hpp"

namespace sae {
namespace {

using json = nlohmann::json;

// src [rows, cols] -> [cols, rows] for elements of type T, through 64 x 64
// tiles staged in a local buffer so reads and writes are 64-element runs
// (~0.5 s for a 32x Llama Scope decoder, 4096 x 131072 bf16; element by
// element with the same tiling takes ~4 s).
template <typename T>
void Transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kTile = 64;
  T tile[kTile][kTile];
  T run[kTile];
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t nr = std::min(kTile, rows - r0), nc = std::min(kTile, cols - c0);
      for (int64_t r = 0; r < nr; ++r) std::memcpy(tile[r], src + (r0 + r) * cols + c0, sizeof(T) * nc);
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t r = 0; r < nr; ++r) run[r] = tile[r][c];
        std::memcpy(dst + (c0 + c) * rows + r0, run, sizeof(T) * nr);
      }
    }
  }
}

// A 2-D tensor's bytes transposed ([rows, cols] -> [cols, rows]); 2- or 4-byte elements.
std::unique_ptr<char[]> TransposeElements(const HostTensor& t) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  std::unique_ptr<char[]> dst(new char[t.nbytes()]);  // every byte is written below: no zero fill
  if (DTypeSize(t.dtype) == 2) {
    Transpose(static_cast<const uint16_t*>(t.data), rows, cols, reinterpret_cast<uint16_t*>(dst.get()));
  } else {
    Transpose(static_cast<const uint32_t*>(t.data), rows, cols, reinterpret_cast<uint32_t*>(dst.get()));
  }
  return dst;
}

// Order of the hooks of one layer in the forward pass.
int HookForwardRank(HookSite site) {
  switch (site) {
    case HookSite::kAttn:
      return 0;
    case HookSite::kTranscoderIn:
      return 1;
    case HookSite::kMlp:
      return 2;
    case HookSite::kResid:
      return 3;
  }
  return 0;
}

absl::Status FieldError(const std::string& path, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": field \"", field, "\": ", what));
}

}  // namespace

float SaeHyperparams::scale_in() const {
  return norm_activation == "dataset-wise" ? std::sqrt(static_cast<float>(d_model)) / avg_norm_in : 1.0f;
}
float SaeHyperparams::scale_out() const {
  return norm_activation == "dataset-wise" ? std::sqrt(static_cast<float>(d_model)) / avg_norm_out : 1.0f;
}

absl::StatusOr<SaeHyperparams> SaeHyperparams::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  SaeHyperparams hp;
  auto get_int = [&](const char* f, int* out) -> absl::Status {
    auto it = j.find(f);
    if (it == j.end()) return FieldError(path, f, "missing");
    // (Capped like config.json's sizes, so it fits an int and products of two fit an int64.)
    if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > (int64_t{1} << 30)) {
      return FieldError(path, f, "must be a positive integer up to 2^30");
    }
    *out = it->get<int>();
    return absl::OkStatus();
  };
  auto get_str = [&](const char* f, std::string* out) -> absl::Status {
    auto it = j.find(f);
    if (it == j.end()) return FieldError(path, f, "missing");
    if (!it->is_string()) return FieldError(path, f, "must be a string");
    *out = it->get<std::string>();
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_int("d_model", &hp.d_model));
  RETURN_IF_ERROR(get_int("d_sae", &hp.d_sae));
  RETURN_IF_ERROR(get_str("act_fn", &hp.act_fn));
  RETURN_IF_ERROR(get_str("hook_point_in", &hp.hook_point_in));
  hp.hook_point_out = hp.hook_point_in;
  if (j.contains("hook_point_out")) RETURN_IF_ERROR(get_str("hook_point_out", &hp.hook_point_out));
  if (hp.act_fn == "jumprelu") {
    auto it = j.find("jump_relu_threshold");
    if (it == j.end()) return FieldError(path, "jump_relu_threshold", "missing (required for act_fn jumprelu)");
    // Checked as the float it is stored in: 1e300 would become inf and silence every feature.
    if (!it->is_number() || !std::isfinite(it->get<float>())) {
      return FieldError(path, "jump_relu_threshold", "must be a number in float range");
    }
    hp.jump_relu_threshold = it->get<float>();
  } else if (hp.act_fn == "topk") {
    RETURN_IF_ERROR(get_int("top_k", &hp.top_k));
    if (hp.top_k > hp.d_sae) {
      return FieldError(path, "top_k", absl::StrCat(hp.top_k, " is larger than d_sae (", hp.d_sae, ")"));
    }
  } else {
    return FieldError(path, "act_fn", absl::StrCat("\"", hp.act_fn, "\" is not supported (jumprelu, topk)"));
  }
  // Llama Scope's encode is W_enc x + b_enc on the (normalised) activation,
  // and the decode adds b_dec: other settings of these flags would change the
  // maths, and are refused rather than ignored.
  for (const auto& [field, supported] : std::vector<std::pair<const char*, bool>>{
           {"apply_decoder_bias_to_pre_encoder", false}, {"use_decoder_bias", true}}) {
    auto it = j.find(field);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_boolean()) return FieldError(path, field, "must be true or false");
    if (it->get<bool>() != supported) {
      return FieldError(
          path, field,
          absl::StrCat("is ", supported ? "false" : "true", "; only ", supported ? "true" : "false", " is supported"));
    }
  }
  hp.norm_activation = "none";
  if (j.contains("norm_activation")) RETURN_IF_ERROR(get_str("norm_activation", &hp.norm_activation));
  if (hp.norm_activation == "dataset-wise") {
    auto it = j.find("dataset_average_activation_norm");
    if (it == j.end() || !it->is_object()) {
      return FieldError(path, "dataset_average_activation_norm", "missing (required for dataset-wise norm)");
    }
    // Checked as the floats they are stored in, and through the scale they
    // give (sqrt(d_model) / norm): 1e-60 would become 0 and 1e60 inf.
    for (const char* key : {"in", "out"}) {
      auto v = it->find(key);
      const float norm = v != it->end() && v->is_number() ? v->get<float>() : 0.0f;
      const float scale = std::sqrt(static_cast<float>(hp.d_model)) / norm;
      if (!(std::isfinite(norm) && norm > 0 && std::isfinite(scale) && scale > 0)) {
        return FieldError(path, absl::StrCat("dataset_average_activation_norm.", key),
                          "must be a positive number in float range (its scale sqrt(d_model) / norm must be too)");
      }
      (key[0] == 'i' ? hp.avg_norm_in : hp.avg_norm_out) = norm;
    }
  } else if (hp.norm_activation != "none") {
    return FieldError(path, "norm_activation",
                      absl::StrCat("\"", hp.norm_activation, "\" is not supported (dataset-wise, none)"));
  }
  return hp;
}

std::string SaeNameFromDir(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return std::filesystem::path(d).filename().string();
}

absl::StatusOr<std::unique_ptr<Sae>> Sae::Load(const std::string& dir, const std::string& name, Backend* backend,
                                               SaeEncodeForm form) {
  std::unique_ptr<Sae> s(new Sae());
  s->name_ = name.empty() ? SaeNameFromDir(dir) : name;
  s->path_ = dir;
  s->form_ = form;
  const std::string hp_path = dir + "/hyperparams.json";
  ASSIGN_OR_RETURN(s->hp_, SaeHyperparams::FromFile(hp_path));
  const SaeHyperparams& hp = s->hp_;
  auto hook = ParseHookPointIn(hp.hook_point_in);
  if (!hook.ok()) return FieldError(hp_path, "hook_point_in", hook.status().message());
  s->hook_ = *hook;
  s->hook_out_ = *hook;
  auto hook_out = ParseHookPointIn(hp.hook_point_out);
  if (!hook_out.ok()) {
    // Features still work; only reconstruction errors need the target hook.
    s->reconstruction_status_ = FieldError(hp_path, "hook_point_out", hook_out.status().message());
  } else if (hook_out->layer != hook->layer || HookForwardRank(hook_out->site) < HookForwardRank(hook->site)) {
    s->reconstruction_status_ = FieldError(hp_path, "hook_point_out",
                                           absl::StrCat("\"", hp.hook_point_out,
                                                        "\" is not at or after hook_point_in in the same layer; "
                                                        "reconstruction errors are not available for this SAE"));
  } else {
    s->hook_out_ = *hook_out;
  }

  if (hp.act_fn == "topk") {
    // A top-k the backend cannot hold would fail every request: refuse it here.
    const int limit = backend->max_sae_top_k(hp.d_model);
    if (hp.top_k > limit) {
      return absl::FailedPreconditionError(
          absl::StrCat(hp_path, ": field \"top_k\" is ", hp.top_k, " but backend ", backend->name(), " keeps at most ",
                       limit, " features per token at d_model ", hp.d_model, " on this device"));
    }
  }

  const std::string st_path = dir + "/checkpoints/final.safetensors";
  ASSIGN_OR_RETURN(auto store, TensorStore::Open(st_path));
  ASSIGN_OR_RETURN(HostTensor w_enc, store->GetWithShape("encoder.weight", {hp.d_sae, hp.d_model}));
  ASSIGN_OR_RETURN(HostTensor b_enc, store->GetWithShape("encoder.bias", {hp.d_sae}));
  ASSIGN_OR_RETURN(HostTensor w_dec, store->GetWithShape("decoder.weight", {hp.d_model, hp.d_sae}));
  ASSIGN_OR_RETURN(HostTensor b_dec, store->GetWithShape("decoder.bias", {hp.d_model}));

  // Upload errors (out of memory, say) name the file and the tensor.
  auto upload = [&](const char* name, const HostTensor& t, DType dtype) -> absl::StatusOr<OwnedTensor> {
    absl::StatusOr<OwnedTensor> up = backend->Upload(t, dtype);
    if (!up.ok()) return Prefixed(absl::StrCat(st_path, ": tensor \"", name, "\": "), up.status());
    return up;
  };
  ASSIGN_OR_RETURN(s->w_enc_, upload("encoder.weight", w_enc, w_enc.dtype));
  ASSIGN_OR_RETURN(s->b_enc_, upload("encoder.bias", b_enc, DType::kF32));
  SaeEncoderWeights& e = s->encoder_;
  e.encoder = s->w_enc_.get();
  e.bias = s->b_enc_.get();
  e.scale_in = hp.scale_in();
  e.max_active = hp.act_fn == "topk" ? hp.top_k : 0;
  // The decoder is always resident so any request may ask for reconstruction
  // errors; feature-major (see SaeDecoderWeights), transposed here on the host.
  const size_t dec_esize = DTypeSize(w_dec.dtype);
  const std::unique_ptr<char[]> dec_rows = TransposeElements(w_dec);  // [d_model, d_sae] checked above
  ASSIGN_OR_RETURN(s->w_dec_, upload("decoder.weight", HostTensor{dec_rows.get(), w_dec.dtype, {hp.d_sae, hp.d_model}},
                                     w_dec.dtype));
  ASSIGN_OR_RETURN(s->b_dec_, upload("decoder.bias", b_dec, DType::kF32));
  s->decoder_ = SaeDecoderWeights{s->w_dec_.get(), s->b_dec_.get(), hp.scale_out()};
  const float theta = hp.act_fn == "topk" ? 0.0f : hp.jump_relu_threshold;
  if (form == SaeEncodeForm::kSaeLens) {
    e.threshold = hp.act_fn == "topk" ? 0.0f : theta * hp.scale_in();
  } else {
    // ||d_i|| over the decoder row i.
    std::vector<float> row(hp.d_model), scale(hp.d_sae);
    for (int i = 0; i < hp.d_sae; ++i) {
      ConvertToF32(dec_rows.get() + static_cast<size_t>(i) * hp.d_model * dec_esize, w_dec.dtype, row.size(),
                   row.data());
      double norm2 = 0.0;
      for (float v : row) norm2 += static_cast<double>(v) * v;
      scale[i] = static_cast<float>(std::sqrt(norm2) / hp.scale_out());
    }
    ASSIGN_OR_RETURN(s->feature_scale_, backend->Alloc(DType::kF32, 1, hp.d_sae));
    RETURN_IF_ERROR(backend->CopyFromHost(scale.data(), s->feature_scale_.get()));
    e.feature_scale = s->feature_scale_.get();
    e.threshold = theta;
  }
  return s;
}

}  // namespace sae
