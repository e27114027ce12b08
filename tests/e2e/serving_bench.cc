// sae-bench-serving: what the serving layer alone costs, with the device
// taken out. The real service, executor and gRPC stack (loopback), driven by
// the real load generator (sae-client bench's RunBench) in the same process,
// in front of a runner that answers every batch at once with synthetic top-k
// results (k features per token and SAE), as an infinitely fast GPU would.
// Tokenization, admission, scheduling, packing, result placement, response
// building and serialization, HTTP/2 and the client's parsing all run as in
// production; the tokens/s it reaches is the most the host side can feed
// through, to compare with the forward pass's tokens/s (sae-bench-cuda).
//
// Usage: sae-bench-serving [--duration=5] [--concurrency=8] [--in_flight=4]
//          [--tokens=512] [--k=32] [--chunk_tokens=64] [--mode=stream|unary]
//          [--max_batch_tokens=8192] [--demo_dir=DIR]
// The last lines are "RESULT key=value", one figure each, for scripts.
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench.h"
#include "core/demo_model.h"
#include "core/engine.h"
#include "rpc/access_log.h"
#include "rpc/executor.h"
#include "rpc/metrics.h"
#include "rpc/service.h"
#include "sae_client.h"

namespace sae {
namespace {

struct Options {
  double duration_s = 5;
  int concurrency = 8;
  int in_flight = 4;
  int tokens = 512;
  int k = 32;
  int chunk_tokens = 64;
  bool stream = true;
  int max_batch_tokens = 8192;
  std::string demo_dir;    // default: $TMPDIR (or /tmp)/sae-bench-serving-demo
  std::string access_log;  // default: none
};

bool ParseFlags(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    const std::string name = a.substr(0, eq), value = eq == std::string::npos ? "" : a.substr(eq + 1);
    const int n = std::atoi(value.c_str());
    if (name == "--duration" && std::atof(value.c_str()) > 0) {
      o->duration_s = std::atof(value.c_str());
    } else if (name == "--concurrency" && n > 0) {
      o->concurrency = n;
    } else if (name == "--in_flight" && n > 0) {
      o->in_flight = n;
    } else if (name == "--tokens" && n > 1) {
      o->tokens = n;
    } else if (name == "--k" && n > 0) {
      o->k = n;
    } else if (name == "--chunk_tokens" && n > 0) {
      o->chunk_tokens = n;
    } else if (name == "--max_batch_tokens" && n > 0) {
      o->max_batch_tokens = n;
    } else if (name == "--demo_dir" && !value.empty()) {
      o->demo_dir = value;
    } else if (name == "--access_log" && !value.empty()) {
      o->access_log = value;
    } else if (name == "--mode" && (value == "stream" || value == "unary")) {
      o->stream = value == "stream";
    } else {
      std::fprintf(stderr,
                   "sae-bench-serving: bad argument %s\nusage: sae-bench-serving [--duration=5] [--concurrency=8] "
                   "[--in_flight=4] [--tokens=512] [--k=32] [--chunk_tokens=64] [--mode=stream|unary] "
                   "[--max_batch_tokens=8192] [--demo_dir=DIR] [--access_log=PATH|-]\n",
                   a.c_str());
      return false;
    }
  }
  return true;
}

// What a batch would bring back from the device: for every request, SAE and
// token, k features with values in descending order.
std::vector<SequenceResult> SyntheticResults(const std::vector<SequenceRequest>& batch,
                                             const std::vector<int64_t>& d_sae) {
  std::vector<SequenceResult> results(batch.size());
  for (size_t r = 0; r < batch.size(); ++r) {
    const SequenceRequest& request = batch[r];
    const size_t n = request.ids.size(), k = static_cast<size_t>(std::max(request.k, 0));
    results[r].saes.resize(request.sae_indices.size());
    for (size_t j = 0; j < request.sae_indices.size(); ++j) {
      SaeTopK& top = results[r].saes[j];
      top.k = request.k;
      top.indices.resize(n * k);
      top.values.resize(n * k);
      const int64_t d = d_sae[static_cast<size_t>(request.sae_indices[j])];
      for (size_t t = 0; t < n; ++t) {
        for (size_t s = 0; s < k; ++s) {
          top.indices[t * k + s] = static_cast<int32_t>((request.ids[t] * 7919 + static_cast<int64_t>(s) * 104729) % d);
          top.values[t * k + s] = 8.0f - 0.1f * static_cast<float>(s) + 0.001f * static_cast<float>(t % 97);
        }
      }
    }
  }
  return results;
}

// Whole sentences, as many as the demo tokenizer encodes in at most `tokens`
// tokens (BOS included; at least one sentence); its token count in *n.
std::string TextOfAtMost(const Engine& engine, int tokens, int* n) {
  const std::string sentence = "The cat sat on the red mat in Paris with one dog and 42 blue birds. ";
  std::string text;
  *n = 0;
  while (true) {
    absl::StatusOr<Encoding> longer = engine.tokenizer().Encode(text + sentence, /*add_bos=*/true);
    if (!longer.ok() || (!text.empty() && static_cast<int>(longer->ids.size()) > tokens)) return text;
    text += sentence;
    *n = static_cast<int>(longer->ids.size());
  }
}

double CpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + 1e-6 * (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

int Main(int argc, char** argv) {
  Options o;
  if (!ParseFlags(argc, argv, &o)) return 2;
  if (o.demo_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    o.demo_dir = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/sae-bench-serving-demo";
  }
  absl::StatusOr<DemoLayout> demo = WriteDemo(o.demo_dir);
  if (!demo.ok()) {
    std::fprintf(stderr, "sae-bench-serving: %s\n", std::string(demo.status().message()).c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(EngineOptionsForDemo(*demo));
  if (!engine.ok()) {
    std::fprintf(stderr, "sae-bench-serving: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  std::vector<int64_t> d_sae;
  std::vector<std::string> sae_names;
  for (const auto& sae : (*engine)->saes()) {
    d_sae.push_back(sae->hyperparams().d_sae);
    sae_names.push_back(sae->name());
  }

  std::atomic<int64_t> batches{0}, batch_tokens{0};
  BatchRunner runner = BlockingRunner([&](const std::vector<SequenceRequest>& batch) -> BatchResults {
    int64_t tokens = 0;
    for (const SequenceRequest& r : batch) tokens += static_cast<int64_t>(r.ids.size());
    ++batches;
    batch_tokens += tokens;
    return SyntheticResults(batch, d_sae);
  });
  ExecutorOptions executor_options;
  executor_options.max_batch_tokens = o.max_batch_tokens;
  executor_options.max_inflight_requests = 1024;
  executor_options.max_seq_len = std::max(o.tokens, 2048);
  executor_options.bos_id = (*engine)->tokenizer().bos_id();
  executor_options.metrics = std::make_shared<Metrics>();
  absl::StatusOr<std::unique_ptr<Executor>> executor = Executor::Create(std::move(runner), executor_options);
  if (!executor.ok()) {
    std::fprintf(stderr, "sae-bench-serving: %s\n", std::string(executor.status().message()).c_str());
    return 1;
  }
  ServiceOptions service_options;
  service_options.limits.max_k = std::max(256, o.k);
  // At least one whole sentence is sent, which may pass a small --tokens.
  service_options.limits.max_tokens_per_request = executor_options.max_seq_len;
  service_options.limits.max_stream_backlog = 1024;
  service_options.max_seq_len = executor_options.max_seq_len;
  service_options.metrics = executor_options.metrics;
  if (!o.access_log.empty()) {
    absl::StatusOr<std::unique_ptr<AccessLog>> log = AccessLog::Open(o.access_log);
    if (!log.ok()) {
      std::fprintf(stderr, "sae-bench-serving: %s\n", std::string(log.status().message()).c_str());
      return 1;
    }
    service_options.access_log = std::move(*log);
  }
  SaeServiceImpl service(service_options);
  service.Attach(engine->get(), executor->get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "sae-bench-serving: cannot listen on 127.0.0.1\n");
    return 1;
  }

  int n_tokens = 0;
  v1::ExtractRequest request;
  request.set_text(TextOfAtMost(**engine, o.tokens, &n_tokens));
  request.set_k(static_cast<uint32_t>(o.k));
  request.set_chunk_tokens(static_cast<uint32_t>(o.chunk_tokens));
  request.set_include_bos(true);  // every position carries k features
  for (const std::string& name : sae_names) request.add_saes(name);

  client::BenchOptions bench;
  bench.stream = o.stream;
  bench.concurrency = o.concurrency;
  bench.in_flight = o.in_flight;
  bench.duration_s = o.duration_s;
  auto client = client::SaeClient::Connect(absl::StrCat("127.0.0.1:", port));
  const double cpu_before = CpuSeconds();
  const client::BenchReport report = client::RunBench(client.get(), bench, {request});
  const double cpu_s = CpuSeconds() - cpu_before;
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  (*executor)->Shutdown();

  const int64_t entries = report.tokens * static_cast<int64_t>(sae_names.size()) * o.k;
  std::printf("%s", client::FormatBenchReport(report).c_str());
  std::printf(
      "serving layer, device removed: %d tokens per request (text, tokenized by the server), %zu SAEs x k=%d, "
      "chunks of %d tokens, %s x %d in flight%s\n",
      n_tokens, sae_names.size(), o.k, o.chunk_tokens,
      o.stream ? absl::StrCat(o.concurrency, " streams").c_str() : "unary", o.stream ? o.in_flight : o.concurrency,
      o.access_log.empty() ? "" : absl::StrCat(", access log to ", o.access_log).c_str());
  std::printf("batches: %lld, %.0f tokens each on average\n", static_cast<long long>(batches.load()),
              batches > 0 ? static_cast<double>(batch_tokens.load()) / batches.load() : 0.0);
  std::printf("CPU (client and server together): %.2f s for %lld tokens, %.2f us per token, %.1f ns per feature\n",
              cpu_s, static_cast<long long>(report.tokens), report.tokens > 0 ? 1e6 * cpu_s / report.tokens : 0.0,
              entries > 0 ? 1e9 * cpu_s / entries : 0.0);
  std::printf("RESULT serving_tokens_per_s=%.0f\n", report.tokens_per_s());
  std::printf("RESULT serving_requests_per_s=%.0f\n", report.requests_per_s());
  std::printf("RESULT serving_features_per_s=%.0f\n", report.wall_s > 0 ? entries / report.wall_s : 0.0);
  std::printf("RESULT serving_cpu_us_per_token=%.3f\n", report.tokens > 0 ? 1e6 * cpu_s / report.tokens : 0.0);
  std::printf("RESULT serving_latency_p50_ms=%.2f\n", report.latency_ms.p50);
  std::printf("RESULT serving_latency_p99_ms=%.2f\n", report.latency_ms.p99);
  std::printf("RESULT serving_failed=%lld\n", static_cast<long long>(report.failed));
  return report.failed == 0 && report.ok > 0 ? 0 : 1;
}

}  // namespace
}  // namespace sae

int main(int argc, char** argv) { return sae::Main(argc, argv); }
