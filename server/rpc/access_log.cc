#include "rpc/access_log.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

absl::StatusOr<std::unique_ptr<AccessLog>> AccessLog::Open(const std::string& path) {
  if (path == "-") return std::unique_ptr<AccessLog>(new AccessLog(path, stderr));
  absl::StatusOr<std::FILE*> file = OpenForAppend(path);
  if (!file.ok()) return file.status();
  return std::unique_ptr<AccessLog>(new AccessLog(path, *file));
}

AccessLog::~AccessLog() {
  if (file_ != stderr) std::fclose(file_);
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
  std::lock_guard<std::mutex> lock(mu_);
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

absl::Status AccessLog::Reopen() {
  if (file_ == stderr) return absl::OkStatus();
  absl::StatusOr<std::FILE*> file = OpenForAppend(path_);
  if (!file.ok()) return file.status();
  std::lock_guard<std::mutex> lock(mu_);
  std::fclose(file_);
  file_ = *file;
  return absl::OkStatus();
}

}  // namespace sae
