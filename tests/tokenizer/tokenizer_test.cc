// Unit tests for the tokenizer: loader error matrix, BPE details, added
// tokens, offsets, invalid UTF-8, decode, demo tokenizer, threads. Bit-exact
// agreement with HF tokenizers is checked separately (tokenizer.conformance_*).
#include "tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"
#include "tokenizer/demo_tokenizer.h"

namespace sae {
namespace {

using Json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

constexpr int32_t kBos = 1000;
constexpr int32_t kEot = 1001;

std::string Bl(std::string_view bytes) { return BytesToByteLevel(bytes); }

// A small Llama 3 style tokenizer: the 256 byte symbols (id = byte), a few
// merges, <|bos|> / <|eot|> / <x> / <x>y as added tokens.
Json BaseJson(bool pair_merges = false) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[Bl(std::string(1, char(b)))] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {" ", "t"}, {"h", "e"}, {" t", "he"}, {"c", "a"}, {"ca", "t"}, {" ", "cat"}, {" ", " "}, {"b", "c"}, {"a", "bc"}};
  int32_t next = 256;
  Json merge_list = Json::array();
  for (const auto& [l, r] : merges) {
    if (!vocab.contains(Bl(l + r))) vocab[Bl(l + r)] = next++;
    if (pair_merges) {
      merge_list.push_back(Json::array({Bl(l), Bl(r)}));
    } else {
      merge_list.push_back(Bl(l) + " " + Bl(r));
    }
  }
  vocab[Bl("xyz")] = next++;  // in the vocab but not reachable by merges
  const auto added = [](int32_t id, const char* content, bool special) {
    return Json{{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", special}};
  };
  return Json{
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", Json::array({added(kBos, "<|bos|>", true), added(kEot, "<|eot|>", true),
                                    added(1002, "<x>", false), added(1003, "<x>y", false)})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers", Json::array({Json{{"type", "Split"},
                                            {"pattern", {{"Regex", std::string(kLlama3SplitPattern)}}},
                                            {"behavior", "Isolated"},
                                            {"invert", false}},
                                       Json{{"type", "ByteLevel"},
                                            {"add_prefix_space", false},
                                            {"trim_offsets", true},
                                            {"use_regex", false}}})}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", Json::array({Json{{"SpecialToken", {{"id", "<|bos|>"}}}}, Json{{"Sequence", {{"id", "A"}}}}})},
        {"special_tokens", {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {kBos}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"byte_fallback", false},
        {"ignore_merges", true},
        {"vocab", vocab},
        {"merges", merge_list}}}};
}

std::unique_ptr<Tokenizer> Load(const Json& j) {
  auto tok = Tokenizer::FromJson(j.dump(), "test");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

std::vector<int32_t> Ids(const Tokenizer& tok, std::string_view text, bool bos = false) {
  auto enc = tok.Encode(text, bos);
  EXPECT_TRUE(enc.ok()) << enc.status();
  return enc.ok() ? enc->ids : std::vector<int32_t>{};
}

std::vector<std::string> Pieces(const Tokenizer& tok, std::string_view text) {
  std::vector<std::string> out;
  for (int32_t id : Ids(tok, text)) out.emplace_back(tok.TokenBytes(id));
  return out;
}

TEST(TokenizerTest, LoadsAndEncodesWithMerges) {
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 1004);
  EXPECT_EQ(tok->bos_id(), kBos);
  EXPECT_THAT(Pieces(*tok, "the cat"), ElementsAre("t", "he", " cat"));
  EXPECT_THAT(Pieces(*tok, " the"), ElementsAre(" the"));
  EXPECT_EQ(tok->TokenToId("Ġthe"), tok->TokenToId(Bl(" the")));
  EXPECT_EQ(tok->TokenToId("<|eot|>"), kEot);
  EXPECT_EQ(tok->TokenToId("nope-not-a-token"), std::nullopt);
  EXPECT_TRUE(tok->IsSpecial(kBos));
  EXPECT_FALSE(tok->IsSpecial(1002));
}

TEST(TokenizerTest, MergesStringAndPairFormsAgree) {
  auto a = Load(BaseJson(false));
  auto b = Load(BaseJson(true));
  ASSERT_TRUE(a && b);
  for (const char* s : {"the cat", "  the  cat  ", "abc", "cathe the", ""}) {
    EXPECT_EQ(Ids(*a, s), Ids(*b, s)) << s;
  }
}

