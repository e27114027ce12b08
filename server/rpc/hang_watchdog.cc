#include "rpc/hang_watchdog.h"

#include <cstdlib>
#include <utility>

namespace sae {

HangWatchdog::HangWatchdog(std::chrono::seconds timeout, OnHang on_hang)
    : timeout_(timeout), on_hang_(std::move(on_hang)) {
  if (timeout_.count() > 0) thread_ = std::thread([this] { Loop(); });
}

HangWatchdog::~HangWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void HangWatchdog::Begin(std::string what) {
  std::lock_guard<std::mutex> lock(mu_);
  what_ = std::move(what);
  since_ = std::chrono::steady_clock::now();
}

void HangWatchdog::End() {
  std::lock_guard<std::mutex> lock(mu_);
  since_.reset();
}

void HangWatchdog::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stop_; })) {
    if (!since_) continue;
    const double busy = std::chrono::duration<double>(std::chrono::steady_clock::now() - *since_).count();
    if (busy < static_cast<double>(timeout_.count())) continue;
    on_hang_(what_, busy);
    std::_Exit(3);  // the working thread is stuck in the GPU: nothing can be released
  }
}

}  // namespace sae
