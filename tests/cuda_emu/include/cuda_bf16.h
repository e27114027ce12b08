// Emulator stand-in for <cuda_bf16.h>: the bfloat16 storage type and the
// conversions the kernels use (round to nearest even, NaN kept quiet).
#ifndef SAE_TESTS_CUDA_EMU_CUDA_BF16_H_
#define SAE_TESTS_CUDA_EMU_CUDA_BF16_H_

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

#endif  // SAE_TESTS_CUDA_EMU_CUDA_BF16_H_
