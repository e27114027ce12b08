// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length, a JSON header
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the raw little-endian tensor bytes. Files are memory-mapped; tensors are
// views into the mapping, so loading copies nothing until a backend uploads.
#ifndef SAE_CORE_SAFETENSORS_H_
#define SAE_CORE_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

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

// Writes a .safetensors file (tensors sorted by name, 8-byte aligned header).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Helpers to build TensorToWrite from float data, converting to `dtype`.
TensorToWrite MakeTensor(std::string name, DType dtype, std::vector<int64_t> shape, const std::vector<float>& values);

}  // namespace sae

#endif  // SAE_CORE_SAFETENSORS_H_
