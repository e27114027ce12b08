// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (the
// Llama 3 / 3.1 format). Output (ids and code-point offsets) is identical to
// the HF `tokenizers` library; tests/tokenizer checks this on a corpus.
#ifndef SAE_TOKENIZER_TOKENIZER_H_
#define SAE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace sae {

struct Encoding {
  std::vector<int32_t> ids;  // [n_tokens]
  // [n_tokens] [start, end) in Unicode code points of the input text; tokens
  // added by the post-processor (BOS) get (0, 0). A character split over
  // several byte-level tokens gives each of them the whole character's span.
  std::vector<std::pair<uint32_t, uint32_t>> offsets;
};

class Tokenizer {
 public:
  // Errors name the file and the JSON field that is missing or unsupported.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  // `origin` names the source in error messages (e.g. a path or "demo").
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json, std::string_view origin);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Thread-safe. INVALID_ARGUMENT on invalid UTF-8 (the message gives the byte
  // offset); the text is never altered. `add_bos` applies the post-processor
  // template (for Llama 3: prepend <|begin_of_text|>).
  absl::StatusOr<Encoding> Encode(std::string_view text, bool add_bos) const;

  // Byte-level decode of the concatenated tokens (added tokens decode to their
  // content); invalid UTF-8 sequences become U+FFFD. Unknown ids are skipped.
  std::string Decode(absl::Span<const int32_t> ids) const;

  // The decoded text of one token, for display (U+FFFD for partial UTF-8).
  std::string TokenPiece(int32_t id) const;

  // The raw bytes of one token (no U+FFFD substitution); empty if unknown.
  std::string_view TokenBytes(int32_t id) const;

  // Including added tokens (max id + 1).
  int32_t vocab_size() const;
  // The most bytes of text one token covers (Llama 3: 128). Tokens partition
  // the text's bytes (no normalizer, no stripping added tokens), so a text of
  // n bytes encodes to at least n / max_token_bytes() tokens.
  size_t max_token_bytes() const;
  // The first special token the post-processor prepends, if any.
  std::optional<int32_t> bos_id() const;
  // `token` as written in tokenizer.json (byte-level form, e.g. "Ġthe", or an
  // added token's content).
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // True for added tokens marked "special": true.
  bool IsSpecial(int32_t id) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Returns the byte offset of the first invalid UTF-8 sequence in `text`, or
// std::nullopt if `text` is valid UTF-8 (no overlongs, surrogates or code
// points above U+10FFFF, as Rust's str).
std::optional<size_t> FindInvalidUtf8(std::string_view text);

// Maps raw bytes to the byte-level alphabet of GPT-2 / Llama 3 (" the" ->
// "Ġthe"), the form tokens take in tokenizer.json.
std::string BytesToByteLevel(std::string_view bytes);

// The Llama 3 pre-tokenizer regex (Oniguruma syntax, as in tokenizer.json).
inline constexpr std::string_view kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Translates a pre-tokenizer regex from Oniguruma (what HF tokenizers runs)
// to PCRE2 (UTF + UCP) with the same matches: \s/\S as Unicode White_Space,
// \p{L}/\p{N} with the reference's newer Unicode assignments.
std::string OnigToPcre2Pattern(std::string_view onig_pattern);

// Appends the UTF-8 encoding of code point `cp` (<= U+10FFFF) to `out`.
void AppendUtf8(uint32_t cp, std::string* out);

// Replaces each maximal invalid subsequence with U+FFFD (the same policy as
// Rust's String::from_utf8_lossy and the WHATWG decoder).
std::string Utf8Lossy(std::string_view bytes);

}  // namespace sae

#endif  // SAE_TOKENIZER_TOKENIZER_H_
