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
// H100's L2 where the fp32 ones do not), which also marks each (token, kv
// head) whose V holds an inf or NaN. Q arrives in fp32 and is rounded to
// bf16, pre-scaled by log2(e)/sqrt(head_dim), when staged in shared memory;
// per 64-key tile each warp computes S = Q K^T [16 x 64] with mma.m16n8k16
// (fp32 accumulators), applies the causal mask, updates its online softmax in
// registers, and multiplies P (rounded to bf16) by V into an fp32 O [16 x HD].
// The accumulator layout of S (two 8-key tiles) is the A-operand layout of P
// for the 16-key PV step, so P never leaves registers.
//
// K/V tiles stream through two shared-memory stages with cp.async: tile
// i + 1 is in flight while tile i is computed. Both are stored row-major as
// bf16 pairs, [key][HD/2 + 4 words] (+4 words: the 8 rows of an 8x8 matrix
// land 4 banks apart, so ldmatrix has no conflicts); ldmatrix.x4 gives the
// B fragments of QK^T from K, and ldmatrix.x4.trans those of PV from V (no
// transposed copy). Q is staged in stage 1's K area before the first
// prefetch needs it.
//
// Non-finite values stay causal: a tile with a marked V row does P.V key by
// key over each row's visible keys, since the MMA would add 0 * inf = NaN
// from keys in a row's future. A NaN in K needs no care: masked scores are
// replaced by -inf.
constexpr int kAttnMmaRows = 64;  // query rows per block: 16 per warp
constexpr int kAttnMmaKeys = 64;  // keys per shared-memory tile
constexpr int kAttnMmaWarps = 4;

