// Llama Scope SAEs: <dir>/hyperparams.json + <dir>/checkpoints/final.safetensors.
#ifndef SAE_CORE_SAE_H_
#define SAE_CORE_SAE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/backend.h"
#include "core/hooks.h"

namespace sae {

struct SaeHyperparams {
  int d_model = 0;
  int d_sae = 0;
  std::string act_fn;  // "jumprelu" or "topk"
  float jump_relu_threshold = 0.0f;
  int top_k = 0;
  std::string norm_activation;  // "dataset-wise" or "none"
  float avg_norm_in = 0.0f;     // dataset_average_activation_norm.in
  float avg_norm_out = 0.0f;    // dataset_average_activation_norm.out
  std::string hook_point_in;
  std::string hook_point_out;

  // s_in = sqrt(d_model) / avg_in (1 when norm_activation is not dataset-wise).
  float scale_in() const;
  float scale_out() const;

  static absl::StatusOr<SaeHyperparams> FromFile(const std::string& path);
};

enum class SaeEncodeForm {
  kSaeLens,  // what Neuronpedia shows: f = h if h > theta * s_in
  kLmSaes,   // lm_saes release form: h'' = ||d|| h / s_out, f = h'' if h'' > theta
};

class Sae {
 public:
  // `name` is what clients use (folder name or config alias).
  static absl::StatusOr<std::unique_ptr<Sae>> Load(const std::string& dir, const std::string& name, Backend* backend,
                                                   SaeEncodeForm form);

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }
  const SaeHyperparams& hyperparams() const { return hp_; }
  const HookPoint& hook() const { return hook_; }
  const SaeEncoderWeights& encoder() const { return encoder_; }
  const SaeDecoderWeights& decoder() const { return decoder_; }
  SaeEncodeForm form() const { return form_; }
  // Where the reconstruction target (hook_point_out) is read: the input hook
  // for R/A/M SAEs, the MLP output of the same layer for transcoders.
  const HookPoint& hook_out() const { return hook_out_; }
  // OK when reconstruction errors can be computed in one forward pass:
  // hook_point_out is a supported hook of the same layer, not before the input.
  const absl::Status& reconstruction_status() const { return reconstruction_status_; }

 private:
  Sae() = default;
  std::string name_;
  std::string path_;
  SaeHyperparams hp_;
  HookPoint hook_;
  HookPoint hook_out_;
  absl::Status reconstruction_status_;
  SaeEncodeForm form_ = SaeEncodeForm::kSaeLens;
  OwnedTensor w_enc_;          // [d_sae, d_model]
  OwnedTensor b_enc_;          // [1, d_sae] F32
  OwnedTensor feature_scale_;  // [1, d_sae] F32 (lm_saes form only)
  OwnedTensor w_dec_;          // [d_sae, d_model]: decoder.weight transposed (see SaeDecoderWeights)
  OwnedTensor b_dec_;          // [1, d_model] F32
  SaeEncoderWeights encoder_;
  SaeDecoderWeights decoder_;
};

// "L15R-8x" for the folder /path/L15R-8x/ (trailing slashes ignored).
std::string SaeNameFromDir(const std::string& dir);

}  // namespace sae

#endif  // SAE_CORE_SAE_H_
