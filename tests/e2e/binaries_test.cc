// End-to-end tests of the shipped binaries: sae-server as a subprocess
// (health, reflection, config errors, graceful shutdown), the client library
// (ExtractStream, ExtractMany) and the sae-client CLI (bench included)
// against it, and sae-extract's JSONL contract and hook dumps.
#include <arpa/inet.h>
#include <fcntl.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/util/field_comparator.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench.h"
#include "core/demo_model.h"
#include "core/engine.h"
#include "core/safetensors.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "prometheus_scrape.h"
#include "rpc/access_log.h"
#include "rpc/flag_util.h"
#include "rpc/metrics.h"
#include "rpc/tls.h"
#include "sae_client.h"
#include "testing/test_util.h"

namespace sae {
namespace {

using json = nlohmann::json;

// The binaries under test: where the build put them, unless the environment
// names others (tests/gpu/run_bundle.sh runs the CUDA cases from its bundle).
const char* BinaryPath(const char* env, const char* built) {
  const char* v = std::getenv(env);
  return v != nullptr && *v != '\0' ? v : built;
}
#define SAE_SERVER_BIN BinaryPath("SAE_SERVER_BIN", SAE_SERVER_BUILT)
#define SAE_CLIENT_BIN BinaryPath("SAE_CLIENT_BIN", SAE_CLIENT_BUILT)
#define SAE_EXTRACT_BIN BinaryPath("SAE_EXTRACT_BIN", SAE_EXTRACT_BUILT)

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs a shell command; returns its exit code, stdout+stderr in `output`.
int RunShell(const std::string& command, std::string* output) {
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return -1;
  char buffer[4096];
  size_t n;
  output->clear();
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output->append(buffer, n);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Child processes (start, exit) get longer than in-process waits.
constexpr std::chrono::seconds kProcessTimeout(20);

// Variables set in a child process's environment on top of this one's.
using EnvOverrides = std::vector<std::pair<std::string, std::string>>;

// A program run as a child process: `args` (args[0] the binary), stdout and
// stderr into the file `log`, `env` added to this process's environment.
class ChildProcess {
 public:
  ChildProcess(std::vector<std::string> args, std::string log, const EnvOverrides& env = {}) : log_(std::move(log)) {
    // Built before fork: the child only execs (the test's threads may hold
    // the allocator's locks at fork time).
    std::vector<std::string> environment;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry = *e;
      const std::string name = entry.substr(0, entry.find('='));
      if (std::none_of(env.begin(), env.end(), [&](const auto& o) { return o.first == name; })) {
        environment.push_back(entry);
      }
    }
    for (const auto& [name, value] : env) environment.push_back(name + "=" + value);
    std::vector<char*> envp;
    for (std::string& e : environment) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log_file = std::freopen(log_.c_str(), "w", stderr);
      if (log_file == nullptr) _exit(127);
      dup2(fileno(stderr), STDOUT_FILENO);
      execve(argv[0], argv.data(), envp.data());
      _exit(127);
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  ~ChildProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // Sends `signal` (SIGSTOP freezes the child: a server's kernel still
  // accepts its connections' bytes, nothing answers them).
  void Signal(int signal) {
    if (pid_ > 0) kill(pid_, signal);
  }

  // Waits for the child to exit on its own; its exit code (-1 if it did not
  // exit normally within `timeout`).
  int WaitExit(std::chrono::milliseconds timeout = kProcessTimeout) {
    if (!testing::WaitFor([this] { return Exited(); }, timeout)) return -1;
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : -1;
  }

  // Whether the child has exited (reaps it).
  bool Exited() {
    if (pid_ <= 0) return true;
    rusage usage{};
    if (wait4(pid_, &status_, WNOHANG, &usage) != pid_) return false;
    peak_rss_kib_ = usage.ru_maxrss;
    pid_ = -1;
    return true;
  }

  // Once exited: the most memory the child had resident at once, in KiB.
  long peak_rss_kib() const { return peak_rss_kib_; }
  std::string log() const { return ReadFile(log_); }

 private:
  std::string log_;
  pid_t pid_ = -1;
  int status_ = 0;
  long peak_rss_kib_ = 0;
};

// sae-server --demo on a free loopback port, as a child process, with `env`
// added to its environment (the emulator's SAE_CUDA_EMU_* settings).
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra_args = {}, const EnvOverrides& env = {}) {
    static std::atomic<int> servers{0};  // a directory of its own for each server a test starts
    dir_ = testing::MakeTempDir(absl::StrCat("e2e-server-", servers++));
    port_file_ = dir_ + "/port";
    metrics_port_file_ = dir_ + "/metrics_port";
    health_port_file_ = dir_ + "/health_port";
    std::vector<std::string> args = {SAE_SERVER_BIN,
                                     "--demo",
                                     "--demo_dir=" + dir_ + "/demo",
                                     "--listen=127.0.0.1:0",
                                     "--port_file=" + port_file_,
                                     "--metrics_listen=127.0.0.1:0",
                                     "--metrics_port_file=" + metrics_port_file_,
                                     "--health_port_file=" + health_port_file_};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    child_ = std::make_unique<ChildProcess>(std::move(args), dir_ + "/server.log", env);
  }

  // Waits for the port file; the address, or "" on timeout.
  std::string WaitForAddress() {
    if (!testing::WaitFor([this] { return !ReadFile(port_file_).empty(); }, kProcessTimeout)) return "";
    return "127.0.0.1:" + std::to_string(std::stoi(ReadFile(port_file_)));
  }

  // The Prometheus endpoint's port (written before the model loads), or -1.
  int MetricsPort() {
    if (!testing::WaitFor([this] { return !ReadFile(metrics_port_file_).empty(); }, kProcessTimeout)) return -1;
    return std::stoi(ReadFile(metrics_port_file_));
  }

  // With --health_listen: the probe port's address (written before the model
  // loads), or "".
  std::string WaitForHealthAddress() {
    if (!testing::WaitFor([this] { return !ReadFile(health_port_file_).empty(); }, kProcessTimeout)) return "";
    return "127.0.0.1:" + std::to_string(std::stoi(ReadFile(health_port_file_)));
  }

  // SIGTERM, then the exit code (-1 if it did not exit normally in time).
  int Terminate() {
    child_->Signal(SIGTERM);
    return WaitExit();
  }

  int WaitExit() { return child_->WaitExit(); }

  // Polls gRPC health at `address` until SERVING; false if the process exits
  // first or the time runs out (listening comes before loading).
  bool WaitServing(const std::string& address, const client::ConnectOptions& options = {}) {
    auto client = client::SaeClient::Connect(address, options);
    client->set_timeout(std::chrono::seconds(2));
    bool serving = false;
    testing::WaitFor(
        [&] {
          grpc::health::v1::HealthCheckResponse response;
          serving =
              client->Health("", &response).ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
          return serving || Exited();
        },
        kProcessTimeout);
    return serving;
  }

  // WaitForAddress, then WaitServing: the address once SERVING, or "" when
  // the server did not get there in time (the log says why).
  std::string WaitServingAddress(const client::ConnectOptions& options = {}) {
    const std::string address = WaitForAddress();
    return !address.empty() && WaitServing(address, options) ? address : "";
  }

  std::string log() const { return child_->log(); }
  void Signal(int signal) { child_->Signal(signal); }
  bool Exited() { return child_->Exited(); }

 private:
  std::string dir_, port_file_, metrics_port_file_, health_port_file_;
  std::unique_ptr<ChildProcess> child_;
};

class ServerBinaryTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess();
    address_ = server_->WaitServingAddress();
    ASSERT_FALSE(address_.empty()) << server_->log();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  static ServerProcess* server_;
  static std::string address_;
};
ServerProcess* ServerBinaryTest::server_ = nullptr;
std::string ServerBinaryTest::address_;

TEST_F(ServerBinaryTest, HealthIsServing) {
  auto client = client::SaeClient::Connect(address_);
  for (const std::string service : {"", "sae.v1.SaeService"}) {
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status = client->Health(service, &response);
    ASSERT_TRUE(status.ok()) << service << ": " << status.error_message();
    EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  // The same on the Prometheus endpoint, with the process's start time (the
  // alerting rules count restarts by it).
  const testing::Scrape s = testing::ParseScrape(testing::HttpGet(server_->MetricsPort(), "/metrics"));
  EXPECT_EQ(s.Get("sae_serving"), 1);
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_LE(s.Get("process_start_time_seconds"), now);
  EXPECT_GT(s.Get("process_start_time_seconds"), now - 600);
  EXPECT_FALSE(s.Has("sae_tls_certificate_expiration_timestamp_seconds")) << "plaintext: no certificate";
}

TEST_F(ServerBinaryTest, ReflectionListsTheService) {
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub->ServerReflectionInfo(&context);

  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("*");
  ASSERT_TRUE(stream->Write(list));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> names;
  for (const auto& s : response.list_services_response().service()) names.push_back(s.name());
  EXPECT_NE(std::find(names.begin(), names.end(), "sae.v1.SaeService"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "grpc.health.v1.Health"), names.end());

  // The descriptor itself is served, so tools like grpcurl can call us.
  grpc::reflection::v1alpha::ServerReflectionRequest symbol;
  symbol.set_file_containing_symbol("sae.v1.SaeService");
  ASSERT_TRUE(stream->Write(symbol));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_GT(response.file_descriptor_response().file_descriptor_proto_size(), 0);
  google::protobuf::FileDescriptorProto file;
  ASSERT_TRUE(file.ParseFromString(response.file_descriptor_response().file_descriptor_proto(0)));
  EXPECT_EQ(file.package(), "sae.v1");
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServerBinaryTest, ClientPrintsTable) {
  std::string out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ +
                         " extract 'The cat sat on the red mat.' --k 3 --sae L1R-8x --sae L3R-32x",
                     &out),
            0)
      << out;
  for (const std::string piece : {"\"<|begin_of_text|>\"", "\"The\"", "\" cat\"", "\" red\"", "\" mat\"", "\".\""}) {
    EXPECT_NE(out.find(piece), std::string::npos) << piece << " in\n" << out;
  }
  EXPECT_NE(out.find("L1R-8x"), std::string::npos) << out;
  EXPECT_NE(out.find("L3R-32x"), std::string::npos) << out;
  EXPECT_EQ(out.find("L2A-8x"), std::string::npos) << "only the requested SAEs\n" << out;
  EXPECT_NE(out.find("9 tokens"), std::string::npos) << out;
}

TEST_F(ServerBinaryTest, ClientJsonAndOtherCommands) {
  std::string out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract 'red cat' --json --chunk-tokens 1",
                     &out),
            0)
      << out;
  std::istringstream lines(out);
  std::string line;
  int n_lines = 0;
  json last;
  while (std::getline(lines, line)) {
    last = json::parse(line, nullptr, false);
    ASSERT_FALSE(last.is_discarded()) << line;
    EXPECT_EQ(last["tokens"].size(), 1u);  // one token per message
    ++n_lines;
  }
  ASSERT_GT(n_lines, 2);
  EXPECT_EQ(last["total_tokens"].get<int>(), n_lines);
  EXPECT_TRUE(last["done"].get<bool>());

  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " tokenize 'The cat'", &out), 0) << out;
  EXPECT_NE(out.find("\" cat\""), std::string::npos) << out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " list-saes", &out), 0) << out;
  EXPECT_NE(out.find("L2TC-8x"), std::string::npos) << out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " info --json", &out), 0) << out;
  EXPECT_EQ(json::parse(out)["backend"], "cpu") << out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " health", &out), 0) << out;
  EXPECT_EQ(out, "SERVING\n");
}

// Reads `sae-client extract --json` output: per token, per SAE, the
// (index, value) list.
std::vector<std::map<std::string, std::vector<std::pair<uint32_t, float>>>> ParseJsonFeatures(const std::string& out) {
  std::vector<std::map<std::string, std::vector<std::pair<uint32_t, float>>>> tokens;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    const json chunk = json::parse(line, nullptr, false);
    if (chunk.is_discarded()) return {};
    for (const json& token : chunk["tokens"]) {
      auto& saes = tokens.emplace_back();
      for (const json& s : token["saes"]) {
        auto& list = saes[s["sae"].get<std::string>()];
        for (size_t i = 0; i < s["indices"].size(); ++i) {
          list.emplace_back(s["indices"][i].get<uint32_t>(), s["values"][i].get<float>());
        }
      }
    }
  }
  return tokens;
}

TEST_F(ServerBinaryTest, ClientWatchReportsListedFeatures) {
  const std::string text = "The cat sat on the red mat.";
  const std::vector<uint32_t> watched = {17, 428, 5, 0};
  std::string out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract " + Quote(text) +
                         " --json --k 4 --sae L1R-8x --sae L3R-32x --watch L1R-8x:17,428,5,0",
                     &out),
            0)
      << out;
  const auto got = ParseJsonFeatures(out);
  // Reference: no watch list, k large enough to hold every active feature.
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract " + Quote(text) +
                         " --json --k 256 --sae L1R-8x --sae L3R-32x",
                     &out),
            0)
      << out;
  const auto all = ParseJsonFeatures(out);
  ASSERT_EQ(got.size(), 9u);
  ASSERT_EQ(all.size(), got.size());
  int beyond_top_k = 0;
  for (size_t t = 0; t < got.size(); ++t) {
    // The watched SAE reports exactly the watched features that fire (at most
    // 4 = k of them), with the values they have without a watch list.
    std::vector<std::pair<uint32_t, float>> want;
    const auto& reference = all[t].at("L1R-8x");
    ASSERT_LT(reference.size(), 256u) << "reference truncated";
    for (const auto& [index, value] : reference) {
      if (std::find(watched.begin(), watched.end(), index) != watched.end()) want.emplace_back(index, value);
    }
    const auto& reported = got[t].at("L1R-8x");
    ASSERT_EQ(reported.size(), want.size()) << "token " << t;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(reported[i].first, want[i].first) << "token " << t;
      EXPECT_NEAR(reported[i].second, want[i].second, 1e-4 * std::fabs(want[i].second)) << "token " << t;
      // Reported although outside the token's global top 4.
      beyond_top_k += std::find_if(reference.begin(), reference.begin() + std::min<size_t>(4, reference.size()),
                                   [&](const auto& f) { return f.first == want[i].first; }) ==
                      reference.begin() + std::min<size_t>(4, reference.size());
    }
    // The SAE without a watch list keeps its global top k.
    const auto& other = got[t].at("L3R-32x");
    const auto& other_all = all[t].at("L3R-32x");
    ASSERT_EQ(other.size(), std::min<size_t>(4, other_all.size())) << "token " << t;
    for (size_t i = 0; i < other.size(); ++i) EXPECT_EQ(other[i].first, other_all[i].first) << "token " << t;
  }
  EXPECT_GT(beyond_top_k, 0) << "the demo text should fire a watched feature outside some token's top k";
  EXPECT_FALSE(got[6].at("L1R-8x").empty()) << "\" red\" fires the demo colour feature 17";

  const std::string extract = std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract hi ";
  EXPECT_EQ(RunShell(extract + "--watch L1R-8x", &out), 2) << out;
  EXPECT_EQ(RunShell(extract + "--watch L1R-8x:1,x", &out), 2) << out;
  EXPECT_EQ(RunShell(extract + "--watch :1", &out), 2) << out;
  EXPECT_EQ(RunShell(extract + "--watch L1R-8x:999999", &out), 1) << out;
  EXPECT_NE(out.find("INVALID_ARGUMENT"), std::string::npos) << out;
  EXPECT_EQ(RunShell(extract + "--sae L3R-32x --watch L1R-8x:1", &out), 1) << out;
  EXPECT_NE(out.find("INVALID_ARGUMENT"), std::string::npos) << out;
}

TEST_F(ServerBinaryTest, ClientMinActivationAndReconstructionError) {
  const std::string text = "The cat sat on the red mat.";
  const std::string extract =
      std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract " + Quote(text) + " --sae L1R-8x --k 8 ";
  std::string out;
  ASSERT_EQ(RunShell(extract + "--json", &out), 0) << out;
  const auto all = ParseJsonFeatures(out);
  ASSERT_EQ(RunShell(extract + "--json --min-activation 2.5", &out), 0) << out;
  const auto high = ParseJsonFeatures(out);
  ASSERT_EQ(high.size(), all.size());
  int dropped = 0;
  for (size_t t = 0; t < all.size(); ++t) {
    std::vector<std::pair<uint32_t, float>> want;
    for (const auto& f : all[t].at("L1R-8x")) {
      if (f.second >= 2.5f) want.push_back(f);
    }
    dropped += static_cast<int>(all[t].at("L1R-8x").size() - want.size());
    ASSERT_EQ(high[t].at("L1R-8x").size(), want.size()) << "token " << t;
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(high[t].at("L1R-8x")[i].first, want[i].first);
  }
  EXPECT_GT(dropped, 0);
  // The table shows one reconstruction error per token and SAE, none at BOS.
  ASSERT_EQ(RunShell(extract + "--reconstruction-error", &out), 0) << out;
  size_t n_errors = 0;
  for (size_t at = out.find("(reconstruction error "); at != std::string::npos;
       at = out.find("(reconstruction error ", at + 1)) {
    ++n_errors;
  }
  EXPECT_EQ(n_errors, all.size() - 1) << out;
  EXPECT_EQ(RunShell(extract + "--min-activation -1", &out), 2) << out;
  EXPECT_EQ(RunShell(extract + "--reconstruction-error=yes", &out), 2) << out;
  // Numbers that parse but are no use: usage errors, not an RPC's failure.
  EXPECT_EQ(RunShell(extract + "--min-activation 1e300", &out), 2) << out;  // inf as a float
  EXPECT_EQ(RunShell(extract + "--min-activation nan", &out), 2) << out;
  EXPECT_EQ(RunShell(extract + "--k -1", &out), 2) << out;
  EXPECT_EQ(RunShell(extract + "--chunk-tokens -3", &out), 2) << out;
  for (const char* timeout : {"nan", "inf", "-1", "1e300"}) {
    EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " --timeout " + timeout + " info", &out),
              2)
        << timeout << ": " << out;
  }
}

TEST_F(ServerBinaryTest, ClientReportsErrors) {
  std::string out;
  EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract hi --sae nope", &out), 1);
  EXPECT_NE(out.find("INVALID_ARGUMENT"), std::string::npos) << out;
  EXPECT_NE(out.find("nope"), std::string::npos) << out;
  EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " extract hi --k 100000", &out), 1);
  EXPECT_NE(out.find("INVALID_ARGUMENT"), std::string::npos) << out;
  EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr 127.0.0.1:1 --timeout 2 info", &out), 1);
  EXPECT_NE(out.find("UNAVAILABLE"), std::string::npos) << out;
  EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " frobnicate", &out), 2);
}

TEST_F(ServerBinaryTest, ClientKeepaliveFlags) {
  const std::string client = std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " ";
  std::string out;
  EXPECT_EQ(RunShell(client + "--keepalive 10 --keepalive-timeout 5 info", &out), 0) << out;
  EXPECT_EQ(RunShell(client + "--keepalive=0 info", &out), 0) << out;  // off
  for (const char* bad : {"-1", "nan", "inf", "0.0001", "2147484"}) {
    EXPECT_EQ(RunShell(client + "--keepalive " + bad + " info", &out), 2) << bad << ": " << out;
    EXPECT_NE(out.find("--keepalive needs 0 (off) or a number of seconds from 0.001 to 2147483"), std::string::npos)
        << out;
    EXPECT_EQ(RunShell(client + "--keepalive 10 --keepalive-timeout " + bad + " info", &out), 2) << bad << ": " << out;
  }
  EXPECT_EQ(RunShell(client + "--keepalive-timeout 5 info", &out), 2) << out;
  EXPECT_NE(out.find("--keepalive-timeout needs --keepalive"), std::string::npos) << out;
}

