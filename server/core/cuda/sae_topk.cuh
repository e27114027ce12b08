// SAE encode epilogue fused with a per-token top-k, so only k (index, value)
// pairs per token ever leave the GPU. The pre-activations w_i . x come from a
// cuBLAS GEMM over a chunk of tokens (cuda_backend.cc), possibly as several
// partial products (the bf16 split of x); this kernel adds the parts, applies
// bias / scale / JumpReLU threshold, and selects.
//
// One block per token row. Selection is a radix select on order-preserving
// 32-bit keys of the values (larger value <=> larger key):
//   pass 0: histogram of the top 12 key bits (sign, exponent, 3 mantissa bits)
//           of the active features. If at most `cap` features are active
//           (JumpReLU SAEs: tens to hundreds of 131072), collect them all.
//   else find the bin holding the k-th largest; if the elements at or above
//           that bin fit in `cap`, collect them; otherwise refine the bin with
//           10 more bits (passes 1 and 2).
//   after 32 bits the k-th value K is exact; the rest are ties at K: collect
//           every key > K plus the first (by index) keys == K, so ties go to
//           the lower index exactly as on the CPU.
// Collected candidates (<= cap, in shared memory) are bitonic-sorted by
// (key desc, index asc) packed in one uint64, and the first k are written.
// Typical cost: 2 reads of the row (histogram + collect).
#ifndef SAE_CORE_CUDA_SAE_TOPK_CUH_
#define SAE_CORE_CUDA_SAE_TOPK_CUH_

#include "core/cuda/common.cuh"
#include "core/cuda/sae_keys.cuh"

