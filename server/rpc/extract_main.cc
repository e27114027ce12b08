// sae-extract: offline bulk extraction with the same Engine as the server,
// no network. Reads JSONL, writes JSONL (one output line per input line).
//
//   sae-extract --model DIR --sae DIR [--sae DIR ...] --input IN.jsonl --output OUT.jsonl
//               [--k K] [--dump-hooks F.safetensors] [--demo]
//
// IN lines:  {"text": "..."} (optional "add_bos": false) or {"token_ids": [...]}
// OUT lines: {"tokens": [{"id": 9906, "piece": "Hello", "offset": [0, 5],
//             "features": {"L15R-8x": [[index, value], ...]}}]}
// Blank input lines are skipped: output line i belongs to the i-th non-blank
// input line. Offsets are [start, end) in code points ([0, 0] for token_ids);
// features are the active ones, value descending, values written with at
// most 9 significant digits (they read back as the same float).
// --dump-hooks: one F32 tensor [n_tokens, d_model] per hook, named like the
// hook ("L15R", "L15TC" = the transcoder input); with several input lines,
// named "<hook>.<i>" for output line i. Streamed as the lines are written.
// Memory: every line is checked before the compute, then read again when a
// batch reaches it (InputLines); neither tokens nor hooks pile up.
// --resume: continue a run that stopped (a hung GPU's exit 3, a kill): the
// whole lines OUT already holds are checked against this input and kept, a
// torn last line is dropped, and the run appends from the next line. With
// --dump-hooks, F.partial (a stopped or failed run leaves it) goes on too:
// its header must be this run's, and lines whose tensors it lacks are redone.
// --max_seq_len: a longer line runs as windows, split as the server's
// long_input_policy WINDOW splits a request (rpc/windows.h), so both give the
// same features for the same text; its output line is assembled from them.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "common/file.h"
#include "common/status_macros.h"
#include "core/demo_model.h"
#include "core/engine.h"
#include "core/safetensors.h"
#include "nlohmann/json.hpp"
#include "rpc/config.h"
#include "rpc/flag_util.h"
#include "rpc/hang_watchdog.h"
#include "rpc/windows.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model folder");
ABSL_FLAG(sae::RepeatedFlag, sae, {}, "SAE folder (\"DIR\" or \"ALIAS=DIR\"); repeatable");
ABSL_FLAG(std::string, input, "", "input JSONL: {\"text\": ...} or {\"token_ids\": [...]} per line");
ABSL_FLAG(std::string, output, "", "output JSONL, one line per input line");
ABSL_FLAG(int, k, 16, "features kept per token and SAE");
ABSL_FLAG(std::string, dump_hooks, "",
          "also write the hook activations (F32 [n_tokens, d_model] per hook) to this .safetensors file");
ABSL_FLAG(bool, demo, false, "use the generated tiny demo model (and all demo SAEs when no --sae)");
ABSL_FLAG(std::string, demo_dir, "/tmp/sae-demo", "where --demo writes the demo model");
ABSL_FLAG(std::string, backend, "cpu", "cpu or cuda");
ABSL_FLAG(bool, include_bos, false, "also report features at BOS positions");
ABSL_FLAG(int, batch_tokens, 2048, "input lines are packed into engine batches of about this many tokens");
ABSL_FLAG(std::optional<int>, batch_timeout_seconds, std::nullopt,
          "a batch not finished after this long means a hung GPU: exit with status 3 (default 120 on cuda, "
          "0 = off on cpu)");
ABSL_FLAG(int, max_seq_len, 2048,
          "tokens per forward pass (the context window): a longer input line runs as windows of at most this many "
          "tokens, a BOS-started line with BOS again at the start of each later window, as the server splits a "
          "request under long_input_policy WINDOW; 0: every line as one sequence, however long");
ABSL_FLAG(bool, resume, false,
          "continue an interrupted run: keep the whole lines --output already holds (checked to be this input's first "
          "lines, with these SAEs) and append the rest; with --dump-hooks F, F.partial is continued too");

