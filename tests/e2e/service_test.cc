// End-to-end tests of sae.v1.SaeService in process: the demo model behind the
// real executor and callback service, reached through a real gRPC channel on
// a loopback port. Results are compared with Engine::Run called directly.
#include "rpc/service.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/client_unary_call.h>
#include <gtest/gtest.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/engine.h"
#include "rpc/config.h"
#include "rpc/executor.h"
#include "rpc/extract_request.h"
#include "rpc/metrics.h"
#include "rpc/wire.h"
#include "sae_client.h"
#include "testing/test_util.h"

namespace sae {
namespace {

using client::SaeClient;
using testing::WaitFor;

constexpr char kText[] = "The cat sat on the red mat.";
constexpr int kMaxInflight = 4;
constexpr int kMaxTokens = 48;
constexpr int kMaxK = 32;
constexpr int kDefaultK = 8;
constexpr int kStreamBacklog = 3;

// Holds the executor inside the batch runner while closed, so tests can make
// queueing, admission and cancellation happen in a known order.
class Gate {
 public:
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = false;
    cv_.notify_all();
  }
  // Called by the runner before each batch.
  void Pass(size_t batch_size) {
    std::unique_lock<std::mutex> lock(mu_);
    ++waiting_;
    cv_.wait(lock, [this] { return !closed_; });
    --waiting_;
    sequences_run_ += static_cast<int>(batch_size);
    max_batch_ = std::max(max_batch_, static_cast<int>(batch_size));
  }
  int waiting() {
    std::lock_guard<std::mutex> lock(mu_);
    return waiting_;
  }
  int sequences_run() {
    std::lock_guard<std::mutex> lock(mu_);
    return sequences_run_;
  }
  int TakeMaxBatch() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(max_batch_, 0);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  int waiting_ = 0;
  int sequences_run_ = 0;
  int max_batch_ = 0;
};

struct Env {
  std::unique_ptr<Engine> engine;     // owned by the executor thread
  std::unique_ptr<Engine> reference;  // the test thread's own, for Engine::Run comparisons
  Gate gate;
  std::unique_ptr<Executor> executor;
  std::unique_ptr<SaeServiceImpl> service;
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<Metrics> metrics = std::make_shared<Metrics>();
  int port = 0;
};
Env* env = nullptr;

// The service's metrics as scraped: a counter or gauge's value, or a
// histogram's sample count, of the series of `family` with `label`=`value`
// (the family's first series without a label).
double MetricValue(const Metrics& metrics, const std::string& family, const std::string& label = "",
                   const std::string& value = "") {
  for (const prometheus::MetricFamily& f : metrics.registry()->Collect()) {
    if (f.name != family) continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      const bool match = label.empty() || std::any_of(m.label.begin(), m.label.end(), [&](const auto& l) {
                           return l.name == label && l.value == value;
                         });
      if (!match) continue;
      if (f.type == prometheus::MetricType::Histogram) return static_cast<double>(m.histogram.sample_count);
      if (f.type == prometheus::MetricType::Gauge) return m.gauge.value;
      return m.counter.value;
    }
  }
  ADD_FAILURE() << "no series " << family << "{" << label << "=" << value << "}";
  return -1;
}

double MetricValue(const std::string& family, const std::string& label = "", const std::string& value = "") {
  return MetricValue(*env->metrics, family, label, value);
}

// Calls of `rpc` that ended with `outcome` ("ok" or "error"), as
// sae_request_duration_seconds counts them.
double RequestCount(const Metrics& metrics, const std::string& rpc, const std::string& outcome) {
  for (const prometheus::MetricFamily& f : metrics.registry()->Collect()) {
    if (f.name != "sae_request_duration_seconds") continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      const auto has = [&](const char* name, const std::string& value) {
        return std::any_of(m.label.begin(), m.label.end(),
                           [&](const auto& l) { return l.name == name && l.value == value; });
      };
      if (has("rpc", rpc) && has("outcome", outcome)) return static_cast<double>(m.histogram.sample_count);
    }
  }
  ADD_FAILURE() << "no series sae_request_duration_seconds{rpc=" << rpc << ",outcome=" << outcome << "}";
  return -1;
}

// A server for `service` on a free local port (written to `port`).
std::unique_ptr<grpc::Server> StartServer(grpc::Service* service, int* port) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
  builder.RegisterService(service);
  return builder.BuildAndStart();
}

class ServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    env = new Env();
    auto engine = Engine::Create(testing::DemoEngineOptions());
    ASSERT_TRUE(engine.ok()) << engine.status();
    env->engine = std::move(*engine);
    auto reference = Engine::Create(testing::DemoEngineOptions());
    ASSERT_TRUE(reference.ok()) << reference.status();
    env->reference = std::move(*reference);

    Engine* e = env->engine.get();
    Gate* gate = &env->gate;
    ExecutorOptions executor_options;
    executor_options.max_batch_tokens = 4096;
    executor_options.max_inflight_requests = kMaxInflight;
    auto executor = Executor::Create(BlockingRunner([e, gate](const std::vector<SequenceRequest>& batch) {
                                       gate->Pass(batch.size());
                                       return e->Run(batch);
                                     }),
                                     executor_options);
    ASSERT_TRUE(executor.ok()) << executor.status();
    env->executor = std::move(*executor);

    ServiceOptions options;
    options.limits.default_k = kDefaultK;
    options.limits.max_k = kMaxK;
    options.limits.max_tokens_per_request = kMaxTokens;
    options.limits.chunk_tokens = 64;
    options.limits.max_stream_backlog = kStreamBacklog;
    options.version = "test";
    options.metrics = env->metrics;
    env->service = std::make_unique<SaeServiceImpl>(options);
    env->service->Attach(env->engine.get(), env->executor.get());

    env->server = StartServer(env->service.get(), &env->port);
    ASSERT_NE(env->server, nullptr);
    ASSERT_NE(env->port, 0);
  }

  static void TearDownTestSuite() {
    if (env == nullptr) return;
    env->gate.Open();
    if (env->server) env->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    if (env->executor) env->executor->Shutdown();
    if (env->server) env->server->Wait();
    delete env;
    env = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(env, nullptr);
    ASSERT_NE(env->server, nullptr);
    client_ = SaeClient::Connect("127.0.0.1:" + std::to_string(env->port));
    client_->set_timeout(std::chrono::seconds(30));
  }

  void TearDown() override {
    env->gate.Open();
    // Leave no job behind for the next test.
    EXPECT_TRUE(WaitFor([] { return env->executor->inflight() == 0; }));
  }

  std::unique_ptr<SaeClient> client_;
};

std::vector<v1::TokenFeatures> Tokens(const std::vector<v1::ExtractResponse>& responses) {
  std::vector<v1::TokenFeatures> tokens;
  for (const auto& r : responses) tokens.insert(tokens.end(), r.tokens().begin(), r.tokens().end());
  return tokens;
}

// The reference: Engine::Run on the test thread's own engine.
SequenceResult RunDirect(const std::vector<int32_t>& ids, const std::vector<int>& sae_indices, int k) {
  SequenceRequest request;
  request.ids = ids;
  request.sae_indices = sae_indices;
  request.k = k;
  auto results = env->reference->Run({request});
  EXPECT_TRUE(results.ok()) << results.status();
  return results.ok() ? std::move(results->front()) : SequenceResult();
}

// Same active features as Engine::Run. `tolerance` 0 demands identical values;
// a batch of several sequences may round differently in the last bits.
void ExpectMatchesEngine(const std::vector<v1::TokenFeatures>& tokens, const std::vector<int>& sae_indices, int k,
                         float tolerance = 0.0f) {
  std::vector<int32_t> ids;
  for (const auto& t : tokens) ids.push_back(static_cast<int32_t>(t.token_id()));
  const SequenceResult expected = RunDirect(ids, sae_indices, k);
  ASSERT_EQ(expected.saes.size(), sae_indices.size());
  for (size_t t = 0; t < tokens.size(); ++t) {
    ASSERT_EQ(tokens[t].saes_size(), static_cast<int>(sae_indices.size()));
    for (size_t j = 0; j < sae_indices.size(); ++j) {
      const v1::SaeFeatures& got = tokens[t].saes(static_cast<int>(j));
      EXPECT_EQ(got.sae(), env->reference->saes()[sae_indices[j]]->name());
      const SaeTopK& want = expected.saes[j];
      const int n_active = want.n_active(static_cast<int>(t));
      ASSERT_EQ(got.indices_size(), n_active) << "token " << t << " sae " << got.sae();
      for (int s = 0; s < n_active; ++s) {
        const size_t slot = t * static_cast<size_t>(want.k) + s;
        if (tolerance == 0.0f) {
          EXPECT_EQ(got.indices(s), static_cast<uint32_t>(want.indices[slot])) << "token " << t << " slot " << s;
          EXPECT_EQ(got.values(s), want.values[slot]) << "token " << t << " slot " << s;
        } else {
          // Near-ties may swap order; compare values by rank.
          EXPECT_NEAR(got.values(s), want.values[slot], tolerance * (1.0f + std::abs(want.values[slot])));
        }
      }
    }
  }
}

void ExpectSortedDescending(const std::vector<v1::TokenFeatures>& tokens) {
  for (const auto& t : tokens) {
    for (const auto& s : t.saes()) {
      ASSERT_EQ(s.indices_size(), s.values_size());
      for (int i = 0; i < s.values_size(); ++i) {
        EXPECT_GT(s.values(i), 0.0f) << s.sae();
        if (i > 0) {
          EXPECT_GE(s.values(i - 1), s.values(i)) << s.sae() << " at position " << t.position();
        }
      }
    }
  }
}

