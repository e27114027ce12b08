// The Prometheus endpoint: scraped over HTTP on loopback after a known set of
// requests, parsed as the text exposition format, and checked count by count.
// Also checks the thread-stack floor that keeps civetweb's threads alive.
#include "rpc/metrics.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "nlohmann/json.hpp"
#include "prometheus_scrape.h"
#include "serving_env.h"

namespace sae {
namespace {

using testing::HttpGet;
using testing::ParseScrape;
using testing::Scrape;
using testing::ServingEnv;

v1::ExtractRequest TextRequest(const std::string& text) {
  v1::ExtractRequest request;
  request.set_text(text);
  return request;
}

// The batch histograms after `batches` batches of `sequences` sequences and
// `tokens` tokens in all, each with a forward and an SAE time.
void ExpectBatches(const Scrape& s, int batches, int sequences, int64_t tokens) {
  EXPECT_EQ(s.Get("sae_forward_seconds_count"), batches);
  EXPECT_EQ(s.Get("sae_encode_seconds_count"), batches);
  EXPECT_GT(s.Get("sae_encode_seconds_sum"), 0);
  EXPECT_LE(s.Get("sae_encode_seconds_sum"), s.Get("sae_forward_seconds_sum"));
  EXPECT_EQ(s.Get("sae_batch_requests_count"), batches);
  EXPECT_EQ(s.Get("sae_batch_requests_sum"), sequences);
  EXPECT_EQ(s.Get("sae_batch_tokens_sum"), static_cast<double>(tokens));
  EXPECT_EQ(s.Get("sae_tokens_total"), static_cast<double>(tokens));
}

TEST(MetricsTest, ScrapeParsesAndCountsRequests) {
  ExecutorOptions executor;
  executor.max_batch_tokens = 4096;
  executor.max_inflight_requests = 8;
  ServiceOptions service;
  service.limits.default_k = 4;
  service.limits.max_k = 8;
  service.limits.max_tokens_per_request = 64;
  std::string error;
  auto env = ServingEnv::Start(executor, service, &error);
  ASSERT_NE(env, nullptr) << error;
  auto server = MetricsServer::Start("127.0.0.1:0", env->metrics->registry());
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);

  // Nothing yet: every family is declared, all at zero.
  Scrape before = ParseScrape(HttpGet((*server)->port(), "/metrics"));
  EXPECT_EQ(before.Get("sae_request_failures_total{reason=\"invalid_argument\"}"), 0);
  EXPECT_EQ(before.Get("sae_request_failures_total{reason=\"already_exists\"}"), 0);
  EXPECT_EQ(before.Get("sae_inflight_requests"), 0);
  EXPECT_FALSE(before.Has("sae_backend_memory_bytes{kind=\"tensors\"}"));  // set by the engine thread per batch

