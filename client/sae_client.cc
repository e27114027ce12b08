#include "sae_client.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench.h"
#include "common/file.h"

namespace sae::client {

grpc::ChannelArguments ClientChannelArguments(const ConnectOptions& options) {
  grpc::ChannelArguments args;
  // Large k times many SAEs and big chunks can pass gRPC's 4 MiB default.
  args.SetMaxReceiveMessageSize(256 << 20);
  if (options.keepalive.count() > 0) {
    const auto ms = [](std::chrono::milliseconds d) {
      return static_cast<int>(std::min<int64_t>(d.count(), std::numeric_limits<int>::max()));
    };
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, ms(options.keepalive));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(options.keepalive_timeout));
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    // gRPC's client otherwise stops pinging after two pings with no data
    // sent in between: a quiet stream would be kept alive for two pings.
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  if (options.tls && !options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  return args;
}

std::shared_ptr<grpc::ChannelCredentials> ClientChannelCredentials(const ConnectOptions& options) {
  if (!options.tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = options.tls_ca_pem;
  ssl.pem_cert_chain = options.tls_cert_pem;
  ssl.pem_private_key = options.tls_key_pem;
  return grpc::SslCredentials(ssl);
}

std::unique_ptr<SaeClient> SaeClient::Connect(const std::string& address, const ConnectOptions& options) {
  return std::make_unique<SaeClient>(
      grpc::CreateCustomChannel(address, ClientChannelCredentials(options), ClientChannelArguments(options)));
}

SaeClient::SaeClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)),
      stub_(v1::SaeService::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)) {}

void SaeClient::SetDeadline(grpc::ClientContext* context) const {
  context->set_deadline(std::chrono::system_clock::now() + timeout_);
}

grpc::Status SaeClient::Extract(const v1::ExtractRequest& request, std::vector<v1::ExtractResponse>* responses) {
  return Extract(request, [responses](const v1::ExtractResponse& r) { responses->push_back(r); });
}

grpc::Status SaeClient::Extract(const v1::ExtractRequest& request,
                                const std::function<void(const v1::ExtractResponse&)>& on_response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  std::unique_ptr<grpc::ClientReader<v1::ExtractResponse>> reader = stub_->Extract(&context, request);
  v1::ExtractResponse response;
  while (reader->Read(&response)) on_response(response);
  return reader->Finish();
}

ExtractStream::ExtractStream(v1::SaeService::Stub* stub, std::chrono::system_clock::time_point deadline) {
  context_.set_deadline(deadline);
  stream_ = stub->ExtractStream(&context_);
}

ExtractStream::~ExtractStream() {
  if (finished_) return;
  // Finish must be called before the call is destroyed; cancelling first
  // makes it return at once.
  context_.TryCancel();
  v1::ExtractResponse drain;
  while (stream_->Read(&drain)) {
  }
  (void)stream_->Finish();
}

bool ExtractStream::Send(const v1::ExtractRequest& request) { return stream_->Write(request); }

bool ExtractStream::CloseSend() { return stream_->WritesDone(); }

bool ExtractStream::Read(v1::ExtractResponse* response) { return stream_->Read(response); }

grpc::Status ExtractStream::Finish() {
  finished_ = true;
  return stream_->Finish();
}

std::unique_ptr<ExtractStream> SaeClient::OpenExtractStream() {
  return OpenExtractStream(std::chrono::system_clock::now() + timeout_);
}

std::unique_ptr<ExtractStream> SaeClient::OpenExtractStream(std::chrono::system_clock::time_point deadline) {
  return std::make_unique<ExtractStream>(stub_.get(), deadline);
}