v1::ExtractRequest TextRequest(const std::string& text, const std::string& id = "") {
  v1::ExtractRequest request;
  request.set_request_id(id);
  request.set_text(text);
  return request;
}

TEST_F(ServiceTest, ExtractTextMatchesTokenizeAndIsChunked) {
  v1::TokenizeRequest tokenize;
  tokenize.set_text(kText);
  v1::TokenizeResponse tokenized;
  ASSERT_TRUE(client_->Tokenize(tokenize, &tokenized).ok());
  const int n = tokenized.tokens_size();
  ASSERT_GT(n, 4);

  v1::ExtractRequest request = TextRequest(kText, "r");
  request.set_chunk_tokens(2);
  request.set_k(5);
  std::vector<v1::ExtractResponse> responses;
  grpc::Status status = client_->Extract(request, &responses);
  ASSERT_TRUE(status.ok()) << status.error_message();

  ASSERT_EQ(static_cast<int>(responses.size()), (n + 1) / 2);
  for (size_t i = 0; i < responses.size(); ++i) {
    EXPECT_EQ(responses[i].request_id(), "r");
    EXPECT_EQ(static_cast<int>(responses[i].total_tokens()), n);
    EXPECT_LE(responses[i].tokens_size(), 2);
    EXPECT_EQ(responses[i].done(), i + 1 == responses.size());
    EXPECT_FALSE(responses[i].has_error());
  }
  const std::vector<v1::TokenFeatures> tokens = Tokens(responses);
  ASSERT_EQ(static_cast<int>(tokens.size()), n);
  for (int t = 0; t < n; ++t) {
    EXPECT_EQ(tokens[t].position(), static_cast<uint32_t>(t));
    EXPECT_EQ(tokens[t].token_id(), tokenized.tokens(t).id());
    EXPECT_EQ(tokens[t].piece(), tokenized.tokens(t).piece());
    EXPECT_EQ(tokens[t].char_start(), tokenized.tokens(t).char_start());
    EXPECT_EQ(tokens[t].char_end(), tokenized.tokens(t).char_end());
    ASSERT_EQ(tokens[t].saes_size(), static_cast<int>(env->reference->saes().size()));
    for (const auto& s : tokens[t].saes()) EXPECT_LE(s.indices_size(), 5);
  }
  // BOS first, and SAEs never saw it: no features there by default.
  EXPECT_EQ(tokens[0].token_id(), static_cast<uint32_t>(*env->reference->tokenizer().bos_id()));
  for (const auto& s : tokens[0].saes()) EXPECT_EQ(s.indices_size(), 0);
  ExpectSortedDescending(tokens);
  ExpectMatchesEngine(tokens, env->reference->all_sae_indices(), 5);
}

TEST_F(ServiceTest, ConceptFeatureFiresOnConceptWord) {
  const DemoLayout& demo = testing::Demo();
  ASSERT_FALSE(demo.concepts.empty());
  const DemoConcept& concept_def = demo.concepts.front();
  ASSERT_FALSE(concept_def.words.empty());
  std::vector<v1::ExtractResponse> responses;
  ASSERT_TRUE(client_->Extract(TextRequest("I saw a" + concept_def.words.front() + " today"), &responses).ok());
  bool fired = false;
  for (const auto& t : Tokens(responses)) {
    if (t.piece() != concept_def.words.front()) continue;
    for (const auto& s : t.saes()) {
      fired |= std::find(s.indices().begin(), s.indices().end(), static_cast<uint32_t>(concept_def.feature)) !=
               s.indices().end();
    }
  }
  EXPECT_TRUE(fired) << "feature " << concept_def.feature << " (" << concept_def.label << ") on \""
                     << concept_def.words.front() << "\"";
}

TEST_F(ServiceTest, ExtractTokenIdsSelectedSaes) {
  v1::TokenizeRequest tokenize;
  tokenize.set_text(kText);
  tokenize.set_add_bos(false);
  v1::TokenizeResponse tokenized;
  ASSERT_TRUE(client_->Tokenize(tokenize, &tokenized).ok());

  const auto& saes = env->reference->saes();
  ASSERT_GE(saes.size(), 2u);
  v1::ExtractRequest request;
  for (const auto& t : tokenized.tokens()) request.mutable_token_ids()->add_ids(t.id());
  // Request order, not load order.
  request.add_saes(saes.back()->name());
  request.add_saes(saes.front()->name());
  std::vector<v1::ExtractResponse> responses;
  ASSERT_TRUE(client_->Extract(request, &responses).ok());
  ASSERT_EQ(responses.size(), 1u);  // default chunk_tokens (64) holds it all
  const std::vector<v1::TokenFeatures> tokens = Tokens(responses);
  ASSERT_EQ(tokens.size(), static_cast<size_t>(tokenized.tokens_size()));  // no BOS added
  for (size_t t = 0; t < tokens.size(); ++t) {
    EXPECT_EQ(tokens[t].token_id(), tokenized.tokens(static_cast<int>(t)).id());
    EXPECT_EQ(tokens[t].piece(), tokenized.tokens(static_cast<int>(t)).piece());
    EXPECT_EQ(tokens[t].char_start(), 0u);
    EXPECT_EQ(tokens[t].char_end(), 0u);
  }
  ExpectSortedDescending(tokens);
  ExpectMatchesEngine(tokens, {static_cast<int>(saes.size()) - 1, 0}, kDefaultK);
}

// Reads an ExtractStream until every id in `ids` got its done response.
std::map<std::string, std::vector<v1::ExtractResponse>> ReadUntilDone(
    grpc::ClientReaderWriter<v1::ExtractRequest, v1::ExtractResponse>* stream, std::set<std::string> ids) {
  std::map<std::string, std::vector<v1::ExtractResponse>> by_id;
  v1::ExtractResponse response;
  while (!ids.empty() && stream->Read(&response)) {
    EXPECT_TRUE(ids.count(response.request_id())) << "unexpected response for " << response.request_id();
    by_id[response.request_id()].push_back(response);
    if (response.done()) ids.erase(response.request_id());
  }
  EXPECT_TRUE(ids.empty()) << "stream ended early";
  return by_id;
}