// ConnectOptions as channel arguments: none for keepalive when it is off;
// when on, pings also on quiet streams and idle connections.
TEST(ClientChannelArgumentsTest, KeepaliveArguments) {
  auto ints = [](const client::ConnectOptions& options) {
    const grpc::ChannelArguments args = client::ClientChannelArguments(options);
    std::map<std::string, int> out;
    const grpc_channel_args c = args.c_channel_args();
    for (size_t i = 0; i < c.num_args; ++i) {
      if (c.args[i].type == GRPC_ARG_INTEGER) out[c.args[i].key] = c.args[i].value.integer;
    }
    return out;
  };
  EXPECT_EQ(ints({}), (std::map<std::string, int>{{GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 256 << 20}}));
  client::ConnectOptions on;
  on.keepalive = std::chrono::seconds(30);
  on.keepalive_timeout = std::chrono::milliseconds(2500);
  EXPECT_EQ(ints(on), (std::map<std::string, int>{{GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 256 << 20},
                                                  {GRPC_ARG_KEEPALIVE_TIME_MS, 30000},
                                                  {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 2500},
                                                  {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1},
                                                  {GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0}}));
}

// ---- the streaming client API ----

// Tokens of all chunks of one request, in order.
std::vector<v1::TokenFeatures> TokensOf(const std::vector<v1::ExtractResponse>& responses) {
  std::vector<v1::TokenFeatures> tokens;
  for (const auto& r : responses) tokens.insert(tokens.end(), r.tokens().begin(), r.tokens().end());
  return tokens;
}

v1::ExtractRequest TextRequest(const std::string& id, const std::string& text) {
  v1::ExtractRequest request;
  request.set_request_id(id);
  request.set_text(text);
  request.set_k(3);
  request.set_chunk_tokens(2);
  request.add_saes("L3R-32x");
  request.add_saes("L1R-8x");
  return request;
}

TEST_F(ServerBinaryTest, ExtractStreamMatchesExtractPerRequest) {
  auto client = client::SaeClient::Connect(address_);
  client->set_timeout(std::chrono::seconds(20));
  const std::vector<v1::ExtractRequest> requests = {TextRequest("a", "The cat sat on the red mat."),
                                                    TextRequest("b", "A blue bird flew over the green tree."),
                                                    TextRequest("bad", "hi"), TextRequest("c", "red cat")};
  std::vector<v1::ExtractRequest> sent = requests;
  sent[2].add_saes("nope");  // unknown SAE: an error response, the stream goes on

  // Everything is sent before anything is read.
  auto stream = client->OpenExtractStream();
  for (const auto& r : sent) ASSERT_TRUE(stream->Send(r));
  ASSERT_TRUE(stream->CloseSend());
  std::map<std::string, std::vector<v1::ExtractResponse>> by_id;
  v1::ExtractResponse response;
  while (stream->Read(&response)) by_id[response.request_id()].push_back(response);
  grpc::Status status = stream->Finish();
  ASSERT_TRUE(status.ok()) << status.error_message();

  ASSERT_EQ(by_id.size(), 4u);
  ASSERT_EQ(by_id["bad"].size(), 1u);
  EXPECT_TRUE(by_id["bad"][0].done());
  EXPECT_EQ(by_id["bad"][0].error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(by_id["bad"][0].error().message().find("nope"), std::string::npos);
  for (const v1::ExtractRequest& request : requests) {
    if (request.request_id() == "bad") continue;
    const std::vector<v1::ExtractResponse>& chunks = by_id[request.request_id()];
    for (size_t i = 0; i < chunks.size(); ++i) {
      EXPECT_EQ(chunks[i].done(), i + 1 == chunks.size()) << request.request_id();
      EXPECT_FALSE(chunks[i].has_error());
    }
    std::vector<v1::ExtractResponse> unary;
    ASSERT_TRUE(client->Extract(request, &unary).ok());
    const std::vector<v1::TokenFeatures> got = TokensOf(chunks), want = TokensOf(unary);
    ASSERT_EQ(got.size(), want.size()) << request.request_id();
    // Batched with other requests, BLAS sums in another order: values agree
    // to float rounding, not bit for bit.
    google::protobuf::util::DefaultFieldComparator comparator;
    comparator.set_float_comparison(google::protobuf::util::DefaultFieldComparator::APPROXIMATE);
    comparator.SetDefaultFractionAndMargin(1e-4, 1e-5);
    google::protobuf::util::MessageDifferencer differencer;
    differencer.set_field_comparator(&comparator);
    for (size_t t = 0; t < got.size(); ++t) {
      EXPECT_TRUE(differencer.Compare(got[t], want[t])) << request.request_id() << " token " << t << "\n"
                                                        << got[t].DebugString() << "vs\n"
                                                        << want[t].DebugString();
    }
  }
}

TEST_F(ServerBinaryTest, ExtractStreamDestructorCancelsAnUnfinishedCall) {
  auto client = client::SaeClient::Connect(address_);
  client->set_timeout(std::chrono::seconds(20));
  const auto start = std::chrono::steady_clock::now();
  {
    auto stream = client->OpenExtractStream();
    ASSERT_TRUE(stream->Send(TextRequest("a", "The cat sat on the red mat.")));
    // Neither CloseSend nor Finish: the destructor must not hang.
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  v1::InfoResponse info;
  EXPECT_TRUE(client->Info(&info).ok()) << "the server still serves";
}

// The CUDA server runs one full batch before it reports SERVING
// (warmup_full_batch); the default 4096 tokens take ~40 s on the CPU emulator.
constexpr char kEmulatedBatchTokens[] = "--max_batch_tokens=256";

// sae-server --backend=cuda end to end: the engine thread drives the CUDA
// backend (on a GPU, or on the CPU emulator when ctest's cuda_emulated.server
// entry points SAE_CUDA_BACKEND_LIB at it). Without a usable CUDA backend the
// server exits at load: skipped, unless SAE_TEST_REQUIRE_CUDA is set.
TEST(CudaServerTest, ServesTheDemoConceptFeatures) {
  ServerProcess server({"--backend=cuda", kEmulatedBatchTokens});
  const std::string address = server.WaitForAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  if (!server.WaitServing(address)) {
    if (std::getenv("SAE_TEST_REQUIRE_CUDA") != nullptr) FAIL() << "no CUDA server:\n" << server.log();
    GTEST_SKIP() << "no usable CUDA backend:\n" << server.log();
  }
  std::string out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address + " info --json", &out), 0) << out;
  EXPECT_EQ(json::parse(out)["backend"], "cuda") << out;
  EXPECT_NE(server.log().find("full-batch warm-up: 256 tokens in "), std::string::npos) << server.log();
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address +
                         " extract 'The cat sat in Paris on the red mat.' --json --k 1 --sae L1R-8x",
                     &out),
            0)
      << out;
  const auto tokens = ParseJsonFeatures(out);
  ASSERT_EQ(tokens.size(), 11u) << out;
  // " cat" (2): animals 3; " Paris" (5): cities 42; " red" (8): colours 17.
  for (const auto& [pos, feature] : std::vector<std::pair<size_t, uint32_t>>{{2, 3}, {5, 42}, {8, 17}}) {
    ASSERT_EQ(tokens[pos].at("L1R-8x").size(), 1u) << out;
    EXPECT_EQ(tokens[pos].at("L1R-8x")[0].first, feature) << "token " << pos << "\n" << out;
  }
  // Device memory on the Prometheus endpoint: the GPU's total and free (the
  // emulator's capacity, SAE_CUDA_EMU_MEMORY_MB), what the backend reserved,
  // and the live tensors (at least the weights) inside it.
  const int metrics_port = server.MetricsPort();
  ASSERT_GT(metrics_port, 0) << server.log();
  const testing::Scrape s = testing::ParseScrape(testing::HttpGet(metrics_port, "/metrics"));
  const double tensors = s.Get("sae_backend_memory_bytes{kind=\"tensors\"}");
  const double reserved = s.Get("sae_backend_memory_bytes{kind=\"reserved\"}");
  const double total = s.Get("sae_backend_memory_bytes{kind=\"device_total\"}");
  const double free = s.Get("sae_backend_memory_bytes{kind=\"device_free\"}");
  EXPECT_GT(tensors, 100e3);  // the demo model's bf16 weights alone are larger
  EXPECT_GE(reserved, tensors);
  EXPECT_GT(total, 0);
  EXPECT_GE(free, 0);
  EXPECT_LE(free + reserved, total);
  EXPECT_EQ(server.Terminate(), 0) << server.log();
}

// A max_k the device's SAE top-k cannot hold (the demo SAEs are JumpReLU,
// so a request's k is kept as it is; 8192 at most on any GPU) would fail
// every large request: the server refuses it at startup, naming the field.
TEST(CudaServerTest, MaxKBeyondTheDeviceIsRefusedAtStartup) {
  ServerProcess server({"--backend=cuda", "--max_k=9000"});
  const int code = server.WaitExit();
  const std::string log = server.log();
  if (log.find("config: max_k") == std::string::npos && std::getenv("SAE_TEST_REQUIRE_CUDA") == nullptr) {
    GTEST_SKIP() << "no usable CUDA backend:\n" << log;
  }
  EXPECT_EQ(code, 1) << log;
  EXPECT_NE(log.find("config: max_k (9000) is larger than "), std::string::npos) << log;
  EXPECT_NE(log.find("lower max_k"), std::string::npos) << log;
}

// Whether the CUDA backend is the CPU emulator (SAE_CUDA_BACKEND_LIB), the
// only one that can inject device faults and hangs.
bool OnCudaEmulator() {
  const char* lib = std::getenv("SAE_CUDA_BACKEND_LIB");
  return lib != nullptr && std::string(lib).find("sae_cuda_emu") != std::string::npos;
}

// A max_batch_tokens whose full batch the device's memory cannot hold would
// fail every full batch (each then retried one request at a time): the
// full-batch warm-up finds it and the server refuses to start, naming the
// field. The emulator's device is sized by SAE_CUDA_EMU_MEMORY_MB: 96 MiB
// holds the demo model (65.5 MiB reserved) but not 65536 tokens of
// activations. With warmup_full_batch off the same server starts.
TEST(CudaServerTest, FullBatchBeyondTheDeviceIsRefusedAtStartup) {
  if (!OnCudaEmulator()) GTEST_SKIP() << "the device's memory is sized only on the CUDA emulator";
  const EnvOverrides small_device = {{"SAE_CUDA_EMU_MEMORY_MB", "96"}};
  ServerProcess refused({"--backend=cuda", "--max_batch_tokens=65536"}, small_device);
  const int code = refused.WaitExit();
  ServerProcess unchecked({"--backend=cuda", "--max_batch_tokens=65536", "--warmup_full_batch=false"}, small_device);
  const std::string log = refused.log();
  EXPECT_EQ(code, 1) << log;
  EXPECT_NE(log.find("config: max_batch_tokens (65536) does not fit the device: "), std::string::npos) << log;
  EXPECT_NE(log.find("out of memory; lower max_batch_tokens"), std::string::npos) << log;
  const std::string address = unchecked.WaitForAddress();
  ASSERT_FALSE(address.empty()) << unchecked.log();
  EXPECT_TRUE(unchecked.WaitServing(address)) << unchecked.log();
  EXPECT_EQ(unchecked.log().find("full-batch"), std::string::npos) << unchecked.log();
  EXPECT_EQ(unchecked.Terminate(), 0) << unchecked.log();
}

// A device fault leaves the CUDA context unusable: the request fails, the
// server reports NOT_SERVING and exits with status 3 so the orchestrator
// replaces it. Only the CPU emulator can inject the fault
// (SAE_CUDA_EMU_FAULT_FILE: kernels fault while the file exists, with the
// error number it holds), so these run in ctest's cuda_emulated.server entry.
void ExpectDeviceFaultExits(const std::string& fault_file_text, const std::string& error_name) {
  if (!OnCudaEmulator()) GTEST_SKIP() << "faults are injected only by the CUDA emulator (SAE_CUDA_BACKEND_LIB)";
  const std::string fault_file = testing::MakeTempDir("device-fault") + "/fault";
  ServerProcess server({"--backend=cuda", kEmulatedBatchTokens}, {{"SAE_CUDA_EMU_FAULT_FILE", fault_file}});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  const std::string extract = std::string(SAE_CLIENT_BIN) + " --addr " + address + " extract 'The red cat.' --json";
  std::string out;
  ASSERT_EQ(RunShell(extract, &out), 0) << out;

  std::ofstream(fault_file) << fault_file_text;
  EXPECT_NE(RunShell(extract, &out), 0) << out;
  EXPECT_NE(out.find(error_name), std::string::npos) << out;
  EXPECT_EQ(server.WaitExit(), 3) << server.log();
  const std::string log = server.log();
  EXPECT_NE(log.find("device lost"), std::string::npos) << log;
  EXPECT_NE(log.find("NOT_SERVING"), std::string::npos) << log;
}

// A kernel hitting an illegal address: an error code known to be sticky.
TEST(CudaServerTest, DeviceFaultFailsTheRequestAndExits) {
  ExpectDeviceFaultExits("fault\n", "cudaErrorIllegalAddress");
}

// cudaErrorUnknown (what a GPU that fell off the bus tends to return) is not
// always fatal; the backend finds the context lost because a driver query
// fails as well, and the server exits the same way.
TEST(CudaServerTest, UnlistedStickyErrorIsFoundByProbing) { ExpectDeviceFaultExits("999\n", "cudaErrorUnknown"); }

// A kernel that never ends blocks the read-back of its batch for good. The
// emulator plays one (SAE_CUDA_EMU_HANG_FILE: kernels do not finish while the
// file exists): after batch_timeout_seconds the watchdog fails the request
// with UNAVAILABLE, the server reports NOT_SERVING and exits with status 3
// without waiting for the GPU (the engine thread is still stuck in it).
TEST(CudaServerTest, HungDeviceFailsTheRequestAndExits) {
  if (!OnCudaEmulator()) GTEST_SKIP() << "hangs are injected only by the CUDA emulator (SAE_CUDA_BACKEND_LIB)";
  const std::string hang_file = testing::MakeTempDir("device-hang") + "/hang";
  // No full-batch warm-up: on a loaded machine the emulator's can take longer
  // than the 5 s (HangDuringTheWarmUpExits covers hangs there).
  ServerProcess server(
      {"--backend=cuda", kEmulatedBatchTokens, "--batch_timeout_seconds=5", "--warmup_full_batch=false"},
      {{"SAE_CUDA_EMU_HANG_FILE", hang_file}});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  const std::string extract =
      std::string(SAE_CLIENT_BIN) + " --addr " + address + " --timeout 60 extract 'The red cat.' --json";
  std::string out;
  ASSERT_EQ(RunShell(extract, &out), 0) << out;

  std::ofstream(hang_file) << "hang\n";
  EXPECT_NE(RunShell(extract, &out), 0) << out;
  EXPECT_NE(out.find("UNAVAILABLE"), std::string::npos) << out;
  EXPECT_NE(out.find("presumed hung"), std::string::npos) << out;
  EXPECT_EQ(server.WaitExit(), 3) << server.log();
  std::remove(hang_file.c_str());
  const std::string log = server.log();
  EXPECT_NE(log.find("device lost: a batch has been on the device for"), std::string::npos) << log;
  EXPECT_NE(log.find("NOT_SERVING"), std::string::npos) << log;
  EXPECT_NE(log.find("exiting without releasing it (exit status 3)"), std::string::npos) << log;
}

// A device that hangs before the server is SERVING ends the same way: exit
// status 3 after batch_timeout_seconds, in the full-batch warm-up (on the
// main thread, before the executor and its watchdog exist) and in the small
// one (through the executor).
TEST(CudaServerTest, HangDuringTheWarmUpExits) {
  if (!OnCudaEmulator()) GTEST_SKIP() << "hangs are injected only by the CUDA emulator (SAE_CUDA_BACKEND_LIB)";
  const std::string hang_file = testing::MakeTempDir("warm-up-hang") + "/hang";
  std::ofstream(hang_file) << "hang\n";
  const EnvOverrides hang = {{"SAE_CUDA_EMU_HANG_FILE", hang_file}};
  ServerProcess full({"--backend=cuda", kEmulatedBatchTokens, "--batch_timeout_seconds=2"}, hang);
  ServerProcess small(
      {"--backend=cuda", kEmulatedBatchTokens, "--batch_timeout_seconds=2", "--warmup_full_batch=false"}, hang);
  EXPECT_EQ(full.WaitExit(), 3) << full.log();
  EXPECT_EQ(small.WaitExit(), 3) << small.log();
  std::remove(hang_file.c_str());
  EXPECT_NE(full.log().find("the full-batch warm-up has been on the device for "), std::string::npos) << full.log();
  EXPECT_NE(small.log().find("a batch has been on the device for"), std::string::npos) << small.log();
  for (const std::string& log : {full.log(), small.log()}) {
    EXPECT_NE(log.find("exiting without releasing it (exit status 3)"), std::string::npos) << log;
    EXPECT_EQ(log.find("SERVING sae.v1"), std::string::npos) << log;
  }
}