namespace sae {
namespace {

using json = nlohmann::json;
// Output lines keep keys in the documented order (id, piece, offset,
// features; SAEs in load order) and feature values as float, so they are
// written with at most 9 significant digits ("1.5951071", not
// "1.5951071000000001") and still read back as exactly the same float.
using OutJson =
    nlohmann::basic_json<nlohmann::ordered_map, std::vector, std::string, bool, std::int64_t, std::uint64_t, float>;

struct Record {
  int line = 0;  // 1-based line in the input file, for messages
  std::vector<int32_t> ids;
  std::vector<std::pair<uint32_t, uint32_t>> offsets;  // code points; (0, 0) for token_ids
};

absl::StatusOr<Record> ParseLine(const std::string& text, int line_number, const Engine& engine,
                                 const std::string& origin) {
  const std::string where = absl::StrCat(origin, ":", line_number, ": ");
  Record record;
  record.line = line_number;
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(where + "not valid JSON (or not valid UTF-8)");
  if (!j.is_object()) return absl::InvalidArgumentError(where + "expected a JSON object");
  const bool has_text = j.contains("text");
  const bool has_ids = j.contains("token_ids");
  if (has_text == has_ids)
    return absl::InvalidArgumentError(where + "expected exactly one of \"text\" or \"token_ids\"");
  if (has_text) {
    if (!j["text"].is_string()) return absl::InvalidArgumentError(where + "\"text\" must be a string");
    bool add_bos = true;
    if (j.contains("add_bos")) {
      if (!j["add_bos"].is_boolean()) return absl::InvalidArgumentError(where + "\"add_bos\" must be true or false");
      add_bos = j["add_bos"].get<bool>();
    }
    absl::StatusOr<Encoding> enc = engine.tokenizer().Encode(j["text"].get<std::string>(), add_bos);
    if (!enc.ok()) return absl::InvalidArgumentError(where + std::string(enc.status().message()));
    record.ids = std::move(enc->ids);
    record.offsets = std::move(enc->offsets);
  } else {
    const json& ids = j["token_ids"];
    if (!ids.is_array()) return absl::InvalidArgumentError(where + "\"token_ids\" must be an array of integers");
    const int64_t vocab = engine.model_config().vocab_size;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (!ids[i].is_number_integer() || ids[i].get<int64_t>() < 0 || ids[i].get<int64_t>() >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "token_ids[", i, "] = ", ids[i].dump(), " is not a token id in [0, ", vocab, ")"));
      }
      record.ids.push_back(static_cast<int32_t>(ids[i].get<int64_t>()));
    }
    record.offsets.assign(record.ids.size(), {0, 0});
  }
  if (record.ids.empty()) return absl::InvalidArgumentError(where + "no tokens");
  return record;
}

// The input's non-blank lines. Each is parsed and tokenized up front, so a
// bad line fails the run before any compute, and again when the run reaches
// it: a regular file is read a second time from the offsets of the first
// pass, so the run holds 24 bytes per line rather than its tokens (about 5
// bytes per input byte). An input that cannot be read twice (a pipe:
// --input <(zcat IN.jsonl.gz)) has its non-blank lines' bytes held instead.
class InputLines {
 public:
  // `in` is `path`, opened.
  static absl::StatusOr<std::unique_ptr<InputLines>> Read(const std::string& path, std::ifstream in,
                                                          const Engine& engine) {
    auto lines = std::unique_ptr<InputLines>(new InputLines(path, engine));
    lines->in_ = std::move(in);
    std::error_code error;
    lines->reread_ = std::filesystem::is_regular_file(path, error);
    std::string line;
    uint64_t offset = 0;
    for (int line_number = 1; std::getline(lines->in_, line); ++line_number) {
      const uint64_t begin = offset;
      offset += line.size() + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines carry no record
      ASSIGN_OR_RETURN(Record record, ParseLine(line, line_number, engine, path));
      lines->index_.push_back({lines->reread_ ? begin : lines->Hold(line), std::hash<std::string>()(line), line_number,
                               static_cast<uint32_t>(record.ids.size())});
    }
    if (lines->in_.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
    lines->in_.clear();
    lines->position_ = offset + 1;  // nowhere: the first Get seeks
    return lines;
  }

  size_t size() const { return index_.size(); }
  int line_number(size_t i) const { return index_[i].line; }
  size_t n_tokens(size_t i) const { return index_[i].n_tokens; }

  // Record i (0-based, blank lines not counted). Reading in order does not
  // seek. FAILED_PRECONDITION when the line changed since the first pass.
  absl::StatusOr<Record> Get(size_t i) {
    const Entry& entry = index_[i];
    if (!reread_) {
      const std::string& chunk = held_[entry.offset >> 32];
      const size_t begin = entry.offset & 0xffffffff;
      return ParseLine(chunk.substr(begin, chunk.find('\n', begin) - begin), entry.line, engine_, path_);
    }
    if (position_ != entry.offset) {
      in_.clear();
      in_.seekg(static_cast<std::streamoff>(entry.offset));
    }
    std::string line;
    const bool read = static_cast<bool>(std::getline(in_, line));
    position_ = entry.offset + line.size() + 1;
    if (!read || std::hash<std::string>()(line) != entry.hash) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ":", entry.line,
                       ": changed since sae-extract checked it (the input file must not change during the run)"));
    }
    return ParseLine(line, entry.line, engine_, path_);
  }

 private:
  struct Entry {
    uint64_t offset;  // of the line in the file; when !reread_, Hold's
    size_t hash;      // of its bytes, to notice a file changed under the run
    int line;         // 1-based line number, for messages
    uint32_t n_tokens;
  };
  InputLines(std::string path, const Engine& engine) : path_(std::move(path)), engine_(engine) {}

  // Keeps `line`; where: the chunk's index in the high 32 bits, the line's
  // start in it in the low 32.
  uint64_t Hold(const std::string& line) {
    if (held_.empty() || held_.back().size() + line.size() + 1 > held_.back().capacity()) {
      held_.emplace_back().reserve(std::max<size_t>(1 << 20, line.size() + 1));
    }
    const uint64_t where = (uint64_t{held_.size() - 1} << 32) | held_.back().size();
    absl::StrAppend(&held_.back(), line, "\n");
    return where;
  }

  const std::string path_;
  const Engine& engine_;
  std::ifstream in_;
  bool reread_ = false;
  uint64_t position_ = 0;  // where in_ will read next
  std::vector<Entry> index_;
  // When !reread_: the non-blank lines, each ending in \n, in chunks of about
  // 1 MiB (a single growing buffer would take twice the input as it grows).
  std::vector<std::string> held_;
};

