// Elementwise ops: embedding gather, dtype conversion (incl. the bf16 split
// used to feed fp32 activations to bf16 tensor-core GEMMs), SiLU*up and the
// residual add. All are memory-bound one-pass grid-stride loops: consecutive
// threads touch consecutive elements, so every access is coalesced.
#ifndef SAE_CORE_CUDA_ELEMENTWISE_CUH_
#define SAE_CORE_CUDA_ELEMENTWISE_CUH_

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

constexpr int kElementwiseThreads = 256;

// ---- kernels ----

// One thread per output element. A bad id cannot return a status from here,
// so it writes zeros and raises the error word the host checks at read-back.
template <typename T>
__global__ void EmbedKernel(const T* __restrict__ table, int64_t vocab, int64_t d, const int32_t* __restrict__ ids,
                            int64_t n, float* __restrict__ out, int* error_flag) {
  const int64_t total = n * d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / d, c = i - t * d;
    const int32_t id = ids[t];
    if (id < 0 || id >= vocab) {
      out[i] = 0.0f;
      if (c == 0) *error_flag = kDeviceErrorBadTokenId;
      continue;
    }
    out[i] = ToFloat(table[static_cast<int64_t>(id) * d + c]);
  }
}

// Part p holds Bf16Part(x - parts < p): 1 part is plain bf16 rounding (8
// bits of mantissa), 2 parts carry 16 bits, 3 parts all 24 bits of the fp32
// value. An inf or NaN x is all in part 0 (the rest is 0, not inf - inf), so
// the summed part products are what x itself gives.
__global__ void SplitToBf16Kernel(const float* __restrict__ x, int64_t n, int n_parts,
                                  __nv_bfloat16* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float rest = x[i];
    for (int p = 0; p < n_parts; ++p) {
      const __nv_bfloat16 h = Bf16Part(rest);
      out[p * n + i] = h;
      rest = fabsf(rest) < INFINITY ? rest - __bfloat162float(h) : 0.0f;
    }
  }
}

// Sums GEMM part products (see SplitToBf16Kernel), smallest part first.
__global__ void SumPartsKernel(const float* __restrict__ parts, int n_parts, int64_t n, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = parts[(n_parts - 1) * n + i];
    for (int p = n_parts - 2; p >= 0; --p) s += parts[p * n + i];
    out[i] = s;
  }
}

template <typename T>
__global__ void ToF32Kernel(const T* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = ToFloat(src[i]);
  }
}

// Same expression as the CPU twin: g / (1 + exp(-g)) * u, precise expf.
template <typename O>
__global__ void SiluMulKernel(const float* gate, const float* up, O* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    StoreAs(&out[i], g / (1.0f + expf(-g)) * up[i]);
  }
}

// No __restrict__: out may alias a (the residual update is in place).
__global__ void AddKernel(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = a[i] + b[i];
  }
}

// ---- launchers ----

// Raises the error word when an id is outside [0, limit).
__global__ void CheckIdsKernel(const int32_t* __restrict__ ids, int64_t n, int64_t limit, int* error_flag) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (ids[i] < 0 || ids[i] >= limit) *error_flag = kDeviceErrorBadFeatureId;
  }
}

cudaError_t LaunchCheckIds(const int32_t* ids, int64_t n, int64_t limit, int* error_flag, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(CheckIdsKernel, GridFor(n, kElementwiseThreads), kElementwiseThreads, 0, stream)
  (ids, n, limit, error_flag);
  return cudaGetLastError();
}

cudaError_t LaunchEmbed(const void* table, ElemType table_type, int64_t vocab, int64_t d, const int32_t* ids, int64_t n,
                        float* out, int* error_flag, cudaStream_t stream) {
  if (n * d == 0) return cudaSuccess;
  const unsigned grid = GridFor(n * d, kElementwiseThreads);
  switch (table_type) {
    case ElemType::kF32:
      SAE_KERNEL_LAUNCH(EmbedKernel<float>, grid, kElementwiseThreads, 0, stream)
      (static_cast<const float*>(table), vocab, d, ids, n, out, error_flag);
      break;
    case ElemType::kBF16:
      SAE_KERNEL_LAUNCH(EmbedKernel<__nv_bfloat16>, grid, kElementwiseThreads, 0, stream)
      (static_cast<const __nv_bfloat16*>(table), vocab, d, ids, n, out, error_flag);
      break;
    case ElemType::kF16:
      SAE_KERNEL_LAUNCH(EmbedKernel<__half>, grid, kElementwiseThreads, 0, stream)
      (static_cast<const __half*>(table), vocab, d, ids, n, out, error_flag);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchSplitToBf16(const float* x, int64_t n_elems, int n_parts, void* out, cudaStream_t stream) {
  if (n_elems == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(SplitToBf16Kernel, GridFor(n_elems, kElementwiseThreads), kElementwiseThreads, 0, stream)
  (x, n_elems, n_parts, static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

cudaError_t LaunchSumParts(const float* parts, int n_parts, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(SumPartsKernel, GridFor(n, kElementwiseThreads), kElementwiseThreads, 0, stream)
  (parts, n_parts, n, out);
  return cudaGetLastError();
}

cudaError_t LaunchToF32(const void* src, ElemType type, int64_t n, float* dst, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = GridFor(n, kElementwiseThreads);
  switch (type) {
    case ElemType::kF32:
      return cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream);
    case ElemType::kBF16:
      SAE_KERNEL_LAUNCH(ToF32Kernel<__nv_bfloat16>, grid, kElementwiseThreads, 0, stream)
      (static_cast<const __nv_bfloat16*>(src), n, dst);
      break;
    case ElemType::kF16:
      SAE_KERNEL_LAUNCH(ToF32Kernel<__half>, grid, kElementwiseThreads, 0, stream)
      (static_cast<const __half*>(src), n, dst);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(const float* gate, const float* up, void* out, ElemType out_type, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = GridFor(n, kElementwiseThreads);
  switch (out_type) {
    case ElemType::kF32:
      SAE_KERNEL_LAUNCH(SiluMulKernel<float>, grid, kElementwiseThreads, 0, stream)
      (gate, up, static_cast<float*>(out), n);
      return cudaGetLastError();
    case ElemType::kBF16:
      SAE_KERNEL_LAUNCH(SiluMulKernel<__nv_bfloat16>, grid, kElementwiseThreads, 0, stream)
      (gate, up, static_cast<__nv_bfloat16*>(out), n);
      return cudaGetLastError();
    case ElemType::kF16:
      break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchAdd(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(AddKernel, GridFor(n, kElementwiseThreads), kElementwiseThreads, 0, stream)(a, b, out, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_ELEMENTWISE_CUH_