grpc::Status SaeClient::ExtractMany(const std::vector<v1::ExtractRequest>& requests, int max_in_flight,
                                    const std::function<void(const v1::ExtractResponse&)>& on_response) {
  max_in_flight = std::max(1, max_in_flight);
  std::unique_ptr<ExtractStream> stream = OpenExtractStream();
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0;     // guarded by mu: sent, last response not read yet
  bool stopped = false;  // guarded by mu: the stream ended; stop sending
  bool in_send = false;  // guarded by mu: the writer is in Send, where flow control may hold it

  // Every request gets exactly one response with done=true (its last chunk or
  // its error), so counting those counts finished requests.
  auto send_all = [&] {
    for (size_t i = 0; i < requests.size(); ++i) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopped || in_flight < max_in_flight; });
        if (stopped) return;
        ++in_flight;
        in_send = true;
      }
      v1::ExtractRequest named;
      const v1::ExtractRequest* request = &requests[i];
      if (request->request_id().empty()) {
        named = *request;
        named.set_request_id(absl::StrCat(i));
        request = &named;
      }
      const bool sent = stream->Send(*request);
      {
        std::lock_guard<std::mutex> lock(mu);
        in_send = false;
      }
      if (!sent) return;
    }
    stream->CloseSend();
  };
  std::thread writer(send_all);
  v1::ExtractResponse response;
  while (stream->Read(&response)) {
    if (response.done()) {
      std::lock_guard<std::mutex> lock(mu);
      --in_flight;
      cv.notify_one();
    }
    on_response(response);
  }
  bool cancel = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    stopped = true;  // a writer waiting for a slot, or about to, returns
    // Only a writer stuck in Send needs the cancel: otherwise it would turn
    // the stream's own status (DEADLINE_EXCEEDED, or OK while the writer
    // closes its side) into CANCELLED.
    cancel = in_send;
    cv.notify_one();
  }
  if (cancel) stream->Cancel();
  writer.join();
  const grpc::Status status = stream->Finish();
  // CANCELLED past the deadline is the deadline: our cancel of a writer in
  // Send when it passed, or the server's copy of the deadline firing before
  // ours (its RST_STREAM reads as CANCELLED here).
  if (status.error_code() == grpc::StatusCode::CANCELLED && std::chrono::system_clock::now() >= stream->deadline()) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded");
  }
  return status;
}

grpc::Status SaeClient::Tokenize(const v1::TokenizeRequest& request, v1::TokenizeResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub_->Tokenize(&context, request, response);
}

grpc::Status SaeClient::ListSaes(v1::ListSaesResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub_->ListSaes(&context, v1::ListSaesRequest(), response);
}

grpc::Status SaeClient::Info(v1::InfoResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub_->Info(&context, v1::InfoRequest(), response);
}

grpc::Status SaeClient::Health(const std::string& service, grpc::health::v1::HealthCheckResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  return health_stub_->Check(&context, request, response);
}

std::string StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return absl::StrCat("CODE_", static_cast<int>(code));
  }
}

std::string QuotePiece(const std::string& piece) {
  std::string out = "\"";
  for (unsigned char c : piece) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          out += absl::StrFormat("\\x%02x", c);
        } else {
          out += static_cast<char>(c);  // UTF-8 bytes pass through
        }
    }
  }
  return out + "\"";
}