OutJson RecordToJson(const Record& record, const SequenceResult& result, const Engine& engine,
                     const std::vector<int>& sae_indices) {
  OutJson tokens = OutJson::array();
  for (size_t t = 0; t < record.ids.size(); ++t) {
    OutJson features = OutJson::object();
    for (size_t j = 0; j < sae_indices.size(); ++j) {
      const SaeTopK& top = result.saes[j];
      OutJson list = OutJson::array();
      for (int slot = 0; slot < top.k; ++slot) {
        const int32_t index = top.indices[t * top.k + slot];
        if (index < 0) break;  // active features come first, value-descending
        list.push_back(OutJson::array({index, top.values[t * top.k + slot]}));
      }
      features[engine.saes()[sae_indices[j]]->name()] = std::move(list);
    }
    tokens.push_back({{"id", record.ids[t]},
                      {"piece", engine.tokenizer().TokenPiece(record.ids[t])},
                      {"offset", OutJson::array({record.offsets[t].first, record.offsets[t].second})},
                      {"features", std::move(features)}});
  }
  return OutJson{{"tokens", std::move(tokens)}};
}

void ShowProgress(size_t done, size_t total) {
  constexpr int kWidth = 40;
  const int filled = total == 0 ? kWidth : static_cast<int>(kWidth * done / total);
  std::fprintf(stderr, "\r[%s%s] %zu/%zu lines", std::string(filled, '#').c_str(),
               std::string(kWidth - filled, '.').c_str(), done, total);
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// What this run asks of every line, and how it splits long ones.
struct RunShape {
  std::vector<int> sae_indices;  // every loaded SAE, in load order
  int k = 0;
  bool include_bos = false;
  bool capture_hooks = false;  // --dump-hooks
  int max_seq_len = 0;         // 0: a line is one sequence
  std::optional<int32_t> bos;
};

// What sae-extract asks the engine for one whole input line.
SequenceRequest MakeRequest(const Record& record, const RunShape& shape) {
  SequenceRequest request;
  request.ids = record.ids;
  request.sae_indices = shape.sae_indices;
  request.k = shape.k;
  request.include_bos = shape.include_bos;
  request.capture_hooks = shape.capture_hooks;
  return request;
}

// One engine sequence: `window` of records[record].
struct Piece {
  size_t record = 0;
  Window window;
};

// The pieces of `record`, record number `index`, in order.
std::vector<Piece> PiecesOf(const Record& record, size_t index, const RunShape& shape) {
  std::vector<Piece> pieces;
  for (const Window& window : SplitIntoWindows(record.ids, shape.max_seq_len, shape.bos)) {
    pieces.push_back({index, window});
  }
  return pieces;
}

// Runs `pieces` as one engine batch and places each window's result into
// (*lines)[its record], started as an EmptyResult by the record's first
// piece. `records` holds the record of every piece, by record number.
absl::Status RunPieces(Engine& engine, const std::map<size_t, Record>& records, absl::Span<const Piece> pieces,
                       const RunShape& shape, std::map<size_t, SequenceResult>* lines) {
  std::vector<SequenceRequest> batch;
  for (const Piece& piece : pieces) {
    batch.push_back(WindowRequest(MakeRequest(records.at(piece.record), shape), piece.window, shape.bos));
  }
  ASSIGN_OR_RETURN(std::vector<SequenceResult> results, engine.Run(batch));
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Record& record = records.at(pieces[i].record);
    auto [line, first] = lines->try_emplace(pieces[i].record);
    if (first) line->second = EmptyResult(MakeRequest(record, shape));
    DropPrependedRow(pieces[i].window, &results[i]);
    PlaceWindow(pieces[i].window, results[i], static_cast<int>(record.ids.size()), &line->second);
  }
  return absl::OkStatus();
}

