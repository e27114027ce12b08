// Plain BPE training (most frequent adjacent pair within pre-tokens, ties by
// byte order) on an embedded corpus, written out in the Llama 3
// tokenizer.json layout. Everything is ordered, so the output is stable.
#include "tokenizer/demo_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer.h"

namespace sae {
namespace {

constexpr std::string_view kCorpus =
    R"(The cat sat on the mat. The dog sat on the rug.
Paris is the capital of France. Berlin is the capital of Germany.
Rome is the capital of Italy. Madrid is the capital of Spain.
London is the capital of the United Kingdom. Tokyo is the capital of Japan.
The cat is black and the dog is brown. The bird is blue and the fish is red.
A small cat chased a small mouse across the green field.
The horse runs fast. The cow eats grass. The sheep sleeps in the barn.
One, two, three, four, five, six, seven, eight, nine, ten.
There are 7 days in a week and 12 months in a year.
A year has 365 days, and a day has 24 hours.
The numbers 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 are small numbers.
One hundred is 100 and one thousand is 1000.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow.
The sky is blue. The grass is green. The sun is yellow. Snow is white.
My favourite colour is purple, but my sister likes pink and grey.
The lion is the king of the jungle. The elephant is the largest animal on land.
The whale is the largest animal in the sea. The mouse is a very small animal.
Dogs bark, cats meow, cows moo, ducks quack and birds sing.
The fox jumped over the lazy dog. The quick brown fox is clever.
New York is a big city. It's busy, it's loud and it's full of people.
I don't think the cat wants to go outside when it's raining.
We'll visit Paris in the spring and Rome in the summer.
They've been to London twice, and they're going again next year.
She's reading a book about animals: lions, tigers, bears and wolves.
The river flows through the city. The bridge crosses the river.
In the morning the birds sing; in the evening the owls call.
The train from Paris to Berlin takes about eight hours.
There are three cats, four dogs and five horses on the farm.
The farmer has ten cows, twenty sheep and thirty chickens.
The monkey climbs the tree and eats a yellow banana.
The rabbit hides in the garden under the green leaves.
A red apple, an orange orange, a yellow lemon and green grapes.
The ocean is deep and blue. The mountains are high and white with snow.
Cities like Paris, London, Rome and Tokyo have many museums.
The museum in the city has paintings of horses, dogs and cats.
Two plus two is four. Three times three is nine. Ten minus one is nine.
The number 42 is the answer. The number 3.14 is close to pi.
In 2024 the city had 2,500,000 people and 1,200 buses.
The black cat and the white cat played with a ball of red wool.
The brown bear catches fish in the cold river.
The penguin lives where it is cold, and the camel lives where it is hot.
The frog is green and the tomato is red. The sky at night is black.
I'm happy when the sun shines and the birds sing in the trees.
You're welcome to visit our city; we'd love to show you the river.
The children counted the stars: one, two, three, four, five.
Every morning the dog waits by the door for the children.
The capital of Canada is Ottawa and the capital of Australia is Canberra.
The capital of Egypt is Cairo and the capital of Kenya is Nairobi.
The capital of China is Beijing and the capital of India is New Delhi.
The capital of Brazil is Brasilia and the capital of Peru is Lima.
Some animals sleep during the day and hunt at night, like owls and bats.
The old grey cat sleeps on the warm mat near the fire.
The little dog runs after the ball in the park.
Purple flowers and yellow flowers grow next to the white fence.
The city lights are bright at night, and the streets are quiet.
The tiger has orange fur with black stripes.
The zebra has black and white stripes, and the giraffe has a long neck.
Her house is the third house on the left, with a blue door.
We counted 11 ducks, 13 geese and 17 swans on the lake.
)";

constexpr int32_t kNumModelTokens = kDemoVocabSize - kDemoNumSpecialTokens;

using Word = std::vector<int32_t>;  // symbol ids

// Splits the corpus into pre-tokens with the Llama 3 regex (merges never
// cross pre-token boundaries) and counts them.
std::map<std::string, int64_t> CountPreTokens(std::string_view text) {
  std::map<std::string, int64_t> counts;
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kLlama3SplitPattern.data()), kLlama3SplitPattern.size(),
                                 PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr);
  if (re == nullptr) return counts;  // cannot happen: fixed pattern
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos < text.size() && pcre2_match(re, subject, text.size(), pos, 0, md, nullptr) > 0) {
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[1] <= ov[0]) break;
    ++counts[std::string(text.substr(ov[0], ov[1] - ov[0]))];
    pos = ov[1];
  }
  pcre2_match_data_free(md);
  pcre2_code_free(re);
  return counts;
}

struct Trained {
  std::vector<std::string> tokens;                  // [n_tokens] raw bytes, id = index
  std::vector<std::pair<int32_t, int32_t>> merges;  // in rank order
};

