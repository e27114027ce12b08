// Causal attention over packed variable-length sequences, flash-attention
// style: the [len, len] score matrix never exists; each block streams key/value
// tiles through shared memory and keeps an online softmax (running max m,
// running sum l) per query row, all in fp32.
//
// Work split, no padding waste: a query tile is 32 rows of ONE sequence and
// one query head. attention_tile_table computes on device how many tiles each
// sequence needs (prefix sums in tile_start), and block x of the grid finds its
// (sequence, tile) by binary search, so short and long sequences pack densely.
// GQA: query head h reads kv head h / (n_heads / n_kv_heads).
//
// Inside a block (4 warps x 8 query rows each): lane j scores key j of the
// current 32-key tile against the warp's 8 rows (q rows broadcast from shared
// memory, K rows padded to stride head_dim + 1 so the 32 lanes hit 32 banks),
// then lanes own output dims d = lane + 32 * i and accumulate P.V with the
// probability of key j broadcast by shuffle. Scores are pre-scaled by
// log2(e) / sqrt(head_dim) so the softmax is exp2f.
//
// This is the simple CUDA-core version (fp32 FMA); a tensor-core (mma.sync
// bf16) version is the next step if attention shows up in the profile.
#ifndef SAE_CORE_CUDA_ATTENTION_CUH_
#define SAE_CORE_CUDA_ATTENTION_CUH_

#include <math_constants.h>

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

constexpr int kAttnRowsPerBlock = 32;  // query rows per block (one sequence, one head)
constexpr int kAttnKeysPerTile = 32;   // keys per shared-memory tile: one per lane
constexpr int kAttnWarps = 4;
constexpr int kAttnRowsPerWarp = kAttnRowsPerBlock / kAttnWarps;
constexpr int kAttnTableThreads = 1024;

// ---- kernels ----

// One block. tile_start[s] = number of query tiles in sequences < s;
// tile_start[n_seqs] = total. A sequence with bad bounds counts as empty and
// raises the error word.
__global__ void AttentionTileTableKernel(const int32_t* __restrict__ seq_starts, int n_seqs, int max_seq_len,
                                         int64_t n_tokens, int32_t* __restrict__ tile_start, int* error_flag) {
  __shared__ int32_t scan[kAttnTableThreads];
  const int tid = threadIdx.x;
  const int per = (n_seqs + kAttnTableThreads - 1) / kAttnTableThreads;
  const int s0 = min(tid * per, n_seqs), s1 = min(s0 + per, n_seqs);
  auto tiles_of = [&](int s) -> int32_t {
    const int32_t begin = seq_starts[s], end = seq_starts[s + 1];
    const int32_t len = end - begin;
    if (begin < 0 || end > n_tokens || len < 0 || len > max_seq_len) {
      *error_flag = kDeviceErrorBadSeqStarts;
      return 0;
    }
    return (len + kAttnRowsPerBlock - 1) / kAttnRowsPerBlock;
  };
  int32_t local = 0;
  for (int s = s0; s < s1; ++s) local += tiles_of(s);
  if (tid == 0 && (seq_starts[0] != 0 || seq_starts[n_seqs] != n_tokens)) *error_flag = kDeviceErrorBadSeqStarts;
  scan[tid] = local;
  __syncthreads();
  for (int off = 1; off < kAttnTableThreads; off <<= 1) {  // inclusive Hillis-Steele scan
    const int32_t add = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  int32_t run = scan[tid] - local;
  for (int s = s0; s < s1; ++s) {
    tile_start[s] = run;
    run += tiles_of(s);
  }
  if (tid == kAttnTableThreads - 1) tile_start[n_seqs] = scan[tid];
}

// DPL = output dims per lane; handles any head_dim <= 32 * DPL.
template <int DPL>
__global__ void __launch_bounds__(kAttnWarps * 32)
    AttentionKernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                    const int32_t* __restrict__ seq_starts, const int32_t* __restrict__ tile_start, int n_seqs,
                    int n_heads, int n_kv_heads, int head_dim, float scale_log2, float* __restrict__ out) {
  constexpr int BQ = kAttnRowsPerBlock, BK = kAttnKeysPerTile, RPW = kAttnRowsPerWarp;
  SAE_DYNAMIC_SHARED(float, smem);
  const int hd = head_dim;
  float* sq = smem;                // [BQ][hd], pre-scaled
  float* sk = sq + BQ * hd;        // [BK][hd + 1]
  float* sv = sk + BK * (hd + 1);  // [BK][hd]

  const int tile = blockIdx.x;
  if (tile >= tile_start[n_seqs]) return;  // the grid is an upper bound on the tile count
  // Last s with tile_start[s] <= tile; invariant tile_start[lo] <= tile < tile_start[hi].
  int lo = 0, hi = n_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int s = lo;
  const int64_t seq_begin = seq_starts[s];
  const int len = seq_starts[s + 1] - seq_starts[s];
  const int n_tiles = tile_start[s + 1] - tile_start[s];
  // Tiles of a sequence run last-first: the late ones see the most keys, and
  // starting them first shortens the tail of the grid.
  const int q_tile = n_tiles - 1 - (tile - tile_start[s]);
  const int q_first = q_tile * BQ;  // first query row of the tile, within the sequence
  const int n_rows = min(BQ, len - q_first);
  const int kv_len = q_first + n_rows;  // keys [0, kv_len) are visible to some row
  const int h = blockIdx.y;
  const int kvh = h / (n_heads / n_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(n_heads) * hd, kv_stride = static_cast<int64_t>(n_kv_heads) * hd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int i = tid; i < BQ * hd; i += blockDim.x) {
    const int r = i / hd, d = i - r * hd;
    sq[i] = r < n_rows ? q[(seq_begin + q_first + r) * q_stride + static_cast<int64_t>(h) * hd + d] * scale_log2 : 0.0f;
  }

  float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = -CUDART_INF_F;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.0f;
  }

  for (int kt = 0; kt < kv_len; kt += BK) {
    __syncthreads();  // the previous tile is consumed (and sq is written, on the first pass)
    for (int i = tid; i < BK * hd; i += blockDim.x) {
      const int j = i / hd, d = i - j * hd;
      float kval = 0.0f, vval = 0.0f;
      if (kt + j < kv_len) {
        const int64_t off = (seq_begin + kt + j) * kv_stride + static_cast<int64_t>(kvh) * hd + d;
        kval = k[off];
        vval = v[off];
      }
      sk[j * (hd + 1) + d] = kval;
      sv[j * hd + d] = vval;
    }
    __syncthreads();

    // Scores of key kt + lane against the warp's rows.
    float p[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) p[r] = 0.0f;
    const float* krow = sk + lane * (hd + 1);
    const float* qrows = sq + warp * RPW * hd;
    for (int d = 0; d < hd; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) p[r] = fmaf(qrows[r * hd + d], kd, p[r]);
    }

    // Online softmax update; p becomes the (unnormalised) probability.
    const int key = kt + lane;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = warp * RPW + r;
      const int qi = q_first + row;
      // Warp-uniform: rows past the sequence end and tiles entirely in a
      // row's future are skipped, so m never sees an all -inf tile from -inf.
      if (row < n_rows && kt <= qi) {
        const float score = key <= qi ? p[r] : -CUDART_INF_F;
        const float m_new = fmaxf(m[r], WarpMax(score));
        const float corr = exp2f(m[r] - m_new);  // 0 on the first tile (m = -inf)
        const float prob = exp2f(score - m_new);
        l[r] = l[r] * corr + prob;  // per-lane partial sum; lanes are summed at the end
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[r][e] *= corr;
        m[r] = m_new;
        p[r] = prob;
      } else {
        p[r] = 0.0f;
      }
    }

    // acc[r][e] += sum_j P[r][j] * V[j][lane + 32 e]; P[r][j] lives in lane j.
    for (int j = 0; j < BK; ++j) {
      float vj[DPL];
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        const int d = lane + 32 * e;
        vj[e] = d < hd ? sv[j * hd + d] : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float pj = __shfl_sync(kFullMask, p[r], j);
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[r][e] = fmaf(pj, vj[e], acc[r][e]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = warp * RPW + r;
    if (row >= n_rows) continue;  // warp-uniform
    const float inv = 1.0f / WarpSum(l[r]);
    float* o = out + (seq_begin + q_first + row) * q_stride + static_cast<int64_t>(h) * hd;
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int d = lane + 32 * e;
      if (d < hd) o[d] = acc[r][e] * inv;
    }
  }
}