  auto client = env->NewClient();
  const std::vector<std::string> texts = {"The cat sat.", "A blue bird and a green fish.", "Paris"};
  int64_t n_tokens = 0;
  for (const std::string& text : texts) {
    std::vector<v1::ExtractResponse> responses;
    ASSERT_TRUE(client->Extract(TextRequest(text), &responses).ok());
    n_tokens += responses.back().total_tokens();
  }
  std::vector<v1::ExtractResponse> responses;
  v1::ExtractRequest bad = TextRequest("hi");
  bad.set_k(1000);
  ASSERT_EQ(client->Extract(bad, &responses).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::TokenizeRequest tokenize;
  tokenize.set_text("The cat sat.");
  v1::TokenizeResponse tokenized;
  ASSERT_TRUE(client->Tokenize(tokenize, &tokenized).ok());
  v1::ListSaesResponse saes;
  ASSERT_TRUE(client->ListSaes(&saes).ok());
  v1::InfoResponse info;
  ASSERT_TRUE(client->Info(&info).ok());

  const Scrape s = ParseScrape(HttpGet((*server)->port(), "/metrics"));
  EXPECT_EQ(s.types.at("sae_request_duration_seconds"), "histogram");
  EXPECT_EQ(s.types.at("sae_tokens_total"), "counter");
  EXPECT_EQ(s.types.at("sae_inflight_requests"), "gauge");
  for (const auto& [name, type] : s.types) EXPECT_FALSE(s.help.at(name).empty()) << name;

  // By RPC and outcome: the served, and the refused apart from them.
  EXPECT_EQ(s.Get("sae_request_duration_seconds_count{outcome=\"ok\",rpc=\"Extract\"}"), 3);
  EXPECT_EQ(s.Get("sae_request_duration_seconds_bucket{outcome=\"ok\",rpc=\"Extract\",le=\"+Inf\"}"), 3);
  EXPECT_EQ(s.Get("sae_request_duration_seconds_count{outcome=\"error\",rpc=\"Extract\"}"), 1);
  EXPECT_EQ(s.Get("sae_request_duration_seconds_count{outcome=\"ok\",rpc=\"ExtractStream\"}"), 0);
  for (const char* rpc : {"Tokenize", "ListSaes", "Info"}) {
    EXPECT_EQ(s.Get(std::string("sae_request_duration_seconds_count{outcome=\"ok\",rpc=\"") + rpc + "\"}"), 1) << rpc;
  }
  EXPECT_EQ(s.Get("sae_tokenization_seconds_count"), 4);
  EXPECT_EQ(s.Get("sae_request_failures_total{reason=\"invalid_argument\"}"), 1);
  EXPECT_EQ(s.Get("sae_request_failures_total{reason=\"resource_exhausted\"}"), 0);
  // Sequential requests: one batch each, of exactly their tokens.
  ExpectBatches(s, /*batches=*/3, /*sequences=*/3, n_tokens);
  EXPECT_EQ(s.Get("sae_queue_time_seconds_count"), 3);
  EXPECT_EQ(s.Get("sae_inflight_requests"), 0);
  EXPECT_EQ(s.Get("sae_queued_tokens"), 0);
  EXPECT_EQ(s.Get("sae_admission_waiting_requests"), 0);
  // Backend memory after the last batch: its activations are freed, so the
  // live tensors are what an idle engine of the same model holds (the test's
  // reference engine, which has run nothing). The CPU tells no device figures.
  EXPECT_EQ(s.Get("sae_backend_memory_bytes{kind=\"tensors\"}"), static_cast<double>(env->reference->memory().tensors));
  EXPECT_GT(s.Get("sae_backend_memory_bytes{kind=\"tensors\"}"), 100e3);
  EXPECT_FALSE(s.Has("sae_backend_memory_bytes{kind=\"device_total\"}"));
  EXPECT_FALSE(s.Has("sae_backend_memory_bytes{kind=\"reserved\"}"));

  // Every metric the Grafana dashboard (deploy/) queries is one the server
  // exports, with its histogram suffixes. The certificate's expiry is
  // exported with TLS only (set here as ServerTls's observer sets it).
  EXPECT_FALSE(s.types.count("sae_tls_certificate_expiration_timestamp_seconds"));
  env->metrics->SetTlsCertificateNotAfter(1798761600);
  const Scrape with_tls = ParseScrape(HttpGet((*server)->port(), "/metrics"));
  EXPECT_EQ(with_tls.Get("sae_tls_certificate_expiration_timestamp_seconds"), 1798761600);
  std::ifstream file(SAE_DASHBOARD);
  ASSERT_TRUE(file.good()) << SAE_DASHBOARD;
  const auto dashboard = nlohmann::json::parse(file);
  const std::regex metric_name("sae_[a-z_]+");
  int queried = 0;
  for (const auto& panel : dashboard.at("panels")) {
    for (const auto& target : panel.at("targets")) {
      const std::string expr = target.at("expr");
      for (std::sregex_iterator it(expr.begin(), expr.end(), metric_name), end; it != end; ++it) {
        std::string name = it->str();
        for (const char* suffix : {"_bucket", "_count", "_sum"}) {
          if (absl::EndsWith(name, suffix) && with_tls.types.count(name.substr(0, name.size() - strlen(suffix)))) {
            name.resize(name.size() - strlen(suffix));
          }
        }
        EXPECT_EQ(with_tls.types.count(name), 1u) << panel.at("title") << ": " << expr;
        ++queried;
      }
    }
  }
  EXPECT_GT(queried, 10);
  // Buckets are cumulative and run from 0.5 ms to 60 s.
  EXPECT_EQ(s.samples.count("sae_forward_seconds_bucket{le=\"0.0005\"}"), 1u);
  EXPECT_EQ(s.samples.count("sae_forward_seconds_bucket{le=\"60\"}"), 1u);
  double previous = 0;
  for (const char* le : {"0.0005", "0.001", "0.01", "0.1", "1", "10", "60", "+Inf"}) {
    const double v = s.Get(std::string("sae_forward_seconds_bucket{le=\"") + le + "\"}");
    EXPECT_GE(v, previous) << le;
    previous = v;
  }
  EXPECT_EQ(previous, 3);
}

// A batch that fails is retried one request at a time. The batch histograms
// count batches that ran, like the forward time: the failed batch of two is
// in none of them (its forward time would be a zero), the good request's
// retry is in all of them, the bad one's retry fails and is in none.
// On the CPU a bad token id fails the batch as it is submitted; on the GPU
// the device finds it and the batch fails when it is collected (ctest's
// cuda_emulated.metrics entry runs the cuda case on the emulator).
class BatchMetricsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BatchMetricsTest, FailedBatchIsNotObservedItsRetriesAre) {
  ExecutorOptions executor;
  executor.max_batch_tokens = 4096;
  executor.max_inflight_requests = 8;
  std::string error;
  auto env = ServingEnv::Start(executor, ServiceOptions(), &error, GetParam());
  if (env == nullptr && GetParam() == "cuda" && std::getenv("SAE_TEST_REQUIRE_CUDA") == nullptr) {
    GTEST_SKIP() << "no usable CUDA backend: " << error;
  }
  ASSERT_NE(env, nullptr) << error;
  const int32_t vocab = env->engine->model_config().vocab_size;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<absl::Status> outcomes;
  auto submit = [&](std::vector<int32_t> ids) {
    Job job;
    job.request.ids = std::move(ids);
    job.request.sae_indices = {0};
    job.request.k = 2;
    job.done = [&](absl::StatusOr<SequenceResult> result) {
      std::lock_guard<std::mutex> lock(mu);
      outcomes.push_back(result.status());
      cv.notify_all();
    };
    ASSERT_TRUE(env->executor->Submit(std::move(job)).ok());
  };
  // The first batch holds at the gate while the next two queue up together.
  env->gate.Close();
  submit({1, 2, 3});
  ASSERT_TRUE(testing::WaitFor([&] { return env->gate.waiting() == 1; }, std::chrono::seconds(10)));
  submit({4, 5, 6, 7});
  submit({8, vocab});  // outside the vocabulary: fails any batch it is in
  ASSERT_TRUE(testing::WaitFor([&] { return env->executor->staged_windows() == 2; }, std::chrono::seconds(10)));
  env->gate.Open();
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return outcomes.size() == 3; }));
  }
  EXPECT_EQ(env->gate.batch_sizes(), (std::vector<size_t>{1, 2, 1, 1})) << "the batch of two and its retries";
  EXPECT_EQ(std::count_if(outcomes.begin(), outcomes.end(), [](const absl::Status& s) { return s.ok(); }), 2);

  auto server = MetricsServer::Start("127.0.0.1:0", env->metrics->registry());
  ASSERT_TRUE(server.ok()) << server.status();
  const Scrape s = ParseScrape(HttpGet((*server)->port(), "/metrics"));
  ExpectBatches(s, /*batches=*/2, /*sequences=*/2, /*tokens=*/7);
}