TEST_F(ServiceTest, ExtractStreamKeepsServingAfterBadRequest) {
  const std::vector<std::string> texts = {"The cat sat on the red mat.", "A blue bird and a green fish.",
                                          "Paris is far away."};
  grpc::ClientContext context;
  auto stream = client_->stub()->ExtractStream(&context);
  for (size_t i = 0; i < texts.size(); ++i) {
    v1::ExtractRequest request = TextRequest(texts[i], "good" + std::to_string(i));
    request.set_chunk_tokens(3);
    ASSERT_TRUE(stream->Write(request));
    if (i == 1) {
      v1::ExtractRequest bad = TextRequest("oops", "bad");
      bad.add_saes("no-such-sae");
      ASSERT_TRUE(stream->Write(bad));
    }
  }
  auto by_id = ReadUntilDone(stream.get(), {"good0", "good1", "good2", "bad"});

  ASSERT_EQ(by_id["bad"].size(), 1u);
  EXPECT_TRUE(by_id["bad"][0].done());
  EXPECT_EQ(by_id["bad"][0].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(by_id["bad"][0].error().message().find("no-such-sae"), std::string::npos);

  for (size_t i = 0; i < texts.size(); ++i) {
    const auto& responses = by_id["good" + std::to_string(i)];
    for (const auto& r : responses) EXPECT_FALSE(r.has_error());
    std::vector<v1::ExtractResponse> single;
    ASSERT_TRUE(client_->Extract(TextRequest(texts[i]), &single).ok());
    const auto streamed_tokens = Tokens(responses);
    const auto single_tokens = Tokens(single);
    ASSERT_EQ(streamed_tokens.size(), single_tokens.size());
    ExpectMatchesEngine(streamed_tokens, env->reference->all_sae_indices(), kDefaultK, 0.0f);
  }

  // Still serving on the same stream.
  ASSERT_TRUE(stream->Write(TextRequest("One more.", "after")));
  auto after = ReadUntilDone(stream.get(), {"after"});
  EXPECT_FALSE(after["after"].back().has_error());
  stream->WritesDone();
  grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(ServiceTest, ExtractStreamRejectsDuplicateAndMissingRequestIds) {
  env->gate.Close();
  grpc::ClientContext context;
  const double already_exists = MetricValue("sae_request_failures_total", "reason", "already_exists");
  const double invalid = MetricValue("sae_request_failures_total", "reason", "invalid_argument");
  auto stream = client_->stub()->ExtractStream(&context);
  ASSERT_TRUE(stream->Write(TextRequest(kText, "same")));
  // The first is held inside the executor, so it is certainly in flight.
  ASSERT_TRUE(WaitFor([] { return env->gate.waiting() == 1; }));
  ASSERT_TRUE(stream->Write(TextRequest(kText, "same")));
  ASSERT_TRUE(stream->Write(TextRequest(kText, "")));
  v1::ExtractResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "same");
  EXPECT_TRUE(response.done());
  // A code the first "same" cannot end with: the client tells the refusal of
  // the second from the end of the first.
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::ALREADY_EXISTS));
  EXPECT_NE(response.error().message().find("already in flight"), std::string::npos);
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "");
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_EQ(MetricValue("sae_request_failures_total", "reason", "already_exists"), already_exists + 1);
  EXPECT_EQ(MetricValue("sae_request_failures_total", "reason", "invalid_argument"), invalid + 1);
  env->gate.Open();
  auto by_id = ReadUntilDone(stream.get(), {"same"});
  for (const auto& r : by_id["same"]) EXPECT_FALSE(r.has_error());
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServiceTest, StreamBacklogIsBounded) {
  env->gate.Close();
  grpc::ClientContext context;
  auto stream = client_->stub()->ExtractStream(&context);
  std::set<std::string> admitted;
  for (int i = 0; i < kStreamBacklog; ++i) {
    admitted.insert("q" + std::to_string(i));
    ASSERT_TRUE(stream->Write(TextRequest(kText, "q" + std::to_string(i))));
  }
  ASSERT_TRUE(WaitFor([] { return env->executor->inflight() == kStreamBacklog; }));
  ASSERT_TRUE(stream->Write(TextRequest(kText, "one-too-many")));
  v1::ExtractResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), "one-too-many");
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  env->gate.Open();
  auto by_id = ReadUntilDone(stream.get(), admitted);
  for (const auto& [id, responses] : by_id) EXPECT_FALSE(responses.back().has_error()) << id;
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// A client that writes but never reads: past the stream's backlog every
// request is refused, and once max_stream_backlog refusals wait unwritten
// (the client's receive window is full) the server stops reading, so HTTP/2
// flow control holds the client back instead of the stream queueing
// responses without bound. When the client reads, every request is answered.
TEST_F(ServiceTest, StreamThatIsNotReadIsNotReadEither) {
  env->gate.Close();  // the first kStreamBacklog requests stay in flight
  const double handled_before = MetricValue("sae_tokenization_seconds");
  // Without BDP probing the client's receive window stays at its initial
  // size (64 KiB) and fills after some hundred responses.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto stub = v1::SaeService::NewStub(
      grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(env->port), grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext context;
  auto stream = stub->ExtractStream(&context);
  constexpr int kRequests = 20000;
  std::thread writer([&] {
    for (int i = 0; i < kRequests; ++i) {
      if (!stream->Write(TextRequest("a", "r" + std::to_string(i)))) return;
    }
    stream->WritesDone();
  });
  // Handled (read, validated, answered or refused) requests, once their
  // count has not moved for a second.
  double handled = 0;
  for (int still = 0; still < 10;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const double now = MetricValue("sae_tokenization_seconds") - handled_before;
    still = now == handled ? still + 1 : 0;
    handled = now;
  }
  std::cerr << "handled while the client did not read: " << handled << " of " << kRequests << "\n";
  EXPECT_LT(handled, kRequests / 2) << "the server kept reading a stream whose responses nobody read";

  env->gate.Open();
  std::map<std::string, int> codes;
  v1::ExtractResponse response;
  int done = 0;
  while (done < kRequests && stream->Read(&response)) {
    if (!response.done()) continue;
    ++done;
    ++codes[response.has_error() ? grpc::StatusCode(response.error().code()) == grpc::StatusCode::RESOURCE_EXHAUSTED
                                       ? "RESOURCE_EXHAUSTED"
                                       : response.error().message()
                                 : "OK"];
  }
  writer.join();
  EXPECT_EQ(done, kRequests);
  EXPECT_GE(codes["OK"], kStreamBacklog);
  EXPECT_EQ(codes["OK"] + codes["RESOURCE_EXHAUSTED"], kRequests);
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
}

// A deadline that passes while the request is on the engine ends the call
// (gRPC cancels it): the request is counted as deadline_exceeded, like one
// whose deadline passes in the queue, not as cancelled by the client; so is
// a stream's request queued behind it, which the stream's end drops.
TEST_F(ServiceTest, DeadlineDuringTheRunIsCountedAsDeadlineExceeded) {
  auto failures = [](const char* reason) { return MetricValue("sae_request_failures_total", "reason", reason); };
  const double deadline_before = failures("deadline_exceeded");
  const double cancelled_before = failures("cancelled");
  const auto deadline = [] { return std::chrono::system_clock::now() + std::chrono::seconds(1); };
  // The client's deadline fires first; the job may run only once the server
  // saw the call end (its cancel, or its own copy of the deadline), or the
  // request would simply succeed.
  const auto server_saw_the_end = [] { std::this_thread::sleep_for(std::chrono::seconds(1)); };

  env->gate.Close();
  grpc::ClientContext extract_context;
  extract_context.set_deadline(deadline());
  auto reader = client_->stub()->Extract(&extract_context, TextRequest(kText));
  ASSERT_TRUE(WaitFor([] { return env->gate.waiting() == 1; }));  // on the engine before its deadline
  v1::ExtractResponse response;
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  server_saw_the_end();
  env->gate.Open();
  EXPECT_TRUE(WaitFor([&] { return failures("deadline_exceeded") == deadline_before + 1; }));

  env->gate.Close();
  grpc::ClientContext stream_context;
  stream_context.set_deadline(deadline());
  auto stream = client_->stub()->ExtractStream(&stream_context);
  ASSERT_TRUE(stream->Write(TextRequest(kText, "late")));
  ASSERT_TRUE(WaitFor([] { return env->gate.waiting() == 1; }));
  ASSERT_TRUE(stream->Write(TextRequest(kText, "queued")));  // behind it: dropped when the call ends
  ASSERT_TRUE(WaitFor([] { return env->executor->inflight() == 2; }));
  while (stream->Read(&response)) {
  }
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  server_saw_the_end();
  env->gate.Open();
  EXPECT_TRUE(WaitFor([&] { return failures("deadline_exceeded") == deadline_before + 3; }));
  EXPECT_EQ(failures("cancelled"), cancelled_before);
}

TEST_F(ServiceTest, QueuedRequestsRunAsOneBatchWithSameResults) {
  env->gate.TakeMaxBatch();
  env->gate.Close();
  grpc::ClientContext context;
  auto stream = client_->stub()->ExtractStream(&context);
  ASSERT_TRUE(stream->Write(TextRequest("First one.", "a")));
  ASSERT_TRUE(WaitFor([] { return env->gate.waiting() == 1; }));
  ASSERT_TRUE(stream->Write(TextRequest("The cat sat on the red mat.", "b")));
  ASSERT_TRUE(stream->Write(TextRequest("A blue bird and a green fish.", "c")));
  ASSERT_TRUE(WaitFor([] { return env->executor->inflight() == 3; }));
  // Admitted is not yet staged: the scheduler thread packs them.
  ASSERT_TRUE(WaitFor([] { return env->executor->staged_windows() == 2; }));
  env->gate.Open();
  auto by_id = ReadUntilDone(stream.get(), {"a", "b", "c"});
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(env->gate.TakeMaxBatch(), 2) << "b and c were queued together";
  for (const std::string id : {"b", "c"})
    ExpectMatchesEngine(Tokens(by_id[id]), env->reference->all_sae_indices(), kDefaultK, 0.0f);
}

TEST_F(ServiceTest, TokenizeListSaesInfo) {
  v1::TokenizeRequest tokenize;
  tokenize.set_text("héllo cat");
  v1::TokenizeResponse tokenized;
  ASSERT_TRUE(client_->Tokenize(tokenize, &tokenized).ok());
  auto encoding = env->reference->tokenizer().Encode("héllo cat", true);
  ASSERT_TRUE(encoding.ok());
  ASSERT_EQ(tokenized.tokens_size(), static_cast<int>(encoding->ids.size()));
  for (int i = 0; i < tokenized.tokens_size(); ++i) {
    EXPECT_EQ(tokenized.tokens(i).id(), static_cast<uint32_t>(encoding->ids[i]));
    EXPECT_EQ(tokenized.tokens(i).char_start(), encoding->offsets[i].first);
    EXPECT_EQ(tokenized.tokens(i).char_end(), encoding->offsets[i].second);
  }
  EXPECT_EQ(tokenized.tokens(tokenized.tokens_size() - 1).char_end(), 9u);  // code points, not bytes

  v1::ListSaesResponse saes;
  ASSERT_TRUE(client_->ListSaes(&saes).ok());
  ASSERT_EQ(saes.saes_size(), static_cast<int>(env->reference->saes().size()));
  for (int i = 0; i < saes.saes_size(); ++i) {
    const Sae& sae = *env->reference->saes()[i];
    EXPECT_EQ(saes.saes(i).name(), sae.name());
    EXPECT_EQ(saes.saes(i).hook(), sae.hook().Name());
    EXPECT_EQ(saes.saes(i).layer(), static_cast<uint32_t>(sae.hook().layer));
    EXPECT_EQ(saes.saes(i).d_sae(), static_cast<uint32_t>(sae.hyperparams().d_sae));
    EXPECT_EQ(saes.saes(i).d_model(), 64u);
    EXPECT_FALSE(saes.saes(i).site().empty());
  }

  v1::InfoResponse info;
  ASSERT_TRUE(client_->Info(&info).ok());
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.d_model(), 64u);
  EXPECT_EQ(info.n_layers(), static_cast<uint32_t>(env->reference->model_config().num_hidden_layers));
  EXPECT_EQ(info.vocab_size(), static_cast<uint32_t>(env->reference->model_config().vocab_size));
  EXPECT_EQ(info.default_k(), static_cast<uint32_t>(kDefaultK));
  EXPECT_EQ(info.max_k(), static_cast<uint32_t>(kMaxK));
  EXPECT_EQ(info.max_tokens_per_request(), static_cast<uint32_t>(kMaxTokens));
  EXPECT_EQ(info.bos_token_id(), static_cast<uint32_t>(*env->reference->tokenizer().bos_id()));
  EXPECT_EQ(info.version(), "test");
}

