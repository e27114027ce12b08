// End-to-end tests of the shipped binaries: sae-server as a subprocess
// (health, reflection, config errors, graceful shutdown), the sae-client CLI
// against it, and sae-extract's JSONL and hook dumps.
#include <google/protobuf/descriptor.pb.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/demo_model.h"
#include "core/engine.h"
#include "core/safetensors.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "sae_client.h"
#include "testing/test_util.h"

namespace sae {
namespace {

using json = nlohmann::json;

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

template <typename F>
bool WaitFor(F condition, int seconds = 20) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return condition();
}

// sae-server --demo on a free loopback port, as a child process.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra_args = {}) {
    dir_ = testing::MakeTempDir("e2e-server");
    port_file_ = dir_ + "/port";
    log_ = dir_ + "/server.log";
    std::vector<std::string> args = {SAE_SERVER_BIN, "--demo", "--demo_dir=" + dir_ + "/demo", "--listen=127.0.0.1:0",
                                     "--port_file=" + port_file_};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log = std::freopen(log_.c_str(), "w", stderr);
      if (log == nullptr) _exit(127);
      dup2(fileno(stderr), STDOUT_FILENO);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
  }

  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // Waits for the port file; the address, or "" on timeout.
  std::string WaitForAddress() {
    if (!WaitFor([this] { return !ReadFile(port_file_).empty(); })) return "";
    return "127.0.0.1:" + std::to_string(std::stoi(ReadFile(port_file_)));
  }

  // SIGTERM, then the exit code (-1 if it did not exit normally in time).
  int Terminate() {
    kill(pid_, SIGTERM);
    int status = 0;
    const bool exited = WaitFor([&] { return waitpid(pid_, &status, WNOHANG) == pid_; });
    if (!exited) return -1;
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  std::string log() const { return ReadFile(log_); }

 private:
  std::string dir_, port_file_, log_;
  pid_t pid_ = -1;
};

class ServerBinaryTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess();
    address_ = server_->WaitForAddress();
    ASSERT_FALSE(address_.empty()) << server_->log();
    auto client = client::SaeClient::Connect(address_);
    client->set_timeout(std::chrono::seconds(2));
    // Listening comes before loading: wait for SERVING.
    ASSERT_TRUE(WaitFor([&] {
      grpc::health::v1::HealthCheckResponse response;
      return client->Health("", &response).ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    })) << server_->log();
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

TEST(ServerShutdownTest, SigtermStopsGracefully) {
  ServerProcess server;
  const std::string address = server.WaitForAddress();
  ASSERT_FALSE(address.empty()) << server.log();
  auto client = client::SaeClient::Connect(address);
  ASSERT_TRUE(WaitFor([&] {
    v1::InfoResponse info;
    return client->Info(&info).ok();
  })) << server.log();
  client.reset();
  EXPECT_EQ(server.Terminate(), 0) << server.log();
  EXPECT_NE(server.log().find("stopped"), std::string::npos) << server.log();
}

TEST(ServerConfigTest, BadConfigNamesFileLineAndField) {
  const std::string dir = testing::MakeTempDir("e2e-config");
  const std::string path = dir + "/server.textproto";
  std::ofstream(path) << "demo: true\nmax_kk: 5\n";
  std::string out;
  EXPECT_EQ(RunShell(std::string(SAE_SERVER_BIN) + " --config=" + Quote(path) + " --listen=127.0.0.1:0", &out), 1);
  EXPECT_NE(out.find(path + ":2:"), std::string::npos) << out;
  EXPECT_NE(out.find("max_kk"), std::string::npos) << out;

  // A bad model folder: the message names the file.
  EXPECT_EQ(RunShell(std::string(SAE_SERVER_BIN) + " --model_dir=" + Quote(dir) + " --listen=127.0.0.1:0", &out), 1);
  EXPECT_NE(out.find(dir), std::string::npos) << out;
}

// ---- sae-extract ----

EngineOptions DemoOptions() {
  const DemoLayout& demo = testing::Demo();
  EngineOptions options;
  options.model_dir = demo.model_dir;
  for (const std::string& d : demo.sae_dirs) options.saes.push_back({d, ""});
  return options;
}

std::string ExtractCommand(const std::string& input, const std::string& output, const std::string& extra) {
  const DemoLayout& demo = testing::Demo();
  std::string command = std::string(SAE_EXTRACT_BIN) + " --model " + Quote(demo.model_dir);
  for (const std::string& d : demo.sae_dirs) command += " --sae " + Quote(d);
  return command + " --input " + Quote(input) + " --output " + Quote(output) + " " + extra;
}

TEST(ExtractBinaryTest, WritesJsonlAndHookDump) {
  auto engine = Engine::Create(DemoOptions());
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

}  // namespace
}  // namespace sae
