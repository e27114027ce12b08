// Compares our encodings with golden output from the reference (HF
// tokenizers, produced by reference/golden.js), ids AND offsets, with and
// without BOS. Exit status 1 on any mismatch.
//
// Usage: tokenizer_conformance --tokenizer T.json --corpus C.jsonl
//            --golden G.jsonl [--name NAME]
//        tokenizer_conformance --unicode_sweep unicode_sweep.golden.txt
// The second form compares pre-token boundaries (our PCRE2 translation of the
// Split regex vs the reference's Oniguruma) over every Unicode code point.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer.h"

namespace {

using Json = nlohmann::json;

bool ReadJsonl(const std::string& path, std::vector<Json>* out) {
  std::ifstream in(path);
  if (!in) return false;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return false;
    out->push_back(std::move(j));
  }
  return true;
}

std::string FormatEncoding(const std::vector<int32_t>& ids, const std::vector<std::pair<uint32_t, uint32_t>>& offsets) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 40; ++i) {
    absl::StrAppend(&s, ids[i], "(", offsets[i].first, ",", offsets[i].second, ") ");
  }
  if (ids.size() > 40) absl::StrAppend(&s, "... [", ids.size(), " tokens]");
  return s;
}

using Spans = std::vector<std::pair<uint32_t, uint32_t>>;

// Pre-token spans (code points) of `text` under the Split regex, Isolated.
Spans PreTokenSpans(pcre2_code* re, pcre2_match_data* md, const std::string& text) {
  Spans out;
  std::vector<uint32_t> cp_of(text.size() + 1);  // byte -> code point index
  uint32_t cp = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    cp_of[i] = cp;
    cp += (static_cast<uint8_t>(text[i]) & 0xC0) != 0x80;
  }
  cp_of[text.size()] = cp;
  size_t pos = 0;
  while (pos < text.size()) {
    const int rc =
        pcre2_match(re, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc < 0) break;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[1] <= ov[0]) break;  // cannot happen with the Llama 3 regex
    if (ov[0] > pos) out.emplace_back(cp_of[pos], cp_of[ov[0]]);
    out.emplace_back(cp_of[ov[0]], cp_of[ov[1]]);
    pos = ov[1];
  }
  if (pos < text.size()) out.emplace_back(cp_of[pos], cp_of[text.size()]);
  return out;
}

