// TLS on the gRPC port: the server credentials for ServerConfig's tls_*
// fields, after checking the PEM files with gRPC's own TLS stack, and the
// thread that re-reads them so a renewed certificate is served without a
// restart, once it has passed the same check.
#ifndef SAE_RPC_TLS_H_
#define SAE_RPC_TLS_H_

#include <grpcpp/security/server_credentials.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "sae/v1/config.pb.h"

namespace sae {

// The credentials of the gRPC port, and what keeps them current.
//
// gRPC's FileWatcherCertificateProvider (in the gRPC of Debian 12) loads
// whatever the key and certificate files hold when it re-reads them: a key
// that is not the certificate's, or a pair caught half-renewed (the key
// rewritten, the certificate not yet), and every handshake fails until the
// files are right again. So the watcher never sees the operator's files.
// ServerTls re-reads them every tls_reload_seconds; a change that gRPC's TLS
// stack accepts (the startup check) is handed to the watcher as a whole, and
// one it refuses leaves the last accepted files in service and is reported.
//
// The watcher reads in-memory files (memfd) through /proc/self/fd: the key
// and its certificate chain in one file whose descriptor is swapped in one
// dup3, so the pair cannot be read half old, half new (the watcher's own
// before/after modification-time check catches a swap during its read: every
// swap carries a later time). The private key is not copied to any disk.
class ServerTls {
 public:
  // A change the re-read found.
  struct Reload {
    bool served = false;    // new connections get the new files
    std::string problem;    // else why they were refused
    int64_t not_after = 0;  // served: when the new certificate expires (see certificate_not_after)
  };
  using ReloadObserver = std::function<void(const Reload&)>;

  // Plaintext credentials when no tls_* file is set. Otherwise reads the
  // files, checks that each holds what its field says (a certificate chain,
  // its private key, CA certificates) and that gRPC accepts them together,
  // and starts the re-read. INVALID_ARGUMENT (NOT_FOUND for a missing file)
  // names the field and the file. `config` has had its defaults applied and
  // been validated. `observer` may be empty.
  static absl::StatusOr<std::unique_ptr<ServerTls>> Start(const v1::ServerConfig& config, ReloadObserver observer);

  // Stops the re-read. The servers built with credentials() must have been
  // shut down: their watcher reads the files this object holds.
  ~ServerTls();
  ServerTls(const ServerTls&) = delete;
  ServerTls& operator=(const ServerTls&) = delete;

  std::shared_ptr<grpc::ServerCredentials> credentials() const { return credentials_; }

  // When the certificate new connections get expires (notAfter of the first
  // certificate of tls_cert_file), in seconds since the epoch; 0 without TLS.
  int64_t certificate_not_after() const { return not_after_.load(); }

  // Re-reads the files now (the thread does it every tls_reload_seconds;
  // sae-server on SIGHUP too). Returns OK when they are unchanged or were
  // handed to the watcher, else why they were refused. Thread-safe.
  absl::Status Reread();

 private:
  struct Files;
  explicit ServerTls(const v1::ServerConfig& config, ReloadObserver observer);
  // Hands checked files to the watcher: new memfds, swapped in.
  absl::Status Publish(const Files& files);

  const v1::ServerConfig config_;
  const ReloadObserver observer_;
  std::shared_ptr<grpc::ServerCredentials> credentials_;
  int identity_fd_ = -1;    // private key blocks, then the certificate blocks
  int ca_fd_ = -1;          // the client CA file, with mutual TLS
  int64_t last_mtime_ = 0;  // of the files last published, in seconds
  std::atomic<int64_t> not_after_{0};
  std::mutex reread_mu_;   // one Reread at a time
  std::string last_read_;  // what the last re-read found (contents, or its error)
  absl::Notification stop_;
  std::thread thread_;
};

// "plaintext", "TLS, files re-read every N s" or "mutual TLS: client
// certificates required, ...", for the startup log.
std::string DescribeTransportSecurity(const v1::ServerConfig& config);

}  // namespace sae

#endif  // SAE_RPC_TLS_H_