struct BadCase {
  std::string name;
  v1::ExtractRequest request;
  grpc::StatusCode code;
  std::string message_part;
};

std::vector<BadCase> BadCases() {
  std::vector<BadCase> cases;
  cases.push_back({"no input", v1::ExtractRequest(), grpc::StatusCode::INVALID_ARGUMENT, "neither text nor token_ids"});
  v1::ExtractRequest unknown = TextRequest("hi");
  unknown.add_saes("L99R-8x");
  cases.push_back({"unknown SAE", unknown, grpc::StatusCode::INVALID_ARGUMENT, "L99R-8x"});
  v1::ExtractRequest big_k = TextRequest("hi");
  big_k.set_k(kMaxK + 1);
  cases.push_back({"k too large", big_k, grpc::StatusCode::INVALID_ARGUMENT, "max_k"});
  v1::ExtractRequest oov;
  oov.mutable_token_ids()->add_ids(5);
  oov.mutable_token_ids()->add_ids(1u << 20);
  cases.push_back({"out-of-vocab id", oov, grpc::StatusCode::INVALID_ARGUMENT, "token_ids[1]"});
  std::string long_text;
  for (int i = 0; i < kMaxTokens; ++i) long_text += " cat";
  cases.push_back({"too long", TextRequest(long_text), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens_per_request"});
  // A text of more bytes than kMaxTokens of the longest token cover is
  // refused by its size, untokenized; one byte less is tokenized.
  const size_t cover = kMaxTokens * env->reference->tokenizer().max_token_bytes();
  cases.push_back({"too many bytes", TextRequest(std::string(cover + 1, 'a')), grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("the text has ", cover + 1, " bytes, more than ", kMaxTokens, " tokens")});
  cases.push_back({"at the byte bound", TextRequest(std::string(cover, 'a')), grpc::StatusCode::INVALID_ARGUMENT,
                   "tokens; max_tokens_per_request"});
  v1::ExtractRequest empty_ids;
  empty_ids.mutable_token_ids();
  cases.push_back({"empty token_ids", empty_ids, grpc::StatusCode::INVALID_ARGUMENT, "no tokens"});
  return cases;
}

TEST_F(ServiceTest, BadInputMatrixOnExtract) {
  for (const BadCase& c : BadCases()) {
    std::vector<v1::ExtractResponse> responses;
    grpc::Status status = client_->Extract(c.request, &responses);
    EXPECT_EQ(status.error_code(), c.code) << c.name << ": " << status.error_message();
    EXPECT_NE(status.error_message().find(c.message_part), std::string::npos)
        << c.name << ": " << status.error_message();
    EXPECT_TRUE(responses.empty()) << c.name;
  }
}

TEST_F(ServiceTest, BadInputMatrixOnExtractStream) {
  grpc::ClientContext context;
  auto stream = client_->stub()->ExtractStream(&context);
  std::vector<BadCase> cases = BadCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    cases[i].request.set_request_id("bad" + std::to_string(i));
    ASSERT_TRUE(stream->Write(cases[i].request));
  }
  std::set<std::string> ids;
  for (size_t i = 0; i < cases.size(); ++i) ids.insert("bad" + std::to_string(i));
  auto by_id = ReadUntilDone(stream.get(), ids);
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& responses = by_id["bad" + std::to_string(i)];
    ASSERT_EQ(responses.size(), 1u) << cases[i].name;
    EXPECT_EQ(responses[0].error().code(), static_cast<int>(cases[i].code)) << cases[i].name;
    EXPECT_TRUE(responses[0].done());
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// `message` (serialized) with a length-delimited field appended: protobuf
// merges fields, so this sets a string or adds a repeated element. Builds
// requests the C++ API would not serialize as they are (invalid UTF-8).
std::string AppendField(std::string message, int number, const std::string& value) {
  auto varint = [&message](uint64_t v) {
    for (; v >= 0x80; v >>= 7) message.push_back(static_cast<char>(v | 0x80));
    message.push_back(static_cast<char>(v));
  };
  varint(static_cast<uint64_t>(number) << 3 | 2);
  varint(value.size());
  return message + value;
}

grpc::ByteBuffer ToBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

template <typename T>
T FromBuffer(const grpc::ByteBuffer& buffer) {
  T message;
  const absl::Status parsed = ParseMessage(buffer, &message);
  EXPECT_TRUE(parsed.ok()) << parsed;
  return message;
}

// Calls to sae.v1.SaeService that send raw request bytes, as a client in
// another language (or a C++ client, which serializes invalid UTF-8 with
// only a logged error) can.
class RawClient {
 public:
  explicit RawClient(int port)
      : channel_(grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials())) {}

  grpc::Status Extract(const std::string& request, std::vector<v1::ExtractResponse>* responses) {
    grpc::ClientContext context;
    const grpc::ByteBuffer buffer = ToBuffer(request);
    std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
        grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
            channel_.get(), Method("Extract", grpc::internal::RpcMethod::SERVER_STREAMING), &context, buffer));
    for (grpc::ByteBuffer response; reader->Read(&response);) {
      responses->push_back(FromBuffer<v1::ExtractResponse>(response));
    }
    return reader->Finish();
  }

  grpc::Status Tokenize(const std::string& request) {
    grpc::ClientContext context;
    grpc::ByteBuffer response;
    return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
        channel_.get(), Method("Tokenize", grpc::internal::RpcMethod::NORMAL_RPC), &context, ToBuffer(request),
        &response);
  }

  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> ExtractStream(
      grpc::ClientContext* context) {
    return std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>>(
        grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
            channel_.get(), Method("ExtractStream", grpc::internal::RpcMethod::BIDI_STREAMING), context));
  }

 private:
  grpc::internal::RpcMethod Method(const char* name, grpc::internal::RpcMethod::RpcType type) {
    names_.push_back(std::string("/sae.v1.SaeService/") + name);  // RpcMethod keeps the pointer
    return grpc::internal::RpcMethod(names_.back().c_str(), type, channel_);
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::list<std::string> names_;
};

void ExpectInvalidArgument(const grpc::Status& status, const std::string& says) {
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find(says), std::string::npos) << status.error_message();
}

