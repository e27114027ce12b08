// The tokenizer of the embedded demo model: the Llama 3 tokenizer.json format
// (same pre-tokenizer regex, ByteLevel, template post-processor with
// <|begin_of_text|>, ignore_merges) with a ~1000-token vocab learned by plain
// BPE from a small embedded English corpus. No downloads, deterministic.
#ifndef SAE_TOKENIZER_DEMO_TOKENIZER_H_
#define SAE_TOKENIZER_DEMO_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace sae {

// Total vocab size of the demo tokenizer (model vocab + special tokens).
inline constexpr int32_t kDemoVocabSize = 1000;
// Special tokens come after the model vocab, as in Llama 3.
inline constexpr int32_t kDemoNumSpecialTokens = 8;
inline constexpr int32_t kDemoBosId = kDemoVocabSize - kDemoNumSpecialTokens;
inline constexpr int32_t kDemoEosId = kDemoBosId + 1;

// The tokenizer.json text; byte-for-byte identical on every call and build.
std::string MakeDemoTokenizerJson();

// The English text the demo BPE merges were learned from (also handy as
// demo input).
std::string_view DemoTrainingCorpus();

}  // namespace sae

#endif  // SAE_TOKENIZER_DEMO_TOKENIZER_H_
