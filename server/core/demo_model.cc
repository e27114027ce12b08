#include "core/demo_model.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/cpu_backend.h"
#include "core/hooks.h"
#include "core/llama_config.h"
#include "core/llama_model.h"
#include "core/safetensors.h"
#include "nlohmann/json.hpp"
#include "tokenizer/demo_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace sae {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Bump when anything below changes, so cached demo folders are rewritten.
constexpr char kDemoVersion[] = "sae-demo-v1";

constexpr int kHidden = 64;
constexpr int kIntermediate = 192;
constexpr int kLayers = 4;
constexpr int kHeads = 4;
constexpr int kKvHeads = 2;
constexpr int kHeadDim = 16;

struct DemoSaeSpec {
  const char* name;
  HookPoint hook;
  int expansion;
};
const DemoSaeSpec kDemoSaes[] = {
    {"L1R-8x", {1, HookSite::kResid}, 8},   {"L2A-8x", {2, HookSite::kAttn}, 8},
    {"L2M-8x", {2, HookSite::kMlp}, 8},     {"L2TC-8x", {2, HookSite::kTranscoderIn}, 8},
    {"L3R-32x", {3, HookSite::kResid}, 32},
};

// Concept features: the same index in every demo SAE.
struct ConceptDef {
  const char* label;
  std::vector<const char*> words;
  int feature;
};
const std::vector<ConceptDef>& ConceptDefs() {
  static const auto* defs = new std::vector<ConceptDef>{
      {"animals", {" cat", " dog", " bird", " fish", " horse", " cow", " mouse"}, 3},
      {"colours", {" red", " blue", " green", " yellow", " black", " white"}, 17},
      {"cities", {" Paris", " London", " Tokyo", " Rome", " Berlin", " Madrid"}, 42},
      {"numbers", {" one", " two", " three", " four", " five", " six", " seven"}, 101},
  };
  return *defs;
}

// Deterministic, platform-independent randomness: SplitMix64 seeded per
// tensor name, normals from the Irwin-Hall sum of 12 uniforms (pure
// arithmetic, so every machine writes the same bytes).
class Rng {
 public:
  explicit Rng(absl::string_view seed) {
    state_ = 1469598103934665603ull;
    for (char ch : seed) state_ = (state_ ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  }
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float Uniform() { return static_cast<float>(Next() >> 40) * (1.0f / 16777216.0f); }
  float Normal() {
    float s = 0;
    for (int i = 0; i < 12; ++i) s += Uniform();
    return s - 6.0f;
  }

 private:
  uint64_t state_;
};

std::vector<float> RandomVector(absl::string_view name, size_t n, float mean, float std) {
  Rng rng(name);
  std::vector<float> v(n);
  for (float& x : v) x = mean + std * rng.Normal();
  return v;
}

// Sentences that use the concept words in varied contexts.
std::vector<std::string> CalibrationCorpus() {
  const auto& c = ConceptDefs();
  std::vector<std::string> out;
  const auto& animals = c[0].words;
  const auto& colours = c[1].words;
  const auto& cities = c[2].words;
  const auto& numbers = c[3].words;
  for (size_t i = 0; i < 42; ++i) {
    const char* a = animals[i % animals.size()];
    const char* a2 = animals[(i * 3 + 1) % animals.size()];
    const char* col = colours[(i * 5 + 2) % colours.size()];
    const char* city = cities[(i * 7 + 3) % cities.size()];
    const char* num = numbers[(i * 11 + 4) % numbers.size()];
    switch (i % 6) {
      case 0:
        out.push_back(absl::StrCat("The", a, " sat on the", col, " mat in", city, "."));
        break;
      case 1:
        out.push_back(absl::StrCat("In", city, " I saw", num, a, "s and a", col, a2, "."));
        break;
      case 2:
        out.push_back(absl::StrCat("My friend from", city, " has", num, " cats, a", a2, " and a", col, " car."));
        break;
      case 3:
        out.push_back(absl::StrCat("The", col, " house is near the river, and the", a, " likes it."));
        break;
      case 4:
        out.push_back(absl::StrCat("We walked", num, " miles from", city, " to the sea with our", a, "."));
        break;
      default:
        out.push_back(absl::StrCat("Is the sky", col, " today? The", a2, " does not know, but", city, " is calm."));
        break;
    }
  }
  return out;
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path.string(), ": cannot write"));
  return absl::OkStatus();
}

