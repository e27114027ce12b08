// Order-preserving keys and packed (key, index) candidates for the SAE top-k
// kernels (sae_topk.cuh, sae_rescore.cuh): device helpers only, so both
// translation units can include them.
#ifndef SAE_CORE_CUDA_SAE_KEYS_CUH_
#define SAE_CORE_CUDA_SAE_KEYS_CUH_

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

__device__ __forceinline__ uint32_t OrderedKey(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float KeyToFloat(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Larger packed value = larger key, or the same key and a lower index.
__device__ __forceinline__ uint64_t PackCandidate(uint32_t key, int64_t index) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(index));
}

// Writes a row's top-k from sorted packed candidates: slots [0, n_out) get
// cand's (index, value), the rest of the k slots (-1, 0). Every thread of the
// block calls it.
__device__ __forceinline__ void WriteTopKRow(const uint64_t* cand, uint32_t n_out, int k, int32_t* out_idx,
                                             float* out_val) {
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    if (static_cast<uint32_t>(j) < n_out) {
      const uint64_t c = cand[j];
      out_idx[j] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(c & 0xffffffffu));
      out_val[j] = KeyToFloat(static_cast<uint32_t>(c >> 32));
    } else {
      out_idx[j] = -1;
      out_val[j] = 0.0f;
    }
  }
}

// Sorts cand[0, n) descending in place (packed candidates: key desc, index
// asc), zero padding it to a power of two (0 sorts last: key 0 is a negative
// NaN, never active); the buffer must hold that power of two. Every thread of
// the block calls it; it ends with a barrier.
__device__ __forceinline__ void BlockSortCandidatesDesc(uint64_t* cand, uint32_t n) {
  const uint32_t tid = threadIdx.x, n_threads = blockDim.x;
  uint32_t n_pow2 = 1;
  while (n_pow2 < n) n_pow2 <<= 1;
  for (uint32_t i = n + tid; i < n_pow2; i += n_threads) cand[i] = 0;
  __syncthreads();
  for (uint32_t size = 2; size <= n_pow2; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t i = tid; i < n_pow2; i += n_threads) {
        const uint32_t j = i ^ stride;
        if (j > i) {
          const uint64_t a = cand[i], b = cand[j];
          const bool descending = (i & size) == 0;
          if (descending ? (a < b) : (a > b)) {
            cand[i] = b;
            cand[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The threshold lowered by a margin, with slack for rounding the subtraction
// itself: an exact value above `threshold` has an approximate value above
// this when the margin bounds their difference.
__device__ __forceinline__ float LoweredThreshold(float threshold, float margin) {
  return threshold - margin - (fabsf(threshold) + margin) * (1.0f / 1048576.0f);
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_SAE_KEYS_CUH_