// See unicodeSweep in reference/golden.js for the file format.
int UnicodeSweep(const std::string& path) {
  std::ifstream in(path);
  std::string header;
  if (!in || !std::getline(in, header)) {
    std::fprintf(stderr, "cannot read %s (written by tokenizer.golden)\n", path.c_str());
    return 1;
  }
  const Json head = Json::parse(header, nullptr, false);
  if (head.is_discarded() || !head.contains("pattern")) {
    std::fprintf(stderr, "%s: bad header\n", path.c_str());
    return 1;
  }
  const std::string pattern = sae::OnigToPcre2Pattern(head["pattern"].get<std::string>());
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                                 &error, &error_offset, nullptr);
  if (re == nullptr) {
    std::fprintf(stderr, "pattern does not compile\n");
    return 1;
  }
  pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  size_t n = 0, n_match = 0, n_pieces = 0;
  uint32_t next_first = 0;
  int reported = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    uint32_t first = 0, last = 0, end = 0;
    fields >> first >> last;
    Spans ref;
    while (fields >> end) {
      ref.emplace_back(ref.empty() ? 0 : ref.back().second, end);
    }
    if (first != next_first) {
      std::fprintf(stderr, "%s: line %zu does not continue the sweep\n", path.c_str(), n + 2);
      return 1;
    }
    next_first = last + 1;
    std::string text;
    for (uint32_t cp = first; cp <= last; ++cp) {
      if (cp >= 0xD800 && cp <= 0xDFFF) continue;
      std::string c;
      sae::AppendUtf8(cp, &c);
      text += "=" + c + "\n" + c + "=\n";
    }
    ++n;
    n_pieces += ref.size();
    const Spans ours = PreTokenSpans(re, md, text);
    if (ours == ref) {
      ++n_match;
      continue;
    }
    size_t k = 0;
    while (k < ours.size() && k < ref.size() && ours[k] == ref[k]) ++k;
    if (reported++ < 10) {
      // Each code point takes 6 code points of text.
      const uint32_t at = k < ref.size() ? ref[k].first : 0;
      std::fprintf(stderr,
                   "[unicode] code points U+%04X..U+%04X: pre-token #%zu "
                   "differs near U+%04X: ours (%u,%u) ref (%u,%u)\n",
                   first, last, k, first + at / 6, k < ours.size() ? ours[k].first : 0,
                   k < ours.size() ? ours[k].second : 0, at, k < ref.size() ? ref[k].second : 0);
    }
  }
  pcre2_match_data_free(md);
  pcre2_code_free(re);
  const bool complete = next_first == 0x110000;
  std::printf(
      "[unicode] pre-tokenizer sweep over all code points: %zu/%zu strings "
      "(%zu pre-tokens) match%s\n",
      n_match, n, n_pieces, complete ? "" : " (INCOMPLETE sweep)");
  return (complete && n_match == n) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string tokenizer_path, corpus_path, golden_path, name = "tokenizer";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--unicode_sweep") return UnicodeSweep(argv[i + 1]);
    if (flag == "--tokenizer") tokenizer_path = argv[i + 1];
    if (flag == "--corpus") corpus_path = argv[i + 1];
    if (flag == "--golden") golden_path = argv[i + 1];
    if (flag == "--name") name = argv[i + 1];
  }
  if (tokenizer_path.empty() || corpus_path.empty() || golden_path.empty()) {
    std::fprintf(stderr,
                 "usage: %s --tokenizer T.json --corpus C.jsonl --golden "
                 "G.jsonl [--name NAME]\n",
                 argv[0]);
    return 2;
  }
  auto tok = sae::Tokenizer::FromFile(tokenizer_path);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
    return 1;
  }
  std::vector<Json> corpus, golden;
  if (!ReadJsonl(corpus_path, &corpus)) {
    std::fprintf(stderr, "cannot read corpus %s\n", corpus_path.c_str());
    return 1;
  }
  if (!ReadJsonl(golden_path, &golden)) {
    std::fprintf(stderr,
                 "cannot read golden file %s (produced by the "
                 "tokenizer.golden test: node reference/golden.js)\n",
                 golden_path.c_str());
    return 1;
  }
  if (corpus.size() != golden.size()) {
    std::fprintf(stderr, "corpus has %zu lines but golden has %zu\n", corpus.size(), golden.size());
    return 1;
  }
  size_t match[2] = {0, 0};  // [bos, nobos]
  size_t n_tokens = 0;
  int reported = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string text = corpus[i].value("text", "");
    for (int k = 0; k < 2; ++k) {
      const bool add_bos = k == 0;
      const Json& ref = golden[i][add_bos ? "bos" : "nobos"];
      const auto ref_ids = ref["ids"].get<std::vector<int32_t>>();
      const auto ref_offsets = ref["offsets"].get<std::vector<std::pair<uint32_t, uint32_t>>>();
      auto enc = (*tok)->Encode(text, add_bos);
      if (!enc.ok()) {
        if (reported++ < 10) {
          std::fprintf(stderr, "[%s] line %zu: encode failed: %s\n", name.c_str(), i + 1,
                       enc.status().ToString().c_str());
        }
        continue;
      }
      n_tokens += enc->ids.size();
      if (enc->ids == ref_ids && enc->offsets == ref_offsets) {
        ++match[k];
        continue;
      }
      if (reported++ < 10) {
        std::fprintf(stderr,
                     "[%s] line %zu (%s) MISMATCH\n  text: %s\n  ours: %s\n"
                     "  ref:  %s\n",
                     name.c_str(), i + 1, add_bos ? "with BOS" : "no BOS", Json(text).dump().substr(0, 300).c_str(),
                     FormatEncoding(enc->ids, enc->offsets).c_str(), FormatEncoding(ref_ids, ref_offsets).c_str());
      }
    }
  }
  const size_t n = corpus.size();
  std::printf(
      "[%s] %zu strings, %zu tokens: with BOS %zu/%zu match (%.2f%%), "
      "without BOS %zu/%zu match (%.2f%%)\n",
      name.c_str(), n, n_tokens, match[0], n, 100.0 * match[0] / n, match[1], n, 100.0 * match[1] / n);
  return (match[0] == n && match[1] == n) ? 0 : 1;
}