// For --resume: how many whole lines `output` holds and their length in
// bytes. Each kept line must be what this run writes for the input line at
// its place: the same tokens (ids, pieces, offsets), features of the same
// SAEs in the same order, at most --k well-formed [index, value] pairs per
// token, value-descending, none at BOS without --include_bos. The last kept
// line and the longest are computed again and must match
// (CheckComputedAgain). A last line without its newline was torn by
// the stop and is dropped, if it starts as this line would. Anything else
// means another run's file (another input, SAE set, --k, --include_bos,
// --max_seq_len), refused before the file is touched. A missing file holds no lines.
struct ResumePoint {
  size_t lines = 0;
  uint64_t bytes = 0;
};

constexpr char kNotThisRun[] =
    "; not an earlier run of this input with these SAEs and options (remove the file or "
    "drop --resume)";

// Why `line` is not what this run writes for `record`, or OK.
absl::Status CheckOutputLine(const std::string& line, const Record& record, const Engine& engine,
                             const RunShape& shape) {
  const std::vector<int>& sae_indices = shape.sae_indices;
  const int k = shape.k;
  const OutJson j = OutJson::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || j.size() != 1 || !j.contains("tokens") || !j["tokens"].is_array()) {
    return absl::FailedPreconditionError("not an output line of sae-extract");
  }
  const OutJson& tokens = j["tokens"];
  if (tokens.size() != record.ids.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(tokens.size(), " tokens, but the input line has ", record.ids.size()));
  }
  const std::optional<int32_t> bos = engine.tokenizer().bos_id();
  std::vector<std::string> expected_names;
  for (int s : sae_indices) expected_names.push_back(engine.saes()[s]->name());
  static const std::vector<std::string> kTokenKeys = {"id", "piece", "offset", "features"};
  for (size_t t = 0; t < tokens.size(); ++t) {
    const OutJson& token = tokens[t];
    std::vector<std::string> keys;
    if (token.is_object()) {
      for (const auto& item : token.items()) keys.push_back(item.key());
    }
    if (keys != kTokenKeys) return absl::FailedPreconditionError(absl::StrCat("token ", t, " is not an output token"));
    const int32_t id = record.ids[t];
    if (!token["id"].is_number_integer() || token["id"].get<int64_t>() != id) {
      return absl::FailedPreconditionError(
          absl::StrCat("token ", t, " is ", token["id"].dump(), ", but the input line gives token id ", id));
    }
    const OutJson offset = OutJson::array({record.offsets[t].first, record.offsets[t].second});
    if (token["piece"] != engine.tokenizer().TokenPiece(id) || token["offset"] != offset) {
      return absl::FailedPreconditionError(absl::StrCat(
          "token ", t, " has piece ", token["piece"].dump(), " and offset ", token["offset"].dump(),
          " where this run has ", OutJson(engine.tokenizer().TokenPiece(id)).dump(), " and ", offset.dump()));
    }
    const OutJson& features = token["features"];
    std::vector<std::string> names;
    if (features.is_object()) {
      for (const auto& item : features.items()) names.push_back(item.key());
    }
    if (names != expected_names) {
      return absl::FailedPreconditionError(absl::StrCat("token ", t, " has features of the SAEs [",
                                                        absl::StrJoin(names, ", "), "], this run of [",
                                                        absl::StrJoin(expected_names, ", "), "]"));
    }
    const bool skipped = !shape.include_bos && bos && id == *bos;
    for (int s : sae_indices) {
      const Sae& sae = *engine.saes()[s];
      const OutJson& list = features[sae.name()];
      bool ok = list.is_array() && list.size() <= static_cast<size_t>(k) && !(skipped && !list.empty());
      float previous = std::numeric_limits<float>::infinity();
      for (size_t i = 0; ok && i < list.size(); ++i) {
        const OutJson& pair = list[i];
        ok = pair.is_array() && pair.size() == 2 && pair[0].is_number_integer() && pair[0].get<int64_t>() >= 0 &&
             pair[0].get<int64_t>() < sae.hyperparams().d_sae && pair[1].is_number() &&
             pair[1].get<float>() <= previous;
        if (ok) previous = pair[1].get<float>();
      }
      if (!ok) {
        return absl::FailedPreconditionError(absl::StrCat("token ", t, ", ", sae.name(), ": not a list of at most --k=",
                                                          k, " [index, value] pairs of this SAE, value-descending",
                                                          skipped ? ", and empty at BOS without --include_bos" : ""));
      }
    }
  }
  return absl::OkStatus();
}

