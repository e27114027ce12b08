// `sae-client bench`: a closed-loop load generator for Extract and
// ExtractStream. N workers each keep up to `in_flight` requests outstanding
// (one at a time on Extract), drawing requests round-robin from a mix, until
// the --duration or --requests bound is reached; in-flight requests then
// finish. Latency (send -> last chunk) and time to first chunk are kept as
// raw samples and reported as exact percentiles of the sorted samples.
#ifndef SAE_CLIENT_BENCH_H_
#define SAE_CLIENT_BENCH_H_

#include <cstdint>
#include <istream>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sae/v1/sae.pb.h"
#include "sae_client.h"

namespace sae::client {

struct BenchOptions {
  bool stream = true;        // ExtractStream (one stream per worker), else Extract calls
  int concurrency = 4;       // workers: streams or concurrent Extract calls
  int in_flight = 1;         // requests outstanding per stream (ExtractStream only)
  double duration_s = 0;     // stop sending after this long; 0: no time bound
  int64_t max_requests = 0;  // stop after sending this many in all; 0: no count bound
  // A request (on Extract) or a stream with requests outstanding (on
  // ExtractStream) that makes no progress for this long is cancelled.
  double timeout_s = 60;
};

// Order statistics of a set of samples (milliseconds).
struct LatencySummary {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};

struct BenchReport {
  BenchOptions options;
  int64_t ok = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors;  // status code name -> failed requests
  std::string first_error;                // code and message of the first failure
  int64_t tokens = 0;                     // tokens of the successful requests
  double wall_s = 0;                      // first send -> last response
  LatencySummary latency_ms;              // send -> last chunk, successful requests
  LatencySummary first_chunk_ms;          // send -> first chunk, successful requests
  double requests_per_s() const { return wall_s > 0 ? ok / wall_s : 0; }
  double tokens_per_s() const { return wall_s > 0 ? tokens / wall_s : 0; }
};

// Nearest-rank percentile (0 < p <= 100) of ascending `sorted`: the smallest
// sample with at least p% of the samples at or below it; 0 when empty.
double Percentile(const std::vector<double>& sorted, double p);
LatencySummary Summarize(std::vector<double> samples_ms);

// The built-in request mix: texts from a few tokens to about a hundred.
std::vector<v1::ExtractRequest> DefaultBenchMix();

// Requests from JSONL, the sae-extract input format: per line {"text": ...}
// (optional "add_bos": false) or {"token_ids": [...]}; blank lines skipped.
// Errors name `origin`:line.
absl::StatusOr<std::vector<v1::ExtractRequest>> ParseRequestsJsonl(std::istream& in, const std::string& origin);

// Runs the load. `mix` requests are used round-robin (their request_id is
// replaced); it must not be empty.
BenchReport RunBench(SaeClient* client, const BenchOptions& options, const std::vector<v1::ExtractRequest>& mix);

std::string FormatBenchReport(const BenchReport& report);
// One JSON object on one line (durations in ms).
std::string BenchReportJson(const BenchReport& report);

}  // namespace sae::client

#endif  // SAE_CLIENT_BENCH_H_
