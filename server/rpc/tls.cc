#include "rpc/tls.h"

#include <fcntl.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_builder.h>
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/file.h"

namespace sae {
namespace {

// How often gRPC's watcher reads the in-memory files: a local read of a few
// KiB, so a checked change reaches new connections within about a second.
constexpr unsigned kWatcherSeconds = 1;

// Calls `visit(label, block)` for each PEM block of `pem` ("-----BEGIN
// label-----" ... "-----END label-----", both lines included).
template <typename Visit>
void ForEachPemBlock(absl::string_view pem, Visit visit) {
  constexpr absl::string_view kBegin = "-----BEGIN ";
  for (size_t at = pem.find(kBegin); at != absl::string_view::npos; at = pem.find(kBegin, at + 1)) {
    const size_t label_end = pem.find("-----", at + kBegin.size());
    if (label_end == absl::string_view::npos) return;
    const absl::string_view label = pem.substr(at + kBegin.size(), label_end - at - kBegin.size());
    const std::string end_line = absl::StrCat("-----END ", label, "-----");
    const size_t end = pem.find(end_line, label_end);
    if (end == absl::string_view::npos) return;
    visit(label, pem.substr(at, end + end_line.size() - at));
  }
}

// The blocks of `pem` whose label ends in `kind` ("CERTIFICATE", "PRIVATE
// KEY": "EC PRIVATE KEY" is one), each ending in a newline.
std::string PemBlocks(absl::string_view pem, absl::string_view kind) {
  std::string blocks;
  ForEachPemBlock(pem, [&](absl::string_view label, absl::string_view block) {
    if (absl::EndsWith(label, kind)) absl::StrAppend(&blocks, block, "\n");
  });
  return blocks;
}

// The file of `field`, with a check that it holds a complete PEM block whose
// label ends in `kind`.
absl::StatusOr<std::string> ReadPem(const std::string& field, const std::string& path, absl::string_view kind,
                                    absl::string_view what) {
  absl::StatusOr<std::string> pem = ReadFileToString(path);
  if (!pem.ok())
    return absl::Status(pem.status().code(), absl::StrCat("config: ", field, ": ", pem.status().message()));
  if (PemBlocks(*pem, kind).empty()) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", field, " \"", path, "\" holds no PEM ", what,
                                                   " (a \"-----BEGIN ...", kind, "-----\" block)"));
  }
  return pem;
}

// Whether gRPC can build a TLS server from these PEMs: its handshaker
// factory loads and cross-checks them when a port is added, which a server
// on an ephemeral loopback port, started and stopped at once, goes through.
bool GrpcAcceptsPems(const std::string& key, const std::string& cert, const std::string& client_ca) {
  grpc::SslServerCredentialsOptions options(client_ca.empty()
                                                ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                                : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_key_cert_pairs.push_back({key, cert});
  options.pem_root_certs = client_ca;
  grpc::CallbackGenericService no_methods;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(options), &port);
  builder.RegisterCallbackGenericService(&no_methods);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) return false;
  server->Shutdown();
  return true;
}

// An in-memory file holding `contents`, modified at `mtime` (seconds).
absl::StatusOr<int> MemoryFile(const char* name, const std::string& contents, int64_t mtime) {
  const int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat("TLS: memfd_create: ", std::strerror(errno)));
  for (size_t done = 0; done < contents.size();) {
    const ssize_t n = write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int error = errno;
      close(fd);
      return absl::InternalError(absl::StrCat("TLS: writing an in-memory file: ", std::strerror(error)));
    }
    done += static_cast<size_t>(n);
  }
  const struct timespec times[2] = {{static_cast<time_t>(mtime), 0}, {static_cast<time_t>(mtime), 0}};
  if (futimens(fd, times) != 0) {
    const int error = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("TLS: futimens: ", std::strerror(error)));
  }
  return fd;
}

std::string FdPath(int fd) { return absl::StrCat("/proc/self/fd/", fd); }