LlamaConfig DemoConfig(const Tokenizer& tok) {
  LlamaConfig c;
  c.hidden_size = kHidden;
  c.intermediate_size = kIntermediate;
  c.num_hidden_layers = kLayers;
  c.num_attention_heads = kHeads;
  c.num_key_value_heads = kKvHeads;
  c.head_dim = kHeadDim;
  c.vocab_size = (tok.vocab_size() + 63) / 64 * 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.max_position_embeddings = 131072;
  c.bos_token_id = tok.bos_id();
  c.rope_scaling = RopeScaling{"llama3", 8.0, 1.0, 4.0, 8192};
  return c;
}

// Token embeddings of the words of one concept share a direction (as related
// words do in a trained model): the concept's own random unit vector, with
// 1.5 times the norm of a random embedding row.
std::vector<float> ConceptDirection(const std::string& label, int d) {
  std::vector<float> u = RandomVector("concept." + label, d, 0.0f, 1.0f);
  double ss = 0;
  for (float x : u) ss += static_cast<double>(x) * x;
  const float scale = static_cast<float>(1.5 * std::sqrt(d / ss));
  for (float& x : u) x *= scale;
  return u;
}

absl::Status WriteModel(const fs::path& dir, const LlamaConfig& c,
                        const std::map<int32_t, std::string>& concept_of_token) {
  RETURN_IF_ERROR(WriteText(dir / "config.json", c.ToJson()));
  RETURN_IF_ERROR(WriteText(dir / "tokenizer.json", MakeDemoTokenizerJson()));
  const int64_t d = c.hidden_size, ffn = c.intermediate_size, hd = c.head_dim;
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  std::vector<TensorToWrite> shards[2];
  auto add = [&](int shard, const std::string& name, std::vector<int64_t> shape, float mean, float std) {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    shards[shard].push_back(MakeTensor(name, DType::kBF16, shape, RandomVector(name, n, mean, std)));
  };
  {
    const std::string name = "model.embed_tokens.weight";
    std::vector<float> embed = RandomVector(name, static_cast<size_t>(c.vocab_size) * d, 0.0f, 1.0f);
    for (const auto& [id, label] : concept_of_token) {
      const std::vector<float> u = ConceptDirection(label, static_cast<int>(d));
      for (int64_t j = 0; j < d; ++j) embed[static_cast<size_t>(id) * d + j] += u[j];
    }
    shards[0].push_back(MakeTensor(name, DType::kBF16, {c.vocab_size, d}, embed));
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const int shard = l < c.num_hidden_layers / 2 ? 0 : 1;
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const float s_d = 1.0f / std::sqrt(static_cast<float>(d));
    add(shard, p + "input_layernorm.weight", {d}, 1.0f, 0.1f);
    add(shard, p + "post_attention_layernorm.weight", {d}, 1.0f, 0.1f);
    add(shard, p + "self_attn.q_proj.weight", {q_dim, d}, 0.0f, 2.0f * s_d);
    add(shard, p + "self_attn.k_proj.weight", {kv_dim, d}, 0.0f, 2.0f * s_d);
    add(shard, p + "self_attn.v_proj.weight", {kv_dim, d}, 0.0f, s_d);
    // Small output projections keep the residual stream dominated by the token
    // embedding, so residual-stream SAE features stay tied to tokens.
    add(shard, p + "self_attn.o_proj.weight", {d, q_dim}, 0.0f, 0.3f / std::sqrt(static_cast<float>(q_dim)));
    add(shard, p + "mlp.gate_proj.weight", {ffn, d}, 0.0f, s_d);
    add(shard, p + "mlp.up_proj.weight", {ffn, d}, 0.0f, s_d);
    add(shard, p + "mlp.down_proj.weight", {d, ffn}, 0.0f, 0.3f / std::sqrt(static_cast<float>(ffn)));
  }
  add(1, "model.norm.weight", {d}, 1.0f, 0.1f);
  add(1, "lm_head.weight", {c.vocab_size, d}, 0.0f, 1.0f / std::sqrt(static_cast<float>(d)));

  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  uint64_t total = 0;
  for (int s = 0; s < 2; ++s) {
    const std::string file = absl::StrCat("model-0000", s + 1, "-of-00002.safetensors");
    for (const auto& t : shards[s]) {
      index["weight_map"][t.name] = file;
      total += t.bytes.size();
    }
    RETURN_IF_ERROR(WriteSafetensors((dir / file).string(), shards[s], {{"format", "pt"}}));
  }
  index["metadata"]["total_size"] = total;
  return WriteText(dir / "model.safetensors.index.json", index.dump(2));
}

