// The serving engine through the real gRPC service on the demo model: batch
// invariance, windows of long requests, long-input policies, deadlines,
// cancellation, overload (reject and backpressure) and many concurrent
// clients. Every request's features are compared with the same request run
// alone (see kBatchRelTolerance).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "rpc/windows.h"
#include "serving_env.h"

namespace sae {
namespace {

using testing::ServingEnv;
using testing::WaitFor;

const char* const kTexts[] = {
    "The cat sat on the red mat.",
    "A blue bird and a green fish.",
    "Paris and London are cities.",
    "one two three four five six",
};

v1::ExtractRequest TextRequest(const std::string& text, const std::string& id = "") {
  v1::ExtractRequest request;
  request.set_request_id(id);
  request.set_text(text);
  return request;
}

v1::ExtractRequest IdsRequest(const std::vector<int32_t>& ids, const std::string& id = "") {
  v1::ExtractRequest request;
  request.set_request_id(id);
  for (int32_t t : ids) request.mutable_token_ids()->add_ids(static_cast<uint32_t>(t));
  return request;
}

std::vector<v1::TokenFeatures> Tokens(const std::vector<v1::ExtractResponse>& responses) {
  std::vector<v1::TokenFeatures> tokens;
  for (const auto& r : responses) tokens.insert(tokens.end(), r.tokens().begin(), r.tokens().end());
  return tokens;
}

// The CPU backend is batch-invariant by construction (each MatMul output is
// one fixed-order dot product), so values must match bit for bit.
constexpr float kBatchRelTolerance = 0.0f;

// Same features token by token: identical indices, values within
// kBatchRelTolerance.
void ExpectSameFeatures(const std::vector<v1::TokenFeatures>& got, const std::vector<v1::TokenFeatures>& want,
                        const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t t = 0; t < got.size(); ++t) {
    EXPECT_EQ(got[t].token_id(), want[t].token_id()) << what << " token " << t;
    ASSERT_EQ(got[t].saes_size(), want[t].saes_size()) << what << " token " << t;
    for (int j = 0; j < got[t].saes_size(); ++j) {
      const auto& a = got[t].saes(j);
      const auto& b = want[t].saes(j);
      EXPECT_EQ(a.sae(), b.sae());
      ASSERT_EQ(a.indices_size(), b.indices_size()) << what << " token " << t << " " << a.sae();
      for (int s = 0; s < a.indices_size(); ++s) {
        EXPECT_EQ(a.indices(s), b.indices(s)) << what << " token " << t << " " << a.sae();
        EXPECT_NEAR(a.values(s), b.values(s), kBatchRelTolerance * std::fabs(b.values(s)))
            << what << " token " << t << " " << a.sae();
      }
    }
  }
}

ExecutorOptions DefaultExecutor() {
  ExecutorOptions options;
  options.max_batch_tokens = 4096;
  options.max_inflight_requests = 16;
  return options;
}

ServiceOptions DefaultService() {
  ServiceOptions options;
  options.limits.default_k = 8;
  options.limits.max_k = 32;
  options.limits.max_tokens_per_request = 256;
  options.limits.chunk_tokens = 64;
  options.limits.max_stream_backlog = 16;
  return options;
}

std::unique_ptr<ServingEnv> StartOrDie(ExecutorOptions executor, ServiceOptions service) {
  std::string error;
  auto env = ServingEnv::Start(std::move(executor), std::move(service), &error);
  EXPECT_NE(env, nullptr) << error;
  return env;
}

// Reads an ExtractStream until every id in `ids` is done.
std::map<std::string, std::vector<v1::ExtractResponse>> ReadUntilDone(
    grpc::ClientReaderWriter<v1::ExtractRequest, v1::ExtractResponse>* stream, size_t n_ids) {
  std::map<std::string, std::vector<v1::ExtractResponse>> by_id;
  size_t n_done = 0;
  v1::ExtractResponse response;
  while (n_done < n_ids && stream->Read(&response)) {
    by_id[response.request_id()].push_back(response);
    if (response.done()) ++n_done;
  }
  return by_id;
}

TEST(ServingTest, FeaturesAreIdenticalAloneAndInsideAMixedBatch) {
  auto env = StartOrDie(DefaultExecutor(), DefaultService());
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  // Different lengths, k and SAE subsets in one batch.
  std::vector<v1::ExtractRequest> requests;
  for (int i = 0; i < 4; ++i) {
    v1::ExtractRequest r = TextRequest(kTexts[i], "r" + std::to_string(i));
    r.set_k(static_cast<uint32_t>(4 + 8 * i));
    if (i % 2 == 1) r.add_saes("L3R-32x");
    requests.push_back(r);
  }
  std::vector<std::vector<v1::TokenFeatures>> alone;
  for (const auto& r : requests) {
    std::vector<v1::ExtractResponse> responses;
    ASSERT_TRUE(client->Extract(r, &responses).ok());
    alone.push_back(Tokens(responses));
  }
  for (size_t size : env->gate.batch_sizes()) ASSERT_EQ(size, 1u) << "alone means a batch of one";

  env->gate.Close();
  grpc::ClientContext context;
  auto stream = client->stub()->ExtractStream(&context);
  ASSERT_TRUE(stream->Write(TextRequest("Held first.", "hold")));
  ASSERT_TRUE(WaitFor([&] { return env->gate.waiting() == 1; }));
  for (const auto& r : requests) ASSERT_TRUE(stream->Write(r));
  ASSERT_TRUE(WaitFor([&] { return env->executor->inflight() == 5; }));
  // Admitted is not yet staged: the scheduler thread packs them.
  ASSERT_TRUE(WaitFor([&] { return env->executor->staged_windows() == 4; }));
  env->gate.Open();
  auto by_id = ReadUntilDone(stream.get(), 5);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(env->gate.max_batch(), 4) << "the four requests ran as one batch";
  for (int i = 0; i < 4; ++i) {
    ExpectSameFeatures(Tokens(by_id["r" + std::to_string(i)]), alone[i], "request " + std::to_string(i));
  }
}

std::string LongText() {
  std::string text;
  for (const char* t : kTexts) text += std::string(t) + " ";
  return text;
}

TEST(ServingTest, LongRequestWindowsEqualTheSameWindowsSentAlone) {
  ExecutorOptions executor = DefaultExecutor();
  executor.max_seq_len = 8;
  ServiceOptions service = DefaultService();
  service.max_seq_len = 8;
  service.long_input_policy = v1::ServerConfig::WINDOW;
  auto env = StartOrDie(executor, service);
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();

  std::vector<v1::ExtractResponse> responses;
  ASSERT_TRUE(client->Extract(TextRequest(LongText()), &responses).ok());
  const std::vector<v1::TokenFeatures> tokens = Tokens(responses);
  std::vector<int32_t> ids;
  for (const auto& t : tokens) ids.push_back(static_cast<int32_t>(t.token_id()));
  ASSERT_GT(ids.size(), 20u);
  EXPECT_EQ(responses.back().total_tokens(), ids.size());
  for (size_t t = 0; t < tokens.size(); ++t) EXPECT_EQ(tokens[t].position(), t);
  for (const auto& s : env->gate.sequences()) EXPECT_LE(s.size(), 8u) << "no sequence longer than max_seq_len";

  const std::vector<Window> windows = SplitIntoWindows(ids, 8, env->reference->tokenizer().bos_id());
  ASSERT_GE(windows.size(), 3u);
  EXPECT_TRUE(windows[1].bos_prepended);
  for (const Window& w : windows) {
    SequenceRequest whole;
    whole.ids = ids;
    const std::vector<int32_t> window_ids = WindowRequest(whole, w, env->reference->tokenizer().bos_id()).ids;
    std::vector<v1::ExtractResponse> alone;
    ASSERT_TRUE(client->Extract(IdsRequest(window_ids), &alone).ok());
    std::vector<v1::TokenFeatures> alone_tokens = Tokens(alone);
    // The prepended BOS is not a position of the long request.
    if (w.bos_prepended) alone_tokens.erase(alone_tokens.begin());
    const std::vector<v1::TokenFeatures> part(tokens.begin() + w.begin, tokens.begin() + w.end);
    ExpectSameFeatures(part, alone_tokens, "window at " + std::to_string(w.begin));
  }
}

TEST(ServingTest, LongRequestIsStreamedWindowByWindow) {
  ExecutorOptions executor = DefaultExecutor();
  executor.max_seq_len = 8;
  executor.max_batch_tokens = 8;  // one window per batch
  ServiceOptions service = DefaultService();
  service.max_seq_len = 8;
  auto env = StartOrDie(executor, service);
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  env->gate.Close();
  env->gate.Allow(1);
  v1::ExtractRequest request = TextRequest(LongText());
  request.set_chunk_tokens(4);
  grpc::ClientContext context;
  auto reader = client->stub()->Extract(&context, request);
  // The first window's two chunks arrive while the second window is held.
  v1::ExtractResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.tokens(0).position(), 0u);
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.tokens(0).position(), 4u);
  EXPECT_FALSE(response.done());
  ASSERT_TRUE(WaitFor([&] { return env->gate.waiting() == 1; }));
  env->gate.Open();
  int n_more = 0;
  while (reader->Read(&response)) ++n_more;
  EXPECT_TRUE(response.done());
  EXPECT_GT(n_more, 2);
  EXPECT_TRUE(reader->Finish().ok());
}

