#include "core/hooks.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace sae {

absl::string_view HookSiteLetter(HookSite site) {
  switch (site) {
    case HookSite::kResid:
      return "R";
    case HookSite::kAttn:
      return "A";
    case HookSite::kMlp:
      return "M";
    case HookSite::kTranscoderIn:
      return "TC";
  }
  return "?";
}

std::string HookPoint::Name() const { return absl::StrCat("L", layer, HookSiteLetter(site)); }

absl::StatusOr<HookPoint> ParseHookName(absl::string_view name) {
  if (name.size() < 3 || name[0] != 'L') {
    return absl::InvalidArgumentError(absl::StrCat("hook name \"", name, "\" is not of the form L<layer><R|A|M|TC>"));
  }
  size_t i = 1;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  int layer = 0;
  if (i == 1 || !absl::SimpleAtoi(name.substr(1, i - 1), &layer)) {
    return absl::InvalidArgumentError(absl::StrCat("hook name \"", name, "\" has no layer number"));
  }
  const absl::string_view site = name.substr(i);
  HookPoint h{layer, HookSite::kResid};
  if (site == "R") {
    h.site = HookSite::kResid;
  } else if (site == "A") {
    h.site = HookSite::kAttn;
  } else if (site == "M") {
    h.site = HookSite::kMlp;
  } else if (site == "TC") {
    h.site = HookSite::kTranscoderIn;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("hook name \"", name, "\": site must be R, A, M or TC"));
  }
  return h;
}

absl::StatusOr<HookPoint> ParseHookPointIn(absl::string_view hook_point) {
  std::vector<absl::string_view> parts = absl::StrSplit(hook_point, '.');
  int layer = 0;
  if (parts.size() < 3 || parts[0] != "blocks" || !absl::SimpleAtoi(parts[1], &layer) || layer < 0) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported hook point \"", hook_point, "\""));
  }
  const std::string rest = absl::StrJoin(parts.begin() + 2, parts.end(), ".");
  if (rest == "hook_resid_post") return HookPoint{layer, HookSite::kResid};
  if (rest == "hook_attn_out") return HookPoint{layer, HookSite::kAttn};
  if (rest == "hook_mlp_out") return HookPoint{layer, HookSite::kMlp};
  if (rest == "ln2.hook_normalized") return HookPoint{layer, HookSite::kTranscoderIn};
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported hook point \"", hook_point,
                   "\" (supported: blocks.N.hook_resid_post, blocks.N.hook_attn_out, blocks.N.hook_mlp_out, "
                   "blocks.N.ln2.hook_normalized)"));
}

}  // namespace sae