namespace {

// Display width of UTF-8 text, counting code points (good enough for aligning
// pieces; wide CJK glyphs may overhang).
size_t DisplayWidth(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

std::string PadRight(const std::string& s, size_t width) {
  const size_t w = DisplayWidth(s);
  return w >= width ? s : s + std::string(width - w, ' ');
}

std::string FormatFeatures(const v1::SaeFeatures& features) {
  if (features.indices().empty()) return "-";
  std::vector<std::string> parts;
  for (int i = 0; i < features.indices_size(); ++i) {
    parts.push_back(absl::StrFormat("%u:%.3f", features.indices(i), features.values(i)));
  }
  return absl::StrJoin(parts, " ");
}

}  // namespace

std::string FormatExtractTable(const std::vector<v1::ExtractResponse>& responses) {
  std::vector<const v1::TokenFeatures*> tokens;
  for (const auto& r : responses) {
    for (const auto& t : r.tokens()) tokens.push_back(&t);
  }
  size_t pos_w = 3, id_w = 2, piece_w = 5, sae_w = 3;
  for (const v1::TokenFeatures* t : tokens) {
    pos_w = std::max(pos_w, absl::StrCat(t->position()).size());
    id_w = std::max(id_w, absl::StrCat(t->token_id()).size());
    piece_w = std::max(piece_w, DisplayWidth(QuotePiece(t->piece())));
    for (const auto& s : t->saes()) sae_w = std::max(sae_w, s.sae().size());
  }
  std::string out = absl::StrCat(PadRight("pos", pos_w), "  ", PadRight("id", id_w), "  ", PadRight("token", piece_w),
                                 "  ", PadRight("sae", sae_w), "  features (index:value)\n");
  const std::string indent(pos_w + 2 + id_w + 2 + piece_w + 2, ' ');
  for (const v1::TokenFeatures* t : tokens) {
    std::string head =
        absl::StrCat(PadRight(absl::StrCat(t->position()), pos_w), "  ", PadRight(absl::StrCat(t->token_id()), id_w),
                     "  ", PadRight(QuotePiece(t->piece()), piece_w), "  ");
    if (t->saes().empty()) absl::StrAppend(&out, head, "\n");
    for (int i = 0; i < t->saes_size(); ++i) {
      const v1::SaeFeatures& s = t->saes(i);
      absl::StrAppend(&out, i == 0 ? head : indent, PadRight(s.sae(), sae_w), "  ", FormatFeatures(s),
                      s.has_reconstruction_error()
                          ? absl::StrFormat("  (reconstruction error %.4f)", s.reconstruction_error())
                          : "",
                      "\n");
    }
  }
  if (!responses.empty()) absl::StrAppend(&out, responses.back().total_tokens(), " tokens\n");
  return out;
}

std::string FormatTokens(const v1::TokenizeResponse& response) {
  std::string out = "pos  id  token  chars\n";
  for (int i = 0; i < response.tokens_size(); ++i) {
    const v1::Token& t = response.tokens(i);
    absl::StrAppend(&out, i, "  ", t.id(), "  ", QuotePiece(t.piece()), "  [", t.char_start(), ", ", t.char_end(),
                    ")\n");
  }
  return out;
}

std::string FormatSaes(const v1::ListSaesResponse& response) {
  std::string out;
  for (const v1::SaeInfo& s : response.saes()) {
    absl::StrAppend(&out, s.name(), "  hook=", s.hook(), " layer=", s.layer(), " site=", s.site(),
                    " d_model=", s.d_model(), " d_sae=", s.d_sae(), " act_fn=", s.act_fn(),
                    " threshold=", s.threshold(), " in=", s.hook_point_in(), " path=", s.path(), "\n");
  }
  return out;
}

std::string FormatInfo(const v1::InfoResponse& r) {
  return absl::StrCat("model_path: ", r.model_path(), "\nbackend: ", r.backend(), "\nn_layers: ", r.n_layers(),
                      "\nn_layers_run: ", r.n_layers_run(), "\nd_model: ", r.d_model(),
                      "\nvocab_size: ", r.vocab_size(), "\nbos_token_id: ", r.bos_token_id(),
                      "\ndefault_k: ", r.default_k(), "\nmax_k: ", r.max_k(),
                      "\nmax_tokens_per_request: ", r.max_tokens_per_request(), "\nversion: ", r.version(), "\n");
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(message, &json, options);
  return json;
}

namespace {

constexpr char kUsage[] =
    "usage: sae-client [--addr HOST:PORT] [--timeout SECONDS] [--keepalive SECONDS [--keepalive-timeout SECONDS]]\n"
    "                  [--tls] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]\n"
    "                  COMMAND ...\n"
    "  extract TEXT [--sae NAME ...] [--k K] [--watch SAE:F1,F2,... ...] [--chunk-tokens N] [--no-bos]\n"
    "          [--include-bos] [--min-activation X] [--reconstruction-error] [--json]\n"
    "  extract --ids 1,2,3 [...]      token ids instead of text\n"
    "      --watch SAE:1,2,3          for that SAE report only these features (the k largest that fire);\n"
    "                                 repeatable, one per SAE\n"
    "      --min-activation X         drop features whose value is below X\n"
    "      --reconstruction-error     also show each SAE's per-token reconstruction error (FVU)\n"
    "  tokenize TEXT [--no-bos] [--json]\n"
    "  info [--json]\n"
    "  list-saes [--json]\n"
    "  health [--service NAME]        exit 0 only when SERVING\n"
    "  bench [--mode stream|unary] [--concurrency N] [--in-flight M] [--duration SECONDS] [--requests N]\n"
    "        [--input FILE.jsonl] [--sae NAME ...] [--k K] [--watch SAE:F,...] [--chunk-tokens N] [--json]\n"
    "                                 load generator; stops at the first bound reached (default --duration 10);\n"
    "                                 exit 1 when any request failed\n"
    "default --addr: localhost:50051; --keepalive: off (pings a quiet connection after SECONDS, closes it\n"
    "  when a ping goes unanswered for --keepalive-timeout, default 20; sae-server accepts 10 or more)\n"
    "--tls: connect with TLS, trusting the system's CAs or the PEM --tls-ca (which implies --tls); --tls-cert\n"
    "  and --tls-key: a client certificate (mutual TLS); --tls-server-name: the name the server's certificate\n"
    "  must carry, when not the host of --addr\n";

struct Args {
  std::string addr = "localhost:50051";
  double timeout_s = 60;
  double keepalive_s = 0;
  double keepalive_timeout_s = 20;
  bool has_keepalive_timeout = false;
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key, tls_server_name;
  std::vector<std::string> positional;
  std::vector<std::string> saes;
  std::vector<v1::FeatureWatch> watch;
  std::string ids;
  bool has_ids = false;
  uint32_t k = 0;
  uint32_t chunk_tokens = 0;
  bool no_bos = false;
  bool include_bos = false;
  double min_activation = 0;
  bool reconstruction_error = false;
  bool json = false;
  std::string service;
  // bench
  std::string mode = "stream";
  int concurrency = 4;
  int in_flight = 1;
  double duration_s = 0;
  int64_t requests = 0;
  std::string input;
};

// "SAE:1,2,3" -> FeatureWatch; empty on success, else the problem.
std::string ParseWatch(const std::string& spec, v1::FeatureWatch* watch) {
  const size_t colon = spec.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == spec.size()) {
    return "--watch needs SAE:FEATURE,FEATURE,... (e.g. L1R-8x:17,42), got \"" + spec + "\"";
  }
  watch->set_sae(spec.substr(0, colon));
  for (absl::string_view part : absl::StrSplit(absl::string_view(spec).substr(colon + 1), ',')) {
    uint32_t feature = 0;
    if (!absl::SimpleAtoi(part, &feature)) {
      return absl::StrCat("--watch ", spec, ": \"", part, "\" is not a feature index");
    }
    watch->add_features(feature);
  }
  return "";
}

// Empty on success, else the usage problem.
// A duration flag's value: positive and finite (nan and inf parse as
// numbers), and small enough for a clock's duration.
bool IsSeconds(double s) { return s > 0 && s <= 1e7; }
// Seconds that gRPC's int milliseconds hold, at least one.
bool IsGrpcMilliseconds(double s) { return s >= 0.001 && s <= 2147483; }

std::string ParseArgs(const std::vector<std::string>& argv, Args* a) {
  for (size_t i = 0; i < argv.size(); ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      a->positional.insert(a->positional.end(), argv.begin() + i + 1, argv.end());
      break;
    }
    if (arg.size() < 2 || arg.compare(0, 2, "--") != 0) {
      a->positional.push_back(arg);
      continue;
    }
    std::string value;
    bool has_value = false;
    if (size_t eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    std::replace(arg.begin(), arg.end(), '_', '-');
    auto take = [&](std::string* out) -> bool {
      if (has_value) {
        *out = value;
        return true;
      }
      if (i + 1 >= argv.size()) return false;
      *out = argv[++i];
      return true;
    };
    std::string v;
    if (arg == "--tls") {
      if (has_value) return "--tls takes no value";
      a->tls = true;
    } else if (arg == "--tls-ca" || arg == "--tls-cert" || arg == "--tls-key" || arg == "--tls-server-name") {
      std::string* out = arg == "--tls-ca"     ? &a->tls_ca
                         : arg == "--tls-cert" ? &a->tls_cert
                         : arg == "--tls-key"  ? &a->tls_key
                                               : &a->tls_server_name;
      if (!take(out) || out->empty()) return arg + (arg == "--tls-server-name" ? " needs a name" : " needs a PEM file");
      a->tls = true;
    } else if (arg == "--json" || arg == "--no-bos" || arg == "--include-bos" || arg == "--reconstruction-error") {
      if (has_value) return arg + " takes no value";
      (arg == "--json"          ? a->json
       : arg == "--no-bos"      ? a->no_bos
       : arg == "--include-bos" ? a->include_bos
                                : a->reconstruction_error) = true;
    } else if (arg == "--min-activation") {
      // Sent as a float: 1e300 would arrive as inf.
      if (!take(&v) || !absl::SimpleAtod(v, &a->min_activation) || !(a->min_activation >= 0) ||
          !(a->min_activation <= std::numeric_limits<float>::max())) {
        return "--min-activation needs a non-negative number in float range";
      }
    } else if (arg == "--addr") {
      if (!take(&a->addr)) return "--addr needs HOST:PORT";
    } else if (arg == "--sae") {
      if (!take(&v)) return "--sae needs a name";
      a->saes.push_back(v);
    } else if (arg == "--watch") {
      if (!take(&v)) return "--watch needs SAE:FEATURE,FEATURE,...";
      if (std::string problem = ParseWatch(v, &a->watch.emplace_back()); !problem.empty()) return problem;
    } else if (arg == "--ids") {
      if (!take(&a->ids)) return "--ids needs a comma-separated list";
      a->has_ids = true;
    } else if (arg == "--service") {
      if (!take(&a->service)) return "--service needs a name";
    } else if (arg == "--k") {
      if (!take(&v) || !absl::SimpleAtoi(v, &a->k)) return "--k needs a non-negative integer";
    } else if (arg == "--chunk-tokens") {
      if (!take(&v) || !absl::SimpleAtoi(v, &a->chunk_tokens)) return "--chunk-tokens needs a non-negative integer";
    } else if (arg == "--mode") {
      if (!take(&a->mode) || (a->mode != "stream" && a->mode != "unary")) return "--mode needs stream or unary";
    } else if (arg == "--concurrency") {
      if (!take(&v) || !absl::SimpleAtoi(v, &a->concurrency) || a->concurrency < 1) {
        return "--concurrency needs a positive integer";
      }
    } else if (arg == "--in-flight") {
      if (!take(&v) || !absl::SimpleAtoi(v, &a->in_flight) || a->in_flight < 1) {
        return "--in-flight needs a positive integer";
      }
    } else if (arg == "--duration") {
      if (!take(&v) || !absl::SimpleAtod(v, &a->duration_s) || !IsSeconds(a->duration_s)) {
        return "--duration needs a positive number of seconds (at most 1e7)";
      }
    } else if (arg == "--requests") {
      if (!take(&v) || !absl::SimpleAtoi(v, &a->requests) || a->requests < 1) {
        return "--requests needs a positive integer";
      }
    } else if (arg == "--input") {
      if (!take(&a->input)) return "--input needs a JSONL file";
    } else if (arg == "--timeout") {
      if (!take(&v) || !absl::SimpleAtod(v, &a->timeout_s) || !IsSeconds(a->timeout_s)) {
        return "--timeout needs a positive number of seconds (at most 1e7)";
      }
    } else if (arg == "--keepalive") {
      if (!take(&v) || !absl::SimpleAtod(v, &a->keepalive_s) ||
          !(a->keepalive_s == 0 || IsGrpcMilliseconds(a->keepalive_s))) {
        return "--keepalive needs 0 (off) or a number of seconds from 0.001 to 2147483";
      }
    } else if (arg == "--keepalive-timeout") {
      if (!take(&v) || !absl::SimpleAtod(v, &a->keepalive_timeout_s) || !IsGrpcMilliseconds(a->keepalive_timeout_s)) {
        return "--keepalive-timeout needs a number of seconds from 0.001 to 2147483";
      }
      a->has_keepalive_timeout = true;
    } else {
      return "unknown option " + arg;
    }
  }
  return "";
}

// A PEM file's text; the error starts with the path.
absl::StatusOr<std::string> ReadPemFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (text.ok() && text->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(path + ": not a PEM file (no \"-----BEGIN\" line)");
  }
  return text;
}

