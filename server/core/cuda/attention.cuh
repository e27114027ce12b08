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
// Two kernels share that layout. AttentionKernel (fp32 FMA on the CUDA
// cores) is the exact one: the backend uses it when the model's GEMMs carry
// fp32 activations (SAE_CUDA_MODEL_SPLIT >= 2). AttentionMmaKernel (below)
// runs QK^T and PV on the tensor cores with bf16 inputs and fp32
// accumulation, as bf16 inference does; it is the default.
#ifndef SAE_CORE_CUDA_ATTENTION_CUH_
#define SAE_CORE_CUDA_ATTENTION_CUH_

#include <math_constants.h>

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

constexpr int kAttnRowsPerBlock = 32;  // query rows per block (one sequence, one head) of AttentionKernel
constexpr int kAttnKeysPerTile = 32;   // keys per shared-memory tile: one per lane
constexpr int kAttnWarps = 4;
constexpr int kAttnRowsPerWarp = kAttnRowsPerBlock / kAttnWarps;
constexpr int kAttnTableThreads = 1024;

// ---- kernels ----

// One block. tile_start[s] = number of query tiles (of rows_per_tile rows) in sequences < s;
// tile_start[n_seqs] = total. A sequence with bad bounds counts as empty and
// raises the error word.
__global__ void __launch_bounds__(kAttnTableThreads)
    AttentionTileTableKernel(const int32_t* __restrict__ seq_starts, int n_seqs, int max_seq_len, int64_t n_tokens,
                             int rows_per_tile, int32_t* __restrict__ tile_start, int* error_flag) {
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
    return (len + rows_per_tile - 1) / rows_per_tile;
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

// The work of block (blockIdx.x, blockIdx.y): query rows [q_first, q_first +
// n_rows) of the sequence starting at token seq_begin, query head h, which
// reads kv head kvh; keys [0, kv_len) are visible to some row. Row strides of
// q/out and k/v in floats. False when the block has no tile (the grid is an
// upper bound).
struct AttnTile {
  int64_t seq_begin;
  int q_first, n_rows, kv_len;
  int h, kvh;
  int64_t q_stride, kv_stride;
};
__device__ __forceinline__ bool FindAttnTile(const int32_t* __restrict__ seq_starts,
                                             const int32_t* __restrict__ tile_start, int n_seqs, int rows_per_tile,
                                             int n_heads, int n_kv_heads, int head_dim, AttnTile* out) {
  const int tile = blockIdx.x;
  if (tile >= tile_start[n_seqs]) return false;
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
  const int len = seq_starts[s + 1] - seq_starts[s];
  const int n_tiles = tile_start[s + 1] - tile_start[s];
  // Tiles of a sequence run last-first: the late ones see the most keys, and
  // starting them first shortens the tail of the grid.
  const int q_tile = n_tiles - 1 - (tile - tile_start[s]);
  out->seq_begin = seq_starts[s];
  out->q_first = q_tile * rows_per_tile;
  out->n_rows = min(rows_per_tile, len - out->q_first);
  out->kv_len = out->q_first + out->n_rows;
  out->h = blockIdx.y;
  out->kvh = out->h / (n_heads / n_kv_heads);
  out->q_stride = static_cast<int64_t>(n_heads) * head_dim;
  out->kv_stride = static_cast<int64_t>(n_kv_heads) * head_dim;
  return true;
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

  AttnTile tile;
  if (!FindAttnTile(seq_starts, tile_start, n_seqs, BQ, n_heads, n_kv_heads, hd, &tile)) return;
  const int64_t seq_begin = tile.seq_begin, q_stride = tile.q_stride, kv_stride = tile.kv_stride;
  const int q_first = tile.q_first, n_rows = tile.n_rows, kv_len = tile.kv_len, h = tile.h, kvh = tile.kvh;
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
        // Warp-uniform: a key in the row's future adds nothing, not 0 * V (NaN for an inf or NaN there).
        if (kt + j > q_first + warp * RPW + r) continue;
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

// ---- tensor-core attention ----
//
// Block = 4 warps = 64 query rows of one sequence and one head; warp w owns
// rows 16w..16w+15 of the tile. K and V are rounded to bf16 once per call by
// AttentionKvToBf16Kernel (not once per query tile and head: with 1024-token
// sequences and 4 query heads per KV head that was ~34 passes over each K/V
// row, and the bf16 copies, 32 MiB for Llama-3.1-8B at 8k tokens, fit in an
// H100's L2 where the fp32 ones do not). Q arrives in fp32 and is rounded to
// bf16, pre-scaled by log2(e)/sqrt(head_dim), when staged in shared memory;
// per 64-key tile each warp computes S = Q K^T [16 x 64] with mma.m16n8k16
// (fp32 accumulators), applies the causal mask, updates its online softmax in
// registers, and multiplies P (rounded to bf16) by V into an fp32 O [16 x HD].
// The accumulator layout of S (two 8-key tiles) is the A-operand layout of P
// for the 16-key PV step, so P never leaves registers.
//
// Shared memory holds bf16 pairs as 32-bit words: sq/sk [row][HD/2 + 4]
// (+4 words: the 8 rows g of a fragment load land 4 banks apart, no
// conflicts), svt [d][BK/2 + 4] = V transposed, so each B fragment register
// of PV (two consecutive keys of one dim) is one 32-bit load.
//
// Non-finite values stay causal: a tile whose V holds an inf or NaN (flagged
// while it is loaded) does P.V key by key over each row's visible keys, since
// the MMA would add 0 * inf = NaN from keys in a row's future. A NaN in K
// needs no care: masked scores are replaced by -inf.
constexpr int kAttnMmaRows = 64;  // query rows per block: 16 per warp
constexpr int kAttnMmaKeys = 64;  // keys per shared-memory tile
constexpr int kAttnMmaWarps = 4;

bool AttentionMmaSupportsHeadDim(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

template <int HD>
constexpr size_t AttentionMmaSharedBytes() {
  return sizeof(uint32_t) * (static_cast<size_t>(kAttnMmaRows + kAttnMmaKeys) * (HD / 2 + 4) +
                             static_cast<size_t>(HD) * (kAttnMmaKeys / 2 + 4));
}

template <int HD, typename O>
__global__ void __launch_bounds__(kAttnMmaWarps * 32)
    AttentionMmaKernel(const float* __restrict__ q, const uint32_t* __restrict__ kb, const uint32_t* __restrict__ vb,
                       const int32_t* __restrict__ seq_starts, const int32_t* __restrict__ tile_start, int n_seqs,
                       int n_heads, int n_kv_heads, float scale_log2, O* __restrict__ out) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim: a multiple of 16, at most 128");
  constexpr int BQ = kAttnMmaRows, BK = kAttnMmaKeys;
  constexpr int QW = HD / 2 + 4;  // words per sq / sk row
  constexpr int VW = BK / 2 + 4;  // words per svt row
  constexpr int NT = BK / 8;      // 8-key tiles of S
  constexpr int KQ = HD / 16;     // 16-dim steps of QK^T
  constexpr int DT = HD / 8;      // 8-dim tiles of O
  // (extern shared arrays of different types must not share a name)
  SAE_DYNAMIC_SHARED(uint32_t, smem_words);
  uint32_t* sq = smem_words;        // [BQ][QW] Q, pre-scaled, bf16 pairs
  uint32_t* sk = sq + BQ * QW;      // [BK][QW] K tile
  uint32_t* svt = sk + BK * QW;     // [HD][VW] V tile, transposed: key pairs of one dim
  __shared__ int v_nonfinite_tile;  // kt of the last tile found to hold an inf or NaN in V

  AttnTile tile;
  if (!FindAttnTile(seq_starts, tile_start, n_seqs, BQ, n_heads, n_kv_heads, HD, &tile)) return;
  const int64_t seq_begin = tile.seq_begin, q_stride = tile.q_stride, kv_words = tile.kv_stride / 2;
  const int q_first = tile.q_first, n_rows = tile.n_rows, kv_len = tile.kv_len, h = tile.h;
  const int64_t kvh = tile.kvh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int r0 = warp * 16;               // the warp's first row in the tile

  // Rows past the sequence's end are zeros (computed, never stored).
  for (int i = tid; i < BQ * (HD / 2); i += blockDim.x) {
    const int r = i / (HD / 2), c = i - r * (HD / 2);
    float x0 = 0.0f, x1 = 0.0f;
    if (r < n_rows) {
      const float* p = q + (seq_begin + q_first + r) * q_stride + static_cast<int64_t>(h) * HD + 2 * c;
      x0 = p[0] * scale_log2;
      x1 = p[1] * scale_log2;
    }
    sq[r * QW + c] = PackBf16x2(x0, x1);
  }
  if (tid == 0) v_nonfinite_tile = -1;
  __syncthreads();
  uint32_t qf[KQ][4];  // the warp's Q rows as A fragments, one per 16 dims
#pragma unroll
  for (int kk = 0; kk < KQ; ++kk) {
    qf[kk][0] = sq[(r0 + g) * QW + kk * 8 + t];
    qf[kk][1] = sq[(r0 + g + 8) * QW + kk * 8 + t];
    qf[kk][2] = sq[(r0 + g) * QW + kk * 8 + 4 + t];
    qf[kk][3] = sq[(r0 + g + 8) * QW + kk * 8 + 4 + t];
  }

  float o[DT][4];  // O rows g, g + 8 (see MmaBf16M16N8K16's d)
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.0f, 0.0f};  // rows g, g + 8
  const int pos = q_first + r0 + g;  // row g's position in the sequence (row g + 8: pos + 8)
  const int warp_last = q_first + r0 + 15;

  for (int kt = 0; kt < kv_len; kt += BK) {
    __syncthreads();  // the previous tile is consumed
    // Keys past kv_len are zeros: P is 0 there, and 0 * V must not be NaN.
    // K rows: 16-byte copies (8 dims each) into sk.
    for (int i = tid; i < BK * (HD / 8); i += blockDim.x) {
      const int j = i / (HD / 8), c = i - j * (HD / 8);
      uint4 w = make_uint4(0u, 0u, 0u, 0u);
      if (kt + j < kv_len) w = Load16(kb + (seq_begin + kt + j) * kv_words + kvh * (HD / 2) + 4 * c);
      Store16(sk + j * QW + 4 * c, w);
    }
    // V: keys j, j + 1 (pair jp) and dims 2dp, 2dp + 1 give one word of
    // svt row 2dp (the low halves) and one of row 2dp + 1 (the high halves).
    // A warp covers 4 pairs x 8 word columns: 32-byte global segments, and
    // two lanes per bank on the stores.
    for (int i = tid; i < (BK / 2) * (HD / 2); i += blockDim.x) {
      const int jp = (i >> 3) & (BK / 2 - 1), dp = ((i >> 3) / (BK / 2)) * 8 + (i & 7);
      const int j = kt + 2 * jp;
      const uint32_t* p = vb + (seq_begin + j) * kv_words + kvh * (HD / 2) + dp;
      const uint32_t w0 = j < kv_len ? p[0] : 0u;
      const uint32_t w1 = j + 1 < kv_len ? p[kv_words] : 0u;
      if (Bf16x2NonFinite(w0) || Bf16x2NonFinite(w1)) v_nonfinite_tile = kt;
      svt[(2 * dp) * VW + jp] = (w0 & 0xffffu) | (w1 << 16);
      svt[(2 * dp + 1) * VW + jp] = (w0 >> 16) | (w1 & 0xffff0000u);
    }
    __syncthreads();
    if (kt > warp_last) continue;  // warp-uniform: every key of the tile is in the warp's future

    float sc[NT][4];  // S: rows g, g + 8; keys kt + 8 nt + 2t, +1
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t b[2] = {sk[(nt * 8 + g) * QW + kk * 8 + t], sk[(nt * 8 + g) * QW + kk * 8 + 4 + t]};
        SAE_MMA_BF16_M16N8K16(sc[nt], qf[kk], b);
      }
    }
    if (kt + BK - 1 > q_first + r0) {  // the tile reaches past the warp's first row: causal mask
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (kt + nt * 8 + 2 * t + (e & 1) > pos + 8 * (e >> 1)) sc[nt][e] = -CUDART_INF_F;
        }
      }
    }

    // Online softmax; a row's 64 scores are spread over the 4 lanes of its group.
    float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(sc[nt][0], sc[nt][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(sc[nt][2], sc[nt][3]));
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullMask, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullMask, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      base[r] = m_new == -CUDART_INF_F ? 0.0f : m_new;  // a row with nothing visible yet stays at 0
      const float corr = exp2f(m[r] - base[r]);         // 0 on the row's first visible tile
      m[r] = m_new;
      l[r] *= corr;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * r] *= corr;
        o[dt][2 * r + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[nt][e] = exp2f(sc[nt][e] - base[e >> 1]);
        l[e >> 1] += sc[nt][e];
      }
    }

    if (v_nonfinite_tile != kt) {
      // O += P V: P's 16-key chunk kc is S tiles 2kc (keys +0..7) and 2kc+1 (+8..15).
#pragma unroll
      for (int kc = 0; kc < BK / 16; ++kc) {
        const uint32_t pa[4] = {PackBf16x2(sc[2 * kc][0], sc[2 * kc][1]), PackBf16x2(sc[2 * kc][2], sc[2 * kc][3]),
                                PackBf16x2(sc[2 * kc + 1][0], sc[2 * kc + 1][1]),
                                PackBf16x2(sc[2 * kc + 1][2], sc[2 * kc + 1][3])};
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          const uint32_t b[2] = {svt[(dt * 8 + g) * VW + kc * 8 + t], svt[(dt * 8 + g) * VW + kc * 8 + 4 + t]};
          SAE_MMA_BF16_M16N8K16(o[dt], pa, b);
        }
      }
    } else {
      // A V value of this tile is inf or NaN. The MMA would add P * V = 0 * inf = NaN for keys in a row's
      // future, so a later token's inf would reach earlier rows: here each row sums its visible keys only,
      // key by key, with P rounded to bf16 as the MMA takes it. Rare, so kept small: P goes through a local
      // copy (indexed at run time; sc itself stays in registers).
      float pl[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) pl[nt][e] = sc[nt][e];
      }
