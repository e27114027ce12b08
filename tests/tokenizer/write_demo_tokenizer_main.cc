// Writes the demo tokenizer.json (MakeDemoTokenizerJson) to the given path.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "tokenizer/demo_tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_tokenizer.json\n", argv[0]);
    return 2;
  }
  const std::filesystem::path path(argv[1]);
  std::error_code ec;  // an existing directory is fine
  if (path.has_parent_path()) {
    std::filesystem::create_directories(path.parent_path(), ec);
  }
  std::ofstream out(path, std::ios::binary);
  out << sae::MakeDemoTokenizerJson();
  out.close();
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", argv[1]);
    return 1;
  }
  return 0;
}