TEST(TokenizerTest, LowestRankMergeWins) {
  // Merges (in rank order) include "b c" before "a bc", so "abc" -> "abc".
  Json j = BaseJson();
  j["model"]["ignore_merges"] = false;  // "abc" is in the vocab
  auto tok = Load(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Pieces(*tok, "abc"), ElementsAre("abc"));
  // With "a b" ranked first instead, "ab" forms and "c" stays alone.
  j["model"]["vocab"][Bl("ab")] = 999;
  j["model"]["merges"].insert(j["model"]["merges"].begin(), "a b");
  tok = Load(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Pieces(*tok, "abc"), ElementsAre("ab", "c"));
}

TEST(TokenizerTest, IgnoreMergesEmitsWholeVocabPreToken) {
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Pieces(*tok, "xyz"), ElementsAre("xyz"));
  Json j = BaseJson();
  j["model"]["ignore_merges"] = false;
  tok = Load(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Pieces(*tok, "xyz"), ElementsAre("x", "y", "z"));
}

TEST(TokenizerTest, LongPreTokenUsesSameMergeOrder) {
  // > 64 bytes takes the heap path; the result must not depend on length.
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  for (const std::string unit : {"he", "cat", "hecat"}) {
    std::string s;
    for (int i = 0; i < 40; ++i) s += unit;
    const auto short_pieces = Pieces(*tok, unit + unit);
    const auto pieces = Pieces(*tok, s);
    ASSERT_EQ(pieces.size(), 20 * short_pieces.size()) << unit;
    for (size_t i = 0; i < pieces.size(); ++i) {
      EXPECT_EQ(pieces[i], short_pieces[i % short_pieces.size()]) << unit;
    }
  }
  // "    " and " x" are pre-tokens; "  " merges pairwise from the left and
  // there is no " x" merge.
  EXPECT_THAT(Pieces(*tok, std::string(5, ' ') + "x"), ElementsAre("  ", "  ", " ", "x"));
}

TEST(TokenizerTest, AddedTokensMatchedInRawText) {
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  auto enc = tok->Encode("the<|eot|>cat", /*add_bos=*/true);
  ASSERT_TRUE(enc.ok()) << enc.status();
  EXPECT_EQ(enc->ids.front(), kBos);
  EXPECT_EQ(enc->ids[3], kEot);
  EXPECT_THAT(enc->offsets, ElementsAre(Pair(0, 0), Pair(0, 1), Pair(1, 3), Pair(3, 10), Pair(10, 13)));
  // Leftmost-longest: "<x>y" beats "<x>"; a partial token is plain text.
  EXPECT_THAT(Ids(*tok, "<x>y<x>z"), ElementsAre(1003, 1002, 'z'));
  EXPECT_THAT(Ids(*tok, "<|eot|"), ::testing::Not(::testing::Contains(kEot)));
  // The regex sees each side separately (no lookahead across the token).
  EXPECT_THAT(Pieces(*tok, "a  <|eot|>"), ElementsAre("a", "  ", "<|eot|>"));
}

TEST(TokenizerTest, OffsetsAreCodePoints) {
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  // "é" has no merge: two byte tokens, both spanning the whole character.
  auto enc = tok->Encode("aé😀 b", false);
  ASSERT_TRUE(enc.ok());
  EXPECT_THAT(enc->offsets, ElementsAre(Pair(0, 1), Pair(1, 2), Pair(1, 2), Pair(2, 3), Pair(2, 3), Pair(2, 3),
                                        Pair(2, 3), Pair(3, 4), Pair(4, 5)));
  enc = tok->Encode("", true);
  ASSERT_TRUE(enc.ok());
  EXPECT_THAT(enc->ids, ElementsAre(kBos));
  EXPECT_THAT(enc->offsets, ElementsAre(Pair(0, 0)));
}