#pragma unroll 1
      for (int j = 0; j < BK; ++j) {
        const int src = (lane & ~3) | ((j & 7) >> 1);  // the lane of this row group holding key j
        float pj[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) pj[r] = RoundToBf16(__shfl_sync(kFullMask, pl[j >> 3][(j & 1) + 2 * r], src));
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (kt + j > pos + 8 * r) continue;  // key j is in row g + 8r's future
#pragma unroll
          for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const uint32_t pair = svt[(dt * 8 + 2 * t + c) * VW + j / 2];
              o[dt][2 * r + c] = fmaf(pj[r], Bf16BitsToFloat(pair >> (16 * (j & 1))), o[dt][2 * r + c]);
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
    const int row = r0 + g + 8 * r;
    if (row >= n_rows) continue;
    const float inv = 1.0f / l[r];
    O* dst = out + (seq_begin + q_first + row) * q_stride + static_cast<int64_t>(h) * HD + 2 * t;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      StoreAs(&dst[dt * 8], o[dt][2 * r] * inv);
      StoreAs(&dst[dt * 8 + 1], o[dt][2 * r + 1] * inv);
    }
  }
}

// ---- launchers ----

bool AttentionSupportsHeadDim(int head_dim) { return head_dim >= 1 && head_dim <= 256; }