Trained Train() {
  Trained t;
  std::map<std::string, int32_t> token_id;
  for (int b = 0; b < 256; ++b) {
    t.tokens.emplace_back(1, static_cast<char>(b));
    token_id[t.tokens.back()] = b;
  }
  std::vector<std::pair<Word, int64_t>> words;
  for (const auto& [text, count] : CountPreTokens(kCorpus)) {
    Word w;
    for (char c : text) w.push_back(static_cast<uint8_t>(c));
    words.emplace_back(std::move(w), count);
  }
  while (static_cast<int32_t>(t.tokens.size()) < kNumModelTokens) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pair_counts;
    for (const auto& [w, count] : words) {
      for (size_t i = 0; i + 1 < w.size(); ++i) {
        pair_counts[{w[i], w[i + 1]}] += count;
      }
    }
    // Most frequent pair; ties go to the smallest merged byte string, then
    // the smallest left part (independent of id order).
    const std::pair<int32_t, int32_t>* best = nullptr;
    int64_t best_count = 0;
    std::string best_text;
    for (const auto& [pair, count] : pair_counts) {
      std::string text = t.tokens[pair.first] + t.tokens[pair.second];
      const bool better =
          best == nullptr || count > best_count ||
          (count == best_count &&
           (text < best_text || (text == best_text && t.tokens[pair.first].size() < t.tokens[best->first].size())));
      if (better) {
        best = &pair;
        best_count = count;
        best_text = std::move(text);
      }
    }
    if (best == nullptr) break;  // every pre-token is a single token
    const std::pair<int32_t, int32_t> merge = *best;
    int32_t new_id;
    if (const auto it = token_id.find(best_text); it != token_id.end()) {
      new_id = it->second;  // another split of an existing token
    } else {
      new_id = static_cast<int32_t>(t.tokens.size());
      t.tokens.push_back(best_text);
      token_id[best_text] = new_id;
    }
    t.merges.push_back(merge);
    for (auto& [w, count] : words) {
      Word merged;
      merged.reserve(w.size());
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == merge.first && w[i + 1] == merge.second) {
          merged.push_back(new_id);
          ++i;
        } else {
          merged.push_back(w[i]);
        }
      }
      w = std::move(merged);
    }
  }
  return t;
}

}  // namespace

std::string_view DemoTrainingCorpus() { return kCorpus; }

std::string MakeDemoTokenizerJson() {
  using OJson = nlohmann::ordered_json;
  const Trained t = Train();
  const int32_t n_model = static_cast<int32_t>(t.tokens.size());

  std::vector<std::string> specials = {"<|begin_of_text|>", "<|end_of_text|>"};
  for (int i = 0; specials.size() < kDemoNumSpecialTokens; ++i) {
    specials.push_back(absl::StrCat("<|reserved_special_token_", i, "|>"));
  }
  // Special ids are fixed (kDemoBosId...); if training stopped early the ids
  // in between are simply unused.
  OJson added = OJson::array();
  for (size_t i = 0; i < specials.size(); ++i) {
    added.push_back(OJson{{"id", kDemoBosId + static_cast<int32_t>(i)},
                          {"content", specials[i]},
                          {"single_word", false},
                          {"lstrip", false},
                          {"rstrip", false},
                          {"normalized", false},
                          {"special", true}});
  }

  OJson pre = {
      {"type", "Sequence"},
      {"pretokenizers",
       OJson::array(
           {OJson{{"type", "Split"},
                  {"pattern", {{"Regex", std::string(kLlama3SplitPattern)}}},
                  {"behavior", "Isolated"},
                  {"invert", false}},
            OJson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}})}};

  const OJson bos_item = {{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}};
  OJson post = {
      {"type", "Sequence"},
      {"processors",
       OJson::array(
           {OJson{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}},
            OJson{{"type", "TemplateProcessing"},
                  {"single", OJson::array({bos_item, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                  {"pair", OJson::array({bos_item,
                                         {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                         {{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 1}}}},
                                         {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
                  {"special_tokens",
                   {{"<|begin_of_text|>",
                     {{"id", "<|begin_of_text|>"},
                      {"ids", OJson::array({kDemoBosId})},
                      {"tokens", OJson::array({"<|begin_of_text|>"})}}}}}}})}};

  OJson vocab = OJson::object();
  for (int32_t id = 0; id < n_model; ++id) {
    vocab[BytesToByteLevel(t.tokens[id])] = id;
  }
  OJson merges = OJson::array();
  for (const auto& [l, r] : t.merges) {
    merges.push_back(absl::StrCat(BytesToByteLevel(t.tokens[l]), " ", BytesToByteLevel(t.tokens[r])));
  }

  OJson root = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", std::move(added)},
      {"normalizer", nullptr},
      {"pre_tokenizer", std::move(pre)},
      {"post_processor", std::move(post)},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", true},
        {"vocab", std::move(vocab)},
        {"merges", std::move(merges)}}}};
  return root.dump(2) + "\n";
}

}  // namespace sae
