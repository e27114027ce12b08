#include "bench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace sae::client {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// When neither --duration nor --requests is given, so a run always ends.
constexpr double kDefaultDurationS = 10;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// What the workers share: the bounds and the results.
class Load {
 public:
  Load(const BenchOptions& options, const std::vector<v1::ExtractRequest>& mix)
      : options_(options), mix_(mix), end_(Clock::now() + Seconds(options.duration_s)) {}

  // The next request to send, or nullopt once a bound is reached.
  std::optional<v1::ExtractRequest> Next(int worker) {
    if (options_.duration_s > 0 && Clock::now() >= end_) return std::nullopt;
    const int64_t i = next_.fetch_add(1);
    if (options_.max_requests > 0 && i >= options_.max_requests) return std::nullopt;
    v1::ExtractRequest request = mix_[static_cast<size_t>(i) % mix_.size()];
    request.set_request_id(absl::StrCat("w", worker, "-", i));
    return request;
  }

  void Ok(Clock::duration latency, Clock::duration first_chunk, int64_t tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    ++report_.ok;
    report_.tokens += tokens;
    latency_ms_.push_back(Ms(latency));
    first_chunk_ms_.push_back(Ms(first_chunk));
  }

  void Failed(grpc::StatusCode code, const std::string& message) {
    const std::string name = StatusCodeName(code);
    std::lock_guard<std::mutex> lock(mu_);
    ++report_.failed;
    ++report_.errors[name];
    if (report_.first_error.empty()) report_.first_error = absl::StrCat(name, ": ", message);
  }

  BenchReport Finish(double wall_s) {
    std::lock_guard<std::mutex> lock(mu_);
    report_.options = options_;
    report_.wall_s = wall_s;
    report_.latency_ms = Summarize(std::move(latency_ms_));
    report_.first_chunk_ms = Summarize(std::move(first_chunk_ms_));
    return report_;
  }

 private:
  const BenchOptions options_;
  const std::vector<v1::ExtractRequest>& mix_;
  const Clock::time_point end_;
  std::atomic<int64_t> next_{0};
  std::mutex mu_;
  BenchReport report_;                  // guarded by mu_
  std::vector<double> latency_ms_;      // guarded by mu_
  std::vector<double> first_chunk_ms_;  // guarded by mu_
};

// One Extract call at a time.
void UnaryWorker(SaeClient* client, const BenchOptions& options, int worker, Load* load) {
  while (std::optional<v1::ExtractRequest> request = load->Next(worker)) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::duration_cast<std::chrono::system_clock::duration>(Seconds(options.timeout_s)));
    const Clock::time_point sent = Clock::now();
    std::optional<Clock::time_point> first;
    int64_t tokens = 0;
    std::unique_ptr<grpc::ClientReader<v1::ExtractResponse>> reader = client->stub()->Extract(&context, *request);
    v1::ExtractResponse response;
    while (reader->Read(&response)) {
      if (!first) first = Clock::now();
      tokens = response.total_tokens();
    }
    const grpc::Status status = reader->Finish();
    const Clock::time_point done = Clock::now();
    if (status.ok()) {
      load->Ok(done - sent, first.value_or(done) - sent, tokens);
    } else {
      load->Failed(status.error_code(), status.error_message());
    }
  }
}

// Waits for the channel to be READY: UNAVAILABLE when connecting fails,
// DEADLINE_EXCEEDED when it has not connected by `deadline` (a server that
// accepts TCP and never answers would otherwise hold the stream's start for
// gRPC's own connect timeout, about 20 s).
grpc::Status WaitConnected(grpc::Channel* channel, std::chrono::system_clock::time_point deadline, double timeout_s) {
  for (grpc_connectivity_state state = channel->GetState(/*try_to_connect=*/true); state != GRPC_CHANNEL_READY;
       state = channel->GetState(/*try_to_connect=*/true)) {
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE || state == GRPC_CHANNEL_SHUTDOWN) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "cannot connect to the server");
    }
    if (!channel->WaitForStateChange(state, deadline)) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          absl::StrFormat("not connected to the server within %.1f s", timeout_s));
    }
  }
  return grpc::Status::OK;
}

