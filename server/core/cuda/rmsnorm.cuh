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
template <typename W, typename O>
__global__ void RmsNormKernel(const float* x, const W* __restrict__ weight, int64_t cols, float eps, O* out) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * cols;
  O* yr = out + blockIdx.x * cols;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
  ss = BlockSum(ss, scratch);
  // Same form as the CPU twin: 1 / sqrt(mean + eps), not the approximate rsqrtf.
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float w = weight != nullptr ? ToFloat(weight[c]) : 1.0f;
    StoreAs(&yr[c], xr[c] * inv * w);
  }
}

// ---- launchers ----

template <typename O>
cudaError_t LaunchRmsNormTo(const float* x, const void* weight, ElemType weight_type, int64_t rows, int64_t cols,
                            float eps, O* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  auto Launch = [&](auto* kernel, auto* w) {
    SAE_KERNEL_LAUNCH(kernel, grid, kRmsNormThreads, 0, stream)(x, w, cols, eps, out);
  };
  switch (weight_type) {
    case ElemType::kF32:
      Launch(RmsNormKernel<float, O>, static_cast<const float*>(weight));
      break;
    case ElemType::kBF16:
      Launch(RmsNormKernel<__nv_bfloat16, O>, static_cast<const __nv_bfloat16*>(weight));
      break;
    case ElemType::kF16:
      Launch(RmsNormKernel<__half, O>, static_cast<const __half*>(weight));
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const float* x, const void* weight, ElemType weight_type, int64_t rows, int64_t cols,
                          float eps, void* out, ElemType out_type, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  switch (out_type) {
    case ElemType::kF32:
      return LaunchRmsNormTo(x, weight, weight_type, rows, cols, eps, static_cast<float*>(out), stream);
    case ElemType::kBF16:
      return LaunchRmsNormTo(x, weight, weight_type, rows, cols, eps, static_cast<__nv_bfloat16*>(out), stream);
    case ElemType::kF16:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_RMSNORM_CUH_