TEST(TokenizerTest, InvalidUtf8IsRejectedWithOffset) {
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  const std::vector<std::pair<std::string, int>> cases = {
      {"\xff", 0},
      {"ab\xc3", 2},                // truncated
      {"abc\xc0\xaf", 3},           // overlong '/'
      {"\xe0\x80\x80", 0},          // overlong
      {"x\xed\xa0\x80", 1},         // surrogate U+D800
      {"\xf4\x90\x80\x80", 0},      // > U+10FFFF
      {"ok \x80", 3},               // lone continuation
      {"12345678\xf0\x9f\x98", 8},  // truncated emoji after the ASCII path
  };
  for (const auto& [text, offset] : cases) {
    auto enc = tok->Encode(text, true);
    ASSERT_FALSE(enc.ok()) << text;
    EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(enc.status().message()), HasSubstr("byte offset " + std::to_string(offset)));
    EXPECT_EQ(FindInvalidUtf8(text), static_cast<size_t>(offset));
  }
  EXPECT_EQ(FindInvalidUtf8(std::string("a\0b\xf4\x8f\xbf\xbf", 7)), std::nullopt);
}

TEST(TokenizerTest, DecodeRoundTripsAndReplacesPartialUtf8) {
  auto tok = Load(BaseJson());
  ASSERT_NE(tok, nullptr);
  for (const char* s : {"the cat", "aé😀 b\n\t", "<|eot|>x<x>y", "", "  \r\n 123 'll"}) {
    EXPECT_EQ(tok->Decode(Ids(*tok, s, /*bos=*/false)), s);
  }
  const auto ids = Ids(*tok, "é");
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(tok->TokenPiece(ids[0]), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->Decode({ids[0]}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->TokenPiece(kEot), "<|eot|>");
  EXPECT_EQ(tok->TokenPiece(-5), "");
  EXPECT_EQ(tok->Decode({kBos, 't', 999999}), "<|bos|>t");
}

TEST(TokenizerTest, Utf8LossyMatchesRustSemantics) {
  EXPECT_EQ(Utf8Lossy("a\xF0\x9F\x98z"), "a\xEF\xBF\xBDz");  // one U+FFFD
  EXPECT_EQ(Utf8Lossy("\xE0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"),
            "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(Utf8Lossy("\xC3\xA9"), "\xC3\xA9");
}

// Each case breaks one field; the error must name that field and the origin.
TEST(TokenizerTest, LoaderErrorMatrix) {
  struct Case {
    const char* name;
    std::function<void(Json&)> mutate;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"root not object", [](Json& j) { j = Json::array(); }, "(root)"},
      {"no model", [](Json& j) { j.erase("model"); }, "'model'"},
      {"model type", [](Json& j) { j["model"]["type"] = "WordPiece"; }, "'model.type': unsupported 'WordPiece'"},
      {"no vocab", [](Json& j) { j["model"].erase("vocab"); }, "'model.vocab': missing"},
      {"vocab id type", [](Json& j) { j["model"]["vocab"]["zz"] = "x"; }, "'model.vocab'"},
      {"vocab id range", [](Json& j) { j["model"]["vocab"]["zz"] = -1; }, "out of range"},
      {"duplicate id", [](Json& j) { j["model"]["vocab"]["zz"] = 5; }, "used twice"},
      {"missing byte", [](Json& j) { j["model"]["vocab"].erase("A"); }, "byte 0x41"},
      {"no merges", [](Json& j) { j["model"].erase("merges"); }, "'model.merges': missing"},
      {"bad merge form", [](Json& j) { j["model"]["merges"][0] = "abc"; }, "'model.merges[0]'"},
      {"bad merge pair", [](Json& j) { j["model"]["merges"][1] = Json::array({"a"}); }, "'model.merges[1]'"},
      {"merge not in vocab", [](Json& j) { j["model"]["merges"][2] = "q z"; }, "not in vocab"},
      {"byte_fallback", [](Json& j) { j["model"]["byte_fallback"] = true; }, "model.byte_fallback"},
      {"dropout", [](Json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout"},
      {"subword prefix", [](Json& j) { j["model"]["continuing_subword_prefix"] = "##"; },
       "model.continuing_subword_prefix"},
      {"normalizer",
       [](Json& j) {
         j["normalizer"] = {{"type", "NFC"}};
       },
       "'normalizer'"},
      {"truncation",
       [](Json& j) {
         j["truncation"] = {{"max_length", 8}};
       },
       "'truncation'"},
      {"no pre_tokenizer", [](Json& j) { j.erase("pre_tokenizer"); }, "'pre_tokenizer': missing"},
      {"pre_tokenizer kind",
       [](Json& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       "'pre_tokenizer.type': unsupported 'Whitespace'"},
      {"split behavior", [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
       "pre_tokenizer.pretokenizers[0].behavior"},
      {"bad regex", [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "("; },
       "does not compile"},
      {"no byte level", [](Json& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); }, "no ByteLevel"},
      {"prefix space", [](Json& j) { j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true; },
       "add_prefix_space"},
      {"no decoder", [](Json& j) { j.erase("decoder"); }, "'decoder'"},
      {"decoder kind", [](Json& j) { j["decoder"]["type"] = "WordPiece"; }, "'decoder.type'"},
      {"post kind",
       [](Json& j) {
         j["post_processor"] = {{"type", "BertProcessing"}};
       },
       "'post_processor.type'"},
      {"post ids", [](Json& j) { j["post_processor"]["special_tokens"] = Json::object(); },
       "post_processor.special_tokens"},
      // Unbounded nesting recursed once per level (a deep file overflowed the stack).
      {"nested post sequence",
       [](Json& j) {
         Json inner = {{"type", "Sequence"}, {"processors", Json::array({j["post_processor"]})}};
         j["post_processor"] = {{"type", "Sequence"}, {"processors", Json::array({inner})}};
       },
       "'post_processor.processors[0].type': a Sequence inside a Sequence"},
      {"added lstrip", [](Json& j) { j["added_tokens"][0]["lstrip"] = true; }, "'added_tokens[0].lstrip'"},
      {"added content", [](Json& j) { j["added_tokens"][1].erase("content"); }, "'added_tokens[1].content'"},
  };
  for (const auto& c : cases) {
    Json j = BaseJson();
    c.mutate(j);
    auto tok = Tokenizer::FromJson(j.dump(), "my.json");
    ASSERT_FALSE(tok.ok()) << c.name;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(std::string(tok.status().message()), HasSubstr(c.expected)) << c.name;
    EXPECT_THAT(std::string(tok.status().message()), HasSubstr("my.json")) << c.name;
  }
  auto bad_json = Tokenizer::FromJson("{\"model\": [1, 2", "broken.json");
  ASSERT_FALSE(bad_json.ok());
  EXPECT_THAT(std::string(bad_json.status().message()), HasSubstr("broken.json: invalid JSON"));
  auto missing = Tokenizer::FromFile("/nonexistent/tokenizer.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/tokenizer.json"));
  // std::ifstream opens a directory and reads nothing: that must not pass as an empty file.
  const std::string dir = ::testing::TempDir();
  auto directory = Tokenizer::FromFile(dir);
  ASSERT_FALSE(directory.ok());
  EXPECT_EQ(directory.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(directory.status().message()), HasSubstr(dir + ": is a directory"));
}

TEST(DemoTokenizerTest, DeterministicAndLlama3Shaped) {
  const std::string json = MakeDemoTokenizerJson();
  EXPECT_EQ(json, MakeDemoTokenizerJson());
  auto tok = Tokenizer::FromJson(json, "demo");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), kDemoVocabSize);
  EXPECT_EQ((*tok)->bos_id(), kDemoBosId);
  EXPECT_EQ((*tok)->TokenToId("<|begin_of_text|>"), kDemoBosId);
  EXPECT_EQ((*tok)->TokenToId("<|end_of_text|>"), kDemoEosId);
  EXPECT_TRUE((*tok)->IsSpecial(kDemoEosId));
  // Model vocab fills every id below the special tokens.
  for (int32_t id = 0; id < kDemoBosId; ++id) {
    EXPECT_FALSE((*tok)->TokenBytes(id).empty()) << id;
  }
  const Json j = Json::parse(json);
  EXPECT_EQ(j["model"]["ignore_merges"], true);
  EXPECT_EQ(j["model"]["byte_fallback"], false);
  EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], std::string(kLlama3SplitPattern));
  // Learned words become single tokens; the corpus round-trips.
  auto enc = (*tok)->Encode("The cat sat on the mat.", true);
  ASSERT_TRUE(enc.ok());
  EXPECT_EQ(enc->ids.front(), kDemoBosId);
  EXPECT_LE(enc->ids.size(), 9u);
  EXPECT_EQ((*tok)->TokenPiece(*(*tok)->TokenToId("Ġcat")), " cat");
  auto corpus = (*tok)->Encode(DemoTrainingCorpus(), false);
  ASSERT_TRUE(corpus.ok());
  EXPECT_EQ((*tok)->Decode(corpus->ids), DemoTrainingCorpus());
}