// Raises `kernel`'s dynamic shared memory limit to `smem` (both kernels need
// more than the default 48 KiB at head_dim 128) and launches one block of
// `warps` warps per (query tile of rows_per_tile rows, query head).
template <typename... P, typename... Args>
cudaError_t LaunchAttentionTiles(void (*kernel)(P...), int rows_per_tile, int warps, size_t smem, int64_t n_tokens,
                                 int n_seqs, int n_heads, cudaStream_t stream, Args... args) {
  cudaError_t err = RaiseSharedLimit(kernel, smem);
  if (err != cudaSuccess) return err;
  // Upper bound on the tile count: each sequence adds at most one partial tile.
  const int64_t max_tiles = CeilDiv(n_tokens, rows_per_tile) + n_seqs;
  if (max_tiles > 0x7fffffff || n_heads > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(n_heads));
  SAE_KERNEL_LAUNCH(kernel, grid, warps * 32, smem, stream)(args...);
  return cudaGetLastError();
}

float AttentionScaleLog2(int head_dim) { return 1.4426950408889634f / sqrtf(static_cast<float>(head_dim)); }

template <int DPL>
cudaError_t LaunchAttentionDpl(const float* q, const float* k, const float* v, const int32_t* seq_starts,
                               const int32_t* tile_table, int n_seqs, int64_t n_tokens, int n_heads, int n_kv_heads,
                               int head_dim, float* out, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (static_cast<size_t>(kAttnRowsPerBlock) * head_dim +
                                       static_cast<size_t>(kAttnKeysPerTile) * (head_dim + 1) +
                                       static_cast<size_t>(kAttnKeysPerTile) * head_dim);
  return LaunchAttentionTiles(AttentionKernel<DPL>, kAttnRowsPerBlock, kAttnWarps, smem, n_tokens, n_seqs, n_heads,
                              stream, q, k, v, seq_starts, tile_table, n_seqs, n_heads, n_kv_heads, head_dim,
                              AttentionScaleLog2(head_dim), out);
}

