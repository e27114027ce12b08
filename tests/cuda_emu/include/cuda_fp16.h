// Emulator stand-in for <cuda_fp16.h>: the IEEE binary16 storage type and
// its widening to float (exact; subnormals, infinities and NaN included).
#ifndef SAE_TESTS_CUDA_EMU_CUDA_FP16_H_
#define SAE_TESTS_CUDA_EMU_CUDA_FP16_H_

#include <cmath>
#include <cstdint>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const int sign = (h.bits >> 15) & 1, exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

#endif  // SAE_TESTS_CUDA_EMU_CUDA_FP16_H_