TEST_F(ServiceTest, InvalidUtf8IsInvalidArgument) {
  const std::string invalid = "ok \xff\xfe then";
  // The service's own check (the request built in memory, not parsed).
  RequestLimits limits;
  auto prepared = PrepareRequest(*env->reference, limits, TextRequest(invalid));
  ASSERT_FALSE(prepared.ok());
  EXPECT_EQ(prepared.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(prepared.status().message().find("UTF-8"), std::string::npos) << prepared.status();

  // Over the wire protobuf itself refuses such a request; the service parses
  // its requests and names the field (gRPC's own parsing answered
  // UNIMPLEMENTED with no message).
  RawClient raw(env->port);
  std::vector<v1::ExtractResponse> responses;
  ExpectInvalidArgument(raw.Extract(AppendField("", 2, invalid), &responses),
                        "text is not valid UTF-8: invalid byte 0xFF at byte offset 3");
  EXPECT_TRUE(responses.empty());
  ExpectInvalidArgument(raw.Tokenize(AppendField("", 1, invalid)), "text is not valid UTF-8");

  // Nested and repeated fields are named by path.
  v1::FeatureWatch watch;
  watch.add_features(1);
  const std::string good_watch = watch.SerializeAsString();
  std::string request = AppendField(TextRequest(kText).SerializeAsString(), 4, "\xc0\x80");  // overlong NUL
  ExpectInvalidArgument(raw.Extract(request, &responses), "saes[0] is not valid UTF-8");
  request = AppendField(TextRequest(kText).SerializeAsString(), 10, AppendField(good_watch, 1, "L0R"));
  request = AppendField(request, 10, AppendField(good_watch, 1, "sae\xed\xa0\x80"));  // a surrogate
  ExpectInvalidArgument(raw.Extract(request, &responses), "watch[1].sae is not valid UTF-8");

  // Bytes that are not an ExtractRequest at all (a truncated field).
  ExpectInvalidArgument(raw.Extract(AppendField("", 2, "long text").substr(0, 5), &responses),
                        "is not a valid sae.v1.ExtractRequest message");
  EXPECT_TRUE(responses.empty());

  // The same request parsed by the client's protobuf is served.
  responses.clear();
  EXPECT_TRUE(raw.Extract(TextRequest(kText).SerializeAsString(), &responses).ok());
  EXPECT_FALSE(responses.empty());
}

// A request the server cannot parse gets its own error response (with its
// request_id when that field reads) and the stream goes on: gRPC's own
// parsing ended the stream with OK there, silently dropping the requests
// sent after it.
TEST_F(ServiceTest, ExtractStreamAnswersUnparsableRequestsAndKeepsServing) {
  RawClient raw(env->port);
  grpc::ClientContext context;
  auto stream = raw.ExtractStream(&context);
  ASSERT_TRUE(stream->Write(ToBuffer(TextRequest(kText, "good0").SerializeAsString())));
  ASSERT_TRUE(stream->Write(ToBuffer(AppendField(TextRequest("", "bad-text").SerializeAsString(), 2, "\xff"))));
  ASSERT_TRUE(
      stream->Write(ToBuffer("\x0a\x05"
                             "ab")));  // request_id cut short: nothing to echo
  // The id reads, the text after it is cut short: the error carries the id.
  ASSERT_TRUE(stream->Write(ToBuffer(TextRequest("", "cut-text").SerializeAsString() + "\x12\x09lon")));
  ASSERT_TRUE(stream->Write(ToBuffer(TextRequest("A blue bird.", "good1").SerializeAsString())));
  stream->WritesDone();

  std::map<std::string, std::vector<v1::ExtractResponse>> by_id;
  for (grpc::ByteBuffer buffer; stream->Read(&buffer);) {
    const auto response = FromBuffer<v1::ExtractResponse>(buffer);
    by_id[response.request_id()].push_back(response);
  }
  const grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();

  ASSERT_EQ(by_id.size(), 5u);
  ASSERT_EQ(by_id["cut-text"].size(), 1u);
  EXPECT_NE(by_id["cut-text"][0].error().message().find("is not a valid sae.v1.ExtractRequest"), std::string::npos);
  ASSERT_EQ(by_id["bad-text"].size(), 1u);
  EXPECT_TRUE(by_id["bad-text"][0].done());
  EXPECT_EQ(by_id["bad-text"][0].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(by_id["bad-text"][0].error().message().find("text is not valid UTF-8"), std::string::npos);
  ASSERT_EQ(by_id[""].size(), 1u);
  EXPECT_EQ(by_id[""][0].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(by_id[""][0].error().message().find("is not a valid sae.v1.ExtractRequest"), std::string::npos);
  for (const char* id : {"good0", "good1"}) {
    ASSERT_FALSE(by_id[id].empty()) << id;
    EXPECT_TRUE(by_id[id].back().done()) << id;
    for (const auto& r : by_id[id]) EXPECT_FALSE(r.has_error()) << id << ": " << r.error().message();
    ExpectMatchesEngine(Tokens(by_id[id]), env->reference->all_sae_indices(), kDefaultK);
  }
}

// Mutated requests (flipped bytes, truncations): ParseMessage accepts exactly
// what protobuf's own parse accepts (its UTF-8 check walks the fields as
// protobuf does), refusals are INVALID_ARGUMENT, and ReadStringField reads
// the request_id protobuf reads.
TEST(WireTest, MutatedRequestsParseOrAreInvalidArgument) {
  v1::ExtractRequest request = TextRequest("The cat sat.", "id-1");
  request.add_saes("L0R");
  v1::FeatureWatch* watch = request.add_watch();
  watch->set_sae("L0R");
  watch->add_features(3);
  watch->add_features(300);
  const std::string bytes = request.SerializeAsString();
  std::mt19937 rng(7);
  int refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string mutated = bytes;
    const int n_flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < n_flips; ++f) mutated[rng() % mutated.size()] = static_cast<char>(rng());
    if (rng() % 4 == 0) mutated.resize(rng() % mutated.size());
    v1::ExtractRequest parsed, by_protobuf;
    const absl::Status status = ParseMessage(ToBuffer(mutated), &parsed);
    bool protobuf_ok = false;
    {
      google::protobuf::LogSilencer quiet;  // protobuf logs each invalid UTF-8 string it refuses
      protobuf_ok = by_protobuf.ParseFromString(mutated);
    }
    ASSERT_EQ(status.ok(), protobuf_ok) << i << ": " << status;
    const std::string id = ReadStringField(ToBuffer(mutated), *v1::ExtractRequest::descriptor(), "request_id");
    if (status.ok()) {
      EXPECT_EQ(id, parsed.request_id()) << i;
    } else {
      ++refused;
      ASSERT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    }
  }
  EXPECT_GT(refused, 1000);  // the mutations do reach the error paths
}

TEST_F(ServiceTest, FullExecutorGivesResourceExhausted) {
  env->gate.Close();
  std::vector<std::thread> callers;
  std::vector<grpc::Status> statuses(kMaxInflight);
  for (int i = 0; i < kMaxInflight; ++i) {
    callers.emplace_back([this, i, &statuses] {
      std::vector<v1::ExtractResponse> responses;
      statuses[i] = client_->Extract(TextRequest(kText), &responses);
    });
  }
  ASSERT_TRUE(WaitFor([] { return env->executor->inflight() == kMaxInflight; }));
  std::vector<v1::ExtractResponse> responses;
  grpc::Status refused = client_->Extract(TextRequest(kText), &responses);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();

  // On a stream, the refusal is that request's error response.
  grpc::ClientContext context;
  auto stream = client_->stub()->ExtractStream(&context);
  ASSERT_TRUE(stream->Write(TextRequest(kText, "x")));
  v1::ExtractResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());

  env->gate.Open();
  for (auto& t : callers) t.join();
  for (const auto& s : statuses) EXPECT_TRUE(s.ok()) << s.error_message();
}

TEST_F(ServiceTest, CancelledRequestIsDroppedBeforeRunning) {
  env->gate.Close();
  grpc::Status first_status;
  std::thread first([this, &first_status] {
    std::vector<v1::ExtractResponse> responses;
    first_status = client_->Extract(TextRequest(kText), &responses);
  });
  ASSERT_TRUE(WaitFor([] { return env->gate.waiting() == 1; }));
  const int run_before = env->gate.sequences_run();

  grpc::ClientContext context;
  auto reader = client_->stub()->Extract(&context, TextRequest("This one is cancelled."));
  ASSERT_TRUE(WaitFor([] { return env->executor->inflight() == 2; }));
  context.TryCancel();
  v1::ExtractResponse response;
  EXPECT_FALSE(reader->Read(&response));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // Give the server's OnCancel time to mark the queued job.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  env->gate.Open();
  first.join();
  EXPECT_TRUE(first_status.ok()) << first_status.error_message();
  ASSERT_TRUE(WaitFor([] { return env->executor->inflight() == 0; }));
  EXPECT_EQ(env->gate.sequences_run() - run_before, 1) << "the cancelled job must not run";
}

TEST(ServiceNotReadyTest, UnavailableUntilAttached) {
  ServiceOptions options;
  options.metrics = std::make_shared<Metrics>();
  SaeServiceImpl service(options);
  int port = 0;
  std::unique_ptr<grpc::Server> server = StartServer(&service, &port);
  ASSERT_NE(server, nullptr);
  auto client = SaeClient::Connect("127.0.0.1:" + std::to_string(port));
  v1::InfoResponse info;
  EXPECT_EQ(client->Info(&info).error_code(), grpc::StatusCode::UNAVAILABLE);
  std::vector<v1::ExtractResponse> responses;
  EXPECT_EQ(client->Extract(TextRequest("hi"), &responses).error_code(), grpc::StatusCode::UNAVAILABLE);
  v1::TokenizeRequest tokenize;
  tokenize.set_text("hi");
  v1::TokenizeResponse tokenized;
  EXPECT_EQ(client->Tokenize(tokenize, &tokenized).error_code(), grpc::StatusCode::UNAVAILABLE);
  server->Shutdown();
  // Refused while loading, and counted so.
  const Metrics& metrics = *options.metrics;
  EXPECT_EQ(MetricValue(metrics, "sae_request_failures_total", "reason", "unavailable"), 3);
  for (const char* rpc : {"Info", "Extract", "Tokenize"}) {
    EXPECT_EQ(RequestCount(metrics, rpc, "error"), 1) << rpc;
    EXPECT_EQ(RequestCount(metrics, rpc, "ok"), 0) << rpc;
  }
}

// ---- per-request options: min_activation, watch, omit_pieces/offsets, reconstruction_error ----

// Engine::Run of one request with options, on the test thread's own engine.
SequenceResult RunDirectRequest(const SequenceRequest& request) {
  auto results = env->reference->Run({request});
  EXPECT_TRUE(results.ok()) << results.status();
  return results.ok() ? std::move(results->front()) : SequenceResult();
}

std::vector<int32_t> IdsOf(const std::vector<v1::TokenFeatures>& tokens) {
  std::vector<int32_t> ids;
  for (const auto& t : tokens) ids.push_back(static_cast<int32_t>(t.token_id()));
  return ids;
}

std::vector<v1::TokenFeatures> ExtractTokens(SaeClient* client, const v1::ExtractRequest& request) {
  std::vector<v1::ExtractResponse> responses;
  const grpc::Status status = client->Extract(request, &responses);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return Tokens(responses);
}

std::vector<std::pair<uint32_t, float>> Features(const v1::SaeFeatures& s) {
  std::vector<std::pair<uint32_t, float>> out;
  for (int i = 0; i < s.indices_size(); ++i) out.emplace_back(s.indices(i), s.values(i));
  return out;
}

TEST_F(ServiceTest, OmitPiecesAndOffsetsLeaveFeaturesAlone) {
  const std::vector<v1::TokenFeatures> base = ExtractTokens(client_.get(), TextRequest(kText));
  ASSERT_GT(base.size(), 3u);
  ASSERT_GT(base.back().char_end(), 0u) << "text input must carry offsets";
  for (int mode = 1; mode <= 3; ++mode) {
    const bool omit_pieces = mode & 1, omit_offsets = mode & 2;
    v1::ExtractRequest request = TextRequest(kText);
    request.set_omit_pieces(omit_pieces);
    request.set_omit_offsets(omit_offsets);
    const std::vector<v1::TokenFeatures> got = ExtractTokens(client_.get(), request);
    ASSERT_EQ(got.size(), base.size());
    for (size_t t = 0; t < got.size(); ++t) {
      EXPECT_EQ(got[t].token_id(), base[t].token_id());
      EXPECT_EQ(got[t].piece(), omit_pieces ? "" : base[t].piece()) << "mode " << mode << " token " << t;
      EXPECT_EQ(got[t].char_start(), omit_offsets ? 0u : base[t].char_start()) << "mode " << mode;
      EXPECT_EQ(got[t].char_end(), omit_offsets ? 0u : base[t].char_end()) << "mode " << mode;
      ASSERT_EQ(got[t].saes_size(), base[t].saes_size());
      for (int s = 0; s < got[t].saes_size(); ++s) EXPECT_EQ(Features(got[t].saes(s)), Features(base[t].saes(s)));
    }
  }
}