// The torn end of an output file (bytes after its last newline) must be the
// start of the line this run writes for `record`.
bool StartsLikeOutputLine(const std::string& tail, const Record* record) {
  const std::string start = record == nullptr
                                ? std::string("{\"tokens\":[")
                                : absl::StrCat("{\"tokens\":[{\"id\":", record->ids.front(), ",\"piece\":");
  const size_t n = std::min(tail.size(), start.size());
  return tail.compare(0, n, start, 0, n) == 0;
}

// For --resume: output line `index` (0-based), `kept`, must be what this run
// computes for records[index]: byte for byte on the CPU; elsewhere, where
// values depend on the batch to rounding, each token's feature count within
// one (catches a smaller --k, or other weights under the same SAE name).
absl::Status CheckComputedAgain(const std::string& kept, size_t index, const std::string& output,
                                const std::string& input, InputLines& records, Engine& engine, const RunShape& shape,
                                HangWatchdog& watchdog) {
  std::map<size_t, Record> one;
  ASSIGN_OR_RETURN(one[index], records.Get(index));
  const Record& record = one[index];
  watchdog.Begin(
      absl::StrCat("--resume: computing ", input, ":", record.line, " again to check ", output, ":", index + 1));
  std::map<size_t, SequenceResult> again;
  const absl::Status ran = RunPieces(engine, one, PiecesOf(record, index, shape), shape, &again);
  watchdog.End();
  RETURN_IF_ERROR(ran);
  const std::string recomputed = RecordToJson(record, again[index], engine, shape.sae_indices).dump();
  const std::string where = absl::StrCat(output, ":", index + 1, ": ");
  if (engine.backend_name() == "cpu") {
    if (recomputed != kept) {
      return absl::FailedPreconditionError(absl::StrCat(where, "differs from this run's output for ", input, ":",
                                                        record.line, " (computed again)", kNotThisRun));
    }
    return absl::OkStatus();
  }
  const OutJson before = OutJson::parse(kept), now = OutJson::parse(recomputed);
  for (size_t t = 0; t < record.ids.size(); ++t) {
    for (int s : shape.sae_indices) {
      const std::string& name = engine.saes()[s]->name();
      const size_t a = before["tokens"][t]["features"][name].size(), b = now["tokens"][t]["features"][name].size();
      if (a + 1 < b || b + 1 < a) {
        return absl::FailedPreconditionError(absl::StrCat(where, "token ", t, ", ", name, " holds ", a,
                                                          " features; computed again for ", input, ":", record.line,
                                                          " it has ", b, kNotThisRun));
      }
    }
  }
  return absl::OkStatus();
}

// The length in bytes of the first `n` lines of `path` (which has them).
absl::StatusOr<uint64_t> BytesOfLines(const std::string& path, size_t n) {
  std::ifstream in(path, std::ios::binary);
  uint64_t bytes = 0;
  std::string line;
  for (size_t i = 0; i < n; ++i) {
    if (!std::getline(in, line)) return absl::DataLossError(absl::StrCat(path, ": read failed"));
    bytes += line.size() + 1;
  }
  return bytes;
}

