// Hook points of the Llama forward pass, named as Llama Scope names them:
// L{layer}{R|A|M|TC}.
#ifndef SAE_CORE_HOOKS_H_
#define SAE_CORE_HOOKS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sae {

enum class HookSite {
  kResid,         // R: residual stream after decoder layer n
  kAttn,          // A: o_proj output, before the residual add
  kMlp,           // M: down_proj output, before the residual add
  kTranscoderIn,  // TC: resid_mid * rsqrt(mean(resid_mid^2) + eps), no norm weight
};

struct HookPoint {
  int layer = 0;
  HookSite site = HookSite::kResid;

  std::string Name() const;  // "L15R", "L15TC"
  bool operator==(const HookPoint& o) const { return layer == o.layer && site == o.site; }
  bool operator<(const HookPoint& o) const {
    return layer != o.layer ? layer < o.layer : static_cast<int>(site) < static_cast<int>(o.site);
  }
};

absl::string_view HookSiteLetter(HookSite site);  // "R", "A", "M", "TC"
// "L15R" / "L15TC" -> hook point.
absl::StatusOr<HookPoint> ParseHookName(absl::string_view name);
// TransformerLens names used in Llama Scope hyperparams.json:
// blocks.N.hook_resid_post, blocks.N.hook_attn_out, blocks.N.hook_mlp_out,
// blocks.N.ln2.hook_normalized (transcoder input).
absl::StatusOr<HookPoint> ParseHookPointIn(absl::string_view hook_point);

}  // namespace sae

#endif  // SAE_CORE_HOOKS_H_
