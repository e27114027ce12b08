// A watchdog for device work that runs on the calling thread, outside the
// executor (which has its own): sae-extract's batches and sae-server's
// full-batch warm-up. On a hung GPU (a kernel that never ends) that thread
// waits for good, and nothing can release the GPU or finish the work, so the
// process ends with exit status 3, as sae-server does after a device failure.
#ifndef SAE_RPC_HANG_WATCHDOG_H_
#define SAE_RPC_HANG_WATCHDOG_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

namespace sae {

class HangWatchdog {
 public:
  // Told what the stuck work is (Begin's `what`) and how long it has run;
  // it reports, and HangWatchdog then ends the process with status 3.
  using OnHang = std::function<void(const std::string& what, double seconds)>;

  // `timeout` 0: no watchdog (Begin and End do nothing).
  HangWatchdog(std::chrono::seconds timeout, OnHang on_hang);
  ~HangWatchdog();
  HangWatchdog(const HangWatchdog&) = delete;
  HangWatchdog& operator=(const HangWatchdog&) = delete;

  // Work starts; `what` names it in the report.
  void Begin(std::string what);
  // The work ended in time.
  void End();

 private:
  void Loop();

  const std::chrono::seconds timeout_;
  const OnHang on_hang_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;                                           // guarded by mu_
  std::optional<std::chrono::steady_clock::time_point> since_;  // guarded by mu_
  std::string what_;                                            // guarded by mu_
  std::thread thread_;
};

}  // namespace sae

#endif  // SAE_RPC_HANG_WATCHDOG_H_