// sae_serving follows the health service through a server's life: 0 while it
// loads and warms up (here the emulated device holds the warm-up back), 1 once
// SERVING, 0 again while it drains after SIGTERM (a request stuck on the
// device keeps it draining), so SaeNotServing (deploy/prometheus-rules.yml)
// sees loading and draining servers.
TEST(CudaServerTest, ServingMetricFollowsHealth) {
  if (!OnCudaEmulator()) GTEST_SKIP() << "the device is held back only by the CUDA emulator (SAE_CUDA_BACKEND_LIB)";
  const std::string hang_file = testing::MakeTempDir("serving-metric") + "/hang";
  std::ofstream(hang_file) << "hang\n";
  ServerProcess server(
      {"--backend=cuda", kEmulatedBatchTokens, "--batch_timeout_seconds=60", "--health_listen=127.0.0.1:0"},
      {{"SAE_CUDA_EMU_HANG_FILE", hang_file}});
  const std::string address = server.WaitForAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  const std::string probe_address = server.WaitForHealthAddress();
  ASSERT_FALSE(probe_address.empty()) << server.log();
  const int metrics_port = server.MetricsPort();
  ASSERT_GT(metrics_port, 0) << server.log();
  auto health_at = [](const std::string& at) {
    auto client = client::SaeClient::Connect(at);
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = client->Health("", &response);
    return status.ok() ? response.status() : grpc::health::v1::HealthCheckResponse::UNKNOWN;
  };
  // The gRPC port and the probe port (health_listen) answer alike.
  auto health = [&] {
    const auto main_port = health_at(address);
    EXPECT_EQ(health_at(probe_address), main_port);
    return main_port;
  };
  auto serving_metric = [&] {
    return testing::ParseScrape(testing::HttpGet(metrics_port, "/metrics")).Get("sae_serving");
  };
  EXPECT_EQ(serving_metric(), 0);
  EXPECT_EQ(health(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);

  std::remove(hang_file.c_str());
  ASSERT_TRUE(server.WaitServing(address)) << server.log();
  EXPECT_EQ(serving_metric(), 1);
  EXPECT_EQ(health(), grpc::health::v1::HealthCheckResponse::SERVING);

  // A request held on the device, then SIGTERM: the server drains.
  std::ofstream(hang_file) << "hang\n";
  std::string out;
  int request_code = -1;
  std::thread request([&] {
    request_code = RunShell(
        std::string(SAE_CLIENT_BIN) + " --addr " + address + " --timeout 60 extract 'The red cat.' --json", &out);
  });
  EXPECT_TRUE(testing::WaitFor(
      [&] {
        return testing::ParseScrape(testing::HttpGet(metrics_port, "/metrics")).Get("sae_inflight_requests") == 1;
      },
      kProcessTimeout));
  server.Signal(SIGTERM);
  EXPECT_TRUE(testing::WaitFor([&] { return server.log().find("draining") != std::string::npos; }, kProcessTimeout))
      << server.log();
  EXPECT_EQ(serving_metric(), 0);
  EXPECT_EQ(health_at(probe_address), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  std::remove(hang_file.c_str());
  request.join();
  EXPECT_EQ(request_code, 0) << out;  // admitted before SIGTERM: it finishes
  EXPECT_EQ(server.WaitExit(), 0) << server.log();
}

// A server that lets one stream hold at most 4 unanswered requests (and
// admits at most 4 at once): sending 12 at once would get RESOURCE_EXHAUSTED
// answers; ExtractMany's window of 2 must not. (The limit is twice the window
// because the server may stream a request's last chunk a moment before its
// admission slot is released.)
TEST(ExtractManyTest, WindowKeepsUnderTheServerBacklog) {
  ServerProcess server({"--max_inflight_requests=2"});
  const std::string address = server.WaitForAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client = client::SaeClient::Connect(address);
  client->set_timeout(std::chrono::seconds(20));
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        v1::InfoResponse info;
        return client->Info(&info).ok();
      },
      kProcessTimeout))
      << server.log();

  const std::vector<std::string> texts = {"red cat", "The cat sat on the red mat.", "A blue bird.", "green tree"};
  std::vector<v1::ExtractRequest> requests;
  std::vector<size_t> want_tokens;
  for (int i = 0; i < 12; ++i) {
    v1::ExtractRequest request = TextRequest("", texts[i % texts.size()]);
    request.set_chunk_tokens(1);
    requests.push_back(request);
    v1::TokenizeRequest tokenize;
    tokenize.set_text(request.text());
    v1::TokenizeResponse tokens;
    ASSERT_TRUE(client->Tokenize(tokenize, &tokens).ok());
    want_tokens.push_back(static_cast<size_t>(tokens.tokens_size()));
  }
  std::map<std::string, size_t> tokens_by_id;
  std::map<std::string, int> done_by_id;
  std::vector<std::string> errors;
  grpc::Status status = client->ExtractMany(requests, 2, [&](const v1::ExtractResponse& r) {
    tokens_by_id[r.request_id()] += static_cast<size_t>(r.tokens_size());
    done_by_id[r.request_id()] += r.done();
    if (r.has_error()) errors.push_back(r.request_id() + ": " + r.error().message());
  });
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(errors.empty()) << errors[0];
  ASSERT_EQ(tokens_by_id.size(), requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::string id = std::to_string(i);  // ids given by ExtractMany
    EXPECT_EQ(tokens_by_id[id], want_tokens[i]) << id;
    EXPECT_EQ(done_by_id[id], 1) << id;
  }

  // A deadline that passes with requests still unsent is DEADLINE_EXCEEDED
  // (ExtractMany cancelled the stream to free a writer that was not stuck,
  // and reported CANCELLED).
  client->set_timeout(std::chrono::seconds(1));
  const std::vector<v1::ExtractRequest> many(20000, TextRequest("", texts[1]));
  int answered = 0;
  status = client->ExtractMany(many, 2, [&](const v1::ExtractResponse& r) { answered += r.done(); });
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_LT(answered, 20000);
}

// ---- sae-client bench ----

TEST(BenchStatsTest, NearestRankPercentiles) {
  std::vector<double> samples;
  for (int i = 100; i >= 1; --i) samples.push_back(i);  // unsorted on purpose
  client::LatencySummary s = client::Summarize(samples);
  EXPECT_EQ(s.count, 100);
  EXPECT_DOUBLE_EQ(s.p50, 50);
  EXPECT_DOUBLE_EQ(s.p90, 90);
  EXPECT_DOUBLE_EQ(s.p99, 99);
  EXPECT_DOUBLE_EQ(s.max, 100);
  EXPECT_DOUBLE_EQ(s.mean, 50.5);

  // 10 samples: p99 is the largest, p50 the 5th, p90 the 9th.
  s = client::Summarize({5, 1, 9, 3, 7, 2, 8, 4, 10, 6});
  EXPECT_DOUBLE_EQ(s.p50, 5);
  EXPECT_DOUBLE_EQ(s.p90, 9);
  EXPECT_DOUBLE_EQ(s.p99, 10);
  s = client::Summarize({42});
  EXPECT_DOUBLE_EQ(s.p50, 42);
  EXPECT_DOUBLE_EQ(s.p99, 42);
  s = client::Summarize({});
  EXPECT_EQ(s.count, 0);
  EXPECT_DOUBLE_EQ(s.p99, 0);
}

TEST(BenchStatsTest, RequestsJsonl) {
  std::istringstream good("{\"text\": \"hi\"}\n\n{\"text\": \"x\", \"add_bos\": false}\n{\"token_ids\": [1, 2]}\n");
  auto requests = client::ParseRequestsJsonl(good, "in.jsonl");
  ASSERT_TRUE(requests.ok()) << requests.status();
  ASSERT_EQ(requests->size(), 3u);
  EXPECT_EQ((*requests)[0].text(), "hi");
  EXPECT_FALSE((*requests)[0].has_add_bos());
  EXPECT_FALSE((*requests)[1].add_bos());
  EXPECT_EQ((*requests)[2].token_ids().ids_size(), 2);
  for (const std::string bad : {"{\"text\": 1}", "[1]", "{\"token_ids\": [-1]}", "{\"text\": \"a\", \"token_ids\": []}",
                                "{\"token_ids\": []}"}) {
    std::istringstream in("{\"text\": \"fine\"}\n" + bad + "\n");
    auto parsed = client::ParseRequestsJsonl(in, "in.jsonl");
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_NE(parsed.status().message().find("in.jsonl:2:"), std::string::npos) << parsed.status();
  }
}

class BenchTest : public ServerBinaryTest {
 protected:
  // Tokens of `text` as the server counts them.
  static int64_t CountTokens(const std::string& text) {
    auto client = client::SaeClient::Connect(address_);
    v1::TokenizeRequest request;
    request.set_text(text);
    v1::TokenizeResponse response;
    EXPECT_TRUE(client->Tokenize(request, &response).ok());
    return response.tokens_size();
  }

  // Runs `sae-client bench ARGS --json`; the parsed report (null on failure).
  static json Bench(const std::string& args, int want_exit, double* seconds = nullptr) {
    std::string out;
    const auto start = std::chrono::steady_clock::now();
    const int rc = RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " bench --json " + args, &out);
    if (seconds) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(rc, want_exit) << out;
    json report = json::parse(out, nullptr, false);
    EXPECT_FALSE(report.is_discarded()) << out;
    return report;
  }

  static void ExpectConsistent(const json& r) {
    for (const char* key : {"latency_ms", "first_chunk_ms"}) {
      const json& s = r[key];
      EXPECT_EQ(s["count"], r["ok"]) << key;
      EXPECT_LE(s["p50"].get<double>(), s["p90"].get<double>()) << key;
      EXPECT_LE(s["p90"].get<double>(), s["p99"].get<double>()) << key;
      EXPECT_LE(s["p99"].get<double>(), s["max"].get<double>()) << key;
      EXPECT_GT(s["p50"].get<double>(), 0) << key;
    }
    // The first chunk never comes after the last.
    EXPECT_LE(r["first_chunk_ms"]["max"].get<double>(), r["latency_ms"]["max"].get<double>());
    EXPECT_NEAR(r["requests_per_s"].get<double>(), r["ok"].get<double>() / r["wall_s"].get<double>(), 1e-6);
    EXPECT_NEAR(r["tokens_per_s"].get<double>(), r["tokens"].get<double>() / r["wall_s"].get<double>(), 1e-6);
  }
};

TEST_F(BenchTest, StreamStopsAtTheRequestBound) {
  // 12 requests round-robin over the 4 built-in texts: each text 3 times.
  int64_t mix_tokens = 0;
  for (const v1::ExtractRequest& r : client::DefaultBenchMix()) mix_tokens += CountTokens(r.text());
  const json r = Bench("--requests 12 --concurrency 3 --in-flight 2 --k 4 --chunk-tokens 3", 0);
  EXPECT_EQ(r["mode"], "stream");
  EXPECT_EQ(r["ok"], 12);
  EXPECT_EQ(r["failed"], 0);
  EXPECT_EQ(r["tokens"].get<int64_t>(), 3 * mix_tokens);
  ExpectConsistent(r);
}

TEST_F(BenchTest, UnaryReadsJsonlInput) {
  const std::string dir = testing::MakeTempDir("e2e-bench-input");
  const std::string input = dir + "/in.jsonl";
  std::ofstream(input) << "{\"text\": \"The cat sat on the red mat.\"}\n{\"token_ids\": [1, 2, 3, 4, 5, 6, 7]}\n";
  const json r = Bench("--mode unary --concurrency 2 --requests 5 --input " + Quote(input), 0);
  EXPECT_EQ(r["mode"], "unary");
  EXPECT_EQ(r["ok"], 5);
  EXPECT_EQ(r["tokens"].get<int64_t>(), 3 * CountTokens("The cat sat on the red mat.") + 2 * 7);
  ExpectConsistent(r);
}

TEST_F(BenchTest, StopsAtTheDurationBound) {
  for (const std::string mode : {"stream", "unary"}) {
    double seconds = 0;
    const json r = Bench("--mode " + mode + " --duration 0.5 --concurrency 2", 0, &seconds);
    EXPECT_GT(r["ok"].get<int64_t>(), 0) << mode;
    EXPECT_GE(r["wall_s"].get<double>(), 0.5) << mode;
    EXPECT_LT(seconds, 5) << mode << ": in-flight requests finish, nothing more is sent";
    ExpectConsistent(r);
  }
}

TEST_F(BenchTest, CountsFailuresByCode) {
  for (const std::string mode : {"stream", "unary"}) {
    const json r = Bench("--mode " + mode + " --requests 3 --sae nope", 1);
    EXPECT_EQ(r["ok"], 0) << mode;
    EXPECT_EQ(r["failed"], 3) << mode;
    EXPECT_EQ(r["errors"]["INVALID_ARGUMENT"], 3) << mode;
    EXPECT_NE(r["first_error"].get<std::string>().find("nope"), std::string::npos) << mode;
  }
}

TEST_F(BenchTest, TextReportAndUsageErrors) {
  std::string out;
  ASSERT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " bench --requests 4 --concurrency 2", &out),
            0)
      << out;
  for (const std::string want : {"mode: ExtractStream, 2 streams x 1 in flight", "requests: 4 ok, 0 failed",
                                 "requests/s", "tokens/s", "p50", "p90", "p99", "latency ms", "first chunk ms"}) {
    EXPECT_NE(out.find(want), std::string::npos) << want << " in\n" << out;
  }
  const std::string bench = std::string(SAE_CLIENT_BIN) + " --addr " + address_ + " bench ";
  EXPECT_EQ(RunShell(bench + "--duration -1", &out), 2) << out;
  EXPECT_EQ(RunShell(bench + "--requests 0", &out), 2) << out;
  EXPECT_EQ(RunShell(bench + "--mode bidi", &out), 2) << out;
  EXPECT_EQ(RunShell(bench + "--input /nonexistent/in.jsonl", &out), 2) << out;
  const std::string dir = testing::MakeTempDir("e2e-bench-bad");
  std::ofstream(dir + "/in.jsonl") << "{\"text\": \"ok\"}\nnope\n";
  EXPECT_EQ(RunShell(bench + "--input " + Quote(dir + "/in.jsonl"), &out), 2) << out;
  EXPECT_NE(out.find("in.jsonl:2:"), std::string::npos) << out;
}

// A server that accepts TCP connections and never answers (a hung process):
// the streams fail after --timeout, one failure each, not after gRPC's own
// ~20 s connect timeout with nothing counted.
TEST(BenchUnreachableTest, HungServerFailsAfterTheTimeout) {
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 16), 0);  // the kernel completes handshakes; nobody reads
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string address = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  std::string out;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address +
                         " --timeout 1 bench --json --requests 4 --concurrency 3",
                     &out),
            1)
      << out;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  close(listener);
  const json r = json::parse(out.substr(0, out.find('\n')), nullptr, false);
  ASSERT_FALSE(r.is_discarded()) << out;
  EXPECT_EQ(r["ok"], 0);
  EXPECT_EQ(r["failed"], 3) << out;
  EXPECT_EQ(r["errors"]["DEADLINE_EXCEEDED"], 3) << out;
  EXPECT_NE(r["first_error"].get<std::string>().find("not connected to the server within 1.0 s"), std::string::npos)
      << out;
}

TEST(BenchUnreachableTest, FailsFastWithoutAServer) {
  for (const std::string mode : {"stream", "unary"}) {
    std::string out;
    const auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(RunShell(std::string(SAE_CLIENT_BIN) +
                           " --addr 127.0.0.1:1 --timeout 2 bench --json --requests 4 --mode " + mode,
                       &out),
              1)
        << out;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10)) << mode;
    const json r = json::parse(out.substr(0, out.find('\n')), nullptr, false);
    ASSERT_FALSE(r.is_discarded()) << out;
    EXPECT_EQ(r["ok"], 0) << mode;
    // Unary: each of the 4 requests; stream: each of the 4 streams, once.
    EXPECT_EQ(r["errors"]["UNAVAILABLE"].get<int>(), 4) << out;
  }
}

TEST(ServerShutdownTest, SigtermStopsGracefully) {
  ServerProcess server;
  const std::string address = server.WaitForAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client = client::SaeClient::Connect(address);
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        v1::InfoResponse info;
        return client->Info(&info).ok();
      },
      kProcessTimeout))
      << server.log();
  client.reset();
  EXPECT_EQ(server.Terminate(), 0) << server.log();
  EXPECT_NE(server.log().find("stopped"), std::string::npos) << server.log();
  // The CPU backend runs batches in the caller's thread and has no device
  // memory to overrun: no full-batch warm-up.
  EXPECT_EQ(server.log().find("full-batch"), std::string::npos) << server.log();
}

// ---- connections: keepalive, client pings, connection age ----

// A raw HTTP/2 connection to the server, below gRPC: it sends exactly the
// frames a test asks for (PINGs at a chosen rate, which gRPC's own client
// throttles) and answers nothing (no PING ACK), like a peer that vanished.
class RawHttp2Connection {
 public:
  struct Frame {
    uint8_t type = 0;
    uint8_t flags = 0;
    std::string payload;
  };
  static constexpr uint8_t kPing = 6, kGoAway = 7;
  static constexpr uint8_t kAck = 1;

  // Connects to `address` (127.0.0.1:port) and sends the client preface, an
  // empty SETTINGS frame and, blindly, the ACK of the server's SETTINGS.
  explicit RawHttp2Connection(const std::string& address) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    if (fd_ < 0) {
      ADD_FAILURE() << "socket: " << std::strerror(errno);
      return;
    }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(address.rfind(':') + 1))));
    if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ADD_FAILURE() << "connect to " << address << ": " << std::strerror(errno);
      return;
    }
    Send(std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + FrameBytes(4, 0, "") + FrameBytes(4, 1, ""));
  }
  ~RawHttp2Connection() {
    if (fd_ >= 0) close(fd_);
  }

  void SendPing() { Send(FrameBytes(kPing, 0, std::string(8, 'p'))); }
  // From now on acknowledge the server's pings, like a live peer.
  void AnswerPings() { answer_pings_ = true; }
  // How many pings the server has sent (not counting ACKs of ours).
  int PingsReceived() const {
    return static_cast<int>(std::count_if(frames_.begin(), frames_.end(),
                                          [](const Frame& f) { return f.type == kPing && !(f.flags & kAck); }));
  }

  // Reads frames for `period`; false once the server closed the connection.
  bool ReadFor(std::chrono::milliseconds period) {
    const auto end = std::chrono::steady_clock::now() + period;
    while (!closed_ && std::chrono::steady_clock::now() < end) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 20) <= 0) continue;
      char buffer[4096];
      const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
      if (n <= 0) {
        closed_ = true;
        break;
      }
      pending_.append(buffer, static_cast<size_t>(n));
      while (pending_.size() >= 9) {
        const auto byte = [&](size_t i) { return static_cast<uint8_t>(pending_[i]); };
        const size_t length = (size_t{byte(0)} << 16) | (size_t{byte(1)} << 8) | byte(2);
        if (pending_.size() < 9 + length) break;
        frames_.push_back(Frame{byte(3), byte(4), pending_.substr(9, length)});
        pending_.erase(0, 9 + length);
        const Frame& f = frames_.back();
        if (answer_pings_ && f.type == kPing && (f.flags & kAck) == 0) Send(FrameBytes(kPing, kAck, f.payload));
      }
    }
    return !closed_;
  }

  bool closed() const { return closed_; }
  // The GOAWAY frame's debug data (after the last stream id and the error
  // code), or nullopt when none came.
  std::optional<std::string> GoAwayDebugData() const {
    for (const Frame& f : frames_) {
      if (f.type == kGoAway) return f.payload.size() > 8 ? f.payload.substr(8) : std::string();
    }
    return std::nullopt;
  }

 private:
  // A frame on stream 0.
  static std::string FrameBytes(uint8_t type, uint8_t flags, const std::string& payload) {
    const size_t n = payload.size();
    std::string header = {static_cast<char>(n >> 16), static_cast<char>(n >> 8), static_cast<char>(n),
                          static_cast<char>(type), static_cast<char>(flags)};
    return header + std::string(4, '\0') + payload;
  }
  void Send(const std::string& bytes) {
    if (fd_ < 0 || closed_) return;
    if (send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(bytes.size())) closed_ = true;
  }

  int fd_ = -1;
  bool closed_ = false;
  bool answer_pings_ = false;
  std::string pending_;
  std::vector<Frame> frames_;
};

// A client pinging every `interval`, `pings` times, with no call in flight.
void PingRepeatedly(RawHttp2Connection* connection, std::chrono::milliseconds interval, int pings) {
  for (int i = 0; i < pings && !connection->closed(); ++i) {
    connection->SendPing();
    connection->ReadFor(interval);
  }
}

