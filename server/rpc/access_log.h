// The access log: one JSON line per finished call (access_log in
// ServerConfig), for finding out which client sent what and how it ended.
#ifndef SAE_RPC_ACCESS_LOG_H_
#define SAE_RPC_ACCESS_LOG_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sae {

// One finished call. Extract-like fields are empty or 0 for the other RPCs
// and for requests refused before they were understood.
struct AccessRecord {
  const char* rpc = "";  // "Extract", "ExtractStream", "Tokenize", ...
  std::string peer;      // gRPC's peer address, "ipv4:10.0.0.7:51234"
  std::string client;    // the TLS client certificate's identity, if any
  std::string request_id;
  absl::Status status;  // how the call (or the stream's request) ended
  int64_t tokens = 0;
  std::vector<std::string> saes;
  int k = 0;
  double seconds = 0;  // arrival to last response
};

class AccessLog {
 public:
  // "-": standard error; otherwise `path`, created if needed and appended to.
  // The error names the field and the file.
  static absl::StatusOr<std::unique_ptr<AccessLog>> Open(const std::string& path);
  ~AccessLog();
  AccessLog(const AccessLog&) = delete;
  AccessLog& operator=(const AccessLog&) = delete;

  // Appends one line (thread-safe; flushed, so a crash loses nothing).
  void Write(const AccessRecord& record);
  // Opens the path again (after logrotate moved the file away); on failure
  // keeps writing to the old file and says why.
  absl::Status Reopen();

  // The JSON line of `record` at `unix_seconds`, without the newline.
  static std::string Format(const AccessRecord& record, double unix_seconds);

 private:
  AccessLog(std::string path, std::FILE* file) : path_(std::move(path)), file_(file) {}

  const std::string path_;
  std::mutex mu_;
  std::FILE* file_;  // guarded by mu_; stderr for "-"
};

}  // namespace sae

#endif  // SAE_RPC_ACCESS_LOG_H_
