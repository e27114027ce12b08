// Device helpers shared by the kernel headers.
#ifndef SAE_CORE_CUDA_COMMON_CUH_
#define SAE_CORE_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda/launchers.h"

// Kernels are launched, and dynamic shared memory declared, through these
// macros: the CPU emulator that tests the kernels (tests/cuda_emu) compiles
// the same headers with the host compiler and defines its own versions.
#ifndef SAE_KERNEL_LAUNCH
#define SAE_KERNEL_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define SAE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace sae {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n items: enough blocks to fill the
// device many times over, never more than the items need.
inline unsigned GridFor(int64_t n, int threads) {
  const int64_t blocks = CeilDiv(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum over the block, returned to every thread. `scratch` holds >= 32 floats;
// the block size is a multiple of 32.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < n_warps; ++w) total += scratch[w];  // same order in every thread: same result
  __syncthreads();                                        // scratch may be reused right after
  return total;
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_COMMON_CUH_