TEST_F(ServiceTest, MinActivationDropsOnlySmallerFeatures) {
  v1::ExtractRequest request = TextRequest("The red cat and the green dog in Paris.");
  request.set_k(kMaxK);
  const std::vector<v1::TokenFeatures> base = ExtractTokens(client_.get(), request);
  std::vector<float> values;
  for (const auto& t : base)
    for (const auto& s : t.saes()) values.insert(values.end(), s.values().begin(), s.values().end());
  ASSERT_GT(values.size(), 10u);
  std::sort(values.begin(), values.end());
  const float cut = values[values.size() / 2];  // a reported value: kept, since only values < cut drop
  request.set_min_activation(cut);
  const std::vector<v1::TokenFeatures> got = ExtractTokens(client_.get(), request);
  ASSERT_EQ(got.size(), base.size());
  int dropped = 0, kept = 0;
  for (size_t t = 0; t < got.size(); ++t) {
    for (int s = 0; s < got[t].saes_size(); ++s) {
      std::vector<std::pair<uint32_t, float>> want;
      for (const auto& f : Features(base[t].saes(s))) (f.second >= cut ? want.push_back(f) : void(++dropped));
      kept += static_cast<int>(want.size());
      EXPECT_EQ(Features(got[t].saes(s)), want) << "token " << t << " sae " << got[t].saes(s).sae();
    }
  }
  EXPECT_GT(dropped, 0);
  EXPECT_GT(kept, 0);
}

TEST_F(ServiceTest, WatchListReportsWatchedFeaturesAndMatchesEngine) {
  const auto& saes = env->reference->saes();
  const std::string watched_sae = saes[0]->name(), other_sae = saes.back()->name();
  v1::ExtractRequest request = TextRequest("The red cat and the green dog flew to Rome and Paris.");
  request.add_saes(watched_sae);
  request.add_saes(other_sae);
  request.set_k(kMaxK);
  const std::vector<v1::TokenFeatures> base = ExtractTokens(client_.get(), request);
  // Features that fire but rank below 3 somewhere, plus features that never fire.
  std::set<uint32_t> fired;
  std::vector<uint32_t> watch;
  for (const auto& t : base) {
    const auto f = Features(t.saes(0));
    for (size_t j = 0; j < f.size(); ++j) {
      fired.insert(f[j].first);
      if (j >= 3 && watch.size() < 10 && std::find(watch.begin(), watch.end(), f[j].first) == watch.end()) {
        watch.push_back(f[j].first);
      }
    }
  }
  ASSERT_FALSE(watch.empty());
  for (uint32_t f = 0; watch.size() < 16; ++f)
    if (!fired.count(f)) watch.push_back(f);

  request.set_k(3);
  v1::FeatureWatch* w = request.add_watch();
  w->set_sae(watched_sae);
  for (uint32_t f : watch) w->add_features(f);
  const std::vector<v1::TokenFeatures> got = ExtractTokens(client_.get(), request);
  ASSERT_EQ(got.size(), base.size());

  SequenceRequest direct;
  direct.ids = IdsOf(got);
  direct.sae_indices = {0, static_cast<int>(saes.size()) - 1};
  direct.k = 3;
  direct.watch = {std::vector<int32_t>(watch.begin(), watch.end()), {}};
  const SequenceResult want = RunDirectRequest(direct);
  ASSERT_EQ(want.saes.size(), 2u);
  int outside_top3 = 0;
  for (size_t t = 0; t < got.size(); ++t) {
    for (int s = 0; s < 2; ++s) {
      const auto have = Features(got[t].saes(s));
      const SaeTopK& top = want.saes[s];
      ASSERT_EQ(static_cast<int>(have.size()), top.n_active(static_cast<int>(t))) << "token " << t << " sae " << s;
      for (size_t j = 0; j < have.size(); ++j) {
        EXPECT_EQ(have[j].first, static_cast<uint32_t>(top.indices[t * top.k + j])) << "token " << t;
        EXPECT_NEAR(have[j].second, top.values[t * top.k + j], 1e-6f * (1 + std::abs(have[j].second)));
      }
    }
    const auto base_top = Features(base[t].saes(0));
    for (const auto& f : Features(got[t].saes(0))) {
      EXPECT_NE(std::find(watch.begin(), watch.end(), f.first), watch.end()) << "unwatched feature " << f.first;
      bool in_top3 = false;
      for (size_t j = 0; j < base_top.size() && j < 3; ++j) in_top3 |= base_top[j].first == f.first;
      outside_top3 += !in_top3;
    }
    // The SAE without a watch list keeps its global top 3.
    auto other = Features(base[t].saes(1));
    other.resize(std::min<size_t>(3, other.size()));
    EXPECT_EQ(Features(got[t].saes(1)), other) << "token " << t;
  }
  EXPECT_GT(outside_top3, 0) << "a watched feature outside the global top 3 must be reported";
}

TEST_F(ServiceTest, ReconstructionErrorPerTokenAndSae) {
  v1::ExtractRequest request = TextRequest(kText);
  const std::vector<v1::TokenFeatures> plain = ExtractTokens(client_.get(), request);
  for (const auto& t : plain)
    for (const auto& s : t.saes()) EXPECT_FALSE(s.has_reconstruction_error()) << "not asked for";

  request.set_reconstruction_error(true);
  const std::vector<v1::TokenFeatures> got = ExtractTokens(client_.get(), request);
  ASSERT_GT(got.size(), 2u);
  SequenceRequest direct;
  direct.ids = IdsOf(got);
  direct.sae_indices = env->reference->all_sae_indices();
  direct.k = kDefaultK;
  direct.reconstruction_error = true;
  const SequenceResult want = RunDirectRequest(direct);
  for (size_t t = 0; t < got.size(); ++t) {
    ASSERT_EQ(got[t].saes_size(), static_cast<int>(want.saes.size()));
    for (int s = 0; s < got[t].saes_size(); ++s) {
      const v1::SaeFeatures& f = got[t].saes(s);
      if (t == 0) {  // BOS
        EXPECT_FALSE(f.has_reconstruction_error()) << f.sae();
        continue;
      }
      ASSERT_TRUE(f.has_reconstruction_error()) << f.sae() << " token " << t;
      EXPECT_TRUE(std::isfinite(f.reconstruction_error()) && f.reconstruction_error() >= 0) << f.sae();
      EXPECT_NEAR(f.reconstruction_error(), want.saes[s].reconstruction_error[t],
                  1e-6f * (1 + want.saes[s].reconstruction_error[t]))
          << f.sae() << " token " << t;
    }
  }
  request.set_include_bos(true);
  const std::vector<v1::TokenFeatures> with_bos = ExtractTokens(client_.get(), request);
  ASSERT_FALSE(with_bos.empty());
  for (const auto& s : with_bos[0].saes()) EXPECT_TRUE(s.has_reconstruction_error()) << s.sae() << " at BOS";
}

TEST_F(ServiceTest, OptionsOverExtractStreamMatchExtract) {
  v1::ExtractRequest request = TextRequest("Two green birds flew over London.", "opts");
  request.set_min_activation(1.5f);
  request.set_omit_pieces(true);
  request.set_reconstruction_error(true);
  v1::FeatureWatch* w = request.add_watch();
  w->set_sae(env->reference->saes()[1]->name());
  for (uint32_t f : {3u, 1u, 4u, 100u, 200u, 300u, 400u, 500u}) w->add_features(f);
  const std::vector<v1::TokenFeatures> single = ExtractTokens(client_.get(), request);

  grpc::ClientContext context;
  auto stream = client_->stub()->ExtractStream(&context);
  ASSERT_TRUE(stream->Write(request));
  auto by_id = ReadUntilDone(stream.get(), {"opts"});
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  const std::vector<v1::TokenFeatures> streamed = Tokens(by_id["opts"]);
  ASSERT_EQ(streamed.size(), single.size());
  for (size_t t = 0; t < single.size(); ++t) {
    EXPECT_EQ(streamed[t].SerializeAsString(), single[t].SerializeAsString()) << "token " << t;
    EXPECT_EQ(streamed[t].piece(), "");
  }
}

