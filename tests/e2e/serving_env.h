// An in-process sae-server for the serving tests: the demo engine behind the
// real executor (its runner gated so tests control when batches run), the
// callback service and a loopback gRPC port, with options per test.
#ifndef SAE_TESTS_E2E_SERVING_ENV_H_
#define SAE_TESTS_E2E_SERVING_ENV_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/engine.h"
#include "rpc/executor.h"
#include "rpc/metrics.h"
#include "rpc/service.h"
#include "sae_client.h"
#include "testing/test_util.h"

namespace sae::testing {

// Holds the engine thread before each batch while closed; Allow(n) lets n
// batches through a closed gate. Records what ran.
class Gate {
 public:
  void Close();
  void Open();
  void Allow(int n_batches);
  // Called by the runner before each batch.
  void Pass(const std::vector<SequenceRequest>& batch);
  int waiting();
  int max_batch();
  std::vector<size_t> batch_sizes();
  // Every sequence run so far, in order.
  std::vector<std::vector<int32_t>> sequences();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  int permits_ = 0;
  int waiting_ = 0;
  std::vector<size_t> batch_sizes_;
  std::vector<std::vector<int32_t>> sequences_;
};

struct ServingEnv {
  // Null (with the reason in *error) when something failed to start. The
  // served engine runs on `backend`; `reference` always on the CPU.
  static std::unique_ptr<ServingEnv> Start(ExecutorOptions executor_options, ServiceOptions service_options,
                                           std::string* error, const std::string& backend = "cpu");
  ~ServingEnv();

  std::unique_ptr<client::SaeClient> NewClient() const;

  std::unique_ptr<Engine> engine;     // owned by the executor's engine thread
  std::unique_ptr<Engine> reference;  // the test thread's own
  Gate gate;
  std::shared_ptr<Metrics> metrics;
  std::unique_ptr<Executor> executor;
  std::unique_ptr<SaeServiceImpl> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

}  // namespace sae::testing

#endif  // SAE_TESTS_E2E_SERVING_ENV_H_