// min_client_ping_interval_seconds=1: pings every 1.5 s, with no call in
// flight, are accepted (gRPC's own policy would send GOAWAY: without calls
// it allows one ping per two hours).
TEST(ServerConnectionTest, ClientPingsAreAcceptedDownToTheConfiguredInterval) {
  ServerProcess server({"--min_client_ping_interval_seconds=1"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  EXPECT_NE(server.log().find("client pings accepted every 1 s or more"), std::string::npos) << server.log();
  RawHttp2Connection connection(address);
  PingRepeatedly(&connection, std::chrono::milliseconds(1500), 5);
  EXPECT_FALSE(connection.closed());
  EXPECT_EQ(connection.GoAwayDebugData(), std::nullopt);
}

// The shared server has the default (10 s): a client pinging every 200 ms is
// sent GOAWAY too_many_pings and disconnected; the server goes on serving.
TEST_F(ServerBinaryTest, ClientPingingMoreOftenThanAllowedIsSentAway) {
  EXPECT_NE(server_->log().find("client pings accepted every 10 s or more"), std::string::npos) << server_->log();
  RawHttp2Connection connection(address_);
  PingRepeatedly(&connection, std::chrono::milliseconds(200), 10);
  connection.ReadFor(std::chrono::seconds(2));
  EXPECT_TRUE(connection.closed());
  EXPECT_EQ(connection.GoAwayDebugData(), "too_many_pings");
  v1::InfoResponse info;
  EXPECT_TRUE(client::SaeClient::Connect(address_)->Info(&info).ok()) << "the server still serves";
}

// keepalive_time_seconds / keepalive_timeout_seconds: a connection whose
// peer stopped answering is closed once a ping goes unacknowledged (here
// after 1 + 1 s), so a vanished client does not hold the server's resources;
// with the defaults (two hours) the shared server keeps it.
TEST(ServerConnectionTest, UnansweredKeepalivePingClosesTheConnection) {
  ServerProcess server({"--keepalive_time_seconds=1", "--keepalive_timeout_seconds=1"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  EXPECT_NE(server.log().find("keepalive ping after 1 s quiet (timeout 1 s)"), std::string::npos) << server.log();
  RawHttp2Connection connection(address);
  EXPECT_FALSE(connection.ReadFor(std::chrono::seconds(8)));
}

// A live peer (it acknowledges pings) on a connection that stays quiet is
// pinged every keepalive_time_seconds, not just once: that is what keeps the
// flow open through a load balancer's idle timeout and notices the peer
// vanishing later.
TEST(ServerConnectionTest, QuietLiveConnectionIsPingedEveryKeepaliveTime) {
  ServerProcess server({"--keepalive_time_seconds=1", "--keepalive_timeout_seconds=10"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  RawHttp2Connection connection(address);
  connection.AnswerPings();
  EXPECT_TRUE(connection.ReadFor(std::chrono::milliseconds(6500)));
  EXPECT_GE(connection.PingsReceived(), 4);
}

TEST_F(ServerBinaryTest, MuteConnectionIsKeptWithDefaultKeepalive) {
  RawHttp2Connection connection(address_);
  EXPECT_TRUE(connection.ReadFor(std::chrono::seconds(4)));
}

// One request on `stream`, read to its last chunk; whether it succeeded.
bool ExtractOnStream(client::ExtractStream* stream, const std::string& id) {
  if (!stream->Send(TextRequest(id, "The cat sat on the red mat."))) return false;
  v1::ExtractResponse response;
  while (stream->Read(&response)) {
    if (response.request_id() == id && response.done()) return !response.has_error();
  }
  return false;
}

// Reads the responses left on `stream`; the call's status.
grpc::Status ReadToEnd(client::ExtractStream* stream) {
  v1::ExtractResponse response;
  while (stream->Read(&response)) {
  }
  return stream->Finish();
}

// An ExtractStream that stays quiet for `quiet` between two requests (a bulk
// client waiting on its input); the stream's status at the end.
grpc::Status StreamWithAQuietGap(client::SaeClient* client, std::chrono::milliseconds quiet) {
  auto stream = client->OpenExtractStream();
  if (ExtractOnStream(stream.get(), "before")) {
    std::this_thread::sleep_for(quiet);
    if (ExtractOnStream(stream.get(), "after")) {
      stream->CloseSend();
      return ReadToEnd(stream.get());
    }
  }
  return stream->Finish();
}

// max_connection_age_seconds: the connection is sent GOAWAY after about a
// second; the stream open across it finishes (no grace limit), the channel
// drops the old connection and the next call reconnects.
TEST(ServerConnectionTest, OldConnectionsAreSentAwayWhileTheirStreamsFinish) {
  ServerProcess server({"--max_connection_age_seconds=1"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  EXPECT_NE(server.log().find("max connection age 1 s (grace until calls end)"), std::string::npos) << server.log();
  auto client = client::SaeClient::Connect(address);
  client->set_timeout(std::chrono::seconds(60));
  const grpc::Status status = StreamWithAQuietGap(client.get(), std::chrono::milliseconds(2500));
  EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  // The connection past its age closes once its last call ended.
  EXPECT_TRUE(testing::WaitFor([&] { return client->channel()->GetState(false) != GRPC_CHANNEL_READY; },
                               std::chrono::seconds(5)));
  v1::InfoResponse info;
  EXPECT_TRUE(client->Info(&info).ok());
}

// With a grace period the stream still running after age + grace is cut off.
TEST(ServerConnectionTest, GracePeriodCutsOffStreamsOnOldConnections) {
  ServerProcess server({"--max_connection_age_seconds=1", "--max_connection_age_grace_seconds=1"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client = client::SaeClient::Connect(address);
  client->set_timeout(std::chrono::seconds(60));
  const grpc::Status status = StreamWithAQuietGap(client.get(), std::chrono::seconds(4));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
}

// ---- the client's keepalive (ConnectOptions, sae-client --keepalive) ----

client::ConnectOptions Keepalive(std::chrono::milliseconds time, std::chrono::milliseconds timeout) {
  client::ConnectOptions options;
  options.keepalive = time;
  options.keepalive_timeout = timeout;
  return options;
}

// A stream whose server froze (SIGSTOP: TCP still accepts, nothing answers)
// fails with UNAVAILABLE once a keepalive ping goes unanswered (1 + 1 s
// here), long before its 60 s deadline.
TEST(ClientKeepaliveTest, StreamToAFrozenServerFailsWhenAPingGoesUnanswered) {
  ServerProcess server;
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client = client::SaeClient::Connect(address, Keepalive(std::chrono::seconds(1), std::chrono::seconds(1)));
  client->set_timeout(std::chrono::seconds(60));
  auto stream = client->OpenExtractStream();
  ASSERT_TRUE(ExtractOnStream(stream.get(), "before"));
  server.Signal(SIGSTOP);
  const auto start = std::chrono::steady_clock::now();
  stream->Send(TextRequest("frozen", "The cat sat on the red mat."));  // buffered, never answered
  const grpc::Status status = ReadToEnd(stream.get());
  const auto waited = std::chrono::steady_clock::now() - start;
  server.Signal(SIGCONT);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_LT(waited, std::chrono::seconds(15));
}

// A client pinging more often than the server's min_client_ping_interval
// (every 200 ms against 60 s) has its connection closed at the third ping
// too early: the quiet stream on it fails with UNAVAILABLE.
TEST(ClientKeepaliveTest, PingingMoreOftenThanTheServerAllowsFailsTheStream) {
  ServerProcess server({"--min_client_ping_interval_seconds=60"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client =
      client::SaeClient::Connect(address, Keepalive(std::chrono::milliseconds(200), std::chrono::seconds(20)));
  client->set_timeout(std::chrono::seconds(60));
  auto stream = client->OpenExtractStream();
  ASSERT_TRUE(ExtractOnStream(stream.get(), "before"));
  const auto start = std::chrono::steady_clock::now();
  const grpc::Status status = ReadToEnd(stream.get());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_EQ(status.error_message(), "Too many pings");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
}

// Pinging within the server's interval (every 1.5 s against 1 s) keeps a
// stream that stays quiet for several pings, and it goes on serving.
TEST(ClientKeepaliveTest, QuietStreamIsKeptWhenPingsRespectTheServersInterval) {
  ServerProcess server({"--min_client_ping_interval_seconds=1"});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client =
      client::SaeClient::Connect(address, Keepalive(std::chrono::milliseconds(1500), std::chrono::seconds(20)));
  client->set_timeout(std::chrono::seconds(60));
  const grpc::Status status = StreamWithAQuietGap(client.get(), std::chrono::seconds(6));
  EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
}

// The lines of an access log file, parsed.
// The lines of an access log once it holds at least `expected` (its writer
// thread writes them shortly after the calls end), or after 10 s.
std::vector<json> AccessLines(const std::string& path, size_t expected) {
  testing::WaitFor([&] {
    const std::string text = ReadFile(path);
    return static_cast<size_t>(std::count(text.begin(), text.end(), '\n')) >= expected;
  });
  std::vector<json> lines;
  std::istringstream in(ReadFile(path));
  for (std::string line; std::getline(in, line);) {
    lines.push_back(json::parse(line, nullptr, false));
    EXPECT_FALSE(lines.back().is_discarded()) << line;
  }
  return lines;
}

// ---- TLS on the gRPC port ----

// tests/testing/make_certs.sh: a CA `name` and the server and client
// certificates it signed, in `dir` (NAME-ca.pem, NAME-server.pem / .key for
// localhost and 127.0.0.1, NAME-client.pem / .key).
void MakeCertificates(const std::string& dir, const std::string& name, int days = 30) {
  std::string out;
  ASSERT_EQ(RunShell(absl::StrCat("bash ", Quote(SAE_MAKE_CERTS), " ", Quote(dir), " ", name, " ", days), &out), 0)
      << out;
}

// notAfter of a PEM certificate file, in seconds since the epoch, as the
// openssl command reads it.
int64_t NotAfter(const std::string& pem) {
  std::string out;
  EXPECT_EQ(RunShell("date -u -d \"$(openssl x509 -enddate -noout -in " + Quote(pem) + " | cut -d= -f2)\" +%s", &out),
            0)
      << out;
  return std::stoll(out);
}

// `to` gets the bytes of `from`, written aside and renamed into place (as a
// Kubernetes Secret volume swaps its files), so a reader sees all or none.
void ReplaceFile(const std::string& from, const std::string& to) {
  std::ofstream(to + ".new", std::ios::binary) << ReadFile(from);
  ASSERT_EQ(std::rename((to + ".new").c_str(), to.c_str()), 0);
}

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::MakeTempDir("e2e-tls"));
    MakeCertificates(*dir_, "a");
    MakeCertificates(*dir_, "b", 60);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string File(const std::string& name) { return *dir_ + "/" + name; }
  // sae-client with `flags` (TLS and others) running `command` at `address`.
  static int Client(const std::string& address, const std::string& flags, const std::string& command,
                    std::string* out) {
    return RunShell(std::string(SAE_CLIENT_BIN) + " --addr " + address + " --timeout 5 " + flags + " " + command, out);
  }
  // ConnectOptions trusting CA `name`, with its client certificate when asked.
  static client::ConnectOptions TrustCa(const std::string& name, bool client_certificate = false) {
    client::ConnectOptions options;
    options.tls = true;
    options.tls_ca_pem = ReadFile(File(name + "-ca.pem"));
    if (client_certificate) {
      options.tls_cert_pem = ReadFile(File(name + "-client.pem"));
      options.tls_key_pem = ReadFile(File(name + "-client.key"));
    }
    return options;
  }
  // A gRPC server in this process on the credentials of `tls`, with no
  // method: enough for handshakes.
  class InProcessServer {
   public:
    explicit InProcessServer(const ServerTls& tls) {
      grpc::ServerBuilder builder;
      builder.AddListeningPort("127.0.0.1:0", tls.credentials(), &port_);
      builder.RegisterCallbackGenericService(&no_methods_);
      server_ = builder.BuildAndStart();
      EXPECT_NE(port_, 0);
    }
    ~InProcessServer() {
      if (server_) server_->Shutdown();
    }
    // Whether a new connection with `options` completes its handshake
    // within `seconds` (a refused one takes them all).
    bool Handshakes(const client::ConnectOptions& options, int seconds = 5) const {
      grpc::ChannelArguments args;
      args.SetInt("grpc.use_local_subchannel_pool", 1);  // a connection of its own
      std::shared_ptr<grpc::Channel> channel =
          grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port_), client::ClientChannelCredentials(options), args);
      return channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
    }

   private:
    grpc::CallbackGenericService no_methods_;
    int port_ = 0;
    std::unique_ptr<grpc::Server> server_;
  };
  static std::string* dir_;
};
std::string* TlsTest::dir_ = nullptr;

// With tls_cert_file and tls_key_file the port speaks only TLS: a client
// that trusts the CA gets answers (the certificate names 127.0.0.1, or
// --tls-server-name picks the name), plaintext and other CAs' clients fail.
TEST_F(TlsTest, ServesTlsToClientsThatTrustItsCertificate) {
  ServerProcess server({"--tls_cert_file=" + File("a-server.pem"), "--tls_key_file=" + File("a-server.key")});
  const std::string address = server.WaitServingAddress(TrustCa("a"));
  ASSERT_FALSE(address.empty()) << server.log();
  EXPECT_NE(server.log().find("(port " + address.substr(address.rfind(':') + 1) +
                              ", TLS, files re-read every 60 s, served once gRPC accepts them)"),
            std::string::npos)
      << server.log();
  std::string out;
  ASSERT_EQ(RunShell(absl::StrCat("date -u -d @", NotAfter(File("a-server.pem")), " '+%Y-%m-%d %H:%M:%S UTC'"), &out),
            0);
  EXPECT_NE(server.log().find("TLS certificate valid until " + out.substr(0, out.size() - 1)), std::string::npos)
      << server.log();
  const std::string trust_a = "--tls-ca " + Quote(File("a-ca.pem"));
  EXPECT_EQ(Client(address, trust_a, "info", &out), 0) << out;
  EXPECT_EQ(Client(address, trust_a, "extract 'red cat' --sae L1R-8x --k 2", &out), 0) << out;
  EXPECT_NE(out.find("L1R-8x"), std::string::npos) << out;
  EXPECT_EQ(Client(address, trust_a + " --tls-server-name localhost", "info", &out), 0) << out;
  EXPECT_EQ(Client(address, trust_a + " --tls-server-name other.example", "info", &out), 1) << out;
  EXPECT_EQ(Client(address, "--tls-ca " + Quote(File("b-ca.pem")), "info", &out), 1) << out;
  EXPECT_NE(out.find("UNAVAILABLE"), std::string::npos) << out;
  EXPECT_EQ(Client(address, "", "info", &out), 1) << out;  // plaintext
  EXPECT_NE(out.find("UNAVAILABLE"), std::string::npos) << out;
  // The server keeps serving after the failed handshakes.
  EXPECT_EQ(Client(address, trust_a, "health", &out), 0) << out;
}

// Probes that cannot speak TLS (Kubernetes' grpc probes, Docker's
// HEALTHCHECK) use health_listen: a plaintext port beside the TLS one that
// answers grpc.health.v1.Health and no SaeService call.
TEST_F(TlsTest, PlaintextHealthPortBesideTls) {
  ServerProcess server({"--tls_cert_file=" + File("a-server.pem"), "--tls_key_file=" + File("a-server.key"),
                        "--tls_client_ca_file=" + File("a-ca.pem"), "--health_listen=127.0.0.1:0"});
  const std::string address = server.WaitServingAddress(TrustCa("a", true));
  ASSERT_FALSE(address.empty()) << server.log();
  const std::string probe = server.WaitForHealthAddress();
  ASSERT_FALSE(probe.empty()) << server.log();
  EXPECT_NE(server.log().find("health probes on 127.0.0.1:0 (port " + probe.substr(probe.rfind(':') + 1) +
                              ", plaintext, grpc.health.v1.Health only)"),
            std::string::npos)
      << server.log();
  std::string out;
  EXPECT_EQ(Client(probe, "", "health", &out), 0) << out;
  EXPECT_EQ(Client(probe, "", "health --service sae.v1.SaeService", &out), 0) << out;
  EXPECT_EQ(out, "SERVING\n");
  EXPECT_EQ(Client(address, "", "health", &out), 1) << out;  // the gRPC port itself stays TLS only
  for (const char* command : {"info", "list-saes", "tokenize 'red cat'", "extract 'red cat'"}) {
    EXPECT_EQ(Client(probe, "", command, &out), 1) << command << ": " << out;
    EXPECT_NE(out.find("UNIMPLEMENTED"), std::string::npos) << command << ": " << out;
  }
  EXPECT_EQ(server.Terminate(), 0) << server.log();
}

// tls_client_ca_file: only clients with a certificate from that CA get in.
TEST_F(TlsTest, MutualTlsRequiresAClientCertificateFromTheCa) {
  ServerProcess server({"--tls_cert_file=" + File("a-server.pem"), "--tls_key_file=" + File("a-server.key"),
                        "--tls_client_ca_file=" + File("a-ca.pem"), "--access_log=" + File("mtls-access.log")});
  const std::string address = server.WaitServingAddress(TrustCa("a", true));
  ASSERT_FALSE(address.empty()) << server.log();
  EXPECT_NE(server.log().find(
                "mutual TLS: client certificates required, files re-read every 60 s, served once gRPC accepts them"),
            std::string::npos)
      << server.log();
  const std::string trust_a = "--tls-ca " + Quote(File("a-ca.pem"));
  std::string out;
  EXPECT_EQ(Client(address,
                   trust_a + " --tls-cert " + Quote(File("a-client.pem")) + " --tls-key " + Quote(File("a-client.key")),
                   "info", &out),
            0)
      << out;
  // The access log names the client by its certificate.
  const std::vector<json> lines = AccessLines(*dir_ + "/mtls-access.log", 1);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["client"], "client");
  EXPECT_EQ(Client(address, trust_a, "info", &out), 1) << out;
  EXPECT_EQ(Client(address,
                   trust_a + " --tls-cert " + Quote(File("b-client.pem")) + " --tls-key " + Quote(File("b-client.key")),
                   "info", &out),
            1)
      << out;
  EXPECT_NE(out.find("UNAVAILABLE"), std::string::npos) << out;
}

// The files are re-read every tls_reload_seconds: a renewed certificate
// (here from another CA, so the switch shows) is served without a restart.
TEST_F(TlsTest, RenewedCertificateIsServedWithoutARestart) {
  const std::string cert = File("live-server.pem"), key = File("live-server.key");
  auto install = [&](const std::string& name) {
    ReplaceFile(File(name + "-server.pem"), cert);
    ReplaceFile(File(name + "-server.key"), key);
  };
  install("a");
  ServerProcess server({"--tls_cert_file=" + cert, "--tls_key_file=" + key, "--tls_reload_seconds=1"});
  const std::string address = server.WaitServingAddress(TrustCa("a"));
  ASSERT_FALSE(address.empty()) << server.log();
  std::string out;
  EXPECT_EQ(Client(address, "--tls-ca " + Quote(File("b-ca.pem")), "info", &out), 1) << out;
  install("b");
  EXPECT_TRUE(
      testing::WaitFor([&] { return Client(address, "--tls-ca " + Quote(File("b-ca.pem")), "info", &out) == 0; },
                       std::chrono::seconds(15)))
      << out << server.log();
  EXPECT_EQ(Client(address, "--tls-ca " + Quote(File("a-ca.pem")), "info", &out), 1) << out;
}

// A renewal that gRPC's TLS stack would refuse is not served: the key
// renewed before its certificate (or a wrong key) leaves the last files that
// passed in service, where gRPC's own file watcher would load the pair and
// fail every handshake. ServerTls in-process, re-read when the test says.
TEST_F(TlsTest, RefusedRenewalKeepsServingTheLastFilesThatPassed) {
  const std::string cert = File("inproc-server.pem"), key = File("inproc-server.key");
  ReplaceFile(File("a-server.pem"), cert);
  ReplaceFile(File("a-server.key"), key);
  v1::ServerConfig config;
  config.set_tls_cert_file(cert);
  config.set_tls_key_file(key);
  config.set_tls_reload_seconds(86400);  // only the test's Reread()
  std::vector<ServerTls::Reload> told;
  absl::StatusOr<std::unique_ptr<ServerTls>> tls =
      ServerTls::Start(config, [&](const ServerTls::Reload& reload) { told.push_back(reload); });
  ASSERT_TRUE(tls.ok()) << tls.status();
  InProcessServer server(**tls);
  auto handshakes = [&](const std::string& name) { return server.Handshakes(TrustCa(name)); };
  auto turned_away = [&](const std::string& name) { return !server.Handshakes(TrustCa(name), 2); };
  ASSERT_TRUE(handshakes("a"));
  EXPECT_TRUE((*tls)->Reread().ok());  // unchanged: nothing told
  EXPECT_TRUE(told.empty());

  // The key renewed first: refused, named, told once.
  ReplaceFile(File("b-server.key"), key);
  const absl::Status refused = (*tls)->Reread();
  EXPECT_NE(refused.message().find("tls_key_file \"" + key + "\" is not the private key of tls_cert_file \"" + cert),
            std::string::npos)
      << refused;
  EXPECT_TRUE((*tls)->Reread().ok());  // the same files again
  ASSERT_EQ(told.size(), 1u);
  EXPECT_FALSE(told[0].served);
  EXPECT_EQ(told[0].problem, refused.message());
  EXPECT_EQ((*tls)->certificate_not_after(), NotAfter(File("a-server.pem")));
  // gRPC's watcher reads its files every second: past two, new connections
  // still get certificate a.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_TRUE(handshakes("a"));
  EXPECT_TRUE(turned_away("b"));

  // A file gone mid-rotation: refused, with the field and the file.
  ASSERT_EQ(std::rename(cert.c_str(), (cert + ".away").c_str()), 0);
  EXPECT_NE((*tls)->Reread().message().find("config: tls_cert_file: " + cert + ": cannot open"), std::string::npos);
  ASSERT_EQ(std::rename((cert + ".away").c_str(), cert.c_str()), 0);

  // Its certificate follows: the pair passes and is served.
  ReplaceFile(File("b-server.pem"), cert);
  EXPECT_TRUE((*tls)->Reread().ok());
  ASSERT_EQ(told.size(), 3u);  // refused, gone, served
  EXPECT_TRUE(told.back().served);
  // b is valid for 60 days, a for 30.
  EXPECT_EQ(told.back().not_after, NotAfter(File("b-server.pem")));
  EXPECT_EQ((*tls)->certificate_not_after(), NotAfter(File("b-server.pem")));
  EXPECT_GT(NotAfter(File("b-server.pem")), NotAfter(File("a-server.pem")) + 29 * 86400);
  EXPECT_TRUE(testing::WaitFor([&] { return handshakes("b"); }, std::chrono::seconds(10)));
  EXPECT_TRUE(turned_away("a"));
}

// The key and the certificate chain may share one file (both fields name
// it), and a key file may hold a certificate too: each field's blocks of
// its own kind are the ones served.
TEST_F(TlsTest, CombinedPemFiles) {
  const std::string combined = File("combined.pem"), key_and_other = File("key-and-other-cert.pem");
  std::ofstream(combined) << ReadFile(File("a-server.key")) << ReadFile(File("a-server.pem"));
  std::ofstream(key_and_other) << ReadFile(File("b-server.pem")) << ReadFile(File("a-server.key"));
  for (const auto& [cert, key] : {std::pair{combined, combined}, {File("a-server.pem"), key_and_other}}) {
    v1::ServerConfig config;
    config.set_tls_cert_file(cert);
    config.set_tls_key_file(key);
    config.set_tls_reload_seconds(60);
    absl::StatusOr<std::unique_ptr<ServerTls>> tls = ServerTls::Start(config, nullptr);
    ASSERT_TRUE(tls.ok()) << tls.status();
    InProcessServer server(**tls);
    EXPECT_TRUE(server.Handshakes(TrustCa("a"))) << cert << " " << key;
  }
}

// In sae-server the re-read runs every tls_reload_seconds, says what it
// found in the log and in sae_tls_reloads_total / sae_tls_files_refused.
TEST_F(TlsTest, RefusedRenewalIsLoggedAndCounted) {
  const std::string cert = File("counted-server.pem"), key = File("counted-server.key");
  ReplaceFile(File("a-server.pem"), cert);
  ReplaceFile(File("a-server.key"), key);
  ServerProcess server({"--tls_cert_file=" + cert, "--tls_key_file=" + key, "--tls_reload_seconds=1"});
  const std::string address = server.WaitServingAddress(TrustCa("a"));
  ASSERT_FALSE(address.empty()) << server.log();
  auto scrape = [&] { return testing::ParseScrape(testing::HttpGet(server.MetricsPort(), "/metrics")); };
  EXPECT_EQ(scrape().Get("sae_tls_files_refused"), 0);
  EXPECT_EQ(scrape().Get("sae_tls_certificate_expiration_timestamp_seconds"), NotAfter(File("a-server.pem")));
  ReplaceFile(File("b-server.key"), key);  // the key renewed, its certificate not yet
  ASSERT_TRUE(testing::WaitFor([&] { return scrape().Get("sae_tls_files_refused") == 1; })) << server.log();
  EXPECT_EQ(scrape().Get("sae_tls_reloads_total{result=\"refused\"}"), 1);
  EXPECT_NE(server.log().find("TLS files changed but refused: config: tls_key_file \"" + key +
                              "\" is not the private key of tls_cert_file \"" + cert + "\""),
            std::string::npos)
      << server.log();
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  std::string out;
  EXPECT_EQ(Client(address, "--tls-ca " + Quote(File("a-ca.pem")), "info", &out), 0) << out;
  ReplaceFile(File("b-server.pem"), cert);
  ASSERT_TRUE(testing::WaitFor([&] { return scrape().Get("sae_tls_files_refused") == 0; })) << server.log();
  const testing::Scrape s = scrape();
  EXPECT_EQ(s.Get("sae_tls_reloads_total{result=\"served\"}"), 1);
  EXPECT_EQ(s.Get("sae_tls_reloads_total{result=\"refused\"}"), 1);
  EXPECT_EQ(s.Get("sae_tls_certificate_expiration_timestamp_seconds"), NotAfter(File("b-server.pem")));
  EXPECT_NE(server.log().find("TLS files changed: new connections get them (certificate valid until 20"),
            std::string::npos)
      << server.log();
  EXPECT_TRUE(testing::WaitFor([&] {
    return Client(address, "--tls-ca " + Quote(File("b-ca.pem")), "info", &out) == 0;
  })) << out
      << server.log();
  EXPECT_EQ(server.Terminate(), 0) << server.log();
}

// SIGHUP re-reads the files at once, whatever tls_reload_seconds says (and
// still reopens the access log).
TEST_F(TlsTest, SighupRereadsTheFilesAtOnce) {
  const std::string cert = File("hup-server.pem"), key = File("hup-server.key"), log = File("hup-access.log");
  ReplaceFile(File("a-server.pem"), cert);
  ReplaceFile(File("a-server.key"), key);
  ServerProcess server(
      {"--tls_cert_file=" + cert, "--tls_key_file=" + key, "--tls_reload_seconds=86400", "--access_log=" + log});
  const std::string address = server.WaitServingAddress(TrustCa("a"));
  ASSERT_FALSE(address.empty()) << server.log();
  ReplaceFile(File("b-server.pem"), cert);
  ReplaceFile(File("b-server.key"), key);
  ASSERT_EQ(std::rename(log.c_str(), (log + ".1").c_str()), 0);
  server.Signal(SIGHUP);
  std::string out;
  EXPECT_TRUE(testing::WaitFor([&] {
    return Client(address, "--tls-ca " + Quote(File("b-ca.pem")), "info", &out) == 0;
  })) << out
      << server.log();
  EXPECT_NE(server.log().find("SIGHUP: re-reading the TLS files"), std::string::npos) << server.log();
  EXPECT_NE(server.log().find("TLS files changed: new connections get them"), std::string::npos) << server.log();
  EXPECT_NE(server.log().find("SIGHUP: access log reopened"), std::string::npos) << server.log();
  EXPECT_TRUE(std::filesystem::exists(log));
  EXPECT_EQ(server.Terminate(), 0) << server.log();
}

// Bad TLS files stop the server at startup with the field and the file named.
TEST_F(TlsTest, BadFilesAreNamedWithTheirField) {
  const std::string junk_ca = File("junk-ca.pem");
  std::ofstream(junk_ca) << "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
  struct Case {
    std::string cert, key, client_ca, message;
  };
  const std::vector<Case> cases = {
      {File("missing.pem"), File("a-server.key"), "",
       "config: tls_cert_file: " + File("missing.pem") + ": cannot open"},
      {File("a-server.pem"), File("a-server.pem"), "",
       "config: tls_key_file \"" + File("a-server.pem") +
           "\" holds no PEM private key (a \"-----BEGIN ...PRIVATE KEY-----\" block)"},
      {File("a-server.key"), File("a-server.key"), "",
       "config: tls_cert_file \"" + File("a-server.key") + "\" holds no PEM certificate"},
      {File("a-server.pem"), File("b-server.key"), "",
       "config: tls_key_file \"" + File("b-server.key") + "\" is not the private key of tls_cert_file \"" +
           File("a-server.pem") + "\""},
      // With a good CA as well, the pair is still named.
      {File("a-server.pem"), File("b-server.key"), File("a-ca.pem"),
       "config: tls_key_file \"" + File("b-server.key") + "\" is not the private key of tls_cert_file \"" +
           File("a-server.pem") + "\""},
      {File("a-server.pem"), File("a-server.key"), File("a-ca.key"),
       "config: tls_client_ca_file \"" + File("a-ca.key") + "\" holds no PEM CA certificate"},
      {File("a-server.pem"), File("a-server.key"), junk_ca,
       "config: tls_client_ca_file \"" + junk_ca + "\" holds no usable CA certificate"},
  };
  for (const Case& c : cases) {
    v1::ServerConfig config;
    config.set_tls_cert_file(c.cert);
    config.set_tls_key_file(c.key);
    config.set_tls_client_ca_file(c.client_ca);
    config.set_tls_reload_seconds(60);
    const absl::Status status = ServerTls::Start(config, nullptr).status();
    EXPECT_NE(status.message().find(c.message), std::string::npos) << status << "\n  wanted: " << c.message;
  }
  // In sae-server: the message and exit status 1, before anything loads.
  ServerProcess server({"--tls_cert_file=" + File("a-server.pem"), "--tls_key_file=" + File("b-server.key")});
  EXPECT_EQ(server.WaitExit(), 1) << server.log();
  EXPECT_NE(server.log().find("is not the private key of tls_cert_file"), std::string::npos) << server.log();
}

TEST_F(TlsTest, ClientFlagErrors) {
  std::string out;
  const std::string client = std::string(SAE_CLIENT_BIN) + " --addr 127.0.0.1:1 ";
  EXPECT_EQ(RunShell(client + "--tls-cert " + Quote(File("a-client.pem")) + " info", &out), 2) << out;
  EXPECT_NE(out.find("--tls-cert and --tls-key go together"), std::string::npos) << out;
  EXPECT_EQ(RunShell(client + "--tls-ca " + Quote(File("missing.pem")) + " info", &out), 2) << out;
  EXPECT_NE(out.find("--tls-ca: " + File("missing.pem") + ": cannot open"), std::string::npos) << out;
  EXPECT_EQ(RunShell(client + "--tls-ca " + Quote(File("a-san")) + " info", &out), 2) << out;
  EXPECT_NE(out.find("--tls-ca: " + File("a-san") + ": not a PEM file"), std::string::npos) << out;
  EXPECT_EQ(RunShell(client + "--tls=yes info", &out), 2) << out;
  EXPECT_EQ(RunShell(client + "--tls-server-name '' info", &out), 2) << out;
}

// ---- the access log ----

// One JSON line per call and per ExtractStream request, with what was asked
// and how it ended; SIGHUP opens the path again after a rotation.
TEST(AccessLogTest, OneLinePerCallAndStreamRequestReopenedOnSighup) {
  const std::string dir = testing::MakeTempDir("e2e-access-log");
  const std::string path = dir + "/access.log";
  ServerProcess server({"--access_log=" + path});
  const std::string address = server.WaitServingAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  EXPECT_NE(server.log().find("access log: " + path), std::string::npos) << server.log();
  auto client = client::SaeClient::Connect(address);
  // The health checks of WaitServingAddress are not SaeService calls.
  EXPECT_EQ(ReadFile(path), "");
  v1::ExtractRequest extract;
  extract.set_text("The red cat.");
  extract.add_saes("L1R-8x");
  extract.set_k(3);
  std::vector<v1::ExtractResponse> responses;
  ASSERT_TRUE(client->Extract(extract, &responses).ok());
  const int n_tokens = static_cast<int>(responses.back().total_tokens());
  extract.set_saes(0, "nope");
  EXPECT_EQ(client->Extract(extract, &responses).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  {
    auto stream = client->OpenExtractStream();
    ASSERT_TRUE(ExtractOnStream(stream.get(), "first"));
    ASSERT_TRUE(ExtractOnStream(stream.get(), "second"));
    stream->CloseSend();
    ASSERT_TRUE(ReadToEnd(stream.get()).ok());
  }
  v1::TokenizeRequest tokenize;
  tokenize.set_text("hi");
  v1::TokenizeResponse tokens;
  ASSERT_TRUE(client->Tokenize(tokenize, &tokens).ok());

  const std::vector<json> lines = AccessLines(path, 5);
  ASSERT_EQ(lines.size(), 5u) << ReadFile(path);
  const json& ok = lines[0];
  EXPECT_EQ(ok["rpc"], "Extract");
  EXPECT_EQ(ok["code"], "OK");
  EXPECT_EQ(ok["tokens"], n_tokens);
  EXPECT_EQ(ok["saes"], json::array({"L1R-8x"}));
  EXPECT_EQ(ok["k"], 3);
  EXPECT_EQ(ok.count("error"), 0u);
  EXPECT_TRUE(std::regex_match(ok["time"].get<std::string>(), std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)")))
      << ok["time"];
  EXPECT_TRUE(std::regex_match(ok["peer"].get<std::string>(), std::regex(R"(ipv4:127\.0\.0\.1:\d+)"))) << ok["peer"];
  EXPECT_GT(ok["ms"].get<double>(), 0);
  EXPECT_EQ(ok.count("client"), 0u);  // plaintext: no certificate
  const json& refused = lines[1];
  EXPECT_EQ(refused["code"], "INVALID_ARGUMENT");
  EXPECT_NE(refused["error"].get<std::string>().find("unknown SAE \"nope\""), std::string::npos) << refused;
  EXPECT_EQ(refused.count("tokens"), 0u);
  // A stream's request is logged once its last response went out, which
  // may come after the client read it: the two in either order.
  EXPECT_EQ(lines[2]["rpc"], "ExtractStream");
  EXPECT_EQ(lines[3]["rpc"], "ExtractStream");
  EXPECT_EQ((std::set<std::string>{lines[2]["request_id"], lines[3]["request_id"]}),
            (std::set<std::string>{"first", "second"}));
  EXPECT_EQ(lines[3]["code"], "OK");
  EXPECT_EQ(lines[2]["peer"], lines[3]["peer"]);  // one stream, one connection
  EXPECT_EQ(lines[4]["rpc"], "Tokenize");

  // logrotate: the file is moved away, SIGHUP, and the next line goes to a
  // new file at the path.
  ASSERT_EQ(std::rename(path.c_str(), (path + ".1").c_str()), 0);
  server.Signal(SIGHUP);
  ASSERT_TRUE(testing::WaitFor([&] { return server.log().find("SIGHUP: access log reopened") != std::string::npos; },
                               std::chrono::seconds(10)))
      << server.log();
  v1::InfoResponse info;
  ASSERT_TRUE(client->Info(&info).ok());
  EXPECT_EQ(AccessLines(path + ".1", 5).size(), 5u);
  const std::vector<json> after = AccessLines(path, 1);
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0]["rpc"], "Info");
  // SIGHUP does not stop the server.
  EXPECT_TRUE(client->Info(&info).ok());
  const testing::Scrape scrape = testing::ParseScrape(testing::HttpGet(server.MetricsPort(), "/metrics"));
  EXPECT_EQ(scrape.Get("sae_access_log_dropped_lines_total"), 0);
}

// A file that stops taking lines (here a pipe nobody reads, as a stuck log
// collector behind standard error) never holds up a call that ends: Write
// only queues; past 4 MiB queued, lines are dropped and counted
// (sae_access_log_dropped_lines_total). Once the file takes lines again, the
// queued ones follow, in order.
TEST(AccessLogTest, StalledFileDropsLinesWithoutBlocking) {
  const std::string fifo = testing::MakeTempDir("access-log-stall") + "/access.pipe";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  const int reader = open(fifo.c_str(), O_RDONLY | O_NONBLOCK);  // so the log's open does not wait
  ASSERT_GE(reader, 0) << std::strerror(errno);
  auto metrics = std::make_shared<Metrics>();
  auto log = AccessLog::Open(fifo, [metrics] { metrics->AccessLogLineDropped(); });
  ASSERT_TRUE(log.ok()) << log.status();

  // Written until lines are dropped: 64 KiB in the pipe, 4 MiB queued.
  std::future<int> writes = std::async(std::launch::async, [&log] {
    AccessRecord record;
    record.rpc = "Info";
    record.peer = "ipv4:127.0.0.1:5000";
    int n = 0;
    while ((*log)->dropped() < 100 && n < 1'000'000) {
      record.request_id = absl::StrCat("r", n++);
      (*log)->Write(record);
    }
    return n;
  });
  const bool returned = writes.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  // Read what the log wrote (this also frees a Write the old way blocked).
  std::string received;
  auto drain = [&] {
    char buffer[1 << 16];
    ssize_t n;
    while ((n = read(reader, buffer, sizeof(buffer))) > 0) received.append(buffer, static_cast<size_t>(n));
  };
  ASSERT_TRUE(returned) << "Write blocked on a file that takes no lines";
  const int written = writes.get();
  const int64_t dropped = (*log)->dropped();
  EXPECT_GE(dropped, 100);
  auto server = MetricsServer::Start("127.0.0.1:0", metrics->registry());
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ(
      testing::ParseScrape(testing::HttpGet((*server)->port(), "/metrics")).Get("sae_access_log_dropped_lines_total"),
      static_cast<double>(dropped));

  // Every line not dropped arrives, in the order written.
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        drain();
        return std::count(received.begin(), received.end(), '\n') == written - dropped;
      },
      std::chrono::seconds(30)))
      << std::count(received.begin(), received.end(), '\n') << " lines of " << written << " - " << dropped;
  // The file takes lines again: the next one is written.
  AccessRecord last;
  last.rpc = "Info";
  last.request_id = absl::StrCat("r", written);
  (*log)->Write(last);
  ASSERT_TRUE(testing::WaitFor([&] {
    drain();
    return std::count(received.begin(), received.end(), '\n') == written - dropped + 1;
  }));
  EXPECT_EQ((*log)->dropped(), dropped);
  log->reset();  // nothing left to write: returns at once
  close(reader);
  std::istringstream lines(received);
  int previous = -1;
  for (std::string line; std::getline(lines, line);) {
    const json j = json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << line;
    const int id = std::stoi(j["request_id"].get<std::string>().substr(1));
    ASSERT_GT(id, previous);
    previous = id;
  }
  EXPECT_EQ(previous, written);
}

TEST(AccessLogTest, StandardErrorAndAnUnwritablePath) {
  {
    ServerProcess server({"--access_log=-"});
    const std::string address = server.WaitServingAddress();
    ASSERT_FALSE(address.empty()) << server.log();
    v1::InfoResponse info;
    ASSERT_TRUE(client::SaeClient::Connect(address)->Info(&info).ok());
    EXPECT_TRUE(
        testing::WaitFor([&] { return server.log().find("{\"time\":") != std::string::npos; }, std::chrono::seconds(5)))
        << server.log();
    EXPECT_NE(server.log().find("\"rpc\":\"Info\""), std::string::npos) << server.log();
  }
  const std::string path = testing::MakeTempDir("e2e-access-log-bad") + "/missing-dir/access.log";
  ServerProcess server({"--access_log=" + path});
  EXPECT_EQ(server.WaitExit(), 1) << server.log();
  EXPECT_NE(server.log().find("config: access_log: " + path + ": cannot open for appending: No such file or directory"),
            std::string::npos)
      << server.log();
}

TEST(AccessLogTest, LineFormat) {
  AccessRecord record;
  record.rpc = "ExtractStream";
  record.peer = "ipv6:[::1]:5000";
  record.client = "svc-a";
  record.request_id = "r\"1";
  record.status = absl::ResourceExhaustedError("full");
  record.tokens = 12;
  record.saes = {"L1R-8x", "L3R-32x"};
  record.k = 4;
  record.seconds = 0.0123456;
  EXPECT_EQ(AccessLog::Format(record, 1796310245.5),
            R"({"time":"2026-12-03T15:04:05.500Z","rpc":"ExtractStream","peer":"ipv6:[::1]:5000","client":"svc-a",)"
            R"("request_id":"r\"1","code":"RESOURCE_EXHAUSTED","error":"full","tokens":12,"saes":["L1R-8x","L3R-32x"],)"
            R"("k":4,"ms":12.346})");
}

TEST(ServerConfigTest, BadConfigNamesFileLineAndField) {
  const std::string dir = testing::MakeTempDir("e2e-config");
  const std::string path = dir + "/server.textproto";
  std::ofstream(path) << "demo: true\nmax_kk: 5\n";
  std::string out;
  EXPECT_EQ(RunShell(std::string(SAE_SERVER_BIN) + " --config=" + Quote(path) + " --listen=127.0.0.1:0", &out), 1);
  EXPECT_NE(out.find(path + ":2:"), std::string::npos) << out;
  EXPECT_NE(out.find("max_kk"), std::string::npos) << out;

  // A field that parses but is out of range: the file and the field.
  std::ofstream(path) << "demo: true\nmax_seq_len: 1\n";
  EXPECT_EQ(RunShell(std::string(SAE_SERVER_BIN) + " --config=" + Quote(path) + " --listen=127.0.0.1:0", &out), 1);
  EXPECT_NE(out.find(path + " (with the command-line flags applied): config: max_seq_len must be at least 2"),
            std::string::npos)
      << out;

  // A bad model folder: the message names the file.
  EXPECT_EQ(RunShell(std::string(SAE_SERVER_BIN) + " --model_dir=" + Quote(dir) + " --listen=127.0.0.1:0", &out), 1);
  EXPECT_NE(out.find(dir), std::string::npos) << out;
}

// ---- sae-extract ----

std::string ExtractCommand(const std::string& input, const std::string& output, const std::string& extra) {
  const DemoLayout& demo = testing::Demo();
  std::string command = std::string(SAE_EXTRACT_BIN) + " --model " + Quote(demo.model_dir);
  for (const std::string& d : demo.sae_dirs) command += " --sae " + Quote(d);
  return command + " --input " + Quote(input) + " --output " + Quote(output) + " " + extra;
}

TEST(ExtractBinaryTest, WritesJsonlAndHookDump) {
  auto engine = Engine::Create(testing::DemoEngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  const Tokenizer& tokenizer = (*engine)->tokenizer();
  const std::string text = "The cat sat on the red mat.";
  auto no_bos = tokenizer.Encode("A blue bird.", false);
  ASSERT_TRUE(no_bos.ok());

  const std::string dir = testing::MakeTempDir("e2e-extract");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl", dump = dir + "/hooks.safetensors";
  {
    std::ofstream in(input);
    in << json{{"text", text}}.dump() << "\n" << json{{"token_ids", no_bos->ids}}.dump() << "\n";
  }
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--k 4 --dump-hooks " + Quote(dump)), &out), 0) << out;

  std::vector<json> lines;
  {
    std::ifstream in(output);
    std::string line;
    while (std::getline(in, line)) {
      lines.push_back(json::parse(line, nullptr, false));
      ASSERT_FALSE(lines.back().is_discarded()) << line;
    }
  }
  ASSERT_EQ(lines.size(), 2u);
  auto with_bos = tokenizer.Encode(text, true);
  ASSERT_TRUE(with_bos.ok());
  const std::vector<std::vector<int32_t>> ids = {with_bos->ids, no_bos->ids};

  std::vector<SequenceRequest> batch(2);
  for (int i = 0; i < 2; ++i) {
    batch[i].ids = ids[i];
    for (size_t s = 0; s < (*engine)->saes().size(); ++s) batch[i].sae_indices.push_back(static_cast<int>(s));
    batch[i].k = 4;
  }
  auto expected = (*engine)->Run(batch);
  ASSERT_TRUE(expected.ok()) << expected.status();

  for (int i = 0; i < 2; ++i) {
    const json& tokens = lines[i]["tokens"];
    ASSERT_EQ(tokens.size(), ids[i].size());
    for (size_t t = 0; t < tokens.size(); ++t) {
      EXPECT_EQ(tokens[t]["id"].get<int32_t>(), ids[i][t]);
      EXPECT_EQ(tokens[t]["piece"].get<std::string>(), tokenizer.TokenPiece(ids[i][t]));
      const auto offset = tokens[t]["offset"].get<std::vector<uint32_t>>();
      if (i == 0) {
        EXPECT_EQ(offset[0], with_bos->offsets[t].first);
        EXPECT_EQ(offset[1], with_bos->offsets[t].second);
      } else {
        EXPECT_EQ(offset, (std::vector<uint32_t>{0, 0}));
      }
      for (size_t s = 0; s < (*engine)->saes().size(); ++s) {
        const json& features = tokens[t]["features"][(*engine)->saes()[s]->name()];
        const SaeTopK& want = (*expected)[i].saes[s];
        ASSERT_EQ(features.size(), static_cast<size_t>(want.n_active(static_cast<int>(t))));
        for (size_t f = 0; f < features.size(); ++f) {
          EXPECT_EQ(features[f][0].get<int32_t>(), want.indices[t * 4 + f]);
          EXPECT_NEAR(features[f][1].get<float>(), want.values[t * 4 + f], 1e-5);
          if (f > 0) {
            EXPECT_GE(features[f - 1][1].get<float>(), features[f][1].get<float>());
          }
        }
      }
    }
  }

  auto store = TensorStore::Open(dump);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->size(), 2 * (*engine)->saes().size());
  for (const auto& sae : (*engine)->saes()) {
    for (int i = 0; i < 2; ++i) {
      const std::string name = sae->hook().Name() + "." + std::to_string(i);
      auto tensor = (*store)->GetWithShape(name, {static_cast<int64_t>(ids[i].size()), 64});
      ASSERT_TRUE(tensor.ok()) << tensor.status();
      EXPECT_EQ(tensor->dtype, DType::kF32);
    }
  }
}

// The header of a safetensors file's bytes (and its size, from the 8-byte
// little-endian prefix); an empty object when the bytes are too short for it
// or it is not JSON.
json SafetensorsHeader(const std::string& bytes, uint64_t* header_size) {
  *header_size = 0;
  if (bytes.size() < 8) return json::object();
  for (int i = 7; i >= 0; --i) *header_size = (*header_size << 8) | static_cast<unsigned char>(bytes[i]);
  if (bytes.size() < 8 + *header_size) return json::object();
  json header = json::parse(bytes.substr(8, *header_size), nullptr, false);
  return header.is_discarded() ? json::object() : header;
}

// A safetensors file read with nothing but its spec (8-byte little-endian
// header size, JSON header, raw data), independent of core/safetensors.
struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<float> values;  // only for F32
};
std::map<std::string, RawTensor> ReadSafetensorsRaw(const std::string& path) {
  const std::string bytes = ReadFile(path);
  std::map<std::string, RawTensor> tensors;
  uint64_t header_size = 0;
  const json header = SafetensorsHeader(bytes, &header_size);
  const size_t data = 8 + header_size;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    RawTensor& t = tensors[name];
    t.dtype = info["dtype"].get<std::string>();
    t.shape = info["shape"].get<std::vector<int64_t>>();
    const auto offsets = info["data_offsets"].get<std::vector<size_t>>();
    if (t.dtype == "F32") {
      t.values.resize((offsets[1] - offsets[0]) / sizeof(float));
      std::memcpy(t.values.data(), bytes.data() + data + offsets[0], offsets[1] - offsets[0]);
    }
  }
  return tensors;
}

std::vector<std::string> CodePoints(const std::string& utf8) {
  std::vector<std::string> out;
  for (unsigned char c : utf8) {
    if ((c & 0xC0) != 0x80) out.emplace_back();
    out.back() += static_cast<char>(c);
  }
  return out;
}

// Significant digits of a JSON number as written ("0.0012" -> 2, "1.5e-07" -> 2).
int SignificantDigits(const std::string& number) {
  std::string mantissa = number.substr(0, number.find_first_of("eE"));
  mantissa.erase(std::remove(mantissa.begin(), mantissa.end(), '-'), mantissa.end());
  mantissa.erase(std::remove(mantissa.begin(), mantissa.end(), '.'), mantissa.end());
  const size_t first = mantissa.find_first_not_of('0');
  if (first == std::string::npos) return 0;
  const size_t last = mantissa.find_last_not_of('0');
  return static_cast<int>(last - first + 1);
}

// The DESIGN.md contract, line by line: keys, BOS handling, code-point
// offsets on non-ASCII text, compact float values, blank lines, and the hook
// dump read back with a spec-only reader (names ".<output line>", F32
// [n_tokens, d_model], values == the engine's hook activations).
TEST(ExtractBinaryTest, ContractOnNonAsciiTextAndHookDumpValues) {
  auto engine = Engine::Create(testing::DemoEngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  const Tokenizer& tokenizer = (*engine)->tokenizer();
  const int32_t bos = tokenizer.bos_id().value();
  const std::string text = "naïve café — 猫 sat on the red mat.";
  ASSERT_NE(CodePoints(text).size(), text.size()) << "the test needs text where bytes != code points";
  const std::vector<int32_t> raw_ids = {bos, 5, 6, 7};

  const std::string dir = testing::MakeTempDir("e2e-extract-contract");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl", dump = dir + "/hooks.safetensors";
  std::ofstream(input) << json{{"text", text}}.dump() << "\n\n"
                       << json{{"text", "red cat"}, {"add_bos", false}}.dump() << "\n"
                       << json{{"token_ids", raw_ids}}.dump() << "\n";
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--k 5 --dump-hooks " + Quote(dump)), &out), 0) << out;
  EXPECT_EQ(out.find('\r'), std::string::npos) << "no progress bar when stderr is not a terminal:\n" << out;

  std::vector<std::string> raw_lines;
  {
    std::istringstream in(ReadFile(output));
    for (std::string line; std::getline(in, line);) raw_lines.push_back(line);
  }
  ASSERT_EQ(raw_lines.size(), 3u) << "the blank input line has no output line";
  std::vector<std::vector<int32_t>> ids(3);
  std::set<std::string> sae_names;
  for (const auto& sae : (*engine)->saes()) sae_names.insert(sae->name());
  for (size_t i = 0; i < raw_lines.size(); ++i) {
    const json line = json::parse(raw_lines[i], nullptr, false);
    ASSERT_TRUE(line.is_object()) << raw_lines[i];
    ASSERT_EQ(line.size(), 1u) << "only \"tokens\": " << raw_lines[i];
    for (const json& token : line["tokens"]) {
      ASSERT_EQ(token.size(), 4u) << token.dump();
      ids[i].push_back(token["id"].get<int32_t>());
      std::set<std::string> names;
      for (const auto& [name, features] : token["features"].items()) {
        names.insert(name);
        ASSERT_LE(features.size(), 5u);
        for (size_t f = 0; f < features.size(); ++f) {
          EXPECT_GT(features[f][1].get<double>(), 0) << "only active features";
          if (f > 0) {
            EXPECT_GE(features[f - 1][1].get<double>(), features[f][1].get<double>());
          }
        }
      }
      EXPECT_EQ(names, sae_names);
      EXPECT_EQ(token["piece"].get<std::string>(), tokenizer.TokenPiece(ids[i].back()));
    }
  }

  // Line 0: BOS first at [0, 0]; then code-point spans that tile the text
  // and hold the piece, ending at the number of code points (not bytes).
  // Byte-fallback tokens (piece U+FFFD) each carry their whole character's
  // span, like Hugging Face's offsets.
  const json line0 = json::parse(raw_lines[0]);
  const std::vector<std::string> chars = CodePoints(text);
  ASSERT_EQ(line0["tokens"][0]["id"].get<int32_t>(), bos);
  EXPECT_EQ(line0["tokens"][0]["offset"], json::array({0, 0}));
  for (const json& f : line0["tokens"][0]["features"]) EXPECT_TRUE(f.empty()) << "BOS carries no features";
  std::vector<uint32_t> previous = {0, 0};
  int n_partial = 0;
  for (size_t t = 1; t < line0["tokens"].size(); ++t) {
    const json& token = line0["tokens"][t];
    const auto offset = token["offset"].get<std::vector<uint32_t>>();
    ASSERT_EQ(offset.size(), 2u);
    ASSERT_LE(offset[1], chars.size()) << token.dump();
    const std::string piece = token["piece"].get<std::string>();
    if (piece.find("\xEF\xBF\xBD") != std::string::npos) {  // one byte of a character
      ++n_partial;
      EXPECT_EQ(offset[1], offset[0] + 1) << token.dump();
      EXPECT_TRUE(offset == previous || offset[0] == previous[1]) << token.dump();
      EXPECT_GT(chars[offset[0]].size(), 1u) << token.dump();
    } else {
      EXPECT_EQ(offset[0], previous[1]) << token.dump();
      std::string span;
      for (uint32_t c = offset[0]; c < offset[1]; ++c) span += chars[c];
      EXPECT_EQ(span, piece) << token.dump();
    }
    previous = offset;
  }
  EXPECT_EQ(previous[1], chars.size());
  EXPECT_GT(n_partial, 0) << "the demo vocab should split some characters into bytes";
  // Line 1: add_bos false.
  auto red_cat = tokenizer.Encode("red cat", false);
  ASSERT_TRUE(red_cat.ok());
  EXPECT_EQ(ids[1], red_cat->ids);
  EXPECT_EQ(ids[2], raw_ids);

  // Keys in the documented order, SAEs in load order.
  EXPECT_TRUE(std::regex_search(
      raw_lines[1],
      std::regex(absl::StrCat(R"(^\{"tokens":\[\{"id":\d+,"piece":"[^"]*","offset":\[\d+,\d+\],"features":\{")",
                              (*engine)->saes()[0]->name(), R"(":)"))))
      << raw_lines[1];

  // Values are written as floats (at most 9 significant digits), not as
  // widened doubles ("1.5951071000000001").
  const std::regex number(R"(\[\d+,(-?[0-9.eE+-]+)\])");
  int n_values = 0;
  for (const std::string& line : raw_lines) {
    for (std::sregex_iterator m(line.begin(), line.end(), number), end; m != end; ++m, ++n_values) {
      EXPECT_LE(SignificantDigits((*m)[1].str()), 9) << (*m)[1].str();
    }
  }
  EXPECT_GT(n_values, 10);

  // The hook dump, against the engine's own capture of the same sequences.
  std::vector<SequenceRequest> batch(3);
  for (int i = 0; i < 3; ++i) {
    batch[i].ids = ids[i];
    for (size_t s = 0; s < (*engine)->saes().size(); ++s) batch[i].sae_indices.push_back(static_cast<int>(s));
    batch[i].k = 1;
    batch[i].capture_hooks = true;
  }
  auto expected = (*engine)->Run(batch);
  ASSERT_TRUE(expected.ok()) << expected.status();
  const std::map<std::string, RawTensor> tensors = ReadSafetensorsRaw(dump);
  std::set<std::string> hooks;
  for (const auto& sae : (*engine)->saes()) hooks.insert(sae->hook().Name());
  EXPECT_EQ(tensors.size(), 3 * hooks.size());
  const int64_t d_model = (*engine)->model_config().hidden_size;
  for (const std::string& hook : hooks) {
    for (int i = 0; i < 3; ++i) {
      const std::string name = hook + "." + std::to_string(i);
      auto it = tensors.find(name);
      ASSERT_NE(it, tensors.end()) << name;
      const RawTensor& t = it->second;
      EXPECT_EQ(t.dtype, "F32") << name;
      ASSERT_EQ(t.shape, (std::vector<int64_t>{static_cast<int64_t>(ids[i].size()), d_model})) << name;
      const std::vector<float>& want = (*expected)[i].hooks.at(hook);
      ASSERT_EQ(t.values.size(), want.size()) << name;
      for (size_t v = 0; v < want.size(); ++v) {
        ASSERT_NEAR(t.values[v], want[v], 1e-5 + 1e-4 * std::fabs(want[v])) << name << "[" << v << "]";
      }
      if (hook.size() > 2 && hook.substr(hook.size() - 2) == "TC") {
        // Transcoder input: RMS-normalised residual WITHOUT the norm weight,
        // so every row has mean square ~1.
        for (int64_t row = 0; row < t.shape[0]; ++row) {
          double ms = 0;
          for (int64_t c = 0; c < d_model; ++c) ms += t.values[row * d_model + c] * t.values[row * d_model + c];
          EXPECT_NEAR(ms / d_model, 1.0, 1e-3) << name << " row " << row;
        }
      }
    }
  }
}

TEST(ExtractBinaryTest, ProgressBarOnATerminal) {
  const std::string dir = testing::MakeTempDir("e2e-extract-tty");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl";
  std::ofstream(input) << "{\"text\": \"red cat\"}\n{\"text\": \"blue bird\"}\n";
  // script(1) gives the command a pseudo-terminal.
  std::string out;
  ASSERT_EQ(RunShell("script -qec " + Quote(ExtractCommand(input, output, "--batch_tokens 1")) + " /dev/null", &out), 0)
      << out;
  EXPECT_NE(out.find("\r[####################...................."), std::string::npos) << out;
  EXPECT_NE(out.find("] 1/2 lines"), std::string::npos) << out;
  EXPECT_NE(out.find("] 2/2 lines"), std::string::npos) << out;
}

TEST(ExtractBinaryTest, SingleLineHookNamesHaveNoSuffix) {
  const std::string dir = testing::MakeTempDir("e2e-extract-one");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl", dump = dir + "/hooks.safetensors";
  std::ofstream(input) << "{\"text\": \"red cat\"}\n";
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--dump-hooks=" + Quote(dump)), &out), 0) << out;
  auto store = TensorStore::Open(dump);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE((*store)->Contains("L1R"));
  EXPECT_TRUE((*store)->Contains("L2TC"));
  EXPECT_FALSE((*store)->Contains("L1R.0"));
}

TEST(ExtractBinaryTest, BadLineIsNamed) {
  const std::string dir = testing::MakeTempDir("e2e-extract-bad");
  const std::string output = dir + "/out.jsonl";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"text\": \"fine\"}\n{\"token_ids\": [1, \"x\"]}\n", ":2:"},
      {"{\"text\": \"fine\"}\n\n{\"text\": \"fine\"}\nnot json\n", ":4:"},
      {"{\"token_ids\": [99999999]}\n", ":1:"},
      {"{\"nothing\": 1}\n", ":1:"},
  };
  for (const auto& [content, where] : cases) {
    const std::string input = dir + "/in.jsonl";
    std::ofstream(input, std::ios::trunc) << content;
    std::string out;
    EXPECT_EQ(RunShell(ExtractCommand(input, output, ""), &out), 1) << content;
    EXPECT_NE(out.find(input + where), std::string::npos) << out;
  }
}

// A hook file that cannot be written fails the run before any compute (it
// is written at the end: the whole run was lost), and the output is not
// started.
TEST(ExtractBinaryTest, UnwritableHookFileFailsFirst) {
  const std::string dir = testing::MakeTempDir("e2e-extract-dump");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl";
  std::ofstream(input) << "{\"text\": \"The cat sat.\"}\n";
  std::string out;
  EXPECT_EQ(RunShell(ExtractCommand(input, output, "--dump-hooks " + Quote(dir + "/no/such/dir/h.safetensors")), &out),
            1);
  EXPECT_NE(out.find("--dump-hooks " + dir + "/no/such/dir/h.safetensors: cannot create file"), std::string::npos)
      << out;
  EXPECT_FALSE(std::filesystem::exists(output)) << out;
  EXPECT_EQ(RunShell(ExtractCommand(input, output, "--dump-hooks " + Quote(dir)), &out), 1);
  EXPECT_NE(out.find(dir + ": is a directory"), std::string::npos) << out;
  // A writable path is left as it was until the run writes it.
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--dump-hooks " + Quote(dir + "/h.safetensors")), &out), 0) << out;
  EXPECT_TRUE(std::filesystem::exists(dir + "/h.safetensors"));
}

// --sae paths with a comma or an '=' in them (absl split repeated flags at
// commas; everything before an '=' was taken for an alias).
TEST(ExtractBinaryTest, SaePathsWithCommasAndEquals) {
  EXPECT_EQ(ParseSaeSpec("res=/models/L1R-8x").alias, "res");
  EXPECT_EQ(ParseSaeSpec("res=/models/L1R-8x").dir, "/models/L1R-8x");
  EXPECT_EQ(ParseSaeSpec("/runs/lr=3/L1R-8x").dir, "/runs/lr=3/L1R-8x");
  EXPECT_EQ(ParseSaeSpec("/runs/lr=3/L1R-8x").alias, "");
  EXPECT_EQ(ParseSaeSpec("a=b=/c").alias, "a");
  EXPECT_EQ(ParseSaeSpec("a=b=/c").dir, "b=/c");

  const std::string dir = testing::MakeTempDir("e2e-extract-paths");
  const std::string odd = dir + "/a,b/lr=3";
  std::filesystem::create_directories(odd);
  std::filesystem::copy(testing::Demo().sae_dirs[0], odd + "/L1R-8x", std::filesystem::copy_options::recursive);
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl";
  std::ofstream(input) << "{\"text\": \"The cat sat.\"}\n";
  const std::string command = std::string(SAE_EXTRACT_BIN) + " --model " + Quote(testing::Demo().model_dir) +
                              " --sae " + Quote(odd + "/L1R-8x") + " --sae " + Quote("cat=" + odd + "/L1R-8x") +
                              " --input " + Quote(input) + " --output " + Quote(output);
  std::string out;
  ASSERT_EQ(RunShell(command, &out), 0) << out;
  std::ifstream in(output);
  const json line = json::parse(in);
  ASSERT_TRUE(line["tokens"][1]["features"].contains("L1R-8x")) << line.dump();
  EXPECT_TRUE(line["tokens"][1]["features"].contains("cat")) << line.dump();
  EXPECT_EQ(line["tokens"][1]["features"]["L1R-8x"], line["tokens"][1]["features"]["cat"]);
}

// --resume after a stop: the whole lines the output holds are kept, a torn
// last line is dropped, and the rest is appended, so the file ends up byte
// for byte what one uninterrupted run writes (on the CPU, features do not
// depend on how lines are batched). Resuming a finished file changes
// nothing; a missing file is a fresh run.
TEST(ExtractBinaryTest, ResumeContinuesAnInterruptedRun) {
  const std::string dir = testing::MakeTempDir("e2e-extract-resume");
  const std::string input = dir + "/in.jsonl", full = dir + "/full.jsonl", part = dir + "/part.jsonl";
  {
    std::ofstream in(input);
    for (const char* text : {"The cat sat.", "A red bird flew over Paris.", "One two three.", "Dogs and cats.",
                             "Tokyo is big.", "Green fish swim."}) {
      in << json{{"text", text}}.dump() << "\n";
    }
    in << "\n" << json{{"token_ids", {992, 299, 381}}}.dump() << "\n";  // a blank line is no record
  }
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(input, full, "--k 4"), &out), 0) << out;
  const std::string expected = ReadFile(full);
  std::vector<size_t> line_ends;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] == '\n') line_ends.push_back(i + 1);
  }
  ASSERT_EQ(line_ends.size(), 7u);

  // Stopped after 2 whole lines, 30 bytes into the third; then after 0 lines
  // with a torn first line; then with every line but the last newline.
  for (const size_t keep : {line_ends[1] + 30, size_t{17}, expected.size() - 1}) {
    SCOPED_TRACE(keep);
    std::ofstream(part, std::ios::binary | std::ios::trunc) << expected.substr(0, keep);
    ASSERT_EQ(RunShell(ExtractCommand(input, part, "--k 4 --resume --batch_tokens 3"), &out), 0) << out;
    EXPECT_EQ(ReadFile(part), expected);
    const size_t kept = std::count(expected.begin(), expected.begin() + keep, '\n');
    EXPECT_NE(out.find(absl::StrCat("resuming after the ", kept, " lines")), std::string::npos) << out;
    EXPECT_NE(out.find(absl::StrCat("(", kept, " kept, ", 7 - kept, " appended)")), std::string::npos) << out;
  }
  ASSERT_EQ(RunShell(ExtractCommand(input, full, "--k 4 --resume"), &out), 0) << out;
  EXPECT_EQ(ReadFile(full), expected);
  EXPECT_NE(out.find("(7 kept, 0 appended)"), std::string::npos) << out;

  // Kept lines are kept, not computed again: a value raised in the first of
  // three kept lines (still the largest of its list) survives.
  nlohmann::ordered_json edited = nlohmann::ordered_json::parse(expected.substr(0, line_ends[0]));
  nlohmann::ordered_json& top = edited["tokens"][1]["features"]["L1R-8x"][0][1];
  top = top.get<double>() + 1.0;
  const std::string kept = edited.dump() + "\n" + expected.substr(line_ends[0], line_ends[2] - line_ends[0]);
  std::ofstream(part, std::ios::binary | std::ios::trunc) << kept;
  ASSERT_EQ(RunShell(ExtractCommand(input, part, "--k 4 --resume"), &out), 0) << out;
  EXPECT_EQ(ReadFile(part), kept + expected.substr(line_ends[2]));
  const std::string fresh = dir + "/fresh.jsonl";
  ASSERT_EQ(RunShell(ExtractCommand(input, fresh, "--k 4 --resume"), &out), 0) << out;
  EXPECT_EQ(ReadFile(fresh), expected);
}

