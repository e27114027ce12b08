// Emulator stand-in for CUDA's <math_constants.h> (the constants used here).
#ifndef SAE_TESTS_CUDA_EMU_MATH_CONSTANTS_H_
#define SAE_TESTS_CUDA_EMU_MATH_CONSTANTS_H_

#include <limits>

#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())

#endif  // SAE_TESTS_CUDA_EMU_MATH_CONSTANTS_H_