// The per-request options of the command line, shared by extract and bench.
void ApplyRequestOptions(const Args& a, v1::ExtractRequest* request) {
  for (const std::string& s : a.saes) request->add_saes(s);
  for (const v1::FeatureWatch& w : a.watch) *request->add_watch() = w;
  request->set_k(a.k);
  request->set_chunk_tokens(a.chunk_tokens);
  request->set_include_bos(a.include_bos);
  request->set_min_activation(static_cast<float>(a.min_activation));
  request->set_reconstruction_error(a.reconstruction_error);
  if (a.no_bos && request->has_text()) request->set_add_bos(false);
}

int Fail(const grpc::Status& status, std::ostream& err) {
  err << "error: " << StatusCodeName(status.error_code()) << ": " << status.error_message() << "\n";
  return 1;
}

int RunBenchCommand(const Args& a, SaeClient* client, std::ostream& out, std::ostream& err) {
  std::vector<v1::ExtractRequest> mix;
  if (a.input.empty()) {
    mix = DefaultBenchMix();
  } else {
    std::ifstream in;
    if (absl::Status opened = OpenInputFile(a.input, &in); !opened.ok()) {
      err << "sae-client: " << opened.message() << "\n";
      return 2;
    }
    absl::StatusOr<std::vector<v1::ExtractRequest>> parsed = ParseRequestsJsonl(in, a.input);
    if (!parsed.ok()) {
      err << "sae-client: " << parsed.status().message() << "\n";
      return 2;
    }
    if (parsed->empty()) {
      err << "sae-client: " << a.input << ": no requests\n";
      return 2;
    }
    mix = std::move(*parsed);
  }
  for (v1::ExtractRequest& request : mix) ApplyRequestOptions(a, &request);
  BenchOptions options;
  options.stream = a.mode == "stream";
  options.concurrency = a.concurrency;
  options.in_flight = a.in_flight;
  options.duration_s = a.duration_s;
  options.max_requests = a.requests;
  options.timeout_s = a.timeout_s;
  const BenchReport report = RunBench(client, options, mix);
  out << (a.json ? BenchReportJson(report) + "\n" : FormatBenchReport(report));
  if (report.ok == 0 && report.failed == 0) {
    err << "sae-client: bench sent no request\n";
    return 1;
  }
  return report.failed > 0 ? 1 : 0;
}

}  // namespace