// A line longer than --max_seq_len runs as windows, as the server splits a
// request under long_input_policy WINDOW: each window after the first is BOS
// + its tokens, a sequence of its own, whatever the batching.
TEST(ExtractBinaryTest, LongLinesRunAsWindows) {
  auto engine = Engine::Create(testing::DemoEngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::string text;
  for (int i = 0; i < 12; ++i) text += "The cat sat on the red mat in Paris. ";
  auto encoded = (*engine)->tokenizer().Encode(text, true);
  ASSERT_TRUE(encoded.ok());
  ASSERT_GE(encoded->ids.size(), 101u);
  const std::vector<int32_t> ids(encoded->ids.begin(), encoded->ids.begin() + 101);
  const int32_t bos = ids[0];
  auto with_bos = [&](size_t begin, size_t end) {
    std::vector<int32_t> window = {bos};
    window.insert(window.end(), ids.begin() + begin, ids.begin() + end);
    return window;
  };
  // max_seq_len 40: [0, 40), BOS + [40, 79), BOS + [79, 101); then each
  // window as a line of its own.
  const std::vector<std::vector<int32_t>> lines_in = {ids, std::vector<int32_t>(ids.begin(), ids.begin() + 40),
                                                      with_bos(40, 79), with_bos(79, 101)};
  const std::string dir = testing::MakeTempDir("e2e-extract-windows");
  const std::string input = dir + "/in.jsonl";
  {
    std::ofstream in(input);
    for (const auto& line : lines_in) in << json{{"token_ids", line}}.dump() << "\n";
  }
  auto read_lines = [](const std::string& path) {
    std::vector<json> lines;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    return lines;
  };
  std::string out;
  const std::string windowed = dir + "/windowed.jsonl", one_batch = dir + "/one_batch.jsonl";
  ASSERT_EQ(RunShell(ExtractCommand(input, windowed, "--k 4 --max_seq_len 40 --batch_tokens 30"), &out), 0) << out;
  ASSERT_EQ(RunShell(ExtractCommand(input, one_batch, "--k 4 --max_seq_len 40 --batch_tokens 4096"), &out), 0) << out;
  EXPECT_EQ(ReadFile(windowed), ReadFile(one_batch));  // windows batched apart or together: the same bytes

  const std::vector<json> lines = read_lines(windowed);
  ASSERT_EQ(lines.size(), 4u);
  const json& tokens = lines[0]["tokens"];
  ASSERT_EQ(tokens.size(), 101u);
  // Position t of the long line is position t - begin + offset of a window line.
  auto expect_same = [&](size_t begin, size_t end, const json& window_tokens, size_t offset) {
    for (size_t t = begin; t < end; ++t) {
      SCOPED_TRACE(t);
      EXPECT_EQ(tokens[t]["id"], window_tokens[t - begin + offset]["id"]);
      EXPECT_EQ(tokens[t]["features"], window_tokens[t - begin + offset]["features"]);
    }
  };
  expect_same(0, 40, lines[1]["tokens"], 0);
  expect_same(40, 79, lines[2]["tokens"], 1);
  expect_same(79, 101, lines[3]["tokens"], 1);

  // --max_seq_len 0 runs the line whole: later positions see the earlier
  // text, so their features differ.
  const std::string whole = dir + "/whole.jsonl";
  ASSERT_EQ(RunShell(ExtractCommand(input, whole, "--k 4 --max_seq_len 0"), &out), 0) << out;
  const std::vector<json> whole_lines = read_lines(whole);
  ASSERT_EQ(whole_lines.size(), 4u);
  EXPECT_EQ(whole_lines[0]["tokens"][10], tokens[10]);  // inside the first window: the same
  int differing = 0;
  for (size_t t = 40; t < 101; ++t) differing += whole_lines[0]["tokens"][t] != tokens[t];
  EXPECT_GT(differing, 0);

  // --resume computes the last kept line again with the same windows.
  const std::string windowed_text = ReadFile(windowed);
  const std::string part = dir + "/part.jsonl";
  std::ofstream(part, std::ios::binary | std::ios::trunc) << windowed_text.substr(0, windowed_text.find('\n') + 1);
  ASSERT_EQ(RunShell(ExtractCommand(input, part, "--k 4 --max_seq_len 40 --resume"), &out), 0) << out;
  EXPECT_EQ(ReadFile(part), windowed_text);
  std::ofstream(part, std::ios::binary | std::ios::trunc) << windowed_text.substr(0, windowed_text.find('\n') + 1);
  EXPECT_EQ(RunShell(ExtractCommand(input, part, "--k 4 --max_seq_len 0 --resume"), &out), 1) << out;
  EXPECT_NE(out.find("differs from this run's output"), std::string::npos) << out;
  // The last kept line is as long as a window, so no split changes it: the
  // longest kept line, computed again too, catches the other --max_seq_len.
  const size_t two_lines = windowed_text.find('\n', windowed_text.find('\n') + 1) + 1;
  std::ofstream(part, std::ios::binary | std::ios::trunc) << windowed_text.substr(0, two_lines);
  EXPECT_EQ(RunShell(ExtractCommand(input, part, "--k 4 --max_seq_len 0 --resume"), &out), 1) << out;
  EXPECT_NE(out.find(part + ":1: differs from this run's output"), std::string::npos) << out;
  EXPECT_EQ(ReadFile(part), windowed_text.substr(0, two_lines));  // refused: untouched
  ASSERT_EQ(RunShell(ExtractCommand(input, part, "--k 4 --max_seq_len 40 --resume"), &out), 0) << out;
  EXPECT_EQ(ReadFile(part), windowed_text);

  // Hook activations are assembled from the windows too.
  const std::string dump = dir + "/hooks.safetensors";
  ASSERT_EQ(RunShell(ExtractCommand(input, dir + "/dumped.jsonl", "--k 4 --max_seq_len 40 --dump-hooks " + Quote(dump)),
                     &out),
            0)
      << out;
  auto store = TensorStore::Open(dump);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string hook = (*engine)->saes()[0]->hook().Name();
  auto long_line = (*store)->GetWithShape(hook + ".0", {101, 64});
  auto middle = (*store)->GetWithShape(hook + ".2", {40, 64});
  ASSERT_TRUE(long_line.ok() && middle.ok()) << long_line.status() << middle.status();
  const float* a = static_cast<const float*>(long_line->data);
  const float* b = static_cast<const float*>(middle->data);
  EXPECT_TRUE(std::equal(a + 40 * 64, a + 79 * 64, b + 64));

  EXPECT_EQ(RunShell(ExtractCommand(input, dir + "/bad.jsonl", "--max_seq_len 1"), &out), 1) << out;
  EXPECT_NE(out.find("--max_seq_len must be 0 (no windows) or at least 2"), std::string::npos) << out;
}

// --resume refuses, before touching it, an output that is not an earlier run
// of this input with these SAEs and options, and it cannot resume a hook dump.
TEST(ExtractBinaryTest, ResumeRefusesAnotherRunsOutput) {
  const std::string dir = testing::MakeTempDir("e2e-extract-resume-bad");
  const std::string input = dir + "/in.jsonl", other_input = dir + "/other.jsonl", ids_input = dir + "/ids.jsonl",
                    output = dir + "/out.jsonl";
  std::ofstream(input) << "{\"text\": \"The cat sat.\"}\n{\"text\": \"The red cat.\"}\n";
  std::ofstream(other_input) << "{\"text\": \"The cat sat.\"}\n{\"text\": \"The red dog.\"}\n";
  std::string out;
  auto run = [&](const std::string& in, const std::string& flags) {
    EXPECT_EQ(RunShell(ExtractCommand(in, output, flags), &out), 0) << out;
    return ReadFile(output);
  };
  auto first = [](const std::string& file) { return file.substr(0, file.find('\n') + 1); };
  const std::string this_run = run(input, "--k 4");
  const std::string other_run = run(other_input, "--k 4");
  const std::string k2_run = run(input, "--k 2");
  const std::string bos_run = run(input, "--k 4 --include_bos");
  // The same tokens given as ids: pieces equal, offsets [0, 0].
  const json first_line = json::parse(first(this_run));
  json ids = json::array();
  for (const json& token : first_line["tokens"]) ids.push_back(token["id"]);
  std::ofstream(ids_input) << json{{"token_ids", ids}}.dump() << "\n" << json{{"token_ids", ids}}.dump() << "\n";
  nlohmann::ordered_json bad_pair = nlohmann::ordered_json::parse(first(this_run));
  bad_pair["tokens"][1]["features"]["L1R-8x"] = nlohmann::ordered_json::array({nlohmann::ordered_json::array({"x"})});
  std::string crlf = this_run;
  for (size_t at = 0; (at = crlf.find('\n', at)) != std::string::npos; at += 2) crlf.insert(at, "\r");

  const std::string refuse = "not an earlier run of this input with these SAEs and options";
  const std::string in2 = " (" + input + ":2)";
  const struct {
    std::string content, flags, message;
  } cases[] = {
      {other_run, "--k 4", output + ":2: token 3 is "},
      {k2_run, "--k 4", output + ":2: differs from this run's output for " + input + ":2 (computed again)"},
      {first(this_run), "--k 2", output + ":1: token 1, L1R-8x: not a list of at most --k=2 [index, value] pairs"},
      {bos_run, "--k 4",
       output + ":1: token 0, L1R-8x: not a list of at most --k=4 [index, value] pairs of this "
                "SAE, value-descending, and empty at BOS without --include_bos"},
      {bad_pair.dump() + "\n", "--k 4", output + ":1: token 1, L1R-8x: not a list of at most --k=4"},
      {this_run + first(this_run), "--k 4", output + ":3: more lines than the 2 input lines"},
      {"{\"tokens\": 3}\n", "--k 4", output + ":1: not an output line of sae-extract"},
      {"not json\n", "--k 4", output + ":1: not an output line of sae-extract"},
      {crlf, "--k 4", output + ":1: ends in \\r\\n; sae-extract writes \\n"},
      {"my notes, no newline", "--k 4", output + ":1: an unfinished line that is not the start of this run's line"},
      {first(this_run) + "{\"tokens\":[{\"id\":5,", "--k 4", output + ":2: an unfinished line that is not the start"},
      {this_run + "{\"tokens\":[", "--k 4",
       output + ":3: an unfinished line that is not the start of this run's "
                "line (the input has no more lines)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.message);
    std::ofstream(output, std::ios::binary | std::ios::trunc) << c.content;
    EXPECT_EQ(RunShell(ExtractCommand(input, output, c.flags + " --resume"), &out), 1) << out;
    EXPECT_NE(out.find(c.message), std::string::npos) << out;
    EXPECT_NE(out.find(refuse), std::string::npos) << out;
    EXPECT_EQ(ReadFile(output), c.content) << "the refused file was changed";
  }
  // Text lines where the input now gives ids: offsets differ.
  std::ofstream(output, std::ios::binary | std::ios::trunc) << this_run;
  EXPECT_EQ(RunShell(ExtractCommand(ids_input, output, "--k 4 --resume"), &out), 1) << out;
  EXPECT_NE(out.find(output + ":1: token 1 has piece \"The\" and offset [0,3] where this run has \"The\" and [0,0]"),
            std::string::npos)
      << out;
  // The SAEs of the run, and their order, are part of what a line must match.
  const DemoLayout& demo = testing::Demo();
  auto with_saes = [&](const std::vector<std::string>& dirs, const std::string& flags) {
    std::string command = std::string(SAE_EXTRACT_BIN) + " --model " + Quote(demo.model_dir);
    for (const std::string& d : dirs) command += " --sae " + Quote(d);
    return command + " --input " + Quote(input) + " --output " + Quote(output) + " " + flags;
  };
  ASSERT_EQ(RunShell(with_saes({demo.sae_dirs[1], demo.sae_dirs[0]}, "--k 4"), &out), 0) << out;
  EXPECT_EQ(RunShell(with_saes({demo.sae_dirs[0], demo.sae_dirs[1]}, "--k 4 --resume"), &out), 1) << out;
  EXPECT_NE(out.find(output + ":1: token 0 has features of the SAEs [L2A-8x, L1R-8x], this run of [L1R-8x, L2A-8x]"),
            std::string::npos)
      << out;
  EXPECT_EQ(RunShell(ExtractCommand(input, dir, "--k 4 --resume"), &out), 1) << out;
  EXPECT_NE(out.find(dir + ": not a regular file; cannot resume it"), std::string::npos) << out;
  // Output lines to keep, but no hook file to continue.
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--k 4"), &out), 0) << out;
  EXPECT_EQ(
      RunShell(ExtractCommand(input, output, "--k 4 --resume --dump-hooks " + Quote(dir + "/h.safetensors")), &out), 1)
      << out;
  EXPECT_NE(out.find("--resume with --dump-hooks: " + dir +
                     "/h.safetensors.partial: not found; the stopped run's hook file is needed to continue (or run "
                     "without --resume)"),
            std::string::npos)
      << out;
}

// sae-extract --backend=cuda refuses a --k its JumpReLU SAEs cannot be asked
// for on this device (see CudaServerTest.MaxKBeyondTheDeviceIsRefusedAtStartup).
// Every line is checked before any compute, yet no line's tokens are kept
// for later: a regular file is read again as the batches reach its lines
// (24 bytes held per line), a pipe's lines are held as their bytes. Held as
// tokens (the ids, offsets and vectors of each line), the input took 3 to 6
// times its size. Runs that fail at the last line measure the check alone.
TEST(ExtractBinaryTest, CheckingTheInputHoldsNoTokens) {
  const std::string dir = testing::MakeTempDir("e2e-extract-memory");
  const std::string small = dir + "/small.jsonl", big = dir + "/big.jsonl", output = dir + "/out.jsonl";
  std::string text;
  while (text.size() < 400) text += "The quick brown fox jumps over the lazy dog near 17 red barns. ";
  constexpr int kLines = 80'000;  // 34 MB
  {
    std::ofstream(small) << json{{"text", text}}.dump() << "\n{\"text\": 5}\n";
    std::ofstream out(big);
    const std::string line = json{{"text", text}}.dump() + "\n";
    for (int i = 0; i < kLines; ++i) out << line;
    out << "{\"text\": 5}\n";
  }
  const long big_kib = static_cast<long>(std::filesystem::file_size(big) / 1024);
  // Exit code and peak resident memory (KiB) of a shell command (its
  // children's included).
  auto run = [&](const std::string& command, const std::string& names) {
    ChildProcess child({"/bin/sh", "-c", command}, dir + "/log");
    EXPECT_EQ(child.WaitExit(std::chrono::seconds(120)), 1) << child.log();
    EXPECT_NE(child.log().find(names + ": \"text\" must be a string"), std::string::npos) << child.log();
    return child.peak_rss_kib();
  };
  const long baseline = run(ExtractCommand(small, output, ""), small + ":2");
  const long from_file = run(ExtractCommand(big, output, ""), big + ":" + std::to_string(kLines + 1));
  const long from_pipe = run("cat " + Quote(big) + " | " + ExtractCommand("/dev/stdin", output, ""),
                             "/dev/stdin:" + std::to_string(kLines + 1));
  RecordProperty("input_kib", big_kib);
  std::printf("input %ld KiB; peak RSS %ld KiB for 2 lines, %ld KiB from the file, %ld KiB from a pipe\n", big_kib,
              baseline, from_file, from_pipe);
  EXPECT_LT(from_file - baseline, big_kib / 8);
  EXPECT_LT(from_pipe - baseline, big_kib * 3 / 2);
  EXPECT_FALSE(std::filesystem::exists(output));

  // A pipe's lines give the file's output.
  const std::string few = dir + "/few.jsonl", piped = dir + "/piped.jsonl";
  std::ofstream(few) << json{{"text", "The cat sat."}}.dump() << "\n\n"
                     << json{{"token_ids", {992, 299}}}.dump() << "\n";
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(few, output, "--k 3"), &out), 0) << out;
  ASSERT_EQ(RunShell("cat " + Quote(few) + " | " + ExtractCommand("/dev/stdin", piped, "--k 3"), &out), 0) << out;
  const std::string expected = ReadFile(output);
  EXPECT_EQ(ReadFile(piped), expected);
  EXPECT_EQ(std::count(expected.begin(), expected.end(), '\n'), 2);
}