// Long runs hit PCRE2 backtracking (\s+(?!\S)) and the heap BPE path; they
// must neither fail nor lose text.
TEST(TokenizerTest, LargeInputsEncodeAndRoundTrip) {
  auto tok = Tokenizer::FromJson(MakeDemoTokenizerJson(), "demo");
  ASSERT_TRUE(tok.ok());
  for (const std::string unit : {" ", "\n", " \n", "\t ", "a", "1", "!", " !", "'s", "\xC2\xA0", "\xE4\xB8\xAD",
                                 "\xF0\x9F\x98\x80", "e\xCC\x81", "<|"}) {
    std::string text;
    while (text.size() < (1 << 16)) text += unit;
    text += "x";
    auto enc = (*tok)->Encode(text, true);
    ASSERT_TRUE(enc.ok()) << enc.status();
    EXPECT_EQ((*tok)->Decode(absl::MakeConstSpan(enc->ids).subspan(1)), text);
    // The bound the server refuses oversized texts by, before encoding.
    EXPECT_GE((enc->ids.size() - 1) * (*tok)->max_token_bytes(), text.size()) << unit;
  }
}

TEST(TokenizerTest, MaxTokenBytesIsTheLongestToken) {
  auto tok = Tokenizer::FromJson(MakeDemoTokenizerJson(), "demo");
  ASSERT_TRUE(tok.ok());
  size_t longest = 0;
  for (int32_t id = 0; id < (*tok)->vocab_size(); ++id) longest = std::max(longest, (*tok)->TokenBytes(id).size());
  EXPECT_EQ((*tok)->max_token_bytes(), longest);
  EXPECT_GT(longest, 1u);
  // An added token longer than every vocab entry is the longest.
  Json j = BaseJson();
  const std::string added(200, 'x');
  j["added_tokens"].push_back(
      Json{{"id", 2000}, {"content", added}, {"special", false}, {"normalized", false}, {"single_word", false}});
  auto with_added = Load(j);
  ASSERT_NE(with_added, nullptr);
  EXPECT_EQ(with_added->max_token_bytes(), 200u);
  auto enc = with_added->Encode(added + added, false);
  ASSERT_TRUE(enc.ok());
  EXPECT_EQ(enc->ids, (std::vector<int32_t>{2000, 2000}));
}

