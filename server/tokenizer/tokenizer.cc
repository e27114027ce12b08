// Byte-level BPE as in HF tokenizers (models/bpe, pre_tokenizers/byte_level,
// added_vocabulary, processors/template), re-implemented for speed:
//  * the vocab is keyed by raw bytes, so a pre-token is looked up without
//    converting it to the byte-level alphabet (ignore_merges hits are the
//    common case and cost one hash lookup);
//  * merges are keyed by (left id, right id), BPE works on ids only;
//  * no cache, no per-pre-token allocation (thread_local scratch buffers).
#include "tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <functional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sae {
namespace {

using Json = nlohmann::json;

// Debian's absl is built with its own string_view type (not std's).
absl::string_view Av(std::string_view s) { return {s.data(), s.size()}; }

// Ids above this are rejected: they would only make us allocate huge tables
// (real vocabularies are far below it).
constexpr int64_t kMaxTokenId = (int64_t{1} << 22) - 1;

// GPT-2's bytes_to_unicode(): printable bytes map to themselves, the rest to
// U+0100 + n in byte order. Returns the code point for each byte.
std::array<uint32_t, 256> MakeByteToCodePoint() {
  std::array<uint32_t, 256> table{};
  uint32_t n = 0;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = printable ? b : 256 + n++;
  }
  return table;
}

const std::array<uint32_t, 256>& ByteToCodePoint() {
  static const std::array<uint32_t, 256> table = MakeByteToCodePoint();
  return table;
}

// Inverse of ByteToCodePoint over code points < 324; -1 where unmapped.
const std::array<int16_t, 324>& CodePointToByte() {
  static const std::array<int16_t, 324> table = [] {
    std::array<int16_t, 324> t;
    t.fill(-1);
    const auto& fwd = ByteToCodePoint();
    for (int b = 0; b < 256; ++b) t[fwd[b]] = static_cast<int16_t>(b);
    return t;
  }();
  return table;
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if invalid.
size_t ValidSequenceLength(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = byte(i);
  if (b0 < 0x80) return 1;
  const size_t left = s.size() - i;
  const auto cont = [&](size_t k) { return (byte(i + k) & 0xC0) == 0x80; };
  if (b0 >= 0xC2 && b0 <= 0xDF) return (left >= 2 && cont(1)) ? 2 : 0;
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (left < 3) return 0;
    const uint8_t b1 = byte(i + 1);
    // E0 needs A0..BF (no overlongs); ED needs 80..9F (no surrogates).
    const uint8_t lo = b0 == 0xE0 ? 0xA0 : 0x80;
    const uint8_t hi = b0 == 0xED ? 0x9F : 0xBF;
    return (b1 >= lo && b1 <= hi && cont(2)) ? 3 : 0;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (left < 4) return 0;
    const uint8_t b1 = byte(i + 1);
    // F0 needs 90..BF (no overlongs); F4 needs 80..8F (<= U+10FFFF).
    const uint8_t lo = b0 == 0xF0 ? 0x90 : 0x80;
    const uint8_t hi = b0 == 0xF4 ? 0x8F : 0xBF;
    return (b1 >= lo && b1 <= hi && cont(2) && cont(3)) ? 4 : 0;
  }
  return 0;
}

// Decodes a byte-level token ("Ġthe") to raw bytes (" the"); false if it
// contains a character outside the 256-symbol byte-level alphabet.
bool ByteLevelToBytes(std::string_view token, std::string* out) {
  out->clear();
  const auto& inv = CodePointToByte();
  size_t i = 0;
  while (i < token.size()) {
    const size_t len = ValidSequenceLength(token, i);
    if (len == 0) return false;
    uint32_t cp = static_cast<uint8_t>(token[i]);
    if (len == 2) {
      cp = ((cp & 0x1F) << 6) | (static_cast<uint8_t>(token[i + 1]) & 0x3F);
    } else if (len > 2) {
      return false;  // the alphabet is below U+0800
    }
    if (cp >= inv.size() || inv[cp] < 0) return false;
    out->push_back(static_cast<char>(inv[cp]));
    i += len;
  }
  return true;
}

bool IsUtf8Lead(char c) { return (static_cast<uint8_t>(c) & 0xC0) != 0x80; }

// Code points the reference's Oniguruma (Unicode 16 tables) has as letters
// (L) or numbers (N) but PCRE2 10.42 (Unicode 14) has as unassigned: Unicode
// 15.0-16.0 additions. Found by running the reference's Split regex on every
// code point (tests/tokenizer/reference/golden.js writes that sweep and
// tokenizer.conformance_unicode checks it), so a newer PCRE2 changes nothing.
constexpr const char* kExtraLetters =
    "\\x{1C89}-\\x{1C8A}\\x{A7CB}-\\x{A7CD}\\x{A7DA}-\\x{A7DC}\\x{105C0}-"
    "\\x{105F3}\\x{10D4A}-\\x{10D65}\\x{10D6F}-\\x{10D85}\\x{10EC2}-\\x{10EC4}"
    "\\x{1123F}-\\x{11240}\\x{11380}-\\x{11389}\\x{1138B}\\x{1138E}\\x{11390}-"
    "\\x{113B5}\\x{113B7}\\x{113D1}\\x{113D3}\\x{11BC0}-\\x{11BE0}\\x{11F02}"
    "\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}\\x{1342F}\\x{13441}-\\x{13446}"
    "\\x{13460}-\\x{143FA}\\x{16100}-\\x{1611D}\\x{16D40}-\\x{16D6C}\\x{18CFF}"
    "\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}\\x{1E030}-\\x{1E06D}\\x{1E4D0}-"
    "\\x{1E4EB}\\x{1E5D0}-\\x{1E5ED}\\x{1E5F0}\\x{2B739}\\x{2EBF0}-\\x{2EE5D}"
    "\\x{31350}-\\x{323AF}";
