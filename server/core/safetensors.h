// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length, a JSON header
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the raw little-endian tensor bytes. Files are memory-mapped; tensors are
// views into the mapping, so loading copies nothing until a backend uploads.
#ifndef SAE_CORE_SAFETENSORS_H_
#define SAE_CORE_SAFETENSORS_H_

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"

namespace sae {

// A read-only view of one tensor's bytes (e.g. inside a mapped file).
struct HostTensor {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
  // "BF16[4096, 14336]"
  std::string DebugString() const;
};

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, HostTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, HostTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model folder: model.safetensors.index.json (sharded), or
// every *.safetensors file in the folder, or a single file path.
class TensorStore {
 public:
  static absl::StatusOr<std::unique_ptr<TensorStore>> Open(const std::string& path);

  // NOT_FOUND naming the tensor and the store when missing.
  absl::StatusOr<HostTensor> Get(absl::string_view name) const;
  // Get() plus a shape check; the error names the tensor, the file and both shapes.
  absl::StatusOr<HostTensor> GetWithShape(absl::string_view name, const std::vector<int64_t>& shape) const;
  bool Contains(absl::string_view name) const;
  // The file a tensor lives in (for error messages).
  std::string FileOf(absl::string_view name) const;
  size_t size() const { return index_.size(); }

 private:
  std::string origin_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, HostTensor>, std::less<>> index_;
};

// A tensor to write: bytes already in `dtype`.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// The largest header the reader accepts (as Hugging Face's safetensors,
// which refuses headers over 100 MB).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

// What a tensor will be, before its bytes exist.
struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

// Writes a .safetensors file whose tensors are all declared up front: the
// header goes out first, then each tensor's bytes in the declared order as
// they are produced, so a file larger than memory never sits in memory. The
// file is written as PATH.partial and renamed to PATH by Finish(); a writer
// destroyed before that removes the partial file (unless set_keep_partial).
class SafetensorsWriter {
 public:
  // INVALID_ARGUMENT for a repeated or empty name, or a header over
  // kMaxSafetensorsHeaderBytes (it names the tensor count); PERMISSION_DENIED
  // when PATH.partial cannot be created.
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, const std::vector<TensorSpec>& tensors,
      const std::map<std::string, std::string>& metadata = {});
  // The same for `n_tensors` tensors made one at a time by `tensor(i)`, so
  // millions of them are never all in memory (a header too large is refused
  // as soon as it is).
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, size_t n_tensors, absl::FunctionRef<TensorSpec(size_t)> tensor,
      const std::map<std::string, std::string>& metadata = {});
  // Continues PATH.partial, left by a writer of the same declaration that
  // stopped (a killed process, or one with keep_partial): its header must be
  // byte for byte the one these tensors make (FAILED_PRECONDITION otherwise;
  // NOT_FOUND without the file). Of the tensors it holds whole, the first
  // ones are kept, at most `max_tensors` and a multiple of `multiple_of`; the
  // bytes after them are cut off, and Append() goes on from there
  // (written() says where).
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Continue(const std::string& path, size_t n_tensors,
                                                                     absl::FunctionRef<TensorSpec(size_t)> tensor,
                                                                     const std::map<std::string, std::string>& metadata,
                                                                     size_t max_tensors, size_t multiple_of = 1);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The bytes of the next declared tensor; FAILED_PRECONDITION when its
  // name or size is not that tensor's, or every tensor is written.
  absl::Status Append(absl::string_view name, const void* data, uint64_t nbytes);
  // Hands what was appended so far to the file system.
  absl::Status Flush();
  // After the last tensor: flushes, closes and renames PATH.partial to PATH.
  absl::Status Finish();
  // Leave PATH.partial when destroyed before Finish(), for Continue().
  void set_keep_partial(bool keep) { keep_partial_ = keep; }
  // How many tensors the file holds.
  size_t written() const { return next_; }

 private:
  // The header (with its 8-byte length) and the tensors' names and sizes in
  // file order.
  struct Layout {
    std::string header;
    std::vector<std::pair<std::string, uint64_t>> order;
  };
  static absl::StatusOr<Layout> MakeLayout(const std::string& path, size_t n_tensors,
                                           absl::FunctionRef<TensorSpec(size_t)> tensor,
                                           const std::map<std::string, std::string>& metadata);
  SafetensorsWriter(std::string path, std::vector<std::pair<std::string, uint64_t>> order);

  std::string path_;
  std::vector<std::pair<std::string, uint64_t>> order_;  // name, bytes, in write order
  size_t next_ = 0;
  std::ofstream out_;
  bool finished_ = false;
  bool keep_partial_ = false;
};

// Writes a .safetensors file (tensors sorted by name, 8-byte aligned header).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Helpers to build TensorToWrite from float data, converting to `dtype`.
TensorToWrite MakeTensor(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<float>& values);

}  // namespace sae

#endif  // SAE_CORE_SAFETENSORS_H_
