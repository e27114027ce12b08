#include "rpc/access_log.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sae {
namespace {

absl::StatusOr<std::FILE*> OpenForAppend(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "a");
  if (file == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: access_log: ", path, ": cannot open for appending: ", std::strerror(errno)));
  }
  return file;
}

// 2026-12-03T15:04:05.123Z
std::string Rfc3339Millis(double unix_seconds) {
  const auto whole = static_cast<std::time_t>(unix_seconds);
  const int millis = static_cast<int>((unix_seconds - static_cast<double>(whole)) * 1000);
  std::tm utc{};
  gmtime_r(&whole, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%S", &utc);
  return absl::StrFormat("%s.%03dZ", text, millis);
}

}  // namespace

struct AccessLog::State {
  std::mutex mu;
  std::condition_variable wake;     // lines queued, a file to switch to, or stop
  std::condition_variable drained;  // the writer exited
  std::string queued;               // whole lines, not yet handed to the writer
  std::FILE* file = nullptr;        // the writer's only; stderr for "-"
  std::FILE* next_file = nullptr;   // from Reopen: the writer switches to it
  bool stop = false;
  bool exited = false;
  int64_t dropped = 0;
  std::function<void()> on_drop;
  std::string path;

  void Run() {
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      wake.wait(lock, [this] { return stop || !queued.empty() || next_file != nullptr; });
      std::FILE* const replaced = next_file != nullptr ? file : nullptr;
      if (next_file != nullptr) {
        file = next_file;
        next_file = nullptr;
      }
      std::string batch;
      batch.swap(queued);
      if (batch.empty() && replaced == nullptr) break;  // stopped, and every line written
      lock.unlock();
      if (replaced != nullptr) std::fclose(replaced);
      if (!batch.empty()) {
        std::fwrite(batch.data(), 1, batch.size(), file);
        std::fflush(file);
      }
      lock.lock();
    }
    if (file != stderr) std::fclose(file);
    exited = true;
    drained.notify_all();
  }
};

absl::StatusOr<std::unique_ptr<AccessLog>> AccessLog::Open(const std::string& path, std::function<void()> on_drop) {
  auto state = std::make_shared<State>();
  if (path == "-") {
    state->file = stderr;
  } else {
    ASSIGN_OR_RETURN(state->file, OpenForAppend(path));
  }
  state->on_drop = std::move(on_drop);
  state->path = path;
  std::thread([state] { state->Run(); }).detach();
  return std::unique_ptr<AccessLog>(new AccessLog(state));
}

AccessLog::~AccessLog() {
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->stop = true;
  state_->wake.notify_all();
  state_->drained.wait_for(lock, std::chrono::seconds(5), [this] { return state_->exited; });
}

std::string AccessLog::Format(const AccessRecord& r, double unix_seconds) {
  nlohmann::ordered_json line;
  line["time"] = Rfc3339Millis(unix_seconds);
  line["rpc"] = r.rpc;
  line["peer"] = r.peer;
  if (!r.client.empty()) line["client"] = r.client;
  if (!r.request_id.empty()) line["request_id"] = r.request_id;
  line["code"] = absl::StatusCodeToString(r.status.code());
  if (!r.status.ok()) line["error"] = std::string(r.status.message());
  if (r.tokens > 0) {
    line["tokens"] = r.tokens;
    line["saes"] = r.saes;
    line["k"] = r.k;
  }
  line["ms"] = std::round(r.seconds * 1e6) / 1e3;
  // Invalid UTF-8 (none passes the request parser) would become U+FFFD.
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void AccessLog::Write(const AccessRecord& record) {
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  const std::string line = Format(record, now) + "\n";
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->queued.size() + line.size() <= kMaxQueuedBytes) {
      state_->queued += line;
      state_->wake.notify_one();
      return;
    }
    ++state_->dropped;
  }
  if (state_->on_drop) state_->on_drop();
}

absl::Status AccessLog::Reopen() {
  if (state_->path == "-") return absl::OkStatus();
  ASSIGN_OR_RETURN(std::FILE * file, OpenForAppend(state_->path));
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->next_file != nullptr) std::fclose(state_->next_file);  // two SIGHUPs before the writer's turn
  state_->next_file = file;
  state_->wake.notify_one();
  return absl::OkStatus();
}

int64_t AccessLog::dropped() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->dropped;
}

}  // namespace sae
