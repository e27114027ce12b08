// Llama rotary embedding, half-split ("rotate_half") layout, in place.
// The angle is float(position) * inv_freq[j] in fp32 and sin/cos are the
// precise sincosf (this file must never be built with --use_fast_math):
// at position ~100k the angle is ~1e5 rad and __sinf's range reduction is
// off by whole percent, which would corrupt long-context activations.
#ifndef SAE_CORE_CUDA_ROPE_CUH_
#define SAE_CORE_CUDA_ROPE_CUH_

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

constexpr int kRopeThreads = 256;

// ---- kernels ----

// One thread per (token, head, pair j): rotates (x[j], x[j + half]).
__global__ void RopeKernel(float* __restrict__ x, int64_t n, int n_heads, int head_dim,
                           const int32_t* __restrict__ positions, const float* __restrict__ inv_freq) {
  const int half = head_dim / 2;
  const int64_t total = n * n_heads * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % half);
    const int64_t th = i / half;
    const int h = static_cast<int>(th % n_heads);
    const int64_t t = th / n_heads;
    const float angle = static_cast<float>(positions[t]) * inv_freq[j];
    float s, c;
    sincosf(angle, &s, &c);
    float* v = x + t * n_heads * head_dim + static_cast<int64_t>(h) * head_dim;
    const float a = v[j], b = v[j + half];
    v[j] = a * c - b * s;
    v[j + half] = b * c + a * s;
  }
}

// ---- launchers ----

cudaError_t LaunchRope(float* x, int64_t n, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
                       cudaStream_t stream) {
  const int64_t total = n * n_heads * (head_dim / 2);
  if (total == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(RopeKernel, GridFor(total, kRopeThreads), kRopeThreads, 0, stream)
  (x, n, n_heads, head_dim, positions, inv_freq);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_ROPE_CUH_
