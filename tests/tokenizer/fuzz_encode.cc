// libFuzzer target for Tokenizer::Encode. Uses the demo tokenizer, or the
// tokenizer.json named by $SAE_FUZZ_TOKENIZER (e.g. the real Llama 3 one).
// Checks: invalid UTF-8 is rejected (never altered), valid text round-trips
// through Decode exactly, offsets are ordered and inside the text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "tokenizer/demo_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

const sae::Tokenizer& GetTokenizer() {
  static const sae::Tokenizer* tok = [] {
    const char* path = std::getenv("SAE_FUZZ_TOKENIZER");
    auto t = path != nullptr ? sae::Tokenizer::FromFile(path)
                             : sae::Tokenizer::FromJson(sae::MakeDemoTokenizerJson(), "demo");
    if (!t.ok()) std::abort();
    return t->release();
  }();
  return *tok;
}

size_t CountCodePoints(std::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const sae::Tokenizer& tok = GetTokenizer();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const bool valid = !sae::FindInvalidUtf8(text).has_value();
  auto enc = tok.Encode(text, /*add_bos=*/size % 2 == 1);
  if (!valid) {
    if (enc.ok()) std::abort();  // invalid UTF-8 must never be accepted
    return 0;
  }
  if (!enc.ok()) std::abort();
  auto plain = tok.Encode(text, /*add_bos=*/false);
  if (!plain.ok()) std::abort();
  if (tok.Decode(plain->ids) != text) std::abort();  // lossless
  const size_t n_cp = CountCodePoints(text);
  uint32_t last_start = 0;
  for (const auto& [start, end] : plain->offsets) {
    if (start >= end || end > n_cp || start < last_start) std::abort();
    last_start = start;
  }
  return 0;
}