bool AttentionMmaSupportsHeadDim(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// Two stages of a K tile and a V tile, [kAttnMmaKeys][HD/2 + 4] words each.
template <int HD>
constexpr size_t AttentionMmaSharedBytes() {
  return sizeof(uint32_t) * 2 * 2 * static_cast<size_t>(kAttnMmaKeys) * (HD / 2 + 4);
}

template <int HD, typename O>
__global__ void __launch_bounds__(kAttnMmaWarps * 32)
    AttentionMmaKernel(const float* __restrict__ q, const uint32_t* __restrict__ kb, const uint32_t* __restrict__ vb,
                       const uint8_t* __restrict__ v_nonfinite, const int32_t* __restrict__ seq_starts,
                       const int32_t* __restrict__ tile_start, int n_seqs, int n_heads, int n_kv_heads,
                       float scale_log2, O* __restrict__ out) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim: a multiple of 16, at most 128");
  constexpr int BQ = kAttnMmaRows, BK = kAttnMmaKeys;
  static_assert(BQ == BK, "Q is staged in a K tile's place");
  constexpr int QW = HD / 2 + 4;       // words per K / V / Q row in shared memory
  constexpr int kStage = 2 * BK * QW;  // words per stage: the K tile, then the V tile
  constexpr int NT = BK / 8;           // 8-key tiles of S
  constexpr int KQ = HD / 16;          // 16-dim steps of QK^T
  constexpr int DT = HD / 8;           // 8-dim tiles of O
  SAE_DYNAMIC_SHARED(uint32_t, smem_words);

  AttnTile tile;
  if (!FindAttnTile(seq_starts, tile_start, n_seqs, BQ, n_heads, n_kv_heads, HD, &tile)) return;
  const int64_t seq_begin = tile.seq_begin, q_stride = tile.q_stride, kv_words = tile.kv_stride / 2;
  const int q_first = tile.q_first, n_rows = tile.n_rows, kv_len = tile.kv_len, h = tile.h;
  const int64_t kvh = tile.kvh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int r0 = warp * 16;               // the warp's first row in the tile
  const int n_kv_tiles = (kv_len + BK - 1) / BK;

  // Starts the copy of K/V tile `it` into stage it % 2 and commits it as one
  // group. Keys past kv_len are zero-filled: P is 0 there, and 0 * V must not
  // be NaN (the next sequence's V may hold anything).
  auto load_tile = [&](int it) {
    uint32_t* sk = smem_words + (it & 1) * kStage;
    uint32_t* sv = sk + BK * QW;
    const int kt = it * BK;
    for (int i = tid; i < BK * (HD / 8); i += blockDim.x) {
      const int j = i / (HD / 8), c = i - j * (HD / 8);
      const bool in = kt + j < kv_len;
      const int64_t off = (seq_begin + (in ? kt + j : 0)) * kv_words + kvh * (HD / 2) + 4 * c;
      SAE_CP_ASYNC_16(sk + j * QW + 4 * c, kb + off, in ? 16 : 0);
      SAE_CP_ASYNC_16(sv + j * QW + 4 * c, vb + off, in ? 16 : 0);
    }
    SAE_CP_ASYNC_COMMIT();
  };
  // Whether a V row among this lane's keys of tile `it` (kt + lane, kt + 32 +
  // lane) holds an inf or NaN. Read a tile ahead, so the load's latency hides
  // behind the previous tile's work.
  auto lane_v_nonfinite = [&](int it) {
    bool bad = false;
#pragma unroll
    for (int half = 0; half < BK / 32; ++half) {
      const int j = it * BK + 32 * half + lane;
      bad = bad || (j < kv_len && v_nonfinite[(seq_begin + j) * n_kv_heads + kvh] != 0);
    }
    return bad;
  };
  load_tile(0);
  bool next_v_nonfinite = lane_v_nonfinite(0);

  // Q, staged in stage 1's K area (tile 1 goes there only after the barrier
  // below). Rows past the sequence's end are zeros (computed, never stored).
  uint32_t* sq = smem_words + kStage;
#pragma unroll 4
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
  __syncthreads();
  uint32_t qf[KQ][4];  // the warp's Q rows as A fragments, one per 16 dims
#pragma unroll
  for (int kk = 0; kk < KQ; ++kk) SAE_LDMATRIX_X4(qf[kk], sq + (r0 + (lane & 15)) * QW + kk * 8 + (lane >> 4) * 4);
  __syncthreads();  // every warp has its Q before tile 1 overwrites sq

  float o[DT][4];  // O rows g, g + 8 (see MmaBf16M16N8K16's d)
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.0f, 0.0f};  // rows g, g + 8
  const int pos = q_first + r0 + g;  // row g's position in the sequence (row g + 8: pos + 8)
  const int warp_last = q_first + r0 + 15;

  for (int it = 0; it < n_kv_tiles; ++it) {
    const int kt = it * BK;
    const bool my_v_nonfinite = next_v_nonfinite;
    if (it + 1 < n_kv_tiles) {
      load_tile(it + 1);
      next_v_nonfinite = lane_v_nonfinite(it + 1);
    } else {
      SAE_CP_ASYNC_COMMIT();  // an empty group keeps the count the wait below expects
    }
    SAE_CP_ASYNC_WAIT(1);  // this thread's copies of tile it have landed
    __syncthreads();       // and everyone's
    const uint32_t* sk = smem_words + (it & 1) * kStage;
    const uint32_t* sv = sk + BK * QW;
    if (kt <= warp_last) {  // warp-uniform: else every key of the tile is in the warp's future
      const bool v_bad = __ballot_sync(kFullMask, my_v_nonfinite) != 0;  // a V row of the tile is inf / NaN

      float sc[NT][4];  // S: rows g, g + 8; keys kt + 8 nt + 2t, +1
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          // Matrices: keys of S tile 2np (lanes 0-15) / 2np + 1 (16-31), dims +0..7 / +8..15 (lane bit 3).
          uint32_t b[4];
          SAE_LDMATRIX_X4(b, sk + ((2 * np + (lane >> 4)) * 8 + (lane & 7)) * QW + kk * 8 + ((lane >> 3) & 1) * 4);
          SAE_MMA_BF16_M16N8K16(sc[2 * np], qf[kk], b);
          SAE_MMA_BF16_M16N8K16(sc[2 * np + 1], qf[kk], b + 2);
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

      if (!v_bad) {
        // O += P V: P's 16-key chunk kc is S tiles 2kc (keys +0..7) and 2kc+1 (+8..15).
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc) {
          const uint32_t pa[4] = {PackBf16x2(sc[2 * kc][0], sc[2 * kc][1]), PackBf16x2(sc[2 * kc][2], sc[2 * kc][3]),
                                  PackBf16x2(sc[2 * kc + 1][0], sc[2 * kc + 1][1]),
                                  PackBf16x2(sc[2 * kc + 1][2], sc[2 * kc + 1][3])};
#pragma unroll
          for (int dp = 0; dp < DT / 2; ++dp) {
            // Matrices (transposed): keys +0..7 / +8..15 (lane bit 3) of O tile 2dp (lanes 0-15) / 2dp + 1.
            uint32_t b[4];
            SAE_LDMATRIX_X4_TRANS(
                b, sv + (kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * QW + (2 * dp + (lane >> 4)) * 4);
            SAE_MMA_BF16_M16N8K16(o[2 * dp], pa, b);
            SAE_MMA_BF16_M16N8K16(o[2 * dp + 1], pa, b + 2);
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
              // V[key j][dims dt*8 + 2t, +1]: one word of row j.
              const uint32_t pair = sv[j * QW + dt * 4 + t];
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                o[dt][2 * r + c] = fmaf(pj[r], Bf16BitsToFloat(pair >> (16 * c)), o[dt][2 * r + c]);
              }
            }
          }
        }
      }
    }
    __syncthreads();  // stage it % 2 is consumed before the next iteration refills it
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
cudaError_t LaunchAttentionMma(const float* q, const uint32_t* kb, const uint32_t* vb, const uint8_t* v_nonfinite,
                               const int32_t* seq_starts, const int32_t* tile_table, int n_seqs, int64_t n_tokens,
                               int n_heads, int n_kv_heads, O* out, cudaStream_t stream) {
  return LaunchAttentionTiles(AttentionMmaKernel<HD, O>, kAttnMmaRows, kAttnMmaWarps, AttentionMmaSharedBytes<HD>(),
                              n_tokens, n_seqs, n_heads, stream, q, kb, vb, v_nonfinite, seq_starts, tile_table, n_seqs,
                              n_heads, n_kv_heads, AttentionScaleLog2(HD), out);
}