// ---- launchers ----

bool AttentionSupportsHeadDim(int head_dim) { return head_dim >= 1 && head_dim <= 256; }

template <int DPL>
cudaError_t LaunchAttentionDpl(const float* q, const float* k, const float* v, const int32_t* seq_starts,
                               const int32_t* tile_table, int n_seqs, int64_t n_tokens, int n_heads, int n_kv_heads,
                               int head_dim, float* out, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (static_cast<size_t>(kAttnRowsPerBlock) * head_dim +
                                       static_cast<size_t>(kAttnKeysPerTile) * (head_dim + 1) +
                                       static_cast<size_t>(kAttnKeysPerTile) * head_dim);
  // head_dim 128 needs 48.5 KiB, just over the default 48 KiB limit.
  cudaError_t err =
      cudaFuncSetAttribute(AttentionKernel<DPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  // Upper bound on the tile count: each sequence adds at most one partial tile.
  const int64_t max_tiles = CeilDiv(n_tokens, kAttnRowsPerBlock) + n_seqs;
  if (max_tiles > 0x7fffffff || n_heads > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(n_heads));
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(head_dim));
  SAE_KERNEL_LAUNCH(AttentionKernel<DPL>, grid, kAttnWarps * 32, smem, stream)
  (q, k, v, seq_starts, tile_table, n_seqs, n_heads, n_kv_heads, head_dim, scale_log2, out);
  return cudaGetLastError();
}

cudaError_t LaunchAttention(const float* q, const float* k, const float* v, const int32_t* seq_starts, int n_seqs,
                            int max_seq_len, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim, float* out,
                            int32_t* tile_table, int* error_flag, cudaStream_t stream) {
  if (n_tokens == 0 || n_seqs == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(AttentionTileTableKernel, 1, kAttnTableThreads, 0, stream)
  (seq_starts, n_seqs, max_seq_len, n_tokens, tile_table, error_flag);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (head_dim <= 32) {
    return LaunchAttentionDpl<1>(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim, out,
                                 stream);
  }
  if (head_dim <= 64) {
    return LaunchAttentionDpl<2>(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim, out,
                                 stream);
  }
  if (head_dim <= 96) {
    return LaunchAttentionDpl<3>(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim, out,
                                 stream);
  }
  if (head_dim <= 128) {
    return LaunchAttentionDpl<4>(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim, out,
                                 stream);
  }
  if (head_dim <= 256) {
    return LaunchAttentionDpl<8>(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim, out,
                                 stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_ATTENTION_CUH_
