// sae-make-demo DIR: writes the tiny demo model and SAEs into DIR and prints
// where they are and which features mean what.
#include <cstdio>

#include "core/demo_model.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: sae-make-demo DIR\n");
    return 2;
  }
  auto layout = sae::WriteDemo(argv[1]);
  if (!layout.ok()) {
    std::fprintf(stderr, "sae-make-demo: %s\n", layout.status().ToString().c_str());
    return 1;
  }
  std::printf("model: %s\n", layout->model_dir.c_str());
  for (const auto& d : layout->sae_dirs) std::printf("sae:   %s\n", d.c_str());
  for (const auto& c : layout->concepts) {
    std::printf("feature %d = %s (", c.feature, c.label.c_str());
    for (size_t i = 0; i < c.words.size(); ++i) std::printf("%s\"%s\"", i ? ", " : "", c.words[i].c_str());
    std::printf(")\n");
  }
  return 0;
}
