// Encode throughput (one thread) on the conformance corpus, next to the
// reference's throughput on the same corpus in the same run.
//
// Usage: bench_tokenizer --tokenizer T.json --corpus C.jsonl
//            [--reference "node reference/bench.js"] [benchmark flags]
// The reference command gets "T.json C.jsonl" appended.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tokenizer/demo_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace {

std::unique_ptr<sae::Tokenizer> g_tokenizer;
std::vector<std::string> g_corpus;  // [n_strings]
size_t g_corpus_bytes = 0;

// Each string encoded separately, as the server does per request.
void BM_EncodeCorpus(benchmark::State& state) {
  size_t n_tokens = 0;
  for (auto _ : state) {
    for (const auto& text : g_corpus) {
      auto enc = g_tokenizer->Encode(text, /*add_bos=*/false);
      if (!enc.ok()) state.SkipWithError(enc.status().ToString().c_str());
      n_tokens += enc->ids.size();
      benchmark::DoNotOptimize(enc->ids.data());
    }
  }
  const double bytes = static_cast<double>(g_corpus_bytes) * state.iterations();
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["MB/s"] = benchmark::Counter(bytes / 1e6, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(n_tokens), benchmark::Counter::kIsRate);
}

// Plain English prose (the demo corpus), the common case.
void BM_EncodeEnglish(benchmark::State& state) {
  const std::string text(sae::DemoTrainingCorpus());
  for (auto _ : state) {
    auto enc = g_tokenizer->Encode(text, /*add_bos=*/true);
    benchmark::DoNotOptimize(enc->ids.data());
  }
  const double bytes = static_cast<double>(text.size()) * state.iterations();
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["MB/s"] = benchmark::Counter(bytes / 1e6, benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// Wall time, as the reference script measures.
BENCHMARK(BM_EncodeCorpus)->Unit(benchmark::kMillisecond)->MinTime(2.0)->UseRealTime();
BENCHMARK(BM_EncodeEnglish)->Unit(benchmark::kMicrosecond)->MinTime(1.0)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  std::string tokenizer_path, corpus_path, reference;
  // Take our flags out before benchmark::Initialize sees argv.
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (has_value && std::strcmp(argv[i], "--tokenizer") == 0) {
      tokenizer_path = argv[++i];
    } else if (has_value && std::strcmp(argv[i], "--corpus") == 0) {
      corpus_path = argv[++i];
    } else if (has_value && std::strcmp(argv[i], "--reference") == 0) {
      reference = argv[++i];
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (tokenizer_path.empty() || corpus_path.empty()) {
    std::fprintf(stderr,
                 "usage: %s --tokenizer T.json --corpus C.jsonl "
                 "[--reference CMD]\n",
                 argv[0]);
    return 2;
  }
  auto tok = sae::Tokenizer::FromFile(tokenizer_path);
  if (!tok.ok()) {
    std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
    return 1;
  }
  g_tokenizer = std::move(*tok);
  std::ifstream in(corpus_path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("text")) continue;
    g_corpus.push_back(j["text"].get<std::string>());
    g_corpus_bytes += g_corpus.back().size();
  }
  std::printf("corpus: %zu strings, %zu bytes\n", g_corpus.size(), g_corpus_bytes);

  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();

  if (!reference.empty()) {
    const std::string cmd = reference + " '" + tokenizer_path + "' '" + corpus_path + "'";
    std::printf("\nreference (same corpus, same run): %s\n", cmd.c_str());
    std::fflush(stdout);
    const int rc = std::system(cmd.c_str());
    if (rc != 0) {
      std::fprintf(stderr, "reference command failed (%d)\n", rc);
      return 1;
    }
  }
  return 0;
}
