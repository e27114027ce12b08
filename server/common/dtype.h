// Element types of tensors on disk and in backend memory, and the scalar
// conversions between them.
#ifndef SAE_COMMON_DTYPE_H_
#define SAE_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sae {

enum class DType : uint8_t { kF32, kBF16, kF16, kI32 };

size_t DTypeSize(DType dtype);
absl::string_view DTypeName(DType dtype);  // safetensors spelling: "F32", "BF16", ...
absl::StatusOr<DType> ParseDType(absl::string_view name);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToF32(uint16_t v);
uint16_t F32ToF16(float f);

// Converts `n` elements of `src` (of type `dtype`) to float.
void ConvertToF32(const void* src, DType dtype, size_t n, float* dst);

}  // namespace sae

#endif  // SAE_COMMON_DTYPE_H_
