#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace sae {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// Guards against absurd headers (a corrupt length field) before allocating.
constexpr uint64_t kMaxHeaderBytes = kMaxSafetensorsHeaderBytes;

absl::Status FileError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

}  // namespace

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string HostTensor::DebugString() const {
  return absl::StrCat(DTypeName(dtype), "[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return FileError(path, "cannot stat");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return FileError(path, absl::StrCat("file is ", size, " bytes, too short for a safetensors header"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return FileError(path, absl::StrCat("mmap failed: ", std::strerror(errno)));

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = size;

  const auto* bytes = static_cast<const uint8_t*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8) {
    return FileError(path, absl::StrCat("header length ", header_len, " exceeds the file size ", size));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  // A repeated tensor name would silently keep one of its entries: refused.
  std::set<std::string> keys;
  std::string repeated;
  const json::parser_callback_t note_keys = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && !keys.insert(parsed.get<std::string>()).second &&
        repeated.empty()) {
      repeated = parsed.get<std::string>();
    }
    return true;
  };
  json header = json::parse(header_begin, header_begin + header_len, note_keys, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return FileError(path, "header is not a JSON object");
  }
  if (!repeated.empty()) return FileError(path, absl::StrCat("tensor \"", repeated, "\" appears twice in the header"));
  const uint8_t* data_begin = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  std::vector<std::pair<uint64_t, uint64_t>> spans;  // data_offsets of every tensor

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return FileError(path, "__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (m.value().is_string()) file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor \"", name, "\"");
    if (!entry.is_object()) return FileError(path, absl::StrCat(where, " is not an object"));
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) return FileError(path, absl::StrCat(where, ": missing field \"dtype\""));
    if (sh == entry.end() || !sh->is_array()) return FileError(path, absl::StrCat(where, ": missing field \"shape\""));
    if (off == entry.end() || !off->is_array() || off->size() != 2) {
      return FileError(path, absl::StrCat(where, ": field \"data_offsets\" must be [begin, end]"));
    }
    auto dtype = ParseDType(dt->get<std::string>());
    if (!dtype.ok()) return FileError(path, absl::StrCat(where, ": field \"dtype\": ", dtype.status().message()));
    HostTensor t;
    t.dtype = *dtype;
    // The element count is kept below what the data section could hold, so
    // neither it nor the byte count can overflow.
    uint64_t elems = 1;
    bool empty = false;
    for (const json& d : *sh) {
      if (!d.is_number_unsigned())
        return FileError(path, absl::StrCat(where, ": field \"shape\" has a non-integer entry"));
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 53)) return FileError(path, absl::StrCat(where, ": field \"shape\" has ", dim));
      t.shape.push_back(static_cast<int64_t>(dim));
      empty = empty || dim == 0;
      if (!empty && elems > data_size / dim) {
        return FileError(path, absl::StrCat(where, ": field \"shape\" [", absl::StrJoin(t.shape, ", "),
                                            ", ...] needs more bytes than the ", data_size, "-byte data section"));
      }
      if (!empty) elems *= dim;
    }
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
      return FileError(path, absl::StrCat(where, ": field \"data_offsets\" must be non-negative integers"));
    }
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return FileError(path, absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                                          "] fall outside the data section of ", data_size, " bytes"));
    }
    if (end - begin != t.nbytes()) {
      return FileError(path, absl::StrCat(where, ": data_offsets span ", end - begin, " bytes but ", t.DebugString(),
                                          " needs ", t.nbytes()));
    }
    t.data = data_begin + begin;
    file->tensors_.emplace(name, std::move(t));
    spans.emplace_back(begin, end);
  }
  // The tensors tile the data section: no byte shared, none left over.
  std::sort(spans.begin(), spans.end());
  uint64_t covered = 0;
  for (const auto& [begin, end] : spans) {
    if (begin != covered) {
      return FileError(path, absl::StrCat("data_offsets: ", begin < covered ? "tensors overlap" : "a gap", " at byte ",
                                          std::min(begin, covered), " of the data section"));
    }
    covered = end;
  }
  if (covered != data_size) {
    return FileError(path, absl::StrCat("data_offsets: the tensors end at byte ", covered, " of a ", data_size,
                                        "-byte data section"));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::Open(const std::string& path) {
  auto store = std::make_unique<TensorStore>();
  store->origin_ = path;
  std::vector<std::string> files;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const fs::path index_path = fs::path(path) / "model.safetensors.index.json";
    if (fs::exists(index_path, ec)) {
      ASSIGN_OR_RETURN(const std::string text, ReadFileToString(index_path.string()));
      json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (index.is_discarded() || !index.is_object()) {
        return FileError(index_path.string(), "not valid JSON");
      }
      auto wm = index.find("weight_map");
      if (wm == index.end() || !wm->is_object()) {
        return FileError(index_path.string(), "missing field \"weight_map\"");
      }
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string()) {
          return FileError(index_path.string(), absl::StrCat("weight_map[\"", it.key(), "\"] is not a file name"));
        }
        std::string f = (fs::path(path) / it.value().get<std::string>()).string();
        if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
      }
    } else {
      for (const auto& entry : fs::directory_iterator(path, ec)) {
        if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
      }
      std::sort(files.begin(), files.end());
    }
    if (files.empty()) return absl::NotFoundError(absl::StrCat(path, ": no .safetensors files"));
  } else {
    files.push_back(path);
  }
  for (const std::string& f : files) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(f));
    for (const auto& [name, t] : file->tensors()) {
      auto [it, inserted] = store->index_.emplace(name, std::make_pair(file.get(), t));
      if (!inserted) {
        return FileError(f, absl::StrCat("tensor \"", name, "\" also appears in ", it->second.first->path()));
      }
    }
    store->files_.push_back(std::move(file));
  }
  return store;
}

