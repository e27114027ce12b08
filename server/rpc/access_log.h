// The access log: one JSON line per finished call (access_log in
// ServerConfig), for finding out which client sent what and how it ended.
#ifndef SAE_RPC_ACCESS_LOG_H_
#define SAE_RPC_ACCESS_LOG_H_

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
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

// Lines are written by a thread of the log's own: a call that ends never
// waits on the file. A file that stops taking lines (a full disk, a stuck
// log collector behind standard error) holds up only that thread; lines
// that would queue past kMaxQueuedBytes are dropped and counted.
class AccessLog {
 public:
  static constexpr size_t kMaxQueuedBytes = 4 << 20;

  // "-": standard error; otherwise `path`, created if needed and appended to.
  // The error names the field and the file. `on_drop` (may be empty) is
  // called for each line dropped, on the caller's thread.
  static absl::StatusOr<std::unique_ptr<AccessLog>> Open(const std::string& path,
                                                         std::function<void()> on_drop = nullptr);
  // Waits up to 5 s for the queued lines to be written (then leaves them to
  // the writer thread, which the exiting process ends).
  ~AccessLog();
  AccessLog(const AccessLog&) = delete;
  AccessLog& operator=(const AccessLog&) = delete;

  // Queues one line (thread-safe; never blocks on the file). The writer
  // flushes after each batch of lines, so a crash loses only those queued.
  void Write(const AccessRecord& record);
  // Opens the path again (after logrotate moved the file away): lines
  // written from now on go to the new file. On failure keeps writing to the
  // old file and says why.
  absl::Status Reopen();
  // Lines dropped so far because the file was not taking them.
  int64_t dropped() const;

  // The JSON line of `record` at `unix_seconds`, without the newline.
  static std::string Format(const AccessRecord& record, double unix_seconds);

 private:
  struct State;  // shared with the writer thread, which may outlive this
  explicit AccessLog(std::shared_ptr<State> state) : state_(std::move(state)) {}

  std::shared_ptr<State> state_;
};

}  // namespace sae

#endif  // SAE_RPC_ACCESS_LOG_H_