TEST_F(ServiceTest, BadOptionsAreInvalidArgument) {
  const auto& saes = env->reference->saes();
  const std::string first = saes[0]->name();
  const int d_sae = saes[0]->hyperparams().d_sae;
  struct Case {
    std::string name;
    v1::ExtractRequest request;
    std::string message_part;
  };
  std::vector<Case> cases;
  auto add = [&](const std::string& name, const std::string& message_part, auto edit) {
    v1::ExtractRequest request = TextRequest("hi");
    edit(&request);
    cases.push_back({name, request, message_part});
  };
  auto watch = [](v1::ExtractRequest* r, const std::string& sae, std::vector<uint32_t> features) {
    v1::FeatureWatch* w = r->add_watch();
    w->set_sae(sae);
    for (uint32_t f : features) w->add_features(f);
  };
  add("NaN min_activation", "min_activation", [](v1::ExtractRequest* r) { r->set_min_activation(std::nanf("")); });
  add("negative min_activation", "min_activation must be a finite number >= 0",
      [](v1::ExtractRequest* r) { r->set_min_activation(-0.5f); });
  add("infinite min_activation", "min_activation",
      [](v1::ExtractRequest* r) { r->set_min_activation(std::numeric_limits<float>::infinity()); });
  add("watch names an unknown SAE", "watch[0].sae", [&](v1::ExtractRequest* r) { watch(r, "L99R-8x", {1}); });
  add("watch names an SAE not requested", "is not one of the requested saes", [&](v1::ExtractRequest* r) {
    r->add_saes(saes[1]->name());
    watch(r, first, {1});
  });
  add("feature >= d_sae", "watch[0].features[1] = " + std::to_string(d_sae) + " is out of range",
      [&](v1::ExtractRequest* r) {
        watch(r, first, {0, static_cast<uint32_t>(d_sae)});
      });
  add("duplicate feature", "watch[0].features[2] = 7 is listed twice", [&](v1::ExtractRequest* r) {
    watch(r, first, {7, 8, 7});
  });
  add("SAE watched twice", "watch[1] names SAE", [&](v1::ExtractRequest* r) {
    watch(r, first, {1});
    watch(r, first, {2});
  });
  add("empty watch", "lists no features", [&](v1::ExtractRequest* r) { watch(r, first, {}); });
  add("too many watched features", "at most " + std::to_string(kMaxWatchedFeaturesPerSae), [&](v1::ExtractRequest* r) {
    std::vector<uint32_t> many(kMaxWatchedFeaturesPerSae + 1);
    for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<uint32_t>(i % d_sae);
    watch(r, first, many);
  });
  for (const Case& c : cases) {
    std::vector<v1::ExtractResponse> responses;
    const grpc::Status status = client_->Extract(c.request, &responses);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name << ": " << status.error_message();
    EXPECT_NE(status.error_message().find(c.message_part), std::string::npos)
        << c.name << ": " << status.error_message();
    EXPECT_TRUE(responses.empty()) << c.name;
  }
}

// Shutdown with streams open (clients keep theirs open): Drain ends an idle
// stream at once, a busy one once its responses are written, both with
// UNAVAILABLE, and a stream opened afterwards at once; so Server::Shutdown
// need not wait out its deadline for them.
// A server of its own (to shut down) on the demo engine, whose batches
// wait at `gate`, with metrics of its own.
class ServiceDrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::Create(testing::DemoEngineOptions());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    Engine* e = engine_.get();
    auto executor = Executor::Create(BlockingRunner([e, this](const std::vector<SequenceRequest>& batch) {
                                       gate.Pass(batch.size());
                                       return e->Run(batch);
                                     }),
                                     ExecutorOptions{});
    ASSERT_TRUE(executor.ok()) << executor.status();
    executor_ = std::move(*executor);
    ServiceOptions options;
    options.limits.max_tokens_per_request = kMaxTokens;
    options.metrics = metrics;
    service_ = std::make_unique<SaeServiceImpl>(options);
    service_->Attach(e, executor_.get());
    int port = 0;
    server_ = StartServer(service_.get(), &port);
    ASSERT_NE(server_, nullptr);
    client_ = SaeClient::Connect("127.0.0.1:" + std::to_string(port));
  }

  Gate gate;
  std::shared_ptr<Metrics> metrics = std::make_shared<Metrics>();
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<SaeServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<SaeClient> client_;
};

TEST_F(ServiceDrainTest, OpenStreamsEndOnceAnswered) {
  auto open = [&](grpc::ClientContext* context) {
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return client_->stub()->ExtractStream(context);
  };
  auto expect_unavailable = [](grpc::ClientReaderWriter<v1::ExtractRequest, v1::ExtractResponse>* stream,
                               const char* what) {
    v1::ExtractResponse response;
    EXPECT_FALSE(stream->Read(&response)) << what;
    const grpc::Status status = stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << what << ": " << status.error_message();
    EXPECT_NE(status.error_message().find("shutting down"), std::string::npos) << what;
  };

  grpc::ClientContext idle_context, busy_context;
  auto idle = open(&idle_context);
  auto busy = open(&busy_context);
  gate.Close();
  ASSERT_TRUE(busy->Write(TextRequest(kText, "busy")));
  ASSERT_TRUE(WaitFor([&] { return gate.waiting() == 1; }));

  const auto start = std::chrono::steady_clock::now();
  executor_->StopAdmitting();
  service_->Drain();
  expect_unavailable(idle.get(), "idle stream");
  grpc::ClientContext late_context;
  auto late = open(&late_context);
  expect_unavailable(late.get(), "stream opened during the drain");
  gate.Open();
  auto by_id = ReadUntilDone(busy.get(), {"busy"});
  EXPECT_FALSE(by_id["busy"].back().has_error()) << by_id["busy"].back().error().message();
  expect_unavailable(busy.get(), "busy stream");

  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(30));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10))
      << "Server::Shutdown waited for streams that had nothing left to answer";
  executor_->Shutdown();
  server_->Wait();
}

// Calls still running when the shutdown grace ends are cancelled by
// grpc::Server::Shutdown: they count as UNAVAILABLE (the server went away),
// one running and one queued, not as cancelled by their clients.
TEST_F(ServiceDrainTest, CallsCutOffWhenTheGraceEndsAreUnavailable) {
  gate.Close();
  grpc::Status extract_status;
  std::thread extract([&] {
    std::vector<v1::ExtractResponse> responses;
    extract_status = client_->Extract(TextRequest(kText), &responses);
  });
  ASSERT_TRUE(WaitFor([&] { return gate.waiting() == 1; }));
  grpc::ClientContext stream_context;
  stream_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = client_->stub()->ExtractStream(&stream_context);
  ASSERT_TRUE(stream->Write(TextRequest(kText, "queued")));
  ASSERT_TRUE(WaitFor([&] { return executor_->inflight() == 2; }));

  const auto cut_off = std::chrono::system_clock::now() + std::chrono::milliseconds(200);
  service_->CutOffAt(cut_off);
  executor_->StopAdmitting();
  service_->Drain();
  std::thread shutdown([&] { server_->Shutdown(cut_off); });
  std::this_thread::sleep_until(cut_off + std::chrono::milliseconds(300));
  gate.Open();  // the running batch returns; its cancelled job ends
  shutdown.join();
  extract.join();
  EXPECT_FALSE(extract_status.ok());
  v1::ExtractResponse response;
  while (stream->Read(&response)) {
  }
  EXPECT_FALSE(stream->Finish().ok());
  executor_->Shutdown();
  server_->Wait();
  EXPECT_EQ(MetricValue(*metrics, "sae_request_failures_total", "reason", "unavailable"), 2);
  EXPECT_EQ(MetricValue(*metrics, "sae_request_failures_total", "reason", "cancelled"), 0);
}

// A --config that cannot be read is an error naming it: a directory used to
// load as an empty config, so the flags alone silently decided everything.
TEST(ServerConfigTest, UnreadableConfigFileIsNamed) {
  const std::string dir = testing::MakeTempDir("config-dir");
  const absl::Status directory = LoadServerConfig(dir).status();
  EXPECT_EQ(directory.code(), absl::StatusCode::kInvalidArgument) << directory;
  EXPECT_NE(directory.message().find("the config file " + dir + ": is a directory"), std::string::npos) << directory;
  const absl::Status missing = LoadServerConfig(dir + "/none.textproto").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound) << missing;
  EXPECT_NE(missing.message().find(dir + "/none.textproto: cannot open"), std::string::npos) << missing;
}

// The hung-GPU watchdog is on by default on cuda, off on cpu (where a big
// model's batch may take minutes), and a set value (0 too) is kept.
TEST(ServerConfigTest, BatchTimeoutDefaultsFollowTheBackend) {
  auto timeout = [](const std::string& text) -> absl::StatusOr<ExecutorOptions> {
    absl::StatusOr<v1::ServerConfig> config = ParseServerConfig(text, "test.textproto");
    if (!config.ok()) return config.status();
    ApplyConfigDefaults(&*config);
    if (absl::Status s = ValidateServerConfig(*config); !s.ok()) return s;
    return ExecutorOptionsFromConfig(*config);
  };
  auto seconds = [&](const std::string& text) {
    absl::StatusOr<ExecutorOptions> options = timeout(text);
    EXPECT_TRUE(options.ok()) << text << ": " << options.status();
    return options.ok() ? std::chrono::duration_cast<std::chrono::seconds>(options->batch_timeout).count() : -1;
  };
  EXPECT_EQ(seconds("demo: true"), 0);
  EXPECT_EQ(seconds("demo: true backend: \"cpu\""), 0);
  EXPECT_EQ(seconds("demo: true backend: \"cuda\""), 120);
  EXPECT_EQ(seconds("demo: true backend: \"cuda\" batch_timeout_seconds: 0"), 0);
  EXPECT_EQ(seconds("demo: true backend: \"cuda\" batch_timeout_seconds: 15"), 15);
  EXPECT_EQ(seconds("demo: true batch_timeout_seconds: 600"), 600);
  const absl::Status too_long = timeout("demo: true batch_timeout_seconds: 86401").status();
  EXPECT_EQ(too_long.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.message().find("batch_timeout_seconds is 86401; at most 86400"), std::string::npos) << too_long;
}