TEST(TokenizerTest, OnigToPcre2PatternSpellsOutUnicodeClasses) {
  const std::string p = OnigToPcre2Pattern(R"(\s+(?!\S)|[^\s\p{L}]\p{N})");
  EXPECT_THAT(p, HasSubstr(R"([\t\n\x{0B}\f\r\x{85}\p{Z}]+)"));
  EXPECT_THAT(p, HasSubstr(R"((?![^\t\n\x{0B}\f\r\x{85}\p{Z}]))"));
  EXPECT_THAT(p, HasSubstr(R"([^\t\n\x{0B}\f\r\x{85}\p{Z}\p{L}\x{1C89})"));
  EXPECT_THAT(p, HasSubstr(R"([\p{N}\x{10D40}-\x{10D49})"));
}

TEST(TokenizerTest, ConcurrentEncodeMatchesSerial) {
  auto tok = Tokenizer::FromJson(MakeDemoTokenizerJson(), "demo");
  ASSERT_TRUE(tok.ok());
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) {
    texts.push_back(std::string(DemoTrainingCorpus().substr(i * 37, 200 + i)) + std::string(i, 'x') +
                    " <|end_of_text|> é😀");
  }
  std::vector<std::vector<int32_t>> serial;
  for (const auto& t : texts) serial.push_back(Ids(**tok, t));
  std::vector<std::thread> threads;
  std::vector<int> failures(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto enc = (*tok)->Encode(texts[i], false);
          if (!enc.ok() || enc->ids != serial[i]) ++failures[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

}  // namespace
}  // namespace sae