// Hook activations of the calibration corpus (BOS rows dropped).
struct Activations {
  std::vector<int32_t> ids;                         // [n_rows]
  std::map<HookPoint, std::vector<float>> by_hook;  // [n_rows, d]
};

absl::StatusOr<Activations> CollectActivations(const std::string& model_dir, const Tokenizer& tok) {
  auto backend = CreateCpuBackend();
  ASSIGN_OR_RETURN(const LlamaConfig config, LlamaConfig::FromFile(model_dir + "/config.json"));
  ASSIGN_OR_RETURN(auto model, LlamaModel::Load(model_dir, config, backend.get(), -1, DType::kBF16));
  PackedBatch batch;
  for (const std::string& s : CalibrationCorpus()) {
    ASSIGN_OR_RETURN(Encoding enc, tok.Encode(s, /*add_bos=*/true));
    batch.Append(enc.ids);
  }
  std::set<HookPoint> hooks;
  for (const auto& spec : kDemoSaes) {
    hooks.insert(spec.hook);
    if (spec.hook.site == HookSite::kTranscoderIn) hooks.insert(HookPoint{spec.hook.layer, HookSite::kMlp});
  }
  Activations acts;
  std::vector<bool> keep(batch.ids.size());
  for (size_t i = 0; i < batch.ids.size(); ++i) {
    keep[i] = !(tok.bos_id() && batch.ids[i] == *tok.bos_id());
    if (keep[i]) acts.ids.push_back(batch.ids[i]);
  }
  RETURN_IF_ERROR(model->Forward(batch, hooks, [&](const HookPoint& hp, const Tensor& t) -> absl::Status {
    std::vector<float> all(static_cast<size_t>(t.numel()));
    RETURN_IF_ERROR(backend->CopyToHost(t, all.data()));
    std::vector<float>& out = acts.by_hook[hp];
    for (size_t r = 0; r < keep.size(); ++r) {
      if (keep[r]) out.insert(out.end(), all.begin() + r * t.cols, all.begin() + (r + 1) * t.cols);
    }
    return absl::OkStatus();
  }));
  return acts;
}

float MeanNorm(const std::vector<float>& x, int d) {
  const size_t n = x.size() / d;
  double sum = 0;
  for (size_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int c = 0; c < d; ++c) ss += static_cast<double>(x[r * d + c]) * x[r * d + c];
    sum += std::sqrt(ss);
  }
  return static_cast<float>(sum / std::max<size_t>(n, 1));
}

float Percentile(std::vector<float> v, double q) {
  if (v.empty()) return 0.0f;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  return v[i];
}

float Mean(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += x;
  return v.empty() ? 0.0f : static_cast<float>(s / v.size());
}

void Normalize(std::vector<float>& v) {
  double ss = 0;
  for (float x : v) ss += static_cast<double>(x) * x;
  const float inv = ss > 0 ? static_cast<float>(1.0 / std::sqrt(ss)) : 0.0f;
  for (float& x : v) x *= inv;
}

std::string HookPointName(const HookPoint& h, bool out) {
  switch (h.site) {
    case HookSite::kResid:
      return absl::StrCat("blocks.", h.layer, ".hook_resid_post");
    case HookSite::kAttn:
      return absl::StrCat("blocks.", h.layer, ".hook_attn_out");
    case HookSite::kMlp:
      return absl::StrCat("blocks.", h.layer, ".hook_mlp_out");
    case HookSite::kTranscoderIn:
      return out ? absl::StrCat("blocks.", h.layer, ".hook_mlp_out")
                 : absl::StrCat("blocks.", h.layer, ".ln2.hook_normalized");
  }
  return "";
}