// One ExtractStream with up to options.in_flight requests outstanding: this
// thread sends, a second one reads and matches responses by request_id.
// A stream that cannot start counts as one failed request.
void StreamWorker(SaeClient* client, const BenchOptions& options, int worker, Load* load) {
  struct Pending {
    Clock::time_point sent;
    std::optional<Clock::time_point> first;
  };
  const Clock::duration timeout = Seconds(options.timeout_s);
  const grpc::Status connected = WaitConnected(
      client->channel().get(),
      std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(timeout),
      options.timeout_s);
  if (!connected.ok()) {
    load->Failed(connected.error_code(), connected.error_message());
    return;
  }
  // The stream lives as long as the load; stalls are caught by the idle
  // check below instead of a deadline.
  std::unique_ptr<ExtractStream> stream = client->OpenExtractStream(std::chrono::system_clock::time_point::max());
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, Pending> pending;  // guarded by mu
  bool reader_done = false;                // guarded by mu
  Clock::time_point last_progress;         // guarded by mu: last response, or first send after idle

  std::thread reader([&] {
    v1::ExtractResponse response;
    while (stream->Read(&response)) {
      const Clock::time_point now = Clock::now();
      std::lock_guard<std::mutex> lock(mu);
      last_progress = now;
      auto it = pending.find(response.request_id());
      if (it == pending.end()) {
        load->Failed(grpc::StatusCode::INTERNAL, "response for unknown request_id \"" + response.request_id() + "\"");
        continue;
      }
      if (!it->second.first) it->second.first = now;
      if (!response.done()) continue;
      if (response.has_error()) {
        load->Failed(static_cast<grpc::StatusCode>(response.error().code()), response.error().message());
      } else {
        load->Ok(now - it->second.sent, *it->second.first - it->second.sent, response.total_tokens());
      }
      pending.erase(it);
      cv.notify_one();
    }
    std::lock_guard<std::mutex> lock(mu);
    reader_done = true;
    cv.notify_one();
  });

  // Waits until `ready` or the stream stalls: no response for `timeout`
  // while requests are outstanding (or, once `closing`, at all). False on a
  // stall.
  bool closing = false;  // guarded by mu
  auto wait = [&](std::unique_lock<std::mutex>& lock, auto ready) {
    while (!ready()) {
      const bool watched = closing || !pending.empty();
      if (watched && Clock::now() - last_progress >= timeout) return false;
      cv.wait_until(lock, watched ? last_progress + timeout : Clock::now() + timeout);
    }
    return true;
  };
  bool stalled = false;
  bool sent_any = false;
  const size_t in_flight = static_cast<size_t>(std::max(1, options.in_flight));
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu);
      stalled = !wait(lock, [&] { return reader_done || pending.size() < in_flight; });
      if (stalled || reader_done) break;
    }
    std::optional<v1::ExtractRequest> request = load->Next(worker);
    if (!request) break;
    {
      std::lock_guard<std::mutex> lock(mu);
      const Clock::time_point now = Clock::now();
      if (pending.empty()) last_progress = now;
      // Registered before sending: the answer may arrive before Send returns.
      pending[request->request_id()] = Pending{now, std::nullopt};
    }
    sent_any = true;
    if (!stream->Send(*request)) break;
  }
  if (!stalled) {
    stream->CloseSend();
    std::unique_lock<std::mutex> lock(mu);
    if (pending.empty()) last_progress = Clock::now();
    closing = true;
    stalled = !wait(lock, [&] { return reader_done; });
  }
  if (stalled) stream->Cancel();
  reader.join();
  grpc::Status status = stream->Finish();
  // The stream failed before its first request (the server refused the call).
  if (!sent_any && !stalled && !status.ok()) load->Failed(status.error_code(), status.error_message());
  if (stalled) {
    status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          absl::StrFormat("no response on the stream for %.1f s", options.timeout_s));
  } else if (status.ok()) {
    status = grpc::Status(grpc::StatusCode::INTERNAL, "the stream ended before every request was answered");
  }
  // reader_done: nothing else touches `pending` now.
  for (size_t i = 0; i < pending.size(); ++i) load->Failed(status.error_code(), status.error_message());
}

std::string DescribeBounds(const BenchOptions& o) {
  std::string out;
  if (o.duration_s > 0) out = absl::StrFormat("%g s", o.duration_s);
  if (o.max_requests > 0) absl::StrAppend(&out, out.empty() ? "" : ", ", o.max_requests, " requests");
  return out;
}

json SummaryJson(const LatencySummary& s) {
  return json{{"count", s.count}, {"mean", s.mean}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"max", s.max}};
}

}  // namespace

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = std::ceil(p / 100.0 * static_cast<double>(sorted.size()));
  const size_t index = static_cast<size_t>(std::clamp(rank, 1.0, static_cast<double>(sorted.size()))) - 1;
  return sorted[index];
}

LatencySummary Summarize(std::vector<double> samples_ms) {
  LatencySummary s;
  if (samples_ms.empty()) return s;
  std::sort(samples_ms.begin(), samples_ms.end());
  s.count = static_cast<int64_t>(samples_ms.size());
  double sum = 0;
  for (double v : samples_ms) sum += v;
  s.mean = sum / static_cast<double>(s.count);
  s.p50 = Percentile(samples_ms, 50);
  s.p90 = Percentile(samples_ms, 90);
  s.p99 = Percentile(samples_ms, 99);
  s.max = samples_ms.back();
  return s;
}

std::vector<v1::ExtractRequest> DefaultBenchMix() {
  const char* const kTexts[] = {
      "Hello.",
      "The cat sat on the red mat.",
      "A blue bird flew over the green tree while the dog slept in the warm sun.",
      "Sparse autoencoders decompose the residual stream of a language model into features that a person can "
      "read: one fires on animals, another on colours, another on numbers like 3, 14 or 2024. This request is "
      "longer, so a batch mixes short and long sequences the way real traffic does, and the scheduler has to "
      "pack them into its token budget without starving the short ones.",
  };
  std::vector<v1::ExtractRequest> mix;
  for (const char* text : kTexts) mix.emplace_back().set_text(text);
  return mix;
}