TEST(ServingTest, TruncateAndRejectPolicies) {
  for (auto policy : {v1::ServerConfig::TRUNCATE, v1::ServerConfig::REJECT}) {
    ServiceOptions service = DefaultService();
    service.max_seq_len = 8;
    service.long_input_policy = policy;
    ExecutorOptions executor = DefaultExecutor();
    executor.max_seq_len = 8;
    auto env = StartOrDie(executor, service);
    ASSERT_NE(env, nullptr);
    auto client = env->NewClient();
    std::vector<v1::ExtractResponse> responses;
    grpc::Status status = client->Extract(TextRequest(LongText()), &responses);
    if (policy == v1::ServerConfig::REJECT) {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_NE(status.error_message().find("max_seq_len"), std::string::npos) << status.error_message();
      EXPECT_TRUE(env->gate.sequences().empty());
      continue;
    }
    ASSERT_TRUE(status.ok()) << status.error_message();
    const auto tokens = Tokens(responses);
    ASSERT_EQ(tokens.size(), 8u);
    EXPECT_EQ(responses.back().total_tokens(), 8u);
    std::vector<int32_t> first;
    for (const auto& t : tokens) first.push_back(static_cast<int32_t>(t.token_id()));
    std::vector<v1::ExtractResponse> alone;
    ASSERT_TRUE(client->Extract(IdsRequest(first), &alone).ok());
    ExpectSameFeatures(tokens, Tokens(alone), "truncated");
  }
}