// Builds one SAE whose concept features are centroid directions of the
// concept tokens' normalised activations, with per-feature biases that put
// the JumpReLU threshold between concept and other tokens; the remaining
// features are random directions firing on ~2% of calibration tokens.
absl::Status WriteSae(const fs::path& dir, const DemoSaeSpec& spec, const Activations& acts,
                      const std::map<int, std::set<int32_t>>& concept_tokens) {
  const int d = kHidden;
  const int d_sae = d * spec.expansion;
  const std::vector<float>& x_in = acts.by_hook.at(spec.hook);
  const HookPoint out_hook =
      spec.hook.site == HookSite::kTranscoderIn ? HookPoint{spec.hook.layer, HookSite::kMlp} : spec.hook;
  const std::vector<float>& x_out = acts.by_hook.at(out_hook);
  const size_t n = acts.ids.size();
  const float avg_in = MeanNorm(x_in, d), avg_out = MeanNorm(x_out, d);
  const float s_in = std::sqrt(static_cast<float>(d)) / avg_in;
  // jump_relu_threshold is one scalar per SAE: the JumpReLU fires when
  // h > theta * s_in, chosen here to be 1.
  const float theta = 1.0f / s_in;
  const float fire_at = theta * s_in;

  std::vector<float> z(x_in.size());  // normalised inputs
  for (size_t i = 0; i < z.size(); ++i) z[i] = x_in[i] * s_in;
  std::vector<float> mu(d, 0.0f);
  for (size_t r = 0; r < n; ++r)
    for (int c = 0; c < d; ++c) mu[c] += z[r * d + c] / n;

  std::vector<float> w_enc(static_cast<size_t>(d_sae) * d), b_enc(d_sae), w_dec(static_cast<size_t>(d) * d_sae);
  std::vector<float> scores(n);
  for (int f = 0; f < d_sae; ++f) {
    std::vector<float> dir_vec(d);
    const std::set<int32_t>* tokens = nullptr;
    if (auto it = concept_tokens.find(f); it != concept_tokens.end()) tokens = &it->second;
    if (tokens != nullptr) {
      std::vector<float> centroid(d, 0.0f);
      int count = 0;
      for (size_t r = 0; r < n; ++r) {
        if (!tokens->count(acts.ids[r])) continue;
        for (int c = 0; c < d; ++c) centroid[c] += z[r * d + c];
        ++count;
      }
      for (int c = 0; c < d; ++c) dir_vec[c] = centroid[c] / std::max(count, 1) - mu[c];
    } else {
      dir_vec = RandomVector(absl::StrCat(spec.name, ".feature.", f), d, 0.0f, 1.0f);
    }
    Normalize(dir_vec);
    std::vector<float> pos, neg;
    for (size_t r = 0; r < n; ++r) {
      float s = 0;
      for (int c = 0; c < d; ++c) s += dir_vec[c] * z[r * d + c];
      scores[r] = s;
      (tokens != nullptr && tokens->count(acts.ids[r]) ? pos : neg).push_back(s);
    }
    float cut, gain;
    if (tokens != nullptr && !pos.empty()) {
      const float neg_hi = Percentile(neg, 0.99), pos_lo = Percentile(pos, 0.10);
      cut = pos_lo > neg_hi ? 0.5f * (neg_hi + pos_lo) : neg_hi;
      gain = 4.0f / std::max(Mean(pos) - cut, 0.25f);
    } else {
      cut = Percentile(scores, 0.98);
      gain = 1.0f;
    }
    // h = gain * (dir . z) + b fires (h > fire_at) exactly when dir . z > cut.
    for (int c = 0; c < d; ++c) {
      w_enc[static_cast<size_t>(f) * d + c] = gain * dir_vec[c];
      w_dec[static_cast<size_t>(c) * d_sae + f] = dir_vec[c];
    }
    b_enc[f] = fire_at - gain * cut;
  }
  std::vector<float> b_dec(d);
  for (int c = 0; c < d; ++c) b_dec[c] = mu[c] / s_in;  // the mean input, unnormalised

  fs::create_directories(dir / "checkpoints");
  RETURN_IF_ERROR(WriteSafetensors((dir / "checkpoints" / "final.safetensors").string(),
                                   {MakeTensor("encoder.weight", DType::kBF16, {d_sae, d}, w_enc),
                                    MakeTensor("encoder.bias", DType::kBF16, {d_sae}, b_enc),
                                    MakeTensor("decoder.weight", DType::kBF16, {d, d_sae}, w_dec),
                                    MakeTensor("decoder.bias", DType::kBF16, {d}, b_dec)}));
  json hp = {{"d_model", d},
             {"d_sae", d_sae},
             {"act_fn", "jumprelu"},
             {"jump_relu_threshold", theta},
             {"top_k", 50},
             {"norm_activation", "dataset-wise"},
             {"dataset_average_activation_norm", {{"in", avg_in}, {"out", avg_out}}},
             {"sparsity_include_decoder_norm", true},
             {"hook_point_in", HookPointName(spec.hook, false)},
             {"hook_point_out", HookPointName(spec.hook, true)}};
  return WriteText(dir / "hyperparams.json", hp.dump(2));
}

}  // namespace