template <int HD, typename O>
cudaError_t LaunchAttentionMma(const float* q, const uint32_t* kb, const uint32_t* vb, const int32_t* seq_starts,
                               const int32_t* tile_table, int n_seqs, int64_t n_tokens, int n_heads, int n_kv_heads,
                               O* out, cudaStream_t stream) {
  return LaunchAttentionTiles(AttentionMmaKernel<HD, O>, kAttnMmaRows, kAttnMmaWarps, AttentionMmaSharedBytes<HD>(),
                              n_tokens, n_seqs, n_heads, stream, q, kb, vb, seq_starts, tile_table, n_seqs, n_heads,
                              n_kv_heads, AttentionScaleLog2(HD), out);
}

// K and V rounded to bf16 (nearest even, finite values saturated as Bf16Part
// does) for the tensor-core kernel, two elements per word: kb/vb[i] =
// bf16x2(k/v[2i], k/v[2i + 1]).
__global__ void AttentionKvToBf16Kernel(const float* __restrict__ k, const float* __restrict__ v, int64_t n_pairs,
                                        uint32_t* __restrict__ kb, uint32_t* __restrict__ vb) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    kb[i] = PackBf16Parts(k[2 * i], k[2 * i + 1]);
    vb[i] = PackBf16Parts(v[2 * i], v[2 * i + 1]);
  }
}