INSTANTIATE_TEST_SUITE_P(Backends, BatchMetricsTest, ::testing::Values("cpu", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

// sae_encoded_tokens_total counts, per SAE, the tokens of the requests that
// asked for it (watched SAEs included): every loaded SAE has its series from
// the start, at 0, so operators see which SAEs nobody uses.
TEST(MetricsTest, EncodedTokensBySae) {
  ExecutorOptions executor;
  executor.max_batch_tokens = 4096;
  std::string error;
  auto env = ServingEnv::Start(executor, ServiceOptions(), &error);
  ASSERT_NE(env, nullptr) << error;
  auto server = MetricsServer::Start("127.0.0.1:0", env->metrics->registry());
  ASSERT_TRUE(server.ok()) << server.status();
  std::vector<std::string> names;
  for (const auto& sae : env->engine->saes()) names.push_back(sae->name());
  ASSERT_GE(names.size(), 3u);
  auto series = [](const std::string& name) { return "sae_encoded_tokens_total{sae=\"" + name + "\"}"; };
  const Scrape before = ParseScrape(HttpGet((*server)->port(), "/metrics"));
  for (const std::string& name : names) EXPECT_EQ(before.Get(series(name)), 0) << name;

  auto client = env->NewClient();
  auto extract = [&](v1::ExtractRequest request) {
    std::vector<v1::ExtractResponse> responses;
    EXPECT_TRUE(client->Extract(request, &responses).ok());
    return responses.empty() ? 0 : responses.back().total_tokens();
  };
  v1::ExtractRequest first_only = TextRequest("The cat sat.");
  first_only.add_saes(names[0]);
  v1::ExtractRequest first_and_last = TextRequest("A blue bird and a green fish.");
  first_and_last.add_saes(names[0]);
  first_and_last.add_saes(names.back());
  v1::FeatureWatch* watch = first_and_last.add_watch();
  watch->set_sae(names.back());
  watch->add_features(0);
  const int64_t a = extract(first_only);
  const int64_t b = extract(first_and_last);
  ASSERT_GT(a, 0);
  ASSERT_GT(b, 0);

  const Scrape s = ParseScrape(HttpGet((*server)->port(), "/metrics"));
  EXPECT_EQ(s.Get(series(names[0])), static_cast<double>(a + b));
  EXPECT_EQ(s.Get(series(names.back())), static_cast<double>(b));
  for (size_t i = 1; i + 1 < names.size(); ++i) EXPECT_EQ(s.Get(series(names[i])), 0) << names[i];
  EXPECT_EQ(s.Get("sae_tokens_total"), static_cast<double>(a + b));
}

TEST(MetricsTest, BadListenAddressNamesTheField) {
  auto server = MetricsServer::Start("256.0.0.1:notaport", std::make_shared<Metrics>()->registry());
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("metrics_listen"), std::string::npos) << server.status();
}

// Closing the endpoint does not wait out civetweb's 2 s listening poll (it
// counts against Kubernetes' termination grace and every test's shutdown):
// the listener is woken, bound to one address or to all (Debian's civetweb
// has no IPv6). A scraped endpoint (a worker served a request) closes as fast.
TEST(MetricsTest, EndpointClosesPromptly) {
  auto registry = std::make_shared<Metrics>()->registry();
  for (const auto& [address, scraped] :
       {std::pair{"127.0.0.1:0", false}, {"0.0.0.0:0", false}, {"127.0.0.1:0", true}}) {
    SCOPED_TRACE(address);
    auto server = MetricsServer::Start(address, registry);
    ASSERT_TRUE(server.ok()) << server.status();
    if (scraped) ParseScrape(HttpGet((*server)->port(), "/metrics"));
    // Past the first of civetweb's polls, so a stop lands in a later one.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const auto start = std::chrono::steady_clock::now();
    server->reset();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // Waiting out the poll takes 0 to 2 s, under 0.5 s one time in four.
    EXPECT_LT(seconds, 0.5);
  }
}

// thread_stack.cc is linked in here as in sae-server.
TEST(ThreadStackTest, SmallStacksAreRaisedToOneMebibyte) {
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 100 * 1024), 0);
  size_t size = 0;
  ASSERT_EQ(pthread_attr_getstacksize(&attr, &size), 0);
  EXPECT_GE(size, size_t{1} << 20);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, size_t{8} << 20), 0);
  ASSERT_EQ(pthread_attr_getstacksize(&attr, &size), 0);
  EXPECT_EQ(size, size_t{8} << 20) << "larger requests are kept";
  pthread_attr_destroy(&attr);
}

}  // namespace
}  // namespace sae