namespace sae {
namespace cuda {

constexpr int kTopKThreads = 256;  // the bin-ownership split below assumes exactly this
constexpr int kTopKWarps = kTopKThreads / 32;

// ---- kernels ----

struct SaeRowParams {
  const float* pre;     // [n_parts, n_rows, d_sae]
  int64_t part_stride;  // n_rows * d_sae
  int n_parts;
  int64_t d_sae;
  const float* bias;    // [d_sae]
  const float* fscale;  // [d_sae] or nullptr
  float scale_in;
  float threshold;
  const float* margin;      // [n_rows] or nullptr: row r keeps values > threshold - margin[r]
  const int32_t* row_mask;  // [n_rows] or nullptr: rows with row_mask[r] == 0 are skipped
};

// The encoded value of feature i of one row (same expression as the CPU
// twin). Returns whether it is above `threshold` and its key.
__device__ __forceinline__ bool SaeValue(const SaeRowParams& p, float threshold, const float* row, int64_t i,
                                         uint32_t* key) {
  float h = row[(p.n_parts - 1) * p.part_stride + i];
  for (int part = p.n_parts - 2; part >= 0; --part) h += row[part * p.part_stride + i];  // small parts first
  float val = fmaf(p.scale_in, h, p.bias[i]);  // one rounding, on every backend
  if (p.fscale != nullptr) val *= p.fscale[i];
  if (val == 0.0f) val = 0.0f;  // -0 -> +0: equal values must get equal keys
  *key = OrderedKey(val);
  return val > threshold;  // NaN is never active
}

// Inclusive suffix sum over the block's threads (sum over threads >= tid).
__device__ __forceinline__ uint32_t BlockSuffixSum(uint32_t v, uint32_t* warp_tot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t o = __shfl_down_sync(kFullMask, v, off);
    if (lane + off < 32) v += o;
  }
  if (lane == 0) warp_tot[warp] = v;  // lane 0 holds its warp's total
  __syncthreads();
  uint32_t higher = 0;
  for (int w = warp + 1; w < kTopKWarps; ++w) higher += warp_tot[w];
  __syncthreads();
  return v + higher;
}

// cap: SaeTopKCandidateCap(k_keep); shared memory: SaeTopKSharedBytes(k_keep).
__global__ void __launch_bounds__(kTopKThreads)
    SaeTopKKernel(SaeRowParams p, int k_keep, int k, uint32_t cap, int32_t* __restrict__ out_idx,
                  float* __restrict__ out_val) {
  SAE_DYNAMIC_SHARED(uint64_t, smem_u64);
  uint64_t* cand = smem_u64;                                 // [cap]
  uint32_t* hist = reinterpret_cast<uint32_t*>(cand + cap);  // [kSaeTopKBins0]
  __shared__ uint32_t warp_tot[kTopKWarps];
  __shared__ uint32_t s_bin, s_above, s_total, s_count;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row_index = blockIdx.x;
  if (p.row_mask != nullptr && p.row_mask[row_index] == 0) return;  // block-uniform
  const float thr = p.margin != nullptr ? LoweredThreshold(p.threshold, p.margin[row_index]) : p.threshold;
  const float* row = p.pre + row_index * p.d_sae;
  const int64_t d_sae = p.d_sae;

  uint32_t prefix = 0;                             // known top bits of the k-th largest key
  int known_bits = 0;                              // how many
  uint32_t n_above = 0;                            // active keys above the prefix's range
  uint32_t k_rem = static_cast<uint32_t>(k_keep);  // still to find inside the prefix's range
  uint32_t lower_key = 0;
  bool collect = false;  // block-uniform: collect every active key >= lower_key

  for (int pass = 0; pass < 3 && k_keep > 0; ++pass) {
    const int bits = pass == 0 ? 12 : 10;
    const int shift = 32 - known_bits - bits;  // 20, 10, 0
    const uint32_t n_bins = 1u << bits;
    for (uint32_t b = tid; b < n_bins; b += kTopKThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t i = tid; i < d_sae; i += kTopKThreads) {
      uint32_t key;
      if (!SaeValue(p, thr, row, i, &key)) continue;
      if (known_bits > 0 && (key >> (32 - known_bits)) != prefix) continue;
      atomicAdd(&hist[(key >> shift) & (n_bins - 1)], 1u);
    }
    __syncthreads();
    // Thread t owns bins [t * per, (t + 1) * per); find the bin where the
    // count from the top reaches k_rem.
    const uint32_t per = n_bins / kTopKThreads;
    uint32_t local = 0;
    for (uint32_t b = 0; b < per; ++b) local += hist[tid * per + b];
    const uint32_t incl = BlockSuffixSum(local, warp_tot);
    const uint32_t excl = incl - local;
    if (tid == 0) s_total = incl;
    if (excl < k_rem && k_rem <= incl) {  // exactly one thread, when total >= k_rem
      uint32_t run = excl;
      for (int b = static_cast<int>(per) - 1; b >= 0; --b) {
        const uint32_t c = hist[tid * per + b];
        if (run + c >= k_rem) {
          s_bin = tid * per + b;
          s_above = run;
          break;
        }
        run += c;
      }
    }
    __syncthreads();
    if (pass == 0 && s_total <= cap) {  // few active features: take them all
      lower_key = 0;
      collect = true;
      break;
    }
    const uint32_t bin = s_bin, above = s_above, in_bin = hist[bin];
    known_bits += bits;
    prefix = (prefix << bits) | bin;
    if (n_above + above + in_bin <= cap) {
      lower_key = prefix << (32 - known_bits);  // known_bits < 32 here or shift 0
      collect = true;
      break;
    }
    n_above += above;
    k_rem -= above;
    __syncthreads();  // everyone has read hist / s_* before the next pass rewrites them
  }

  if (tid == 0) s_count = 0;
  __syncthreads();
  uint32_t n_cand = 0;
  if (k_keep == 0) {
    n_cand = 0;
  } else if (collect) {
    for (int64_t i = tid; i < d_sae; i += kTopKThreads) {
      uint32_t key;
      if (!SaeValue(p, thr, row, i, &key) || key < lower_key) continue;
      const uint32_t slot = atomicAdd(&s_count, 1u);
      if (slot < cap) cand[slot] = PackCandidate(key, i);
    }
    __syncthreads();
    n_cand = min(s_count, cap);
  } else {
    // prefix is now the exact k-th key K: n_above keys are > K (n_above < k_keep <= cap).
    for (int64_t i = tid; i < d_sae; i += kTopKThreads) {
      uint32_t key;
      if (!SaeValue(p, thr, row, i, &key) || key <= prefix) continue;
      const uint32_t slot = atomicAdd(&s_count, 1u);
      if (slot < cap) cand[slot] = PackCandidate(key, i);
    }
    __syncthreads();
    const uint32_t base = min(s_count, cap);
    // The first k_rem ties, in index order: ballot + prefix counts per 256-wide slab.
    uint32_t taken = 0;  // block-uniform
    for (int64_t i0 = 0; i0 < d_sae && taken < k_rem; i0 += kTopKThreads) {
      const int64_t i = i0 + tid;
      uint32_t key = 0;
      const bool tie = i < d_sae && SaeValue(p, thr, row, i, &key) && key == prefix;
      const unsigned ballot = __ballot_sync(kFullMask, tie);
      if (lane == 0) warp_tot[warp] = __popc(ballot);
      __syncthreads();
      uint32_t before = 0, slab = 0;
      for (int w = 0; w < kTopKWarps; ++w) {
        if (w < warp) before += warp_tot[w];
        slab += warp_tot[w];
      }
      const uint32_t rank = taken + before + __popc(ballot & ((1u << lane) - 1u));
      if (tie && rank < k_rem && base + rank < cap) cand[base + rank] = PackCandidate(key, i);
      taken += slab;
      __syncthreads();  // warp_tot is rewritten by the next slab
    }
    n_cand = min(base + min(taken, k_rem), cap);
  }

  BlockSortCandidatesDesc(cand, n_cand);

  WriteTopKRow(cand, min(n_cand, static_cast<uint32_t>(k_keep)), k, out_idx + row_index * k, out_val + row_index * k);
}

// ---- launchers ----

cudaError_t LaunchSaeTopK(const float* pre, int n_parts, int64_t n_rows, int64_t d_sae, const float* bias,
                          const float* feature_scale, float scale_in, float threshold, const float* margin,
                          const int32_t* row_mask, int k_keep, int k, int32_t* out_idx, float* out_val,
                          cudaStream_t stream) {
  if (n_rows == 0 || k == 0) return cudaSuccess;
  if (k_keep > kSaeTopKMaxK || k_keep > k || n_rows > 0x7fffffff || d_sae > 0x7fffffff) {
    return cudaErrorInvalidValue;  // (d_sae: the indices leave as int32)
  }
  // A larger candidate buffer than k lets pass 0 finish more rows (and all
  // JumpReLU rows with <= cap active features).
  const uint32_t cap = SaeTopKCandidateCap(k_keep);
  const size_t smem = SaeTopKSharedBytes(k_keep);
  cudaError_t err = RaiseSharedLimit(SaeTopKKernel, smem);
  if (err != cudaSuccess) return err;
  const SaeRowParams params{pre,           n_rows * d_sae, n_parts,   d_sae,  bias,
                            feature_scale, scale_in,       threshold, margin, row_mask};
  SAE_KERNEL_LAUNCH(SaeTopKKernel, static_cast<unsigned>(n_rows), kTopKThreads, smem, stream)
  (params, k_keep, k, cap, out_idx, out_val);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_SAE_TOPK_CUH_