constexpr const char* kExtraNumbers =
    "\\x{10D40}-\\x{10D49}\\x{116D0}-\\x{116E3}\\x{11BF0}-\\x{11BF9}\\x{11F50}-"
    "\\x{11F59}\\x{16130}-\\x{16139}\\x{16D70}-\\x{16D79}\\x{1CCF0}-\\x{1CCF9}"
    "\\x{1D2C0}-\\x{1D2D3}\\x{1E4F0}-\\x{1E4F9}\\x{1E5F1}-\\x{1E5FA}";

}  // namespace

// Oniguruma's \s is Unicode White_Space; PCRE2's (with UCP) is \p{Z}|\h|\v,
// which also has U+180E (MONGOLIAN VOWEL SEPARATOR, Cf since Unicode 6.3), so
// \s and \S are spelled out as the White_Space set. \p{L} and \p{N} get the
// code points PCRE2's older Unicode tables lack (kExtraLetters/Numbers).
std::string OnigToPcre2Pattern(std::string_view pattern) {
  constexpr const char* kSpace = "\\t\\n\\x{0B}\\f\\r\\x{85}\\p{Z}";
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  // Appends `body` as class items, wrapped in [...] / [^...] outside a class.
  const auto append_set = [&](const char* body, bool negate) {
    if (in_class) {
      absl::StrAppend(&out, body);
    } else {
      absl::StrAppend(&out, negate ? "[^" : "[", body, "]");
    }
  };
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char n = pattern[i + 1];
      const std::string_view rest = pattern.substr(i);
      if (n == 's') {
        append_set(kSpace, false);
      } else if (n == 'S' && !in_class) {
        append_set(kSpace, true);
      } else if (rest.substr(0, 5) == "\\p{L}") {
        append_set(absl::StrCat("\\p{L}", kExtraLetters).c_str(), false);
        i += 3;
      } else if (rest.substr(0, 5) == "\\p{N}") {
        append_set(absl::StrCat("\\p{N}", kExtraNumbers).c_str(), false);
        i += 3;
      } else {
        // Includes \S inside a class, which has no class-local spelling.
        out.push_back(c);
        out.push_back(n);
      }
      ++i;
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out.push_back(c);
      // A ']' or '^]' right after '[' is literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') {
        out.push_back('^');
        ++i;
      }
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') {
        out.push_back(']');
        ++i;
      }
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out.push_back(c);
  }
  return out;
}