absl::StatusOr<HostTensor> TensorStore::Get(absl::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(origin_, ": missing tensor \"", name, "\""));
  }
  return it->second.second;
}

absl::StatusOr<HostTensor> TensorStore::GetWithShape(absl::string_view name, const std::vector<int64_t>& shape) const {
  ASSIGN_OR_RETURN(HostTensor t, Get(name));
  if (t.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": tensor \"", name, "\" has shape [",
                                                   absl::StrJoin(t.shape, ", "), "], expected [",
                                                   absl::StrJoin(shape, ", "), "]"));
  }
  if (t.dtype != DType::kF32 && t.dtype != DType::kBF16 && t.dtype != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat(FileOf(name), ": tensor \"", name, "\" has dtype ",
                                                   DTypeName(t.dtype), "; weights must be F32, BF16 or F16"));
  }
  return t;
}

bool TensorStore::Contains(absl::string_view name) const { return index_.find(name) != index_.end(); }

std::string TensorStore::FileOf(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? origin_ : it->second.first->path();
}

uint64_t TensorSpec::nbytes() const {
  uint64_t n = DTypeSize(dtype);
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, const std::vector<TensorSpec>& tensors,
    const std::map<std::string, std::string>& metadata) {
  return Create(
      path, tensors.size(), [&tensors](size_t i) { return tensors[i]; }, metadata);
}