template <typename O>
cudaError_t LaunchAttentionMmaHeadDim(const float* q, const float* k, const float* v, const int32_t* seq_starts,
                                      const int32_t* tile_table, int n_seqs, int64_t n_tokens, int n_heads,
                                      int n_kv_heads, int head_dim, uint32_t* kv_bf16, O* out, cudaStream_t stream) {
  const int64_t n_pairs = n_tokens * n_kv_heads * head_dim / 2;
  uint32_t* kb = kv_bf16;
  uint32_t* vb = kv_bf16 + n_pairs;
  constexpr int kThreads = 256;
  SAE_KERNEL_LAUNCH(AttentionKvToBf16Kernel, GridFor(n_pairs, kThreads), kThreads, 0, stream)
  (k, v, n_pairs, kb, vb);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  switch (head_dim) {
    case 16:
      return LaunchAttentionMma<16>(q, kb, vb, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, out,
                                    stream);
    case 32:
      return LaunchAttentionMma<32>(q, kb, vb, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, out,
                                    stream);
    case 64:
      return LaunchAttentionMma<64>(q, kb, vb, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, out,
                                    stream);
    default:
      return LaunchAttentionMma<128>(q, kb, vb, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, out,
                                     stream);
  }
}

size_t AttentionKvScratchBytes(int64_t n_tokens, int n_kv_heads, int head_dim, bool tensor_cores) {
  if (!tensor_cores || !AttentionMmaSupportsHeadDim(head_dim)) return 0;
  return 2 * sizeof(uint16_t) * static_cast<size_t>(n_tokens) * n_kv_heads * head_dim;  // k and v in bf16
}

cudaError_t LaunchAttention(const float* q, const float* k, const float* v, const int32_t* seq_starts, int n_seqs,
                            int max_seq_len, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
                            bool tensor_cores, void* out_ptr, ElemType out_type, int32_t* tile_table, void* kv_bf16,
                            int* error_flag, cudaStream_t stream) {
  // n_seqs == 0 with tokens goes on: the table kernel flags the rows no sequence covers.
  if (n_tokens == 0) return cudaSuccess;
  const bool mma = tensor_cores && AttentionMmaSupportsHeadDim(head_dim);
  if (out_type == ElemType::kF16 || (!mma && out_type != ElemType::kF32)) return cudaErrorInvalidValue;
  if (mma && reinterpret_cast<uintptr_t>(kv_bf16) % 16 != 0) return cudaErrorInvalidValue;  // 16-byte K loads
  SAE_KERNEL_LAUNCH(AttentionTileTableKernel, 1, kAttnTableThreads, 0, stream)
  (seq_starts, n_seqs, max_seq_len, n_tokens, mma ? kAttnMmaRows : kAttnRowsPerBlock, tile_table, error_flag);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (mma && out_type == ElemType::kBF16) {
    return LaunchAttentionMmaHeadDim(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim,
                                     static_cast<uint32_t*>(kv_bf16), static_cast<__nv_bfloat16*>(out_ptr), stream);
  }
  float* out = static_cast<float*>(out_ptr);
  if (mma) {
    return LaunchAttentionMmaHeadDim(q, k, v, seq_starts, tile_table, n_seqs, n_tokens, n_heads, n_kv_heads, head_dim,
                                     static_cast<uint32_t*>(kv_bf16), out, stream);
  }
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