int RunClient(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  Args a;
  if (std::string problem = ParseArgs(argv, &a); !problem.empty()) {
    err << "sae-client: " << problem << "\n" << kUsage;
    return 2;
  }
  if (a.has_keepalive_timeout && a.keepalive_s == 0) {
    err << "sae-client: --keepalive-timeout needs --keepalive\n" << kUsage;
    return 2;
  }
  if (a.positional.empty()) {
    err << kUsage;
    return 2;
  }
  const std::string command = a.positional[0];
  const std::vector<std::string> rest(a.positional.begin() + 1, a.positional.end());
  if (a.tls_cert.empty() != a.tls_key.empty()) {
    err << "sae-client: --tls-cert and --tls-key go together (a client certificate and its private key)\n" << kUsage;
    return 2;
  }
  ConnectOptions connect;
  connect.tls = a.tls;
  connect.tls_server_name = a.tls_server_name;
  for (const auto& [flag, path, pem] :
       {std::tuple<const char*, const std::string&, std::string*>{"--tls-ca", a.tls_ca, &connect.tls_ca_pem},
        {"--tls-cert", a.tls_cert, &connect.tls_cert_pem},
        {"--tls-key", a.tls_key, &connect.tls_key_pem}}) {
    if (path.empty()) continue;
    absl::StatusOr<std::string> text = ReadPemFile(path);
    if (!text.ok()) {
      err << "sae-client: " << flag << ": " << text.status().message() << "\n";
      return 2;
    }
    *pem = std::move(*text);
  }
  const auto to_ms = [](double s) { return std::chrono::milliseconds(static_cast<int64_t>(std::llround(s * 1000))); };
  connect.keepalive = to_ms(a.keepalive_s);
  connect.keepalive_timeout = to_ms(a.keepalive_timeout_s);
  std::unique_ptr<SaeClient> client = SaeClient::Connect(a.addr, connect);
  client->set_timeout(std::chrono::milliseconds(static_cast<int64_t>(a.timeout_s * 1000)));

  if (command == "extract") {
    v1::ExtractRequest request;
    if (a.has_ids == (rest.size() == 1) || rest.size() > 1) {
      err << "sae-client: extract takes one TEXT argument or --ids\n" << kUsage;
      return 2;
    }
    if (a.has_ids) {
      v1::TokenIds* ids = request.mutable_token_ids();
      for (absl::string_view part : absl::StrSplit(a.ids, ',', absl::SkipWhitespace())) {
        uint32_t id = 0;
        if (!absl::SimpleAtoi(part, &id)) {
          err << "sae-client: --ids: \"" << part << "\" is not a token id\n";
          return 2;
        }
        ids->add_ids(id);
      }
    } else {
      request.set_text(rest[0]);
    }
    ApplyRequestOptions(a, &request);
    std::vector<v1::ExtractResponse> responses;
    grpc::Status status = client->Extract(request, &responses);
    if (!status.ok()) return Fail(status, err);
    if (a.json) {
      for (const auto& r : responses) out << ToJson(r) << "\n";
    } else {
      out << FormatExtractTable(responses);
    }
    return 0;
  }
  if (command == "tokenize") {
    if (rest.size() != 1) {
      err << "sae-client: tokenize takes one TEXT argument\n" << kUsage;
      return 2;
    }
    v1::TokenizeRequest request;
    request.set_text(rest[0]);
    if (a.no_bos) request.set_add_bos(false);
    v1::TokenizeResponse response;
    grpc::Status status = client->Tokenize(request, &response);
    if (!status.ok()) return Fail(status, err);
    out << (a.json ? ToJson(response) + "\n" : FormatTokens(response));
    return 0;
  }
  if (!rest.empty()) {
    err << "sae-client: " << command << " takes no argument\n" << kUsage;
    return 2;
  }
  if (command == "info") {
    v1::InfoResponse response;
    grpc::Status status = client->Info(&response);
    if (!status.ok()) return Fail(status, err);
    out << (a.json ? ToJson(response) + "\n" : FormatInfo(response));
    return 0;
  }
  if (command == "list-saes") {
    v1::ListSaesResponse response;
    grpc::Status status = client->ListSaes(&response);
    if (!status.ok()) return Fail(status, err);
    out << (a.json ? ToJson(response) + "\n" : FormatSaes(response));
    return 0;
  }
  if (command == "health") {
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status = client->Health(a.service, &response);
    if (!status.ok()) return Fail(status, err);
    out << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()) << "\n";
    return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  }
  if (command == "bench") return RunBenchCommand(a, client.get(), out, err);
  err << "sae-client: unknown command \"" << command << "\"\n" << kUsage;
  return 2;
}

}  // namespace sae::client