namespace {

std::string EscapeLiteral(std::string_view s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<uint8_t>(c);
    if (u < 0x80 && !std::isalnum(u)) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// GPT-2's pre-tokenizer regex (ByteLevel with use_regex: true).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A byte trie over added-token contents, for leftmost-longest matching (what
// HF's aho-corasick with MatchKind::LeftmostLongest gives).
class AddedTokenTrie {
 public:
  void Insert(std::string_view content, int32_t id) {
    int32_t node = 0;
    for (char c : content) {
      const auto b = static_cast<uint8_t>(c);
      auto it = nodes_[node].next.find(b);
      if (it == nodes_[node].next.end()) {
        nodes_.push_back(Node{});
        it = nodes_[node].next.emplace(b, nodes_.size() - 1).first;
      }
      node = it->second;
    }
    nodes_[node].id = id;
    first_byte_[static_cast<uint8_t>(content[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  // Finds the leftmost-longest match in text[from, to); returns false if none.
  bool Find(std::string_view text, size_t from, size_t to, size_t* start, size_t* end, int32_t* id) const {
    for (size_t pos = from; pos < to; ++pos) {
      if (!first_byte_[static_cast<uint8_t>(text[pos])]) continue;
      int32_t node = 0;
      int32_t best_id = -1;
      size_t best_end = 0;
      for (size_t k = pos; k < to; ++k) {
        const auto it = nodes_[node].next.find(static_cast<uint8_t>(text[k]));
        if (it == nodes_[node].next.end()) break;
        node = it->second;
        if (nodes_[node].id >= 0) {
          best_id = nodes_[node].id;
          best_end = k + 1;
        }
      }
      if (best_id >= 0) {
        *start = pos;
        *end = best_end;
        *id = best_id;
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    absl::flat_hash_map<uint8_t, int32_t> next;
    int32_t id = -1;
  };
  std::vector<Node> nodes_{Node{}};
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

struct MergeInfo {
  int32_t rank;
  int32_t new_id;
};

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Per-thread scratch space, so Encode does not allocate per pre-token.
struct Scratch {
  std::vector<int32_t> ids;      // [n_symbols]
  std::vector<uint32_t> starts;  // [n_symbols] byte start in the pre-token
  std::vector<int32_t> ranks;    // [n_symbols] rank of (ids[i], ids[i+1])
  // Heap path (long pre-tokens): linked list over the original symbols.
  std::vector<int32_t> prev, next;
  struct HeapEntry {
    int32_t rank;
    int32_t pos;
    int32_t left, right;  // the pair when pushed, to detect stale entries
    bool operator>(const HeapEntry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<HeapEntry> heap;
};

struct MatchDataDeleter {
  void operator()(pcre2_match_data* md) const { pcre2_match_data_free(md); }
};

pcre2_match_data* ThreadMatchData() {
  // One ovector pair is enough: we only need the whole match. Independent of
  // the pattern, so it is shared by all Tokenizer instances on this thread.
  thread_local std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create(1, nullptr));
  return md.get();
}

// Advances through the text counting code points; positions must not go
// backwards.
class CodePointCursor {
 public:
  explicit CodePointCursor(std::string_view text) : text_(text) {}
  // Index of the code point that contains byte `pos`.
  uint32_t CodePointAt(size_t pos) {
    for (; byte_ <= pos; ++byte_) cp_ += IsUtf8Lead(text_[byte_]) ? 1 : 0;
    return cp_ - 1;
  }

 private:
  std::string_view text_;
  size_t byte_ = 0;  // bytes [0, byte_) have been counted
  uint32_t cp_ = 0;  // lead bytes in [0, byte_)
};

}  // namespace

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::optional<size_t> FindInvalidUtf8(std::string_view text) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    // Fast path over ASCII, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, text.data() + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    const size_t len = ValidSequenceLength(text, i);
    if (len == 0) return i;
    i += len;
  }
  return std::nullopt;
}

std::string BytesToByteLevel(std::string_view bytes) {
  std::string out;
  const auto& fwd = ByteToCodePoint();
  for (char c : bytes) AppendUtf8(fwd[static_cast<uint8_t>(c)], &out);
  return out;
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    const size_t len = ValidSequenceLength(bytes, i);
    if (len > 0) {
      out.append(bytes.data() + i, len);
      i += len;
      continue;
    }
    // Skip the maximal prefix of a valid sequence (at least one byte), then
    // emit one U+FFFD, as Rust's from_utf8_lossy does.
    const auto b0 = static_cast<uint8_t>(bytes[i]);
    size_t skip = 1;
    size_t need = 0;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      need = 1;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      need = 2;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      need = 3;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    }
    for (size_t k = 1; k <= need && i + k < bytes.size(); ++k) {
      const auto b = static_cast<uint8_t>(bytes[i + k]);
      const bool ok = k == 1 ? (b >= lo && b <= hi) : ((b & 0xC0) == 0x80);
      if (!ok) break;
      ++skip;
    }
    out.append("\xEF\xBF\xBD");
    i += skip;
  }
  return out;
}

struct Tokenizer::Impl {
  std::string origin;
  pcre2_code* regex = nullptr;
  bool jit = false;
  bool ignore_merges = false;

  std::array<int32_t, 256> byte_id;                       // id of each byte
  absl::flat_hash_map<std::string, int32_t> bytes_to_id;  // raw bytes -> id
  absl::flat_hash_map<uint64_t, MergeInfo> merges;        // (left, right)
  std::vector<std::string> id_bytes;                      // [vocab_size]
  std::vector<uint8_t> id_special;                        // [vocab_size]
  size_t max_token_bytes = 0;                             // longest entry of id_bytes
  absl::flat_hash_map<std::string, int32_t> added_by_content;

  AddedTokenTrie raw_added;         // added tokens with normalized: false
  AddedTokenTrie normalized_added;  // normalized: true (no normalizer)

  std::vector<int32_t> prefix_ids;  // post-processor, before the sequence
  std::vector<int32_t> suffix_ids;  // post-processor, after the sequence

  ~Impl() {
    if (regex != nullptr) pcre2_code_free(regex);
  }

  absl::Status Fail(std::string_view field, std::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", origin, ": field '", Av(field), "': ", Av(what)));
  }

  absl::Status Load(const Json& root);
  absl::Status LoadModel(const Json& model);
  absl::Status LoadAddedTokens(const Json& added);
  absl::Status LoadPreTokenizer(const Json& pre);
  // `in_sequence`: `post` is an element of a Sequence, which may not be one
  // itself (Llama 3 nests none; unbounded nesting overflowed the stack).
  absl::Status LoadPostProcessor(const Json& post, std::string_view field, const Json& root, bool in_sequence = false);
  absl::Status CompileRegex(const std::string& pattern);

  absl::Status EncodeSegment(std::string_view text, size_t from, size_t to, bool normalized_pass,
                             CodePointCursor* cursor, Encoding* out) const;
  absl::Status PreTokenize(std::string_view text, size_t from, size_t to, CodePointCursor* cursor, Encoding* out) const;
  void EncodePiece(std::string_view text, size_t from, size_t to, CodePointCursor* cursor, Encoding* out) const;
  void Emit(int32_t id, size_t from, size_t to, CodePointCursor* cursor, Encoding* out) const {
    const uint32_t start = cursor->CodePointAt(from);
    const uint32_t end = cursor->CodePointAt(to - 1) + 1;
    out->ids.push_back(id);
    out->offsets.emplace_back(start, end);
  }
  void BpeScan(Scratch* s) const;
  void BpeHeap(Scratch* s) const;
};

namespace {

// Optional boolean field: absent or null -> `dflt`.
absl::StatusOr<bool> GetBool(const Json& obj, const char* key, bool dflt) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat("'", key, "' must be bool"));
  }
  return it->get<bool>();
}

const Json* Find(const Json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

std::string TypeOf(const Json& obj) {
  const Json* t = Find(obj, "type");
  return (t != nullptr && t->is_string()) ? t->get<std::string>() : "";
}

}  // namespace

absl::Status Tokenizer::Impl::Load(const Json& root) {
  if (!root.is_object()) return Fail("(root)", "must be a JSON object");
  for (const char* key : {"truncation", "padding", "normalizer"}) {
    const Json* v = Find(root, key);
    if (v != nullptr && !v->is_null()) {
      return Fail(key, "unsupported (only null is supported)");
    }
  }
  const Json* model = Find(root, "model");
  if (model == nullptr) return Fail("model", "missing");
  RETURN_IF_ERROR(LoadModel(*model));

  if (const Json* added = Find(root, "added_tokens"); added != nullptr) {
    RETURN_IF_ERROR(LoadAddedTokens(*added));
  }

  const Json* pre = Find(root, "pre_tokenizer");
  if (pre == nullptr || pre->is_null()) {
    return Fail("pre_tokenizer", "missing (byte-level BPE needs a ByteLevel pre-tokenizer)");
  }
  RETURN_IF_ERROR(LoadPreTokenizer(*pre));

  const Json* decoder = Find(root, "decoder");
  if (decoder == nullptr || decoder->is_null()) {
    return Fail("decoder", "missing (expected type ByteLevel)");
  }
  if (TypeOf(*decoder) != "ByteLevel") {
    return Fail("decoder.type", absl::StrCat("unsupported '", TypeOf(*decoder), "' (only ByteLevel is supported)"));
  }

  if (const Json* post = Find(root, "post_processor"); post != nullptr && !post->is_null()) {
    RETURN_IF_ERROR(LoadPostProcessor(*post, "post_processor", root));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadModel(const Json& model) {
  if (!model.is_object()) return Fail("model", "must be an object");
  const std::string type = TypeOf(model);
  if (!type.empty() && type != "BPE") {
    return Fail("model.type", absl::StrCat("unsupported '", type, "' (only BPE is supported)"));
  }
  if (type.empty() && Find(model, "merges") == nullptr) {
    return Fail("model.type", "missing (only BPE is supported)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"}) {
    const Json* v = Find(model, key);
    if (v != nullptr && !v->is_null()) {
      return Fail(absl::StrCat("model.", key), "unsupported (must be null)");
    }
  }
  auto byte_fallback = GetBool(model, "byte_fallback", false);
  if (!byte_fallback.ok()) return Fail("model.byte_fallback", "must be bool");
  if (*byte_fallback) {
    return Fail("model.byte_fallback", "unsupported (must be false)");
  }
  auto ignore = GetBool(model, "ignore_merges", false);
  if (!ignore.ok()) return Fail("model.ignore_merges", "must be bool");
  ignore_merges = *ignore;

  const Json* vocab = Find(model, "vocab");
  if (vocab == nullptr) return Fail("model.vocab", "missing");
  if (!vocab->is_object()) return Fail("model.vocab", "must be an object");
  // Every id gets its raw bytes; ids of byte-level tokens are also indexed by
  // their raw bytes for pre-token lookup.
  std::vector<std::pair<int32_t, std::string>> entries;
  entries.reserve(vocab->size());
  int64_t max_id = -1;
  std::string bytes;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer()) {
      return Fail("model.vocab", absl::StrCat("id of '", it.key(), "' is not an integer"));
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > kMaxTokenId) {
      return Fail("model.vocab", absl::StrCat("id ", id, " of '", it.key(), "' out of range"));
    }
    max_id = std::max(max_id, id);
    entries.emplace_back(static_cast<int32_t>(id), it.key());
  }
  id_bytes.assign(max_id + 1, std::string());
  std::vector<uint8_t> seen(max_id + 1, 0);
  bytes_to_id.reserve(entries.size());
  for (const auto& [id, token] : entries) {
    if (seen[id]) {
      return Fail("model.vocab", absl::StrCat("id ", id, " used twice"));
    }
    seen[id] = 1;
    if (ByteLevelToBytes(token, &bytes)) {
      id_bytes[id] = bytes;
      bytes_to_id.emplace(bytes, id);
    } else {
      id_bytes[id] = token;  // not byte-level: can never be produced
    }
  }
  byte_id.fill(-1);
  for (int b = 0; b < 256; ++b) {
    const auto it = bytes_to_id.find(std::string(1, static_cast<char>(b)));
    if (it == bytes_to_id.end()) {
      std::string sym;
      AppendUtf8(ByteToCodePoint()[b], &sym);
      return Fail("model.vocab", absl::StrFormat("missing byte-level symbol '%s' for byte "
                                                 "0x%02X (every byte must be in the vocab)",
                                                 sym, b));
    }
    byte_id[b] = it->second;
  }

  const Json* merge_list = Find(model, "merges");
  if (merge_list == nullptr) return Fail("model.merges", "missing");
  if (!merge_list->is_array()) return Fail("model.merges", "must be an array");
  merges.reserve(merge_list->size());
  std::string left_bytes, right_bytes;
  for (size_t rank = 0; rank < merge_list->size(); ++rank) {
    const Json& m = (*merge_list)[rank];
    std::string left, right;
    const std::string field = absl::StrCat("model.merges[", rank, "]");
    if (m.is_string()) {
      // "a b": exactly one space (tokens with spaces need the pair form).
      const std::string& s = m.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return Fail(field, absl::StrCat("'", s,
                                        "' is not two tokens separated by "
                                        "one space"));
      }
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return Fail(field, "must be \"a b\" or [\"a\", \"b\"]");
    }
    const auto find_id = [&](const std::string& tok, std::string* raw) -> std::optional<int32_t> {
      if (!ByteLevelToBytes(tok, raw)) return std::nullopt;
      const auto it = bytes_to_id.find(*raw);
      if (it == bytes_to_id.end()) return std::nullopt;
      return it->second;
    };
    const auto l = find_id(left, &left_bytes);
    if (!l) return Fail(field, absl::StrCat("'", left, "' not in vocab"));
    const auto r = find_id(right, &right_bytes);
    if (!r) return Fail(field, absl::StrCat("'", right, "' not in vocab"));
    const auto merged = bytes_to_id.find(left_bytes + right_bytes);
    if (merged == bytes_to_id.end()) {
      return Fail(field, absl::StrCat("'", left, right, "' not in vocab"));
    }
    // Like HF, a repeated pair takes the later rank.
    merges.insert_or_assign(PairKey(*l, *r), MergeInfo{static_cast<int32_t>(rank), merged->second});
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadAddedTokens(const Json& added) {
  if (!added.is_array()) return Fail("added_tokens", "must be an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const Json& t = added[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    if (!t.is_object()) return Fail(field, "must be an object");
    const Json* id = Find(t, "id");
    const Json* content = Find(t, "content");
    if (id == nullptr || !id->is_number_integer()) {
      return Fail(field + ".id", "missing or not an integer");
    }
    if (content == nullptr || !content->is_string()) {
      return Fail(field + ".content", "missing or not a string");
    }
    const int64_t tid = id->get<int64_t>();
    const std::string& text = content->get_ref<const std::string&>();
    if (tid < 0 || tid > kMaxTokenId) {
      return Fail(field + ".id", absl::StrCat(tid, " out of range"));
    }
    if (text.empty()) return Fail(field + ".content", "empty");
    if (FindInvalidUtf8(text)) return Fail(field + ".content", "invalid UTF-8");
    for (const char* key : {"lstrip", "rstrip", "single_word"}) {
      auto v = GetBool(t, key, false);
      if (!v.ok()) return Fail(absl::StrCat(field, ".", key), "must be bool");
      if (*v) {
        return Fail(absl::StrCat(field, ".", key), "unsupported (must be false)");
      }
    }
    auto special = GetBool(t, "special", false);
    auto normalized = GetBool(t, "normalized", false);
    if (!special.ok()) return Fail(field + ".special", "must be bool");
    if (!normalized.ok()) return Fail(field + ".normalized", "must be bool");
    if (static_cast<size_t>(tid) >= id_bytes.size()) {
      id_bytes.resize(tid + 1);
    }
    id_bytes[tid] = text;
    if (id_special.size() < id_bytes.size()) id_special.resize(id_bytes.size());
    id_special[tid] = *special ? 1 : 0;
    added_by_content.insert_or_assign(text, static_cast<int32_t>(tid));
    (*normalized ? normalized_added : raw_added).Insert(text, static_cast<int32_t>(tid));
  }
  id_special.resize(id_bytes.size());
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::CompileRegex(const std::string& pattern) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  const std::string translated = OnigToPcre2Pattern(pattern);
  regex = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(), PCRE2_UTF | PCRE2_UCP,
                        &error, &error_offset, nullptr);
  if (regex == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(error, msg, sizeof(msg));
    return Fail("pre_tokenizer",
                absl::StrCat("regex '", pattern, "' does not compile: ", reinterpret_cast<const char*>(msg)));
  }
  jit = pcre2_jit_compile(regex, PCRE2_JIT_COMPLETE) == 0;
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadPreTokenizer(const Json& pre) {
  // Accepted: ByteLevel(use_regex: true), or Sequence[Split, ByteLevel]
  // with ByteLevel(use_regex: false), as in Llama 3.
  std::vector<const Json*> steps;
  std::string base = "pre_tokenizer";
  if (TypeOf(pre) == "Sequence") {
    const Json* list = Find(pre, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return Fail("pre_tokenizer.pretokenizers", "missing or not an array");
    }
    for (const Json& p : *list) steps.push_back(&p);
    base = "pre_tokenizer.pretokenizers";
  } else {
    steps.push_back(&pre);
  }
  std::optional<std::string> pattern;
  bool byte_level = false;
  for (size_t i = 0; i < steps.size(); ++i) {
    const Json& p = *steps[i];
    const std::string field = steps.size() == 1 && base == "pre_tokenizer" ? base : absl::StrCat(base, "[", i, "]");
    const std::string type = TypeOf(p);
    if (byte_level) {
      return Fail(field, "nothing may follow the ByteLevel pre-tokenizer");
    }
    if (type == "Split") {
      if (pattern) return Fail(field, "only one Split is supported");
      const Json* pat = Find(p, "pattern");
      const Json* regex_src = pat ? Find(*pat, "Regex") : nullptr;
      const Json* string_src = pat ? Find(*pat, "String") : nullptr;
      if (regex_src != nullptr && regex_src->is_string()) {
        pattern = regex_src->get<std::string>();
      } else if (string_src != nullptr && string_src->is_string()) {
        pattern = EscapeLiteral(string_src->get<std::string>());
      } else {
        return Fail(field + ".pattern", "missing {\"Regex\": ...}");
      }
      const Json* behavior = Find(p, "behavior");
      if (behavior == nullptr || !behavior->is_string() || behavior->get<std::string>() != "Isolated") {
        return Fail(field + ".behavior", "unsupported (only Isolated)");
      }
      auto invert = GetBool(p, "invert", false);
      if (!invert.ok() || *invert) {
        return Fail(field + ".invert", "unsupported (must be false)");
      }
    } else if (type == "ByteLevel") {
      byte_level = true;
      auto prefix = GetBool(p, "add_prefix_space", true);
      if (!prefix.ok() || *prefix) {
        return Fail(field + ".add_prefix_space", "unsupported (must be false)");
      }
      auto use_regex = GetBool(p, "use_regex", true);
      if (!use_regex.ok()) return Fail(field + ".use_regex", "must be bool");
      if (*use_regex) {
        if (pattern) {
          return Fail(field + ".use_regex", "unsupported: must be false after a Split");
        }
        pattern = std::string(kGpt2Pattern);
      }
    } else {
      return Fail(field + ".type", absl::StrCat("unsupported '", type, "' (only Split and ByteLevel are supported)"));
    }
  }
  if (!byte_level) {
    return Fail(base, "no ByteLevel pre-tokenizer (byte-level BPE needs one)");
  }
  if (!pattern) {
    return Fail(base, "no Split regex and ByteLevel.use_regex is false");
  }
  return CompileRegex(*pattern);
}

absl::Status Tokenizer::Impl::LoadPostProcessor(const Json& post, std::string_view field, const Json& root,
                                                bool in_sequence) {
  const std::string type = TypeOf(post);
  const std::string f(field);
  if (type == "Sequence") {
    if (in_sequence) return Fail(f + ".type", "a Sequence inside a Sequence is not supported");
    const Json* list = Find(post, "processors");
    if (list == nullptr || !list->is_array()) {
      return Fail(f + ".processors", "missing or not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(LoadPostProcessor((*list)[i], absl::StrCat(f, ".processors[", i, "]"), root, true));
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    // Only offset trimming would change the encoding; Llama 3 disables it.
    auto trim = GetBool(post, "trim_offsets", true);
    if (!trim.ok() || *trim) {
      return Fail(f + ".trim_offsets", "unsupported (must be false)");
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") {
    return Fail(f + ".type", absl::StrCat("unsupported '", type,
                                          "' (only TemplateProcessing, ByteLevel and "
                                          "Sequence are supported)"));
  }
  if (!prefix_ids.empty() || !suffix_ids.empty()) {
    return Fail(f, "only one TemplateProcessing is supported");
  }
  const Json* single = Find(post, "single");
  const Json* specials = Find(post, "special_tokens");
  if (single == nullptr || !single->is_array()) {
    return Fail(f + ".single", "missing or not an array");
  }
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& item = (*single)[i];
    const std::string item_field = absl::StrCat(f, ".single[", i, "]");
    if (Find(item, "Sequence") != nullptr) {
      if (seen_sequence) return Fail(item_field, "second Sequence");
      seen_sequence = true;
      continue;
    }
    const Json* sp = Find(item, "SpecialToken");
    const Json* name = sp ? Find(*sp, "id") : nullptr;
    if (name == nullptr || !name->is_string()) {
      return Fail(item_field, "expected {\"SpecialToken\": {\"id\": ...}}");
    }
    const Json* entry = specials ? Find(*specials, name->get<std::string>().c_str()) : nullptr;
    const Json* ids = entry ? Find(*entry, "ids") : nullptr;
    if (ids == nullptr || !ids->is_array()) {
      return Fail(f + ".special_tokens", absl::StrCat("no ids for '", name->get<std::string>(), "'"));
    }
    for (const Json& id : *ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
          id.get<int64_t>() >= static_cast<int64_t>(id_bytes.size())) {
        return Fail(f + ".special_tokens",
                    absl::StrCat("bad id for '", name->get<std::string>(), "' (must be a token in the vocab)"));
      }
      (seen_sequence ? suffix_ids : prefix_ids).push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  if (!seen_sequence) return Fail(f + ".single", "no {\"Sequence\": ...}");
  return absl::OkStatus();
}

// Greedy BPE, O(n^2) but with contiguous arrays: fastest for short words.
// Applies the lowest-rank pair first, the leftmost one on ties (as HF's heap).
void Tokenizer::Impl::BpeScan(Scratch* s) const {
  auto& ids = s->ids;
  auto& starts = s->starts;
  auto& ranks = s->ranks;
  constexpr int32_t kNone = INT32_MAX;
  size_t n = ids.size();
  ranks.resize(n);
  const auto rank_of = [&](size_t i) {
    const auto it = merges.find(PairKey(ids[i], ids[i + 1]));
    return it == merges.end() ? kNone : it->second.rank;
  };
  for (size_t i = 0; i + 1 < n; ++i) ranks[i] = rank_of(i);
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i) {
      if (ranks[i] < ranks[best]) best = i;
    }
    if (ranks[best] == kNone) break;
    ids[best] = merges.find(PairKey(ids[best], ids[best + 1]))->second.new_id;
    for (size_t i = best + 1; i + 1 < n; ++i) {
      ids[i] = ids[i + 1];
      starts[i] = starts[i + 1];
      ranks[i] = ranks[i + 1];
    }
    --n;
    if (best + 1 < n) ranks[best] = rank_of(best);
    if (best > 0) ranks[best - 1] = rank_of(best - 1);
  }
  ids.resize(n);
  starts.resize(n);
}

// Greedy BPE with a min-heap over (rank, position) and a linked list, for
// long pre-tokens (O(n log n)); same result as BpeScan.
void Tokenizer::Impl::BpeHeap(Scratch* s) const {
  auto& ids = s->ids;
  const int32_t n = static_cast<int32_t>(ids.size());
  auto& prev = s->prev;
  auto& next = s->next;
  auto& heap = s->heap;
  prev.resize(n);
  next.resize(n);
  heap.clear();
  for (int32_t i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  const auto cmp = std::greater<Scratch::HeapEntry>();
  const auto push = [&](int32_t pos) {
    const int32_t r = next[pos];
    if (r < 0) return;
    const auto it = merges.find(PairKey(ids[pos], ids[r]));
    if (it == merges.end()) return;
    heap.push_back({it->second.rank, pos, ids[pos], ids[r]});
    std::push_heap(heap.begin(), heap.end(), cmp);
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  // Dead symbols are marked with id -1.
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    const Scratch::HeapEntry top = heap.back();
    heap.pop_back();
    const int32_t r = next[top.pos];
    if (ids[top.pos] != top.left || r < 0 || ids[r] != top.right) continue;
    ids[top.pos] = merges.find(PairKey(top.left, top.right))->second.new_id;
    ids[r] = -1;
    next[top.pos] = next[r];
    if (next[r] >= 0) prev[next[r]] = top.pos;
    if (prev[top.pos] >= 0) push(prev[top.pos]);
    push(top.pos);
  }
  size_t out = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (ids[i] < 0) continue;
    ids[out] = ids[i];
    s->starts[out] = s->starts[i];
    ++out;
  }
  ids.resize(out);
  s->starts.resize(out);
}

void Tokenizer::Impl::EncodePiece(std::string_view text, size_t from, size_t to, CodePointCursor* cursor,
                                  Encoding* out) const {
  const std::string_view piece = text.substr(from, to - from);
  if (piece.size() == 1) {
    Emit(byte_id[static_cast<uint8_t>(piece[0])], from, to, cursor, out);
    return;
  }
  if (ignore_merges) {
    const auto it = bytes_to_id.find(Av(piece));
    if (it != bytes_to_id.end()) {
      Emit(it->second, from, to, cursor, out);
      return;
    }
  }
  thread_local Scratch scratch;
  Scratch* s = &scratch;
  s->ids.resize(piece.size());
  s->starts.resize(piece.size());
  for (size_t i = 0; i < piece.size(); ++i) {
    s->ids[i] = byte_id[static_cast<uint8_t>(piece[i])];
    s->starts[i] = static_cast<uint32_t>(i);
  }
  // Beyond ~64 symbols the O(n^2) scan loses to the heap.
  if (piece.size() <= 64) {
    BpeScan(s);
  } else {
    BpeHeap(s);
  }
  const size_t n = s->ids.size();
  for (size_t i = 0; i < n; ++i) {
    const size_t end = i + 1 < n ? s->starts[i + 1] : piece.size();
    Emit(s->ids[i], from + s->starts[i], from + end, cursor, out);
  }
}

absl::Status Tokenizer::Impl::PreTokenize(std::string_view text, size_t from, size_t to, CodePointCursor* cursor,
                                          Encoding* out) const {
  // The segment is matched as its own subject: HF splits on added tokens
  // first, so lookaheads must not see past the segment.
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + from);
  const size_t length = to - from;
  pcre2_match_data* md = ThreadMatchData();
  size_t pos = 0;  // next unconsumed byte in the segment
  size_t search = 0;
  while (search < length) {
    int rc = jit ? pcre2_jit_match(regex, subject, length, search, 0, md, nullptr)
                 : pcre2_match(regex, subject, length, search, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      // The interpreter keeps its backtracking state on the heap.
      rc = pcre2_match(regex, subject, length, search, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof(msg));
      return absl::InternalError(
          absl::StrCat("tokenizer ", origin, ": pre-tokenizer regex failed: ", reinterpret_cast<const char*>(msg)));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t ms = ov[0], me = ov[1];
    if (me <= ms) {
      // Empty match: produces no piece; retry from the next code point.
      search = ms + 1;
      while (search < length && !IsUtf8Lead(text[from + search])) ++search;
      continue;
    }
    // Isolated: text between matches is a piece too.
    if (ms > pos) EncodePiece(text, from + pos, from + ms, cursor, out);
    EncodePiece(text, from + ms, from + me, cursor, out);
    pos = search = me;
  }
  if (pos < length) EncodePiece(text, from + pos, to, cursor, out);
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::EncodeSegment(std::string_view text, size_t from, size_t to, bool normalized_pass,
                                            CodePointCursor* cursor, Encoding* out) const {
  // HF first splits on non-normalized added tokens, then (after the
  // normalizer, which we require to be null) on normalized ones.
  const AddedTokenTrie& trie = normalized_pass ? normalized_added : raw_added;
  const auto gap = [&](size_t a, size_t b) -> absl::Status {
    if (a >= b) return absl::OkStatus();
    if (!normalized_pass && !normalized_added.empty()) {
      return EncodeSegment(text, a, b, true, cursor, out);
    }
    return PreTokenize(text, a, b, cursor, out);
  };
  size_t pos = from;
  if (!trie.empty()) {
    size_t ms, me;
    int32_t id;
    while (pos < to && trie.Find(text, pos, to, &ms, &me, &id)) {
      RETURN_IF_ERROR(gap(pos, ms));
      Emit(id, ms, me, cursor, out);
      pos = me;
    }
  }
  return gap(pos, to);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  absl::StatusOr<std::string> json = ReadFileToString(path);
  if (!json.ok()) return Prefixed("tokenizer ", json.status());
  return FromJson(*json, path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json, std::string_view origin) {
  auto impl = std::make_unique<Impl>();
  impl->origin = std::string(origin);
  try {
    const Json root = Json::parse(json.begin(), json.end());
    RETURN_IF_ERROR(impl->Load(root));
    for (const std::string& bytes : impl->id_bytes)
      impl->max_token_bytes = std::max(impl->max_token_bytes, bytes.size());
  } catch (const Json::exception& e) {
    // parse_error messages give the byte position.
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", Av(origin), ": invalid JSON: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("tokenizer ", Av(origin), ": load failed: ", e.what()));
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<Encoding> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  if (const auto bad = FindInvalidUtf8(text); bad.has_value()) {
    return absl::InvalidArgumentError(absl::StrFormat("text is not valid UTF-8: invalid byte 0x%02X at byte offset %d",
                                                      static_cast<uint8_t>(text[*bad]), *bad));
  }
  Encoding out;
  // ~4 bytes per token on English text.
  out.ids.reserve(text.size() / 3 + 4);
  out.offsets.reserve(text.size() / 3 + 4);
  if (add_bos) {
    for (int32_t id : impl_->prefix_ids) {
      out.ids.push_back(id);
      out.offsets.emplace_back(0, 0);
    }
  }
  CodePointCursor cursor(text);
  RETURN_IF_ERROR(impl_->EncodeSegment(text, 0, text.size(), false, &cursor, &out));
  if (add_bos) {
    for (int32_t id : impl_->suffix_ids) {
      out.ids.push_back(id);
      out.offsets.emplace_back(0, 0);
    }
  }
  return out;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string bytes;
  for (int32_t id : ids) bytes.append(TokenBytes(id));
  return Utf8Lossy(bytes);
}

std::string Tokenizer::TokenPiece(int32_t id) const { return Utf8Lossy(TokenBytes(id)); }

std::string_view Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_bytes.size()) return {};
  return impl_->id_bytes[id];
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_bytes.size()); }

size_t Tokenizer::max_token_bytes() const { return impl_->max_token_bytes; }

std::optional<int32_t> Tokenizer::bos_id() const {
  if (impl_->prefix_ids.empty()) return std::nullopt;
  return impl_->prefix_ids.front();
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (const auto it = impl_->added_by_content.find(Av(token)); it != impl_->added_by_content.end()) {
    return it->second;
  }
  std::string bytes;
  if (!ByteLevelToBytes(token, &bytes)) return std::nullopt;
  const auto it = impl_->bytes_to_id.find(bytes);
  if (it == impl_->bytes_to_id.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_special.size() && impl_->id_special[id] != 0;
}

}  // namespace sae