absl::StatusOr<ResumePoint> FindResumePoint(const std::string& output, const std::string& input, InputLines& records,
                                            Engine& engine, const RunShape& shape, HangWatchdog& watchdog) {
  ResumePoint point;
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(output, error);
  if (status.type() == std::filesystem::file_type::not_found) return point;
  if (status.type() != std::filesystem::file_type::regular) {
    return absl::FailedPreconditionError(absl::StrCat(output, ": not a regular file; cannot resume it"));
  }
  std::ifstream in(output, std::ios::binary);
  const uint64_t size = std::filesystem::file_size(output, error);
  if (!in || error) return absl::PermissionDeniedError(absl::StrCat(output, ": cannot read the output file to resume"));
  // Where the whole lines end: after the last newline, found from the end so
  // a long torn tail is never held in memory.
  uint64_t whole = 0;
  std::string chunk;
  for (uint64_t end = size; end > 0 && whole == 0;) {
    const uint64_t begin = end > (1 << 16) ? end - (1 << 16) : 0;
    chunk.resize(end - begin);
    in.seekg(static_cast<std::streamoff>(begin));
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    if (!in) return absl::DataLossError(absl::StrCat(output, ": read failed"));
    const size_t nl = chunk.rfind('\n');
    if (nl != std::string::npos) whole = begin + nl + 1;
    end = begin;
  }
  in.seekg(0);
  std::string line, last_line, longest_line;
  size_t longest = 0;  // the kept line with the most tokens (the first of them)
  while (point.bytes < whole && std::getline(in, line)) {
    const size_t i = point.lines;
    const std::string where = absl::StrCat(output, ":", i + 1, ": ");
    if (i >= records.size()) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, "more lines than the ", records.size(), " input lines of ", input, kNotThisRun));
    }
    if (!line.empty() && line.back() == '\r') {
      return absl::FailedPreconditionError(absl::StrCat(where, "ends in \\r\\n; sae-extract writes \\n", kNotThisRun));
    }
    ASSIGN_OR_RETURN(const Record record, records.Get(i));
    if (absl::Status s = CheckOutputLine(line, record, engine, shape); !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(where, s.message(), " (", input, ":", record.line, ")", kNotThisRun));
    }
    if (i == 0 || records.n_tokens(i) > records.n_tokens(longest)) {
      longest = i;
      longest_line = line;
    }
    ++point.lines;
    point.bytes += line.size() + 1;
    last_line = std::move(line);
  }
  if (point.bytes != whole) return absl::DataLossError(absl::StrCat(output, ": read failed"));
  if (whole < size) {
    std::string tail(static_cast<size_t>(std::min<uint64_t>(size - whole, 64)), '\0');
    in.clear();
    in.seekg(static_cast<std::streamoff>(whole));
    in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
    std::optional<Record> next;
    if (point.lines < records.size()) {
      ASSIGN_OR_RETURN(next, records.Get(point.lines));
    }
    if (!in || !next || !StartsLikeOutputLine(tail, &*next)) {
      return absl::FailedPreconditionError(absl::StrCat(output, ":", point.lines + 1,
                                                        ": an unfinished line that is not the start of this run's line",
                                                        !next ? " (the input has no more lines)" : "", kNotThisRun));
    }
  }
  if (point.lines == 0) return point;

  // Kept lines computed again with this run's model, SAEs and options: the
  // last, and the longest (a run with another --max_seq_len split the long
  // lines differently; affected lines are the longest ones).
  RETURN_IF_ERROR(CheckComputedAgain(last_line, point.lines - 1, output, input, records, engine, shape, watchdog));
  if (longest != point.lines - 1) {
    RETURN_IF_ERROR(CheckComputedAgain(longest_line, longest, output, input, records, engine, shape, watchdog));
  }
  return point;
}

// The hook file goes to F.partial and is renamed F at the end of the run: a
// path F cannot be written to is found now, before the compute. A file the
// check creates is removed again.
absl::Status CheckWritable(const std::string& path) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) return absl::InvalidArgumentError(path + ": is a directory");
  const bool existed = std::filesystem::exists(path, error);
  {
    errno = 0;
    std::ofstream probe(path, std::ios::binary | std::ios::app);
    if (!probe) {
      return absl::PermissionDeniedError(
          absl::StrCat(path, ": cannot create file", errno != 0 ? absl::StrCat(": ", std::strerror(errno)) : ""));
    }
  }
  if (!existed) std::filesystem::remove(path, error);
  return absl::OkStatus();
}