absl::StatusOr<DemoLayout> WriteDemo(const std::string& dir_str) {
  const fs::path dir(dir_str);
  ASSIGN_OR_RETURN(auto tok, Tokenizer::FromJson(MakeDemoTokenizerJson(), "demo tokenizer"));
  DemoLayout layout;
  layout.model_dir = (dir / "model").string();
  for (const auto& spec : kDemoSaes) layout.sae_dirs.push_back((dir / "saes" / spec.name).string());
  std::map<int, std::set<int32_t>> concept_tokens;
  std::map<int32_t, std::string> concept_of_token;
  for (const ConceptDef& def : ConceptDefs()) {
    DemoConcept c{def.label, {}, def.feature};
    for (const char* w : def.words) {
      ASSIGN_OR_RETURN(Encoding enc, tok->Encode(w, /*add_bos=*/false));
      // Only words that are one token make a clean concept.
      if (enc.ids.size() != 1) continue;
      c.words.push_back(w);
      concept_tokens[def.feature].insert(enc.ids[0]);
      concept_of_token[enc.ids[0]] = def.label;
    }
    if (!c.words.empty()) layout.concepts.push_back(std::move(c));
  }

  auto complete = [](const fs::path& d) {
    std::ifstream version(d / "VERSION");
    std::string v;
    return version && std::getline(version, v) && v == kDemoVersion;
  };
  if (complete(dir)) return layout;

  // Build in a private folder and rename it into place, so concurrent
  // writers (parallel tests) never see a half-written demo.
  const fs::path tmp = absl::StrCat(dir_str, ".partial-", ::getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp / "model", ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(tmp.string(), ": cannot create: ", ec.message()));
  const LlamaConfig config = DemoConfig(*tok);
  RETURN_IF_ERROR(WriteModel(tmp / "model", config, concept_of_token));
  ASSIGN_OR_RETURN(Activations acts, CollectActivations((tmp / "model").string(), *tok));
  for (const auto& spec : kDemoSaes) RETURN_IF_ERROR(WriteSae(tmp / "saes" / spec.name, spec, acts, concept_tokens));
  std::string features = "Demo SAE concept features (same index in every demo SAE):\n";
  for (const DemoConcept& c : layout.concepts) {
    absl::StrAppend(&features, "  feature ", c.feature, ": ", c.label, " -");
    for (const auto& w : c.words) absl::StrAppend(&features, " \"", w, "\"");
    features += "\n";
  }
  RETURN_IF_ERROR(WriteText(tmp / "FEATURES.txt", features));
  RETURN_IF_ERROR(WriteText(tmp / "VERSION", absl::StrCat(kDemoVersion, "\n")));
  if (fs::exists(dir) && !complete(dir)) fs::remove_all(dir, ec);  // stale or older version
  if (dir.has_parent_path()) fs::create_directories(dir.parent_path(), ec);
  fs::rename(tmp, dir, ec);
  if (ec) {
    fs::remove_all(tmp, ec);
    // Another writer won the race; its copy is identical.
    if (!complete(dir)) return absl::PermissionDeniedError(absl::StrCat(dir_str, ": cannot move the demo into place"));
  }
  return layout;
}

EngineOptions EngineOptionsForDemo(const DemoLayout& demo) {
  EngineOptions options;
  options.model_dir = demo.model_dir;
  for (const std::string& dir : demo.sae_dirs) options.saes.push_back({dir, ""});
  return options;
}

}  // namespace sae