// notAfter of the first certificate of `pem`, in seconds since the epoch; 0
// when OpenSSL cannot read it (gRPC's check has read it by then).
int64_t FirstCertificateNotAfter(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  if (bio == nullptr) return 0;
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  int64_t seconds = 0;
  struct tm when {};
  if (cert != nullptr && ASN1_TIME_to_tm(X509_get0_notAfter(cert), &when) == 1) seconds = timegm(&when);
  X509_free(cert);
  ERR_clear_error();  // this thread's OpenSSL errors, if any, are told by the 0
  return seconds;
}

}  // namespace

// What the tls_* files hold, each checked for its kind of PEM block.
struct ServerTls::Files {
  std::string key, cert, client_ca;
  // The one file gRPC's watcher reads as both the private key and the
  // certificate chain: OpenSSL's PEM readers skip blocks of other kinds, so
  // each finds its own. Only those blocks are kept, so that neither reader
  // can find one in the other's file (a key file that also holds a
  // certificate, say).
  std::string identity;

  static absl::StatusOr<Files> Read(const v1::ServerConfig& config) {
    Files files;
    absl::StatusOr<std::string> cert = ReadPem("tls_cert_file", config.tls_cert_file(), "CERTIFICATE", "certificate");
    if (!cert.ok()) return cert.status();
    files.cert = std::move(*cert);
    absl::StatusOr<std::string> key = ReadPem("tls_key_file", config.tls_key_file(), "PRIVATE KEY", "private key");
    if (!key.ok()) return key.status();
    files.key = std::move(*key);
    if (!config.tls_client_ca_file().empty()) {
      absl::StatusOr<std::string> ca =
          ReadPem("tls_client_ca_file", config.tls_client_ca_file(), "CERTIFICATE", "CA certificate");
      if (!ca.ok()) return ca.status();
      files.client_ca = std::move(*ca);
    }
    files.identity = PemBlocks(files.key, "PRIVATE KEY") + PemBlocks(files.cert, "CERTIFICATE");
    return files;
  }

  // OK when gRPC's TLS stack accepts the files together, as the watcher
  // will hand them to it; else names the field and the file at fault. One
  // trial server when all is well; a second only to tell which file gRPC
  // refused.
  absl::Status Check(const v1::ServerConfig& config) const {
    if (GrpcAcceptsPems(identity, identity, client_ca)) return absl::OkStatus();
    if (client_ca.empty() || !GrpcAcceptsPems(identity, identity, "")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config: tls_key_file \"", config.tls_key_file(), "\" is not the private key of tls_cert_file \"",
          config.tls_cert_file(), "\", or one of them is malformed (gRPC's log lines above say which)"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("config: tls_client_ca_file \"", config.tls_client_ca_file(),
                     "\" holds no usable CA certificate (gRPC's log lines above say why)"));
  }

  // What a re-read compares with the last one.
  std::string Contents() const { return absl::StrCat(key.size(), ":", key, cert.size(), ":", cert, client_ca); }
};

ServerTls::ServerTls(const v1::ServerConfig& config, ReloadObserver observer)
    : config_(config), observer_(std::move(observer)) {}

ServerTls::~ServerTls() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
  // The last reference to gRPC's watcher (the servers are gone): it stops
  // reading before its files close.
  credentials_.reset();
  if (identity_fd_ >= 0) close(identity_fd_);
  if (ca_fd_ >= 0) close(ca_fd_);
}