// K and V rounded to bf16 (nearest even, finite values saturated as Bf16Part
// does) for the tensor-core kernel, two elements per word: kb/vb[i] =
// bf16x2(k/v[2i], k/v[2i + 1]); and v_nonfinite[row] = 1 where V row `row`
// (one token's one kv head, head_dim values) holds an inf or NaN, else 0.
// One warp per row.
__global__ void AttentionKvToBf16Kernel(const float* __restrict__ k, const float* __restrict__ v, int64_t n_rows,
                                        int head_dim, uint32_t* __restrict__ kb, uint32_t* __restrict__ vb,
                                        uint8_t* __restrict__ v_nonfinite) {
  const int lane = threadIdx.x & 31, pairs = head_dim / 2;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; row < n_rows;
       row += warps) {  // warp-uniform
    bool bad = false;
    for (int p = lane; p < pairs; p += 32) {
      const int64_t i = row * pairs + p;
      kb[i] = PackBf16Parts(k[2 * i], k[2 * i + 1]);
      const uint32_t w = PackBf16Parts(v[2 * i], v[2 * i + 1]);
      vb[i] = w;
      bad = bad || Bf16x2NonFinite(w);
    }
    bad = __ballot_sync(kFullMask, bad) != 0;
    if (lane == 0) v_nonfinite[row] = bad ? 1 : 0;
  }
}

// The scratch: K in bf16, V in bf16, then the V rows' non-finite marks.
template <typename O>
cudaError_t LaunchAttentionMmaHeadDim(const float* q, const float* k, const float* v, const int32_t* seq_starts,
                                      const int32_t* tile_table, int n_seqs, int64_t n_tokens, int n_heads,
                                      int n_kv_heads, int head_dim, uint32_t* kv_bf16, O* out, cudaStream_t stream) {
  const int64_t n_rows = n_tokens * n_kv_heads;
  const int64_t n_pairs = n_rows * head_dim / 2;
  uint32_t* kb = kv_bf16;
  uint32_t* vb = kv_bf16 + n_pairs;
  uint8_t* v_nonfinite = reinterpret_cast<uint8_t*>(vb + n_pairs);
  constexpr int kThreads = 256;
  SAE_KERNEL_LAUNCH(AttentionKvToBf16Kernel, GridFor(n_rows * 32, kThreads), kThreads, 0, stream)
  (k, v, n_rows, head_dim, kb, vb, v_nonfinite);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  switch (head_dim) {
    case 16:
      return LaunchAttentionMma<16>(q, kb, vb, v_nonfinite, seq_starts, tile_table, n_seqs, n_tokens, n_heads,
                                    n_kv_heads, out, stream);
    case 32:
      return LaunchAttentionMma<32>(q, kb, vb, v_nonfinite, seq_starts, tile_table, n_seqs, n_tokens, n_heads,
                                    n_kv_heads, out, stream);
    case 64:
      return LaunchAttentionMma<64>(q, kb, vb, v_nonfinite, seq_starts, tile_table, n_seqs, n_tokens, n_heads,
                                    n_kv_heads, out, stream);
    default:
      return LaunchAttentionMma<128>(q, kb, vb, v_nonfinite, seq_starts, tile_table, n_seqs, n_tokens, n_heads,
                                     n_kv_heads, out, stream);
  }
}

size_t AttentionKvScratchBytes(int64_t n_tokens, int n_kv_heads, int head_dim, bool tensor_cores) {
  if (!tensor_cores || !AttentionMmaSupportsHeadDim(head_dim)) return 0;
  // K and V in bf16, and a byte per V row.
  return (2 * sizeof(uint16_t) * static_cast<size_t>(head_dim) + 1) * static_cast<size_t>(n_tokens) * n_kv_heads;
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
