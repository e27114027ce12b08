// RMSNorm: one block per row. Two reads of the row (sum of squares, then
// scale) beat staging it in shared memory for d = 4096: the second read hits L1/L2.
#ifndef SAE_CORE_CUDA_RMSNORM_CUH_
#define SAE_CORE_CUDA_RMSNORM_CUH_

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

constexpr int kRmsNormThreads = 256;

// ---- kernels ----

// out may alias x: each thread reads x[c] before writing out[c], and the
// whole row was read by the sum before anything is written.
template <typename W>
__global__ void RmsNormKernel(const float* x, const W* __restrict__ weight, int64_t cols, float eps, float* out) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * cols;
  float* yr = out + blockIdx.x * cols;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
  ss = BlockSum(ss, scratch);
  // Same form as the CPU twin: 1 / sqrt(mean + eps), not the approximate rsqrtf.
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float w = weight != nullptr ? ToFloat(weight[c]) : 1.0f;
    yr[c] = xr[c] * inv * w;
  }
}

// ---- launchers ----

cudaError_t LaunchRmsNorm(const float* x, const void* weight, ElemType weight_type, int64_t rows, int64_t cols,
                          float eps, float* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows));
  switch (weight_type) {
    case ElemType::kF32:
      SAE_KERNEL_LAUNCH(RmsNormKernel<float>, grid, kRmsNormThreads, 0, stream)
      (x, static_cast<const float*>(weight), cols, eps, out);
      break;
    case ElemType::kBF16:
      SAE_KERNEL_LAUNCH(RmsNormKernel<__nv_bfloat16>, grid, kRmsNormThreads, 0, stream)
      (x, static_cast<const __nv_bfloat16*>(weight), cols, eps, out);
      break;
    case ElemType::kF16:
      SAE_KERNEL_LAUNCH(RmsNormKernel<__half>, grid, kRmsNormThreads, 0, stream)
      (x, static_cast<const __half*>(weight), cols, eps, out);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_RMSNORM_CUH_