TEST(ServingTest, RequestPastItsDeadlineIsNotRun) {
  auto env = StartOrDie(DefaultExecutor(), DefaultService());
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  env->gate.Close();
  std::thread holder([&] {
    std::vector<v1::ExtractResponse> responses;
    EXPECT_TRUE(client->Extract(TextRequest("Held first."), &responses).ok());
  });
  ASSERT_TRUE(WaitFor([&] { return env->gate.waiting() == 1; }));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  auto reader = client->stub()->Extract(&context, IdsRequest({7, 7, 7, 7, 7}));
  v1::ExtractResponse response;
  EXPECT_FALSE(reader->Read(&response));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // Dropped on the server too, before it cost compute.
  ASSERT_TRUE(WaitFor([&] { return env->executor->inflight() == 1; }));
  env->gate.Open();
  holder.join();
  for (const auto& s : env->gate.sequences()) EXPECT_NE(s, (std::vector<int32_t>{7, 7, 7, 7, 7}));
}

TEST(ServingTest, CancellingAStreamMidwayFreesItsCapacity) {
  ExecutorOptions executor = DefaultExecutor();
  executor.max_inflight_requests = 3;
  auto env = StartOrDie(executor, DefaultService());
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  env->gate.Close();
  std::thread holder([&] {
    std::vector<v1::ExtractResponse> responses;
    EXPECT_TRUE(client->Extract(TextRequest("Held first."), &responses).ok());
  });
  ASSERT_TRUE(WaitFor([&] { return env->gate.waiting() == 1; }));
  auto context = std::make_unique<grpc::ClientContext>();
  auto stream = client->stub()->ExtractStream(context.get());
  ASSERT_TRUE(stream->Write(IdsRequest({9, 9, 9}, "a")));
  ASSERT_TRUE(stream->Write(IdsRequest({9, 9, 9, 9}, "b")));
  ASSERT_TRUE(WaitFor([&] { return env->executor->inflight() == 3; }));
  std::vector<v1::ExtractResponse> responses;
  EXPECT_EQ(client->Extract(TextRequest("Full."), &responses).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);

  context->TryCancel();
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // Freed while the running batch is still held.
  ASSERT_TRUE(WaitFor([&] { return env->executor->inflight() == 1; }));
  std::thread after([&] {
    std::vector<v1::ExtractResponse> r;
    EXPECT_TRUE(client->Extract(TextRequest("Now there is room."), &r).ok());
  });
  ASSERT_TRUE(WaitFor([&] { return env->executor->inflight() == 2; }));
  env->gate.Open();
  holder.join();
  after.join();
  for (const auto& s : env->gate.sequences()) EXPECT_NE(s[0], 9) << "a cancelled request ran";
}