// The connection settings become the gRPC server's channel arguments, in
// milliseconds: keepalive defaults to gRPC's own (two hours, 20 s), client
// pings are accepted every 10 s (0: at any rate, no strikes), also with no
// call in flight, and a connection age only when one is set; values that do
// not fit gRPC's int milliseconds are refused, naming the field.
TEST(ServerConfigTest, ConnectionSettingsBecomeChannelArguments) {
  auto args = [](const std::string& text) -> absl::StatusOr<std::map<std::string, int>> {
    absl::StatusOr<v1::ServerConfig> config = ParseServerConfig(text, "test.textproto");
    if (!config.ok()) return config.status();
    ApplyConfigDefaults(&*config);
    if (absl::Status s = ValidateServerConfig(*config); !s.ok()) return s;
    std::map<std::string, int> out;
    for (const auto& [name, value] : GrpcServerChannelArgs(*config)) {
      EXPECT_TRUE(out.emplace(name, value).second) << text << ": " << name << " twice";
    }
    return out;
  };
  const absl::StatusOr<std::map<std::string, int>> defaults = args("demo: true");
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(*defaults, (std::map<std::string, int>{{GRPC_ARG_KEEPALIVE_TIME_MS, 7200000},
                                                   {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000},
                                                   {GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0},
                                                   {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1},
                                                   {GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000}}));
  const absl::StatusOr<std::map<std::string, int>> set = args(
      "demo: true keepalive_time_seconds: 30 keepalive_timeout_seconds: 5 min_client_ping_interval_seconds: 0 "
      "max_connection_age_seconds: 600 max_connection_age_grace_seconds: 2147483");
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(*set, (std::map<std::string, int>{{GRPC_ARG_KEEPALIVE_TIME_MS, 30000},
                                              {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000},
                                              {GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0},
                                              {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1},
                                              {GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 0},
                                              {GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0},
                                              {GRPC_ARG_MAX_CONNECTION_AGE_MS, 600000},
                                              {GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, 2147483000}}));
  // A grace without an age means nothing: no argument.
  const absl::StatusOr<std::map<std::string, int>> grace_only = args("demo: true max_connection_age_grace_seconds: 5");
  ASSERT_TRUE(grace_only.ok()) << grace_only.status();
  EXPECT_EQ(grace_only->count(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS), 0u);
  for (const std::string field :
       {"keepalive_time_seconds", "keepalive_timeout_seconds", "min_client_ping_interval_seconds",
        "max_connection_age_seconds", "max_connection_age_grace_seconds"}) {
    const absl::Status too_long = args("demo: true " + field + ": 2147484").status();
    EXPECT_EQ(too_long.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_EQ(too_long.message(), "config: " + field + " is 2147484; at most 2147483 (24 days)") << too_long;
  }
}

// A config's text through sae-server's own parsing, defaults and validation.
absl::Status ValidateConfigText(const std::string& text) {
  absl::StatusOr<v1::ServerConfig> config = ParseServerConfig(text, "test.textproto");
  if (!config.ok()) return config.status();
  ApplyConfigDefaults(&*config);
  return ValidateServerConfig(*config);
}

// The metrics and health ports are ports of their own (port 0, any free
// port, is never the same port twice).
TEST(ServerConfigTest, PortsAreDistinct) {
  EXPECT_TRUE(ValidateConfigText("demo: true listen: ':1' metrics_listen: ':2' health_listen: ':3'").ok());
  EXPECT_TRUE(ValidateConfigText("demo: true listen: ':0' metrics_listen: ':0' health_listen: ':0'").ok());
  const std::string health = "config: health_listen must differ from listen and metrics_listen (a port of its own)";
  for (const auto& [text, message] : std::vector<std::pair<std::string, std::string>>{
           {"listen: ':1' metrics_listen: ':1'", "config: metrics_listen must differ from listen (a separate port)"},
           {"listen: ':1' health_listen: ':1'", health},
           {"listen: ':1' metrics_listen: ':2' health_listen: ':2'", health},
       }) {
    const absl::Status status = ValidateConfigText("demo: true " + text);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_EQ(status.message(), message) << text;
  }
}

// The tls_* fields go together as TLS needs them; the files themselves are
// checked when the credentials are built (TlsTest in e2e_binaries_test).
TEST(ServerConfigTest, TlsFieldsComeTogether) {
  EXPECT_TRUE(ValidateConfigText("demo: true tls_cert_file: 'c.pem' tls_key_file: 'k.pem'").ok());
  EXPECT_TRUE(ValidateConfigText("demo: true tls_cert_file: 'c.pem' tls_key_file: 'k.pem' tls_client_ca_file: 'ca.pem' "
                                 "tls_reload_seconds: 86400")
                  .ok());
  struct Case {
    std::string text, message;
  };
  for (const Case& c : std::vector<Case>{
           {"tls_cert_file: 'c.pem'", "config: tls_cert_file is set without tls_key_file (its private key)"},
           {"tls_key_file: 'k.pem'",
            "config: tls_key_file is set without tls_cert_file (the certificate it signs for)"},
           {"tls_client_ca_file: 'ca.pem'",
            "config: tls_client_ca_file is set without tls_cert_file and tls_key_file (client certificates need TLS)"},
           {"tls_reload_seconds: 86401", "config: tls_reload_seconds is 86401; at most 86400 (one day)"},
       }) {
    const absl::Status status = ValidateConfigText("demo: true " + c.text);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_EQ(status.message(), c.message) << c.text;
  }
  absl::StatusOr<v1::ServerConfig> defaults = ParseServerConfig("demo: true", "test.textproto");
  ASSERT_TRUE(defaults.ok());
  ApplyConfigDefaults(&*defaults);
  EXPECT_EQ(defaults->tls_reload_seconds(), 60u);
}

// The configurations that ship in deploy/ load and validate as sae-server
// would load them: deploy/server.textproto, and the textproto inside the
// Kubernetes ConfigMap, whose shutdown grace must end before the pod's
// terminationGracePeriodSeconds and whose pod must run the GPU image; both
// with the connection settings the README quotes.
TEST(ServerConfigTest, ShippedDeployConfigsAreValid) {
  const std::string deploy = SAE_DEPLOY_DIR;
  auto check = [](absl::StatusOr<v1::ServerConfig> config, const std::string& origin) -> v1::ServerConfig {
    EXPECT_TRUE(config.ok()) << origin << ": " << config.status();
    if (!config.ok()) return {};
    ApplyConfigDefaults(&*config);
    const absl::Status valid = ValidateServerConfig(*config);
    EXPECT_TRUE(valid.ok()) << origin << ": " << valid;
    EXPECT_EQ(config->backend(), "cuda") << origin;
    EXPECT_GT(config->saes_size(), 0) << origin;
    EXPECT_GT(config->batch_timeout_seconds(), 0u) << origin;
    // The README's Connections section quotes these.
    EXPECT_EQ(config->keepalive_time_seconds(), 60u) << origin;
    EXPECT_EQ(config->keepalive_timeout_seconds(), 20u) << origin;
    if (config->long_input_policy() == v1::ServerConfig::WINDOW) {
      EXPECT_GT(config->max_tokens_per_request(), config->max_seq_len())
          << origin << ": WINDOW never applies when no request may be longer than max_seq_len";
    }
    return *config;
  };
  const v1::ServerConfig server = check(LoadServerConfig(deploy + "/server.textproto"), "server.textproto");
  EXPECT_EQ(server.saes_size(), 3);

  std::ifstream in(deploy + "/kubernetes.yaml");
  ASSERT_TRUE(in) << deploy << "/kubernetes.yaml";
  std::string line, textproto, image;
  int grace_period = -1;
  size_t block_indent = std::string::npos;  // indentation of the ConfigMap's textproto lines, once inside
  bool in_block = false;
  while (std::getline(in, line)) {
    const size_t indent = line.find_first_not_of(' ');
    if (in_block) {
      if (indent == std::string::npos) {
        textproto += "\n";
        continue;
      }
      if (block_indent == std::string::npos) block_indent = indent;
      if (indent >= block_indent) {
        textproto += line.substr(block_indent) + "\n";
        continue;
      }
      in_block = false;
    }
    if (indent == std::string::npos) continue;
    const std::string body = line.substr(indent);
    if (body == "server.textproto: |") in_block = true;
    if (body.rfind("terminationGracePeriodSeconds:", 0) == 0) grace_period = std::stoi(body.substr(30));
    if (body.rfind("image:", 0) == 0) {
      std::istringstream words(body.substr(6));
      words >> image;
    }
  }
  ASSERT_FALSE(textproto.empty()) << "no server.textproto in the ConfigMap";
  const v1::ServerConfig pod = check(ParseServerConfig(textproto, "kubernetes.yaml ConfigMap"), "kubernetes.yaml");
  EXPECT_GT(grace_period, 0);
  EXPECT_EQ(pod.max_connection_age_seconds(), 1800u) << "connections rebalance over replicas";
  EXPECT_EQ(pod.max_connection_age_grace_seconds(), 0u) << "a running stream is not cut off";
  EXPECT_LT(static_cast<int>(pod.shutdown_grace_seconds()), grace_period)
      << "in-flight streams must finish before the kubelet's SIGKILL";
  EXPECT_EQ(image, "sae-server:gpu") << "the Dockerfile's gpu target (docker build --target gpu -t sae-server:gpu .)";
}

}  // namespace
}  // namespace sae
