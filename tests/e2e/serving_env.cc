#include "serving_env.h"

#include <algorithm>
#include <utility>

#include "testing/test_util.h"

namespace sae::testing {

void Gate::Close() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  permits_ = 0;
}

void Gate::Open() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = false;
  cv_.notify_all();
}

void Gate::Allow(int n_batches) {
  std::lock_guard<std::mutex> lock(mu_);
  permits_ += n_batches;
  cv_.notify_all();
}

void Gate::Pass(const std::vector<SequenceRequest>& batch) {
  std::unique_lock<std::mutex> lock(mu_);
  ++waiting_;
  cv_.wait(lock, [this] { return !closed_ || permits_ > 0; });
  if (closed_) --permits_;
  --waiting_;
  batch_sizes_.push_back(batch.size());
  for (const SequenceRequest& r : batch) sequences_.push_back(r.ids);
}

int Gate::waiting() {
  std::lock_guard<std::mutex> lock(mu_);
  return waiting_;
}

int Gate::max_batch() {
  std::lock_guard<std::mutex> lock(mu_);
  return batch_sizes_.empty() ? 0 : static_cast<int>(*std::max_element(batch_sizes_.begin(), batch_sizes_.end()));
}

std::vector<size_t> Gate::batch_sizes() {
  std::lock_guard<std::mutex> lock(mu_);
  return batch_sizes_;
}

std::vector<std::vector<int32_t>> Gate::sequences() {
  std::lock_guard<std::mutex> lock(mu_);
  return sequences_;
}

std::unique_ptr<ServingEnv> ServingEnv::Start(ExecutorOptions executor_options, ServiceOptions service_options,
                                              std::string* error, const std::string& backend) {
  auto env = std::make_unique<ServingEnv>();
  auto engine = Engine::Create(DemoEngineOptions(backend));
  auto reference = Engine::Create(DemoEngineOptions());
  if (!engine.ok() || !reference.ok()) {
    *error = engine.ok() ? reference.status().ToString() : engine.status().ToString();
    return nullptr;
  }
  env->engine = std::move(*engine);
  env->reference = std::move(*reference);
  env->metrics = std::make_shared<Metrics>();
  executor_options.bos_id = env->engine->tokenizer().bos_id();
  executor_options.metrics = env->metrics;
  Engine* e = env->engine.get();
  Gate* gate = &env->gate;
  BatchRunner runner = EngineRunner(e, env->metrics);
  runner.start = [gate, start = std::move(runner.start)](const std::vector<SequenceRequest>& batch) {
    gate->Pass(batch);
    return start(batch);
  };
  auto executor = Executor::Create(std::move(runner), executor_options);
  if (!executor.ok()) {
    *error = executor.status().ToString();
    return nullptr;
  }
  env->executor = std::move(*executor);
  service_options.metrics = env->metrics;
  if (service_options.version.empty()) service_options.version = "test";
  env->service = std::make_unique<SaeServiceImpl>(service_options);
  env->service->Attach(env->engine.get(), env->executor.get());
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &env->port);
  builder.RegisterService(env->service.get());
  env->server = builder.BuildAndStart();
  if (env->server == nullptr || env->port == 0) {
    *error = "cannot listen on 127.0.0.1";
    return nullptr;
  }
  return env;
}

ServingEnv::~ServingEnv() {
  gate.Open();
  if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (executor) executor->Shutdown();
  if (server) server->Wait();
}

std::unique_ptr<client::SaeClient> ServingEnv::NewClient() const {
  auto client = client::SaeClient::Connect("127.0.0.1:" + std::to_string(port));
  client->set_timeout(std::chrono::seconds(30));
  return client;
}

}  // namespace sae::testing