TEST(ServingTest, OverloadIsResourceExhaustedAndNothingElseBreaks) {
  ExecutorOptions executor = DefaultExecutor();
  executor.max_inflight_requests = 4;
  auto env = StartOrDie(executor, DefaultService());
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  env->gate.Close();
  constexpr int kClients = 12;
  std::vector<grpc::Status> statuses(kClients);
  std::vector<std::vector<v1::ExtractResponse>> results(kClients);
  std::atomic<int> n_refused{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto own = env->NewClient();  // one channel per client
      statuses[i] = own->Extract(TextRequest(kTexts[i % 4]), &results[i]);
      if (statuses[i].error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) ++n_refused;
    });
  }
  ASSERT_TRUE(WaitFor([&] { return n_refused.load() == kClients - 4; }));
  EXPECT_EQ(env->executor->inflight(), 4);
  // The rest of the API keeps answering while the engine is full.
  v1::InfoResponse info;
  EXPECT_TRUE(client->Info(&info).ok());
  v1::TokenizeRequest tokenize;
  tokenize.set_text("still here");
  v1::TokenizeResponse tokenized;
  EXPECT_TRUE(client->Tokenize(tokenize, &tokenized).ok());
  env->gate.Open();
  for (auto& t : threads) t.join();
  int n_ok = 0;
  for (int i = 0; i < kClients; ++i) {
    if (statuses[i].ok()) {
      ++n_ok;
      std::vector<v1::ExtractResponse> alone;
      ASSERT_TRUE(client->Extract(TextRequest(kTexts[i % 4]), &alone).ok());
      ExpectSameFeatures(Tokens(results[i]), Tokens(alone), "admitted under overload");
    } else {
      EXPECT_EQ(statuses[i].error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << statuses[i].error_message();
    }
  }
  EXPECT_EQ(n_ok, 4);
  EXPECT_EQ(env->executor->inflight(), 0);
}

TEST(ServingTest, BackpressureHoldsAStreamInsteadOfFailingIt) {
  ExecutorOptions executor = DefaultExecutor();
  executor.max_inflight_requests = 2;
  ServiceOptions service = DefaultService();
  service.overload_policy = v1::ServerConfig::BACKPRESSURE;
  auto env = StartOrDie(executor, service);
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  env->gate.Close();
  grpc::ClientContext context;
  auto stream = client->stub()->ExtractStream(&context);
  constexpr int kRequests = 6;
  for (int i = 0; i < kRequests; ++i) ASSERT_TRUE(stream->Write(TextRequest(kTexts[i % 4], "s" + std::to_string(i))));
  // Two admitted, one waiting in line, the rest unread in the transport.
  ASSERT_TRUE(WaitFor([&] { return env->executor->inflight() == 2 && env->executor->waiting() == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(env->executor->waiting(), 1) << "the stream must not read further while its request waits";
  env->gate.Open();
  auto by_id = ReadUntilDone(stream.get(), kRequests);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  ASSERT_EQ(by_id.size(), static_cast<size_t>(kRequests));
  for (const auto& [id, responses] : by_id) {
    EXPECT_FALSE(responses.back().has_error()) << id << ": " << responses.back().error().message();
    EXPECT_TRUE(responses.back().done());
  }
}

TEST(ServingTest, ManyConcurrentClientsGetTheirOwnResults) {
  auto env = StartOrDie(DefaultExecutor(), DefaultService());
  ASSERT_NE(env, nullptr);
  auto client = env->NewClient();
  std::vector<std::vector<v1::TokenFeatures>> alone;
  for (const char* text : kTexts) {
    std::vector<v1::ExtractResponse> responses;
    ASSERT_TRUE(client->Extract(TextRequest(text), &responses).ok());
    alone.push_back(Tokens(responses));
  }
  constexpr int kClients = 8;
  constexpr int kPerClient = 5;
  std::vector<std::thread> threads;
  std::atomic<int> n_ok{0};
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto own = env->NewClient();
      for (int i = 0; i < kPerClient; ++i) {
        const int which = (c + i) % 4;
        std::vector<v1::ExtractResponse> responses;
        grpc::Status status = own->Extract(TextRequest(kTexts[which]), &responses);
        EXPECT_TRUE(status.ok()) << status.error_message();
        if (!status.ok()) continue;
        ExpectSameFeatures(Tokens(responses), alone[which], "client " + std::to_string(c));
        ++n_ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(n_ok.load(), kClients * kPerClient);
  EXPECT_EQ(env->executor->inflight(), 0);
  EXPECT_EQ(env->executor->queued_tokens(), 0);
}

}  // namespace
}  // namespace sae
