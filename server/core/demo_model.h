// The embedded tiny demo: a deterministic Llama in the real Hugging Face
// layout (config.json, two bf16 safetensors shards + index, tokenizer.json)
// and Llama Scope format SAEs whose concept features fire on recognisable
// tokens. Tests and `sae-server --demo` use it; everything is loaded back
// through the same loaders as the 8B model.
#ifndef SAE_CORE_DEMO_MODEL_H_
#define SAE_CORE_DEMO_MODEL_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"

namespace sae {

struct DemoConcept {
  std::string label;               // e.g. "animals"
  std::vector<std::string> words;  // e.g. " cat", " dog"
  int feature = 0;                 // feature index in every demo SAE
};

struct DemoLayout {
  std::string model_dir;              // <dir>/model
  std::vector<std::string> sae_dirs;  // <dir>/saes/L1R-8x, ...
  std::vector<DemoConcept> concepts;
};

// Writes the demo model and SAEs under `dir` (created if missing). The
// output is byte-for-byte deterministic. When `dir` already holds a complete
// demo of the same version, nothing is rewritten.
absl::StatusOr<DemoLayout> WriteDemo(const std::string& dir);

// Engine options for the demo model with every demo SAE under its folder
// name; the other options keep their defaults.
EngineOptions EngineOptionsForDemo(const DemoLayout& demo);

}  // namespace sae

#endif  // SAE_CORE_DEMO_MODEL_H_