absl::StatusOr<std::unique_ptr<ServerTls>> ServerTls::Start(const v1::ServerConfig& config, ReloadObserver observer) {
  std::unique_ptr<ServerTls> tls(new ServerTls(config, std::move(observer)));
  if (config.tls_cert_file().empty()) {
    tls->credentials_ = grpc::InsecureServerCredentials();
    return tls;
  }
  absl::StatusOr<Files> files = Files::Read(config);
  if (!files.ok()) return files.status();
  if (absl::Status checked = files->Check(config); !checked.ok()) return checked;
  if (absl::Status published = tls->Publish(*files); !published.ok()) return published;
  tls->last_read_ = files->Contents();

  const std::string identity_path = FdPath(tls->identity_fd_);
  // gRPC's watcher reads the in-memory files by these paths.
  absl::StatusOr<std::string> readable = ReadFileToString(identity_path);
  if (!readable.ok() || *readable != files->identity) {
    return absl::FailedPreconditionError(
        absl::StrCat("TLS: the server's in-memory copy of the key and certificate cannot be read back at ",
                     identity_path, " (is /proc mounted?)"));
  }
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      identity_path, identity_path, tls->ca_fd_ >= 0 ? FdPath(tls->ca_fd_) : "", kWatcherSeconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (tls->ca_fd_ < 0) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  tls->credentials_ = grpc::experimental::TlsServerCredentials(options);

  ServerTls* self = tls.get();
  tls->thread_ = std::thread([self] {
    while (!self->stop_.WaitForNotificationWithTimeout(absl::Seconds(self->config_.tls_reload_seconds()))) {
      self->Reread().IgnoreError();  // told to the observer
    }
  });
  return tls;
}

absl::Status ServerTls::Reread() {
  if (config_.tls_cert_file().empty()) return absl::OkStatus();
  std::lock_guard<std::mutex> lock(reread_mu_);
  absl::StatusOr<Files> files = Files::Read(config_);
  // An unreadable file is told once, as a change is, until it reads again.
  std::string read = files.ok() ? files->Contents() : absl::StrCat("error: ", files.status().message());
  if (read == last_read_) return absl::OkStatus();
  last_read_ = std::move(read);
  absl::Status status = files.ok() ? files->Check(config_) : files.status();
  if (status.ok()) status = Publish(*files);
  if (observer_) observer_(Reload{status.ok(), std::string(status.message()), status.ok() ? not_after_.load() : 0});
  return status;
}

absl::Status ServerTls::Publish(const Files& files) {
  // Each generation is modified later than the one before, so the watcher's
  // before/after check sees a swap made while it reads.
  const int64_t mtime = std::max<int64_t>(std::time(nullptr), last_mtime_ + 1);
  // Swapped into a descriptor the watcher already reads: dup3 replaces it
  // in one step.
  auto install = [&](const char* name, const std::string& contents, int* fd) -> absl::Status {
    absl::StatusOr<int> made = MemoryFile(name, contents, mtime);
    if (!made.ok()) return made.status();
    if (*fd < 0) {
      *fd = *made;
      return absl::OkStatus();
    }
    const bool swapped = dup3(*made, *fd, O_CLOEXEC) >= 0;
    const int error = errno;
    close(*made);
    if (!swapped) return absl::InternalError(absl::StrCat("TLS: dup3: ", std::strerror(error)));
    return absl::OkStatus();
  };
  if (absl::Status status = install("sae-tls-identity", files.identity, &identity_fd_); !status.ok()) return status;
  if (!files.client_ca.empty()) {
    if (absl::Status status = install("sae-tls-client-ca", files.client_ca, &ca_fd_); !status.ok()) return status;
  }
  last_mtime_ = mtime;
  not_after_ = FirstCertificateNotAfter(PemBlocks(files.cert, "CERTIFICATE"));
  return absl::OkStatus();
}

std::string DescribeTransportSecurity(const v1::ServerConfig& config) {
  if (config.tls_cert_file().empty()) return "plaintext";
  const std::string reload =
      absl::StrCat("files re-read every ", config.tls_reload_seconds(), " s, served once gRPC accepts them");
  if (config.tls_client_ca_file().empty()) return absl::StrCat("TLS, ", reload);
  return absl::StrCat("mutual TLS: client certificates required, ", reload);
}

}  // namespace sae
