// libFuzzer target for the tokenizer.json loader: any input must give a
// Status (never crash, throw or hang); a loaded tokenizer must encode.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view json(reinterpret_cast<const char*>(data), size);
  auto tok = sae::Tokenizer::FromJson(json, "fuzz");
  if (!tok.ok()) return 0;
  for (std::string_view text : {"", "Hello world, it's 2024!", "  é😀\n\n<|begin_of_text|>x"}) {
    auto enc = (*tok)->Encode(text, /*add_bos=*/true);
    if (!enc.ok()) std::abort();
    auto plain = (*tok)->Encode(text, /*add_bos=*/false);
    if (!plain.ok()) std::abort();
    // Lossless unless added tokens overlap vocab bytes in odd ways; only
    // check the call works and ids are in range.
    for (int32_t id : plain->ids) {
      if (id < 0 || id >= (*tok)->vocab_size()) std::abort();
    }
    (void)(*tok)->Decode(enc->ids);
  }
  return 0;
}