absl::StatusOr<std::vector<v1::ExtractRequest>> ParseRequestsJsonl(std::istream& in, const std::string& origin) {
  std::vector<v1::ExtractRequest> requests;
  std::string line;
  for (int line_number = 1; std::getline(in, line); ++line_number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = absl::StrCat(origin, ":", line_number, ": ");
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(where + "expected a JSON object");
    const bool has_text = j.contains("text"), has_ids = j.contains("token_ids");
    if (has_text == has_ids) {
      return absl::InvalidArgumentError(where + "expected exactly one of \"text\" or \"token_ids\"");
    }
    v1::ExtractRequest request;
    if (has_text) {
      if (!j["text"].is_string()) return absl::InvalidArgumentError(where + "\"text\" must be a string");
      request.set_text(j["text"].get<std::string>());
      if (j.contains("add_bos")) {
        if (!j["add_bos"].is_boolean()) return absl::InvalidArgumentError(where + "\"add_bos\" must be true or false");
        request.set_add_bos(j["add_bos"].get<bool>());
      }
    } else {
      const json& ids = j["token_ids"];
      if (!ids.is_array()) return absl::InvalidArgumentError(where + "\"token_ids\" must be an array");
      // (As sae-extract: an empty list would be sent as no input at all.)
      if (ids.empty()) return absl::InvalidArgumentError(where + "no tokens");
      for (const json& id : ids) {
        if (!id.is_number_unsigned() || id.get<uint64_t>() > UINT32_MAX) {
          return absl::InvalidArgumentError(absl::StrCat(where, id.dump(), " is not a token id"));
        }
        request.mutable_token_ids()->add_ids(id.get<uint32_t>());
      }
    }
    requests.push_back(std::move(request));
  }
  if (in.bad()) return absl::DataLossError(origin + ": read failed");
  return requests;
}

BenchReport RunBench(SaeClient* client, const BenchOptions& options_in, const std::vector<v1::ExtractRequest>& mix) {
  BenchOptions options = options_in;
  options.concurrency = std::max(1, options.concurrency);
  options.in_flight = std::max(1, options.in_flight);
  if (options.duration_s <= 0 && options.max_requests <= 0) options.duration_s = kDefaultDurationS;
  Load load(options, mix);
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> workers;
  for (int w = 0; w < options.concurrency; ++w) {
    workers.emplace_back(options.stream ? StreamWorker : UnaryWorker, client, std::cref(options), w, &load);
  }
  for (std::thread& t : workers) t.join();
  return load.Finish(std::chrono::duration<double>(Clock::now() - start).count());
}

std::string FormatBenchReport(const BenchReport& r) {
  const BenchOptions& o = r.options;
  std::string out = o.stream
                        ? absl::StrFormat("mode: ExtractStream, %d streams x %d in flight", o.concurrency, o.in_flight)
                        : absl::StrFormat("mode: Extract, %d concurrent calls", o.concurrency);
  absl::StrAppend(&out, "; bounds: ", DescribeBounds(o), "\n");
  absl::StrAppendFormat(&out, "requests: %d ok, %d failed in %.2f s\n", r.ok, r.failed, r.wall_s);
  absl::StrAppendFormat(&out, "throughput: %.1f requests/s, %.1f tokens/s\n", r.requests_per_s(), r.tokens_per_s());
  absl::StrAppendFormat(&out, "%-16s %9s %9s %9s %9s %9s\n", "", "p50", "p90", "p99", "max", "mean");
  for (const auto& [label, s] : {std::pair<const char*, const LatencySummary&>{"latency ms", r.latency_ms},
                                 std::pair<const char*, const LatencySummary&>{"first chunk ms", r.first_chunk_ms}}) {
    absl::StrAppendFormat(&out, "%-16s %9.2f %9.2f %9.2f %9.2f %9.2f\n", label, s.p50, s.p90, s.p99, s.max, s.mean);
  }
  if (r.failed > 0) {
    std::string counts;
    for (const auto& [code, n] : r.errors) absl::StrAppend(&counts, counts.empty() ? "" : ", ", code, " ", n);
    absl::StrAppend(&out, "errors: ", counts, " (first: ", r.first_error, ")\n");
  }
  return out;
}

std::string BenchReportJson(const BenchReport& r) {
  const BenchOptions& o = r.options;
  json j = {{"mode", o.stream ? "stream" : "unary"},
            {"concurrency", o.concurrency},
            {"in_flight", o.in_flight},
            {"duration_s", o.duration_s},
            {"max_requests", o.max_requests},
            {"ok", r.ok},
            {"failed", r.failed},
            {"errors", r.errors},
            {"tokens", r.tokens},
            {"wall_s", r.wall_s},
            {"requests_per_s", r.requests_per_s()},
            {"tokens_per_s", r.tokens_per_s()},
            {"latency_ms", SummaryJson(r.latency_ms)},
            {"first_chunk_ms", SummaryJson(r.first_chunk_ms)}};
  if (!r.first_error.empty()) j["first_error"] = r.first_error;
  return j.dump();
}

}  // namespace sae::client