// Where the tensors of hook-file lines [0, n) end in the file's bytes.
uint64_t HookLinesEnd(const json& header, uint64_t header_size, size_t n) {
  uint64_t end = 0;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const size_t dot = name.rfind('.');
    if (dot != std::string::npos && std::stoul(name.substr(dot + 1)) < n) {
      end = std::max(end, entry.at("data_offsets")[1].get<uint64_t>());
    }
  }
  return 8 + header_size + end;
}

// Lines are read again as the batches reach them: a line changed after the
// check fails the run naming it, with the lines before it written. The hook
// file is written as the lines are, as F.partial until the run ends; a failed
// run leaves it, and --resume completes both files once the line is back.
TEST(ExtractBinaryTest, LinesAreReadAsTheRunReachesThem) {
  const std::string dir = testing::MakeTempDir("e2e-extract-reread");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl", dump = dir + "/hooks.safetensors";
  constexpr int kLines = 300;
  auto write_input = [&](const std::string& last) {
    std::ofstream in(input, std::ios::trunc);
    for (int i = 1; i < kLines; ++i)
      in << json{{"text", absl::StrCat("Line ", i, ": the cat sat on the mat.")}}.dump() << "\n";
    in << json{{"text", last}}.dump() << "\n";
  };
  write_input("The last line.");
  ChildProcess child(
      {"/bin/sh", "-c", "exec " + ExtractCommand(input, output, "--k 2 --batch_tokens 16 --dump-hooks " + Quote(dump))},
      dir + "/log");
  ASSERT_TRUE(testing::WaitFor([&] { return ReadFile(output).find('\n') != std::string::npos; }, kProcessTimeout))
      << child.log();
  child.Signal(SIGSTOP);
  const std::string written = ReadFile(output);
  const size_t lines_written = std::count(written.begin(), written.end(), '\n');
  ASSERT_LT(lines_written, static_cast<size_t>(kLines)) << "the run ended before it could be stopped";
  // The header, then the hook tensors of every line written.
  const std::string partial = ReadFile(dump + ".partial");
  uint64_t header_size = 0;
  const json header = SafetensorsHeader(partial, &header_size);
  EXPECT_EQ(header.size(), 1 + 5 * kLines);  // __metadata__, then 5 hooks a line
  for (const char* hook : {"L1R", "L2A", "L2M", "L2TC", "L3R"}) {
    EXPECT_TRUE(header.contains(absl::StrCat(hook, ".", lines_written - 1))) << hook;
  }
  EXPECT_GE(partial.size(), HookLinesEnd(header, header_size, lines_written));
  EXPECT_FALSE(std::filesystem::exists(dump));

  write_input("The last line, changed.");
  child.Signal(SIGCONT);
  EXPECT_EQ(child.WaitExit(), 1) << child.log();
  EXPECT_NE(child.log().find(absl::StrCat(input, ":", kLines,
                                          ": changed since sae-extract checked it (the input file must not change "
                                          "during the run)")),
            std::string::npos)
      << child.log();
  const std::string kept = ReadFile(output);
  EXPECT_EQ(kept.substr(0, written.size()), written);
  EXPECT_EQ(std::count(kept.begin(), kept.end(), '\n'), kLines - 1);
  EXPECT_EQ(kept.back(), '\n');
  EXPECT_TRUE(std::filesystem::exists(dump + ".partial"));
  EXPECT_FALSE(std::filesystem::exists(dump));

  // The line back as it was: --resume completes both files, as one run would.
  write_input("The last line.");
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--k 2 --resume --dump-hooks " + Quote(dump)), &out), 0) << out;
  EXPECT_NE(out.find(absl::StrCat("(", kLines - 1, " kept, 1 appended)")), std::string::npos) << out;
  const std::string whole_output = dir + "/whole.jsonl", whole_dump = dir + "/whole.safetensors";
  ASSERT_EQ(RunShell(ExtractCommand(input, whole_output, "--k 2 --dump-hooks " + Quote(whole_dump)), &out), 0) << out;
  EXPECT_EQ(ReadFile(output), ReadFile(whole_output));
  EXPECT_TRUE(ReadFile(dump) == ReadFile(whole_dump));
  EXPECT_FALSE(std::filesystem::exists(dump + ".partial"));
}