absl::StatusOr<SafetensorsWriter::Layout> SafetensorsWriter::MakeLayout(
    const std::string& path, size_t n_tensors, absl::FunctionRef<TensorSpec(size_t)> tensor,
    const std::map<std::string, std::string>& metadata) {
  // The header is built as text, a tensor at a time: a JSON tree of a few
  // hundred thousand entries would cost far more memory than the text.
  Layout layout;
  std::string& header = layout.header;
  header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + json(metadata).dump();
  std::set<std::string, std::less<>> names;
  uint64_t offset = 0;
  for (size_t i = 0; i < n_tensors; ++i) {
    const TensorSpec t = tensor(i);
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor name \"", t.name, "\" is ", t.name.empty() ? "empty" : "reserved or repeated"));
    }
    const uint64_t n = t.nbytes();
    if (header.size() > 1) header += ",";
    absl::StrAppend(&header, json(t.name).dump(), ":{\"dtype\":\"", DTypeName(t.dtype),
                    "\",\"shape\":", json(t.shape).dump(), ",\"data_offsets\":[", offset, ",", offset + n, "]}");
    if (header.size() > kMaxSafetensorsHeaderBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": the header of ", n_tensors, " tensors would pass the ", kMaxSafetensorsHeaderBytes >> 20,
          " MiB safetensors readers accept (at tensor ", layout.order.size() + 1, ", \"", t.name, "\")"));
    }
    offset += n;
    layout.order.emplace_back(t.name, n);
  }
  header += "}";
  while ((header.size() + 8) % 8 != 0) header.push_back(' ');  // keep tensor data aligned
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xff);
  header.insert(0, prefix);
  return layout;
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, size_t n_tensors, absl::FunctionRef<TensorSpec(size_t)> tensor,
    const std::map<std::string, std::string>& metadata) {
  ASSIGN_OR_RETURN(Layout layout, MakeLayout(path, n_tensors, tensor, metadata));
  std::unique_ptr<SafetensorsWriter> writer(new SafetensorsWriter(path, std::move(layout.order)));
  errno = 0;
  writer->out_.open(path + ".partial", std::ios::binary | std::ios::trunc);
  if (!writer->out_) {
    return absl::PermissionDeniedError(
        absl::StrCat(path, ".partial: cannot create file", errno != 0 ? absl::StrCat(": ", std::strerror(errno)) : ""));
  }
  writer->out_.write(layout.header.data(), static_cast<std::streamsize>(layout.header.size()));
  if (!writer->out_) return absl::DataLossError(absl::StrCat(path, ".partial: write failed"));
  return writer;
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Continue(
    const std::string& path, size_t n_tensors, absl::FunctionRef<TensorSpec(size_t)> tensor,
    const std::map<std::string, std::string>& metadata, size_t max_tensors, size_t multiple_of) {
  ASSIGN_OR_RETURN(Layout layout, MakeLayout(path, n_tensors, tensor, metadata));
  const std::string partial = path + ".partial";
  std::error_code error;
  const fs::file_status status = fs::status(partial, error);
  if (status.type() == fs::file_type::not_found) return absl::NotFoundError(absl::StrCat(partial, ": not found"));
  if (status.type() != fs::file_type::regular) {
    return absl::FailedPreconditionError(absl::StrCat(partial, ": not a regular file"));
  }
  const uint64_t size = fs::file_size(partial, error);
  std::ifstream in(partial, std::ios::binary);
  if (!in || error) return absl::PermissionDeniedError(absl::StrCat(partial, ": cannot read it"));
  std::string header(static_cast<size_t>(std::min<uint64_t>(size, layout.header.size())), '\0');
  in.read(header.data(), static_cast<std::streamsize>(header.size()));
  if (!in) return absl::DataLossError(absl::StrCat(partial, ": read failed"));
  if (header != layout.header) {
    return absl::FailedPreconditionError(absl::StrCat(
        partial, ": ",
        header.size() < layout.header.size() ? "shorter than the header this run writes"
                                             : "its header is not the one this run writes (other tensors or shapes)"));
  }
  in.close();
  // The tensors it holds whole, at most max_tensors, in whole multiples.
  uint64_t end = layout.header.size();
  size_t whole = 0;
  while (whole < std::min(max_tensors, layout.order.size()) && end + layout.order[whole].second <= size) {
    end += layout.order[whole++].second;
  }
  for (size_t keep = whole - whole % std::max<size_t>(multiple_of, 1); whole > keep;) {
    end -= layout.order[--whole].second;
  }
  fs::resize_file(partial, end, error);
  if (error) return absl::PermissionDeniedError(absl::StrCat(partial, ": cannot truncate: ", error.message()));
  std::unique_ptr<SafetensorsWriter> writer(new SafetensorsWriter(path, std::move(layout.order)));
  writer->next_ = whole;
  errno = 0;
  writer->out_.open(partial, std::ios::binary | std::ios::app);
  if (!writer->out_) {
    return absl::PermissionDeniedError(
        absl::StrCat(partial, ": cannot open it", errno != 0 ? absl::StrCat(": ", std::strerror(errno)) : ""));
  }
  return writer;
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<std::pair<std::string, uint64_t>> order)
    : path_(std::move(path)), order_(std::move(order)) {}

SafetensorsWriter::~SafetensorsWriter() {
  if (finished_ || keep_partial_) return;
  out_.close();
  std::error_code error;
  fs::remove(path_ + ".partial", error);
}

absl::Status SafetensorsWriter::Append(absl::string_view name, const void* data, uint64_t nbytes) {
  if (next_ == order_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": tensor \"", name, "\" written after all ", order_.size(), " declared ones"));
  }
  const auto& [expected, size] = order_[next_];
  if (name != expected || nbytes != size) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": tensor \"", name, "\" of ", nbytes,
                                                      " bytes written where \"", expected, "\" of ", size,
                                                      " bytes was declared"));
  }
  out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out_) return absl::DataLossError(absl::StrCat(path_, ".partial: write failed"));
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Flush() {
  out_.flush();
  if (!out_) return absl::DataLossError(absl::StrCat(path_, ".partial: write failed"));
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (next_ != order_.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": ", next_, " of the ", order_.size(), " declared tensors written"));
  }
  out_.close();
  if (!out_) return absl::DataLossError(absl::StrCat(path_, ".partial: write failed"));
  std::error_code error;
  fs::rename(path_ + ".partial", path_, error);
  if (error)
    return absl::PermissionDeniedError(absl::StrCat(path_, ": cannot rename from .partial: ", error.message()));
  finished_ = true;
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<const TensorToWrite*> sorted;
  for (const auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });
  std::vector<TensorSpec> specs;
  for (const TensorToWrite* t : sorted) {
    specs.push_back({t->name, t->dtype, t->shape});
    if (specs.back().nbytes() != t->bytes.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t->name, ": ", t->bytes.size(),
                                                     " bytes for a shape needing ", specs.back().nbytes()));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer, SafetensorsWriter::Create(path, specs, metadata));
  for (const TensorToWrite* t : sorted) RETURN_IF_ERROR(writer->Append(t->name, t->bytes.data(), t->bytes.size()));
  return writer->Finish();
}

TensorToWrite MakeTensor(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<float>& values) {
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.bytes.resize(values.size() * DTypeSize(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    switch (dtype) {
      case DType::kF32:
        std::memcpy(&t.bytes[i * 4], &values[i], 4);
        break;
      case DType::kBF16: {
        uint16_t v = F32ToBf16(values[i]);
        std::memcpy(&t.bytes[i * 2], &v, 2);
        break;
      }
      case DType::kF16: {
        uint16_t v = F32ToF16(values[i]);
        std::memcpy(&t.bytes[i * 2], &v, 2);
        break;
      }
      case DType::kI32: {
        int32_t v = static_cast<int32_t>(values[i]);
        std::memcpy(&t.bytes[i * 4], &v, 4);
        break;
      }
    }
  }
  return t;
}

}  // namespace sae
