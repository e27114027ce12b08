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

#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "serving_env.h"

namespace sae {
namespace {

using testing::ServingEnv;

// GET http://127.0.0.1:port/path; the whole response (headers and body).
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval timeout{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
      char buffer[4096];
      ssize_t n;
      while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, static_cast<size_t>(n));
    }
  }
  close(fd);
  return response;
}

// Text exposition format: "name{labels} value" lines -> value; comments
// (# HELP / # TYPE) collected separately. Fails the test on a malformed line.
struct Scrape {
  std::map<std::string, double> samples;  // key: name{labels} as written
  std::map<std::string, std::string> types;
  std::map<std::string, std::string> help;

  double Get(const std::string& key) const {
    auto it = samples.find(key);
    EXPECT_NE(it, samples.end()) << "no sample " << key;
    return it == samples.end() ? -1 : it->second;
  }
};

Scrape Parse(const std::string& http) {
  Scrape scrape;
  const size_t body_start = http.find("\r\n\r\n");
  EXPECT_NE(body_start, std::string::npos) << http;
  EXPECT_EQ(http.rfind("HTTP/1.", 0), 0u) << http.substr(0, 100);
  EXPECT_NE(http.find(" 200 "), std::string::npos) << http.substr(0, 100);
  std::istringstream lines(http.substr(body_start + 4));
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream words(line);
      std::string hash, kind, name, rest;
      words >> hash >> kind >> name;
      std::getline(words, rest);
      if (kind == "TYPE") scrape.types[name] = rest.substr(1);
      if (kind == "HELP") scrape.help[name] = rest.substr(1);
      continue;
    }
    // The value follows the last space outside the label braces.
    const size_t close = line.rfind('}');
    const size_t space = line.find(' ', close == std::string::npos ? 0 : close);
    EXPECT_NE(space, std::string::npos) << line;
    if (space == std::string::npos) continue;
    char* end = nullptr;
    const std::string value = line.substr(space + 1);
    const double v = std::strtod(value.c_str(), &end);
    EXPECT_TRUE(end != value.c_str()) << "bad value in: " << line;
    scrape.samples[line.substr(0, space)] = v;
  }
  return scrape;
}

v1::ExtractRequest TextRequest(const std::string& text) {
  v1::ExtractRequest request;
  request.set_text(text);
  return request;
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
  Scrape before = Parse(HttpGet((*server)->port(), "/metrics"));
  EXPECT_EQ(before.Get("sae_request_failures_total{reason=\"invalid_argument\"}"), 0);
  EXPECT_EQ(before.Get("sae_inflight_requests"), 0);

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

  const Scrape s = Parse(HttpGet((*server)->port(), "/metrics"));
  EXPECT_EQ(s.types.at("sae_request_duration_seconds"), "histogram");
  EXPECT_EQ(s.types.at("sae_tokens_total"), "counter");
  EXPECT_EQ(s.types.at("sae_inflight_requests"), "gauge");
  for (const auto& [name, type] : s.types) EXPECT_FALSE(s.help.at(name).empty()) << name;

  EXPECT_EQ(s.Get("sae_request_duration_seconds_count{rpc=\"Extract\"}"), 4);
  EXPECT_EQ(s.Get("sae_request_duration_seconds_bucket{rpc=\"Extract\",le=\"+Inf\"}"), 4);
  EXPECT_EQ(s.Get("sae_request_duration_seconds_count{rpc=\"ExtractStream\"}"), 0);
  EXPECT_EQ(s.Get("sae_tokenization_seconds_count"), 4);
  EXPECT_EQ(s.Get("sae_request_failures_total{reason=\"invalid_argument\"}"), 1);
  EXPECT_EQ(s.Get("sae_request_failures_total{reason=\"resource_exhausted\"}"), 0);
  // Sequential requests: one batch each, of exactly their tokens.
  EXPECT_EQ(s.Get("sae_forward_seconds_count"), 3);
  EXPECT_EQ(s.Get("sae_encode_seconds_count"), 3);
  EXPECT_GT(s.Get("sae_encode_seconds_sum"), 0);
  EXPECT_LE(s.Get("sae_encode_seconds_sum"), s.Get("sae_forward_seconds_sum"));
  EXPECT_EQ(s.Get("sae_batch_requests_count"), 3);
  EXPECT_EQ(s.Get("sae_batch_requests_sum"), 3);
  EXPECT_EQ(s.Get("sae_batch_tokens_sum"), static_cast<double>(n_tokens));
  EXPECT_EQ(s.Get("sae_queue_time_seconds_count"), 3);
  EXPECT_EQ(s.Get("sae_tokens_total"), static_cast<double>(n_tokens));
  EXPECT_EQ(s.Get("sae_inflight_requests"), 0);
  EXPECT_EQ(s.Get("sae_queued_tokens"), 0);
  EXPECT_EQ(s.Get("sae_admission_waiting_requests"), 0);
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

TEST(MetricsTest, BadListenAddressNamesTheField) {
  auto server = MetricsServer::Start("256.0.0.1:notaport", std::make_shared<Metrics>()->registry());
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("metrics_listen"), std::string::npos) << server.status();
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