// --resume with --dump-hooks: the stopped run's F.partial is continued from
// the last line whose tensors it holds whole; output lines it has no
// tensors for (the hooks lag the output when a stop falls between their
// writes) are computed again. Both files end as one uninterrupted run's.
TEST(ExtractBinaryTest, ResumeContinuesTheHookFile) {
  const std::string dir = testing::MakeTempDir("e2e-extract-resume-hooks");
  const std::string input = dir + "/in.jsonl", full = dir + "/full.jsonl", full_dump = dir + "/full.safetensors";
  const std::string part = dir + "/part.jsonl", dump = dir + "/part.safetensors";
  {
    std::ofstream in(input);
    for (const char* text :
         {"The cat sat.", "A red bird flew over Paris.", "One two three.", "Dogs and cats.", "Tokyo is big."}) {
      in << json{{"text", text}}.dump() << "\n";
    }
  }
  std::string out;
  ASSERT_EQ(RunShell(ExtractCommand(input, full, "--k 3 --dump-hooks " + Quote(full_dump)), &out), 0) << out;
  const std::string expected = ReadFile(full), expected_hooks = ReadFile(full_dump);
  std::vector<size_t> line_ends;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] == '\n') line_ends.push_back(i + 1);
  }
  ASSERT_EQ(line_ends.size(), 5u);
  uint64_t header_size = 0;
  const json header = SafetensorsHeader(expected_hooks, &header_size);
  ASSERT_FALSE(header.empty());

  struct Stop {
    size_t output_bytes;  // of the output file at the stop
    uint64_t hook_bytes;  // of F.partial
    size_t kept;          // lines kept by --resume
  };
  const std::vector<Stop> stops = {
      // Hooks of 3 lines and a torn tensor; the output 3 lines and a torn one.
      {line_ends[2] + 20, HookLinesEnd(header, header_size, 3) + 100, 3},
      // The output 4 lines, the hooks 2: lines 3 and 4 are redone.
      {line_ends[3], HookLinesEnd(header, header_size, 2), 2},
      // Hooks ahead of the output: cut back to it.
      {line_ends[0], HookLinesEnd(header, header_size, 4), 1},
      // Two of line 4's five tensors whole: line 4 is redone whole.
      {line_ends[3], 8 + header_size + header.at("L2A.3").at("data_offsets")[1].get<uint64_t>() + 50, 3},
      // Nothing past the header.
      {line_ends[1], 8 + header_size, 0},
  };
  for (const Stop& stop : stops) {
    SCOPED_TRACE(absl::StrCat(stop.output_bytes, " ", stop.hook_bytes));
    std::ofstream(part, std::ios::binary | std::ios::trunc) << expected.substr(0, stop.output_bytes);
    std::ofstream(dump + ".partial", std::ios::binary | std::ios::trunc) << expected_hooks.substr(0, stop.hook_bytes);
    ASSERT_EQ(
        RunShell(ExtractCommand(input, part, "--k 3 --resume --batch_tokens 4 --dump-hooks " + Quote(dump)), &out), 0)
        << out;
    EXPECT_EQ(ReadFile(part), expected);
    EXPECT_TRUE(ReadFile(dump) == expected_hooks);
    EXPECT_FALSE(std::filesystem::exists(dump + ".partial"));
    EXPECT_NE(out.find(absl::StrCat("resuming after the ", stop.kept, " lines")), std::string::npos) << out;
    const size_t output_lines = std::count(expected.begin(), expected.begin() + stop.output_bytes, '\n');
    if (stop.kept < output_lines) {
      EXPECT_NE(out.find(absl::StrCat(dump, ".partial holds the hooks of ", stop.kept, " of the ", output_lines,
                                      " lines ", part, " holds; the rest are redone")),
                std::string::npos)
          << out;
    }
  }

  // A finished run: nothing to do, and F is checked and left as it was.
  ASSERT_EQ(RunShell(ExtractCommand(input, part, "--k 3 --resume --dump-hooks " + Quote(dump)), &out), 0) << out;
  EXPECT_NE(out.find("(5 kept, 0 appended)"), std::string::npos) << out;
  EXPECT_TRUE(ReadFile(dump) == expected_hooks);

  // Another run's hook file (other lines, so other shapes) is refused, the
  // files left as they were.
  const std::string other_input = dir + "/other.jsonl", other_dump = dir + "/other.safetensors";
  std::ofstream(other_input) << json{{"text", "Something else entirely."}}.dump() << "\n"
                             << json{{"text", "And more."}}.dump() << "\n";
  ASSERT_EQ(
      RunShell(ExtractCommand(other_input, dir + "/other.jsonl.out", "--k 3 --dump-hooks " + Quote(other_dump)), &out),
      0)
      << out;
  std::ofstream(part, std::ios::binary | std::ios::trunc) << expected.substr(0, line_ends[1]);
  std::ofstream(dump + ".partial", std::ios::binary | std::ios::trunc) << ReadFile(other_dump);
  EXPECT_EQ(RunShell(ExtractCommand(input, part, "--k 3 --resume --dump-hooks " + Quote(dump)), &out), 1) << out;
  EXPECT_NE(out.find(dump + ".partial: its header is not the one this run writes"), std::string::npos) << out;
  EXPECT_EQ(ReadFile(part), expected.substr(0, line_ends[1]));
  // A finished run's F from another input is refused, and stays F.
  std::filesystem::remove(dump + ".partial");
  std::ofstream(part, std::ios::binary | std::ios::trunc) << expected;
  std::filesystem::copy_file(other_dump, dump, std::filesystem::copy_options::overwrite_existing);
  EXPECT_EQ(RunShell(ExtractCommand(input, part, "--k 3 --resume --dump-hooks " + Quote(dump)), &out), 1) << out;
  EXPECT_NE(out.find("its header is not the one this run writes"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::exists(dump));
  EXPECT_FALSE(std::filesystem::exists(dump + ".partial"));
}