absl::Status Run() {
  const std::string input = absl::GetFlag(FLAGS_input);
  const std::string output = absl::GetFlag(FLAGS_output);
  const std::string dump_path = absl::GetFlag(FLAGS_dump_hooks);
  const int k = absl::GetFlag(FLAGS_k);
  if (input.empty() || output.empty()) return absl::InvalidArgumentError("--input and --output are required");
  if (k <= 0) return absl::InvalidArgumentError(absl::StrCat("--k must be positive, got ", k));
  const bool resume = absl::GetFlag(FLAGS_resume);
  const bool include_bos = absl::GetFlag(FLAGS_include_bos);
  const int max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  if (max_seq_len != 0 && max_seq_len < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_seq_len must be 0 (no windows) or at least 2 (BOS and one token), got ", max_seq_len));
  }
  const int timeout_s =
      absl::GetFlag(FLAGS_batch_timeout_seconds).value_or(DefaultBatchTimeoutSeconds(absl::GetFlag(FLAGS_backend)));
  if (timeout_s < 0 || timeout_s > kMaxBatchTimeoutSeconds) {
    return absl::InvalidArgumentError(absl::StrCat("--batch_timeout_seconds must be in [0, ", kMaxBatchTimeoutSeconds,
                                                   "] (0: no watchdog), got ", timeout_s));
  }

  EngineOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.backend = absl::GetFlag(FLAGS_backend);
  for (const std::string& spec : absl::GetFlag(FLAGS_sae).values) {
    options.saes.push_back(ParseSaeSpec(spec));
  }
  if (absl::GetFlag(FLAGS_demo) && options.model_dir.empty()) {
    ASSIGN_OR_RETURN(DemoLayout demo, WriteDemo(absl::GetFlag(FLAGS_demo_dir)));
    options.model_dir = demo.model_dir;
    if (options.saes.empty()) options.saes = EngineOptionsForDemo(demo).saes;
  }
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model is required (or --demo)");
  if (options.saes.empty()) return absl::InvalidArgumentError("at least one --sae is required");

  std::ifstream in;
  if (absl::Status opened = OpenInputFile(input, &in); !opened.ok()) return Prefixed("the input file ", opened);
  if (!dump_path.empty()) RETURN_IF_ERROR(Prefixed("--dump-hooks ", CheckWritable(dump_path)));
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(options));
  if (k > engine->max_k()) {
    return absl::FailedPreconditionError(absl::StrCat("--k=", k, " is larger than ", engine->max_k(),
                                                      ", the most features per token the ", engine->backend_name(),
                                                      " backend's SAE top-k holds on this device"));
  }

  // Every line is checked before any compute starts.
  ASSIGN_OR_RETURN(std::unique_ptr<InputLines> read, InputLines::Read(input, std::move(in), *engine));
  InputLines& records = *read;
  const size_t n_records = records.size();

  RunShape shape;
  shape.sae_indices = engine->all_sae_indices();
  shape.k = k;
  shape.include_bos = include_bos;
  shape.max_seq_len = max_seq_len;
  shape.bos = engine->tokenizer().bos_id();
  // Exit status 3, as sae-server after a device failure; the output holds
  // every line of the batches that finished (it is flushed after each).
  HangWatchdog watchdog(std::chrono::seconds(timeout_s), [timeout_s](const std::string& what, double busy) {
    std::fprintf(stderr,
                 "\nsae-extract: %s: the batch has run for %.1f s, longer than --batch_timeout_seconds (%d): the GPU "
                 "is presumed hung; exiting (status 3)\n",
                 what.c_str(), busy, timeout_s);
  });
  ResumePoint resume_at;
  if (resume) {
    ASSIGN_OR_RETURN(resume_at, FindResumePoint(output, input, records, *engine, shape, watchdog));
  }

  // The hook file's header goes out now (every line's token count is known),
  // each line's tensors as the line is written: hooks never pile up in memory.
  const bool dump = !dump_path.empty();
  const int d_model = engine->model_config().hidden_size;
  // A hook's tensor for output line `line`: suffixed by the line when there
  // are several, so names stay unique.
  auto hook_tensor_name = [n_records](const std::string& hook, size_t line) {
    return n_records > 1 ? absl::StrCat(hook, ".", line) : hook;
  };
  std::unique_ptr<SafetensorsWriter> hooks_out;
  if (dump) {
    std::set<std::string> hook_set;
    for (int s : shape.sae_indices) hook_set.insert(engine->saes()[s]->hook().Name());
    const std::vector<std::string> hooks(hook_set.begin(), hook_set.end());
    auto tensor = [&](size_t t) {
      const size_t line = t / hooks.size();
      return TensorSpec{hook_tensor_name(hooks[t % hooks.size()], line),
                        DType::kF32,
                        {static_cast<int64_t>(records.n_tokens(line)), d_model}};
    };
    const size_t n_tensors = n_records * hooks.size();
    const std::map<std::string, std::string> metadata = {{"format", "pt"}};
    absl::StatusOr<std::unique_ptr<SafetensorsWriter>> created;
    if (resume_at.lines == 0) {
      created = SafetensorsWriter::Create(dump_path, n_tensors, tensor, metadata);
    } else {
      // The stopped run's F.partial goes on from the last line whose tensors
      // it holds whole (it may lag the output by a batch). A run that
      // finished has only F: its header is checked the same way.
      std::error_code error;
      const std::string partial = dump_path + ".partial";
      bool finished = false;
      if (resume_at.lines == n_records && !std::filesystem::exists(partial, error) &&
          std::filesystem::is_regular_file(dump_path, error)) {
        std::filesystem::rename(dump_path, partial, error);
        finished = !error;
      }
      created = SafetensorsWriter::Continue(dump_path, n_tensors, tensor, metadata, resume_at.lines * hooks.size(),
                                            hooks.size());
      if (!created.ok() && finished) std::filesystem::rename(partial, dump_path, error);  // left as it was
      if (created.ok() && (*created)->written() / hooks.size() < resume_at.lines) {
        const size_t lines_with_hooks = (*created)->written() / hooks.size();
        ASSIGN_OR_RETURN(resume_at.bytes, BytesOfLines(output, lines_with_hooks));
        std::fprintf(stderr, "sae-extract: %s holds the hooks of %zu of the %zu lines %s holds; the rest are redone\n",
                     partial.c_str(), lines_with_hooks, resume_at.lines, output.c_str());
        resume_at.lines = lines_with_hooks;
      }
      if (absl::IsNotFound(created.status())) {
        return absl::FailedPreconditionError(
            absl::StrCat("--resume with --dump-hooks: ", created.status().message(),
                         "; the stopped run's hook file is needed to continue (or run without --resume)"));
      }
    }
    if (!created.ok()) return Prefixed("--dump-hooks ", created.status());
    hooks_out = *std::move(created);
    // A failed run leaves F.partial, as it leaves the lines it wrote, for --resume.
    hooks_out->set_keep_partial(true);
  }
  if (resume) {
    if (resume_at.lines > 0) {
      std::error_code error;
      std::filesystem::resize_file(output, resume_at.bytes, error);  // drops a torn last line
      if (error) return absl::PermissionDeniedError(absl::StrCat(output, ": cannot truncate: ", error.message()));
    }
    std::fprintf(stderr, "sae-extract: resuming after the %zu lines %s holds\n", resume_at.lines, output.c_str());
  }

  std::ofstream out(output, std::ios::binary | (resume_at.lines > 0 ? std::ios::app : std::ios::trunc));
  if (!out) return absl::PermissionDeniedError(absl::StrCat(output, ": cannot open the output file"));
  const bool progress = isatty(STDERR_FILENO) == 1;

  // Lines are read from the input as the batches reach them; only the lines
  // of the batch being run (and a long line's windows still to run) are held.
  shape.capture_hooks = dump;
  const int batch_tokens = std::max(1, absl::GetFlag(FLAGS_batch_tokens));
  std::map<size_t, Record> open;           // lines read, not yet written
  std::deque<Piece> queue;                 // their windows not yet run
  std::map<size_t, SequenceResult> lines;  // lines with windows run, not yet written
  size_t next = resume_at.lines;           // the next line to read
  size_t written = resume_at.lines;
  while (written < n_records) {
    // Pack consecutive pieces up to the token budget (at least one).
    std::vector<Piece> batch;
    size_t n_tokens = 0;
    while (true) {
      if (queue.empty()) {
        if (next == n_records) break;
        absl::StatusOr<Record> record = records.Get(next);
        if (!record.ok()) {
          if (batch.empty()) return record.status();
          break;  // the lines before are run and written first (the next batch fails)
        }
        for (Piece& piece : PiecesOf(*record, next, shape)) queue.push_back(piece);
        open.emplace(next++, *std::move(record));
      }
      const size_t size = queue.front().window.n_tokens();
      if (!batch.empty() && n_tokens + size > static_cast<size_t>(batch_tokens)) break;
      n_tokens += size;
      batch.push_back(queue.front());
      queue.pop_front();
    }
    const std::string lines_run = absl::StrCat(input, ":", records.line_number(batch.front().record), "-",
                                               records.line_number(batch.back().record));
    watchdog.Begin(absl::StrCat(lines_run, " (", output, " holds the ", written, " lines before",
                                "; --resume continues from there)"));
    const absl::Status ran = RunPieces(*engine, open, batch, shape, &lines);
    watchdog.End();
    if (!ran.ok()) return absl::Status(ran.code(), absl::StrCat(lines_run, ": ", ran.message()));
    // Every line before the next piece's has all its windows.
    const size_t complete = queue.empty() ? next : queue.front().record;
    for (; written < complete; ++written) {
      const SequenceResult& result = lines[written];
      out << RecordToJson(open.at(written), result, *engine, shape.sae_indices).dump() << "\n";
      if (dump) {
        for (const auto& [hook, values] : result.hooks) {
          RETURN_IF_ERROR(
              hooks_out->Append(hook_tensor_name(hook, written), values.data(), values.size() * sizeof(float)));
        }
      }
      lines.erase(written);
      open.erase(written);
    }
    out.flush();  // whole lines on disk after every batch, should a later one hang
    if (!out) return absl::DataLossError(absl::StrCat(output, ": write failed"));
    if (dump) RETURN_IF_ERROR(hooks_out->Flush());
    if (progress) ShowProgress(written, n_records);
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(output, ": write failed"));
  if (dump) RETURN_IF_ERROR(hooks_out->Finish());
  std::fprintf(
      stderr, "sae-extract: %zu lines -> %s%s%s\n", n_records, output.c_str(),
      resume ? absl::StrCat(" (", resume_at.lines, " kept, ", n_records - resume_at.lines, " appended)").c_str() : "",
      dump ? absl::StrCat(", hooks -> ", dump_path).c_str() : "");
  return absl::OkStatus();
}

}  // namespace
}  // namespace sae

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Extracts SAE features offline.\n  sae-extract --model DIR --sae DIR [--sae DIR ...] --input IN.jsonl "
      "--output OUT.jsonl [--k K] [--dump-hooks F.safetensors] [--demo] [--resume]");
  std::vector<std::string> args = sae::PrepareArgs(argc, argv, {"sae"});
  std::vector<char*> merged_argv = sae::ToArgv(args);
  std::vector<char*> positional = absl::ParseCommandLine(static_cast<int>(args.size()), merged_argv.data());
  if (positional.size() > 1) {
    std::fprintf(stderr, "sae-extract: unexpected argument \"%s\" (see --help)\n", positional[1]);
    return 2;
  }
  absl::Status status = sae::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "sae-extract: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