TEST(CudaExtractTest, KBeyondTheDeviceIsRefused) {
  const std::string dir = testing::MakeTempDir("e2e-extract-k");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl";
  std::ofstream(input) << "{\"text\": \"The red cat.\"}\n";
  std::string out;
  const int code = RunShell(ExtractCommand(input, output, "--backend=cuda --k=9000"), &out);
  if (out.find("--k=9000") == std::string::npos && std::getenv("SAE_TEST_REQUIRE_CUDA") == nullptr) {
    GTEST_SKIP() << "no usable CUDA backend:\n" << out;
  }
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("--k=9000 is larger than "), std::string::npos) << out;
  EXPECT_EQ(RunShell(ExtractCommand(input, output, "--backend=cuda --k=8"), &out), 0) << out;
}

// A GPU that hangs mid-run (the emulator's SAE_CUDA_EMU_HANG_FILE, created
// once the first lines are out): sae-extract exits with status 3 after
// --batch_timeout_seconds, naming the batch's input lines, and the output
// holds whole lines for every batch that finished, from which --resume
// completes the run.
TEST(CudaExtractTest, HungDeviceExitsAndKeepsFinishedLines) {
  if (!OnCudaEmulator()) GTEST_SKIP() << "hangs are injected only by the CUDA emulator (SAE_CUDA_BACKEND_LIB)";
  const std::string dir = testing::MakeTempDir("e2e-extract-hang");
  const std::string input = dir + "/in.jsonl", output = dir + "/out.jsonl", hang_file = dir + "/hang";
  const std::string dump = dir + "/hooks.safetensors", with_dump = " --dump-hooks " + Quote(dump);
  constexpr int kLines = 100;
  {
    std::ofstream in(input);
    const char* kTexts[] = {"The red cat.", "A dog in Paris.", "One blue bird", "Tokyo, Rome and Berlin."};
    for (int i = 0; i < kLines; ++i) in << json{{"text", absl::StrCat(kTexts[i % 4], " Line ", i, ".")}}.dump() << "\n";
  }
  auto lines_out = [&] {
    std::vector<std::string> lines;
    std::ifstream in(output);
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  };
  setenv("SAE_CUDA_EMU_HANG_FILE", hang_file.c_str(), 1);
  std::string out;
  int code = -1;
  std::atomic<bool> finished{false};
  std::thread run([&] {
    code = RunShell(
        ExtractCommand(input, output, "--backend=cuda --batch_tokens=1 --batch_timeout_seconds=5" + with_dump), &out);
    finished = true;
  });
  const bool started = testing::WaitFor([&] { return !lines_out().empty(); }, std::chrono::seconds(60));
  unsetenv("SAE_CUDA_EMU_HANG_FILE");  // (after popen read it)
  std::ofstream(hang_file) << "hang\n";
  // Without a watchdog the run would wait for good: ending the hang lets it finish (and the checks fail).
  const bool exited_while_hung = testing::WaitFor([&] { return finished.load(); }, std::chrono::seconds(60));
  std::remove(hang_file.c_str());
  run.join();
  EXPECT_TRUE(exited_while_hung) << "sae-extract did not end while the GPU hung";
  ASSERT_TRUE(started) << out;
  EXPECT_EQ(code, 3) << out;
  EXPECT_NE(out.find("the GPU is presumed hung; exiting (status 3)"), std::string::npos) << out;
  EXPECT_NE(out.find("longer than --batch_timeout_seconds (5)"), std::string::npos) << out;
  const std::vector<std::string> lines = lines_out();
  ASSERT_GE(lines.size(), 1u);
  EXPECT_LT(lines.size(), static_cast<size_t>(kLines)) << out;
  EXPECT_NE(out.find(absl::StrCat(input, ":", lines.size() + 1, "-")), std::string::npos) << out;
  EXPECT_NE(out.find(absl::StrCat("holds the ", lines.size(), " lines before")), std::string::npos) << out;
  for (const std::string& line : lines) EXPECT_FALSE(json::parse(line, nullptr, false).is_discarded()) << line;
  EXPECT_NE(out.find("--resume continues from there"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::exists(dump + ".partial"));

  // Once the GPU is healthy again, --resume keeps those lines and adds the
  // rest (and the hook file's); resuming the finished file then checks them
  // all against the input.
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--backend=cuda --resume --batch_tokens=4096" + with_dump), &out), 0)
      << out;
  const std::string hooks = ReadFile(dump);
  uint64_t header_size = 0;
  const json header = SafetensorsHeader(hooks, &header_size);
  EXPECT_EQ(header.size(), 1 + 5 * kLines);  // __metadata__, then 5 hooks a line
  EXPECT_EQ(hooks.size(), HookLinesEnd(header, header_size, kLines));
  EXPECT_FALSE(std::filesystem::exists(dump + ".partial"));
  const std::vector<std::string> resumed = lines_out();
  ASSERT_EQ(resumed.size(), static_cast<size_t>(kLines)) << out;
  EXPECT_TRUE(std::equal(lines.begin(), lines.end(), resumed.begin())) << "kept lines changed";
  EXPECT_NE(out.find(absl::StrCat("(", lines.size(), " kept, ", kLines - lines.size(), " appended)")),
            std::string::npos)
      << out;
  ASSERT_EQ(RunShell(ExtractCommand(input, output, "--backend=cuda --resume" + with_dump), &out), 0) << out;
  EXPECT_NE(out.find(absl::StrCat("(", kLines, " kept, 0 appended)")), std::string::npos) << out;
  EXPECT_TRUE(ReadFile(dump) == hooks);
}

}  // namespace
}  // namespace sae
