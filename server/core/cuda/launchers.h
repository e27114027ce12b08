// Host-side declarations of every kernel launcher, for cuda_backend.cc (plain
// C++, compiled by the host compiler; the kernels live in the .cuh headers,
// each compiled by exactly one .cu file). Launchers take raw device pointers,
// dims and an explicit stream, validate nothing the caller already checked,
// and return the launch's cudaError_t.
#ifndef SAE_CORE_CUDA_LAUNCHERS_H_
#define SAE_CORE_CUDA_LAUNCHERS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace sae {
namespace cuda {

// Element types of weight-like inputs, and of the activations that feed a
// GEMM (F32, or BF16: see Backend::gemm_input_dtype).
enum class ElemType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Codes kernels store into the backend's host-mapped error word (one per
// error epoch, see cuda_backend.cc); the host turns them into
// INVALID_ARGUMENT at the read-back that waited for the kernel.
enum DeviceError : int {
  kDeviceErrorNone = 0,
  kDeviceErrorBadTokenId = 1,
  kDeviceErrorBadSeqStarts = 2,
  kDeviceErrorBadFeatureId = 3,
};

// ---- elementwise.cuh ----
// out[t, :] = F32(table[ids[t], :]); ids outside [0, vocab) give zeros and set *error_flag.
cudaError_t LaunchEmbed(const void* table, ElemType table_type, int64_t vocab, int64_t d, const int32_t* ids, int64_t n,
                        float* out, int* error_flag, cudaStream_t stream);
// Raises *error_flag (kDeviceErrorBadFeatureId) when an id is outside [0, limit).
cudaError_t LaunchCheckIds(const int32_t* ids, int64_t n, int64_t limit, int* error_flag, cudaStream_t stream);
// x [n_elems] F32 -> n_parts BF16 arrays [n_parts, n_elems] with x ~= sum of parts
// (part p is the bf16 rounding of what parts < p left over).
cudaError_t LaunchSplitToBf16(const float* x, int64_t n_elems, int n_parts, void* out, cudaStream_t stream);
// out[i] = sum over p of parts[p * n + i], the smallest (last) part first.
cudaError_t LaunchSumParts(const float* parts, int n_parts, int64_t n, float* out, cudaStream_t stream);
// dst[i] = F32(src[i]).
cudaError_t LaunchToF32(const void* src, ElemType type, int64_t n, float* dst, cudaStream_t stream);
// out = silu(gate) * up, stored as out_type (kF32 or kBF16).
cudaError_t LaunchSiluMul(const float* gate, const float* up, void* out, ElemType out_type, int64_t n,
                          cudaStream_t stream);
// out = a + b.
cudaError_t LaunchAdd(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream);

// ---- rmsnorm.cuh ----
// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight (weight == nullptr: none),
// stored as out_type (kF32, which may alias x, or kBF16).
cudaError_t LaunchRmsNorm(const float* x, const void* weight, ElemType weight_type, int64_t rows, int64_t cols,
                          float eps, void* out, ElemType out_type, cudaStream_t stream);

// ---- rope.cuh ----
// In-place half-split rotary embedding of x [n, n_heads * head_dim].
cudaError_t LaunchRope(float* x, int64_t n, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
                       cudaStream_t stream);

// ---- attention.cuh ----
bool AttentionSupportsHeadDim(int head_dim);
// Head dims the tensor-core kernel handles (others use the fp32 one).
bool AttentionMmaSupportsHeadDim(int head_dim);
// Causal attention over packed sequences. tensor_cores: bf16 QK^T and PV on
// the tensor cores (fp32 accumulation and softmax) where the head dim allows,
// else fp32 FMA throughout. tile_table: device scratch of n_seqs + 1 ints.
// kv_bf16: device scratch of AttentionKvScratchBytes bytes (the tensor-core
// kernel's bf16 copies of k and v and a mark per V row holding an inf or
// NaN; 256-byte aligned, as cudaMalloc returns).
// Bad seq_starts set *error_flag (those sequences are skipped). out_type:
// kF32, or kBF16 with the tensor-core kernel only (cudaErrorInvalidValue else).
cudaError_t LaunchAttention(const float* q, const float* k, const float* v, const int32_t* seq_starts, int n_seqs,
                            int max_seq_len, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
                            bool tensor_cores, void* out, ElemType out_type, int32_t* tile_table, void* kv_bf16,
                            int* error_flag, cudaStream_t stream);
// Bytes of LaunchAttention's kv_bf16 scratch (0 when it uses none).
size_t AttentionKvScratchBytes(int64_t n_tokens, int n_kv_heads, int head_dim, bool tensor_cores);

// ---- sae_topk.cuh ----
// Largest k the top-k kernel handles (its candidate buffer lives in shared
// memory; a device may hold less, see SaeTopKSharedBytes).
constexpr int kSaeTopKMaxK = 8192;
constexpr int kSaeTopKBins0 = 1 << 12;  // the first pass's histogram
// LaunchSaeTopK's candidate buffer at k_keep: a power of two >= 2 k_keep, at
// least 2048 (room to finish most rows in one pass).
inline uint32_t SaeTopKCandidateCap(int k_keep) {
  uint32_t cap = 2048;
  while (cap < 2u * static_cast<uint32_t>(k_keep)) cap <<= 1;
  return cap;
}
// LaunchSaeTopK's dynamic shared memory at k_keep: the candidates (8 bytes
// each) and the histogram. 144 KiB at kSaeTopKMaxK: more than the 99 KiB a
// block may opt in to on sm_86 / sm_89 (163 KiB on sm_80, 227 KiB on sm_90).
inline size_t SaeTopKSharedBytes(int k_keep) {
  return SaeTopKCandidateCap(k_keep) * sizeof(uint64_t) + kSaeTopKBins0 * sizeof(uint32_t);
}
// For each of n_rows tokens: v_i = (scale_in * h_i + bias_i) * feature_scale_i,
// h_i = sum over n_parts of pre[p][row][i]; keeps the k_keep largest v_i >
// threshold - margin[row] (margin == nullptr: 0) (value-descending, ties to
// the lower index) in out_idx/out_val [n_rows, k]; slots past them hold -1 /
// 0. pre: F32 [n_parts, n_rows, d_sae]. row_mask (nullable): rows whose mask
// is 0 are left untouched.
cudaError_t LaunchSaeTopK(const float* pre, int n_parts, int64_t n_rows, int64_t d_sae, const float* bias,
                          const float* feature_scale, float scale_in, float threshold, const float* margin,
                          const int32_t* row_mask, int k_keep, int k, int32_t* out_idx, float* out_val,
                          cudaStream_t stream);

// ---- sae_rescore.cuh: exact top-k from a plain-bf16 encoder GEMM ----
// The encoder GEMM runs on bf16-rounded activations (one part); the top-k
// kernel keeps a few more candidates than k with the threshold lowered by a
// per-row error bound; these kernels recompute the candidates' values from
// the fp32 activations and prove, per row, that no other feature can enter
// the exact top-k (rows where that fails are recomputed exactly).
// Per-encoder maxima over the features i of a BF16 encoder [d_sae, d] (w_i
// its rows, fs_i the feature scale or 1), the constants of the error bound;
// in device memory as 5 floats in this order. They bound any subset of the
// features too (watch lists).
struct SaeValueBounds {
  float m = 0;     // max_i |scale_in| ||w_i||_2 |fs_i|
  float b = 0;     // max_i |bias_i| |fs_i|
  float s = 0;     // max_i |scale_in| |fs_i|
  float w = 0;     // max_i ||w_i||_2
  float bias = 0;  // max_i |bias_i|
};
// Running maxima into *bound (device memory that must hold zeros before).
cudaError_t LaunchSaeValueBound(const void* encoder_bf16, const float* bias, int64_t d_sae, int64_t d,
                                const float* feature_scale, float scale_in, SaeValueBounds* bound, cudaStream_t stream);
// margin[r] >= |v_i(x_r) computed exactly - v_i from the bf16 GEMM| for every
// feature i (bf16 rounding of x, fp32 accumulation in both, epilogue rounding,
// underflow), or +inf where no bound holds: x_r not finite, or so large that
// a partial sum or the epilogue could overflow fp32. bound: on the host.
cudaError_t LaunchSaeMargins(const float* x, int64_t n_rows, int64_t d, const SaeValueBounds& bound, float scale_in,
                             float* margin, cudaStream_t stream);
// Per row: exact values of the candidates cand_idx [n_rows, n_cand] (the
// top-k kernel's output at k_keep = n_cand, threshold lowered by margin), then
// the k_keep largest exact values > threshold into out_idx/out_val [n_rows, k]
// when provably right: fallback[r] = 0; else fallback[r] = 1 and the row's
// outputs are left for LaunchSaeExactRows + LaunchSaeTopK(row_mask = fallback).
// fallback_count (nullable): incremented once per row with fallback[r] = 1.
// LaunchSaeRescore's candidate buffer (a power of two >= n_cand), and its
// dynamic shared memory: the candidates (8 bytes each), the row of x.
inline uint32_t SaeRescoreCandidateCap(int n_cand) {
  uint32_t cap = 1;
  while (cap < static_cast<uint32_t>(n_cand)) cap <<= 1;
  return cap;
}
inline size_t SaeRescoreSharedBytes(int n_cand, int64_t d) {
  return SaeRescoreCandidateCap(n_cand) * sizeof(uint64_t) + static_cast<size_t>(d) * sizeof(float);
}
cudaError_t LaunchSaeRescore(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, const float* bias,
                             const float* feature_scale, float scale_in, float threshold, const float* margin,
                             const int32_t* cand_idx, const float* cand_val, int n_cand, int k_keep, int k,
                             int32_t* out_idx, float* out_val, int32_t* fallback, unsigned long long* fallback_count,
                             cudaStream_t stream);
// pre [n_rows, d_sae] <- exact w_i . x_r for the rows with fallback[r] != 0.
cudaError_t LaunchSaeExactRows(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, int64_t d_sae,
                               const int32_t* fallback, float* pre, cudaStream_t stream);
// JumpReLU actives from a 1-part bf16 GEMM (pre [n_rows, d_sae] = w_i .
// bf16(x_r)), exact: only features within margin[r] of the threshold are
// recomputed. The active (index, exact h) go to list_idx / list_h [n_rows,
// kJumpReluListSlots] (unused slots index -1) and dense_row[r] = 0; a row
// whose actives do not fit gets dense_row[r] = 1 and F in place of pre
// (exact h where active, else 0).
constexpr int kJumpReluListSlots = 512;
cudaError_t LaunchSaeJumpReluExact(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, int64_t d_sae,
                                   const float* bias, const float* feature_scale, float scale_in, float threshold,
                                   const float* margin, float* pre, int32_t* list_idx, float* list_h,
                                   int32_t* dense_row, cudaStream_t stream);
// JumpReLU watch list from a 1-part bf16 GEMM against the watched rows
// (rows [m, d]: the encoder rows of ids, gathered; pre [n_rows, m] = rows_j .
// bf16(x_r)), exact: out [n_rows, m] = v (h * feature scale) where v >
// threshold, else 0, and only the features within margin[r] of the threshold
// or above it are recomputed. An id outside [0, d_sae) gives 0.
cudaError_t LaunchSaeSelectedExact(const float* x, const void* rows_bf16, int64_t n_rows, int64_t d, const int32_t* ids,
                                   int64_t m, int64_t d_sae, const float* bias, const float* feature_scale,
                                   float scale_in, float threshold, const float* margin, const float* pre, float* out,
                                   cudaStream_t stream);
// h [n_rows, k] <- scale_in * (w_idx . x_r) + bias_idx (exact, as the rescore
// computes it) for slots with idx >= 0, 0 elsewhere.
cudaError_t LaunchSaeExactH(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, const float* bias,
                            float scale_in, const int32_t* idx, int k, float* h, cudaStream_t stream);

// ---- sae_decode.cuh ----
// Pre-activation inputs are [n_parts, n_rows, cols] GEMM parts (summed here).
// dst [m, cols] = src [ids[j], :] (elem_bytes 2 or 4; the encoder's own dtype).
cudaError_t LaunchGatherRows(const void* src, int elem_bytes, int64_t n_src_rows, int64_t cols, const int32_t* ids,
                             int64_t m, void* dst, cudaStream_t stream);
// out [n_rows, m] = JumpReLU value of feature ids[j] from pre [n_parts, n_rows, m].
cudaError_t LaunchSaeSelectedEpilogue(const float* pre, int n_parts, int64_t n_rows, int64_t m, const int32_t* ids,
                                      int64_t d_sae, const float* bias, const float* feature_scale, float scale_in,
                                      float threshold, float* out, cudaStream_t stream);
// In place: part 0 of pre [n_parts, n_rows, d_sae] <- h if active else 0.
cudaError_t LaunchSaeJumpReluActivations(float* pre, int n_parts, int64_t n_rows, int64_t d_sae, const float* bias,
                                         const float* feature_scale, float scale_in, float threshold,
                                         cudaStream_t stream);
// val [n_rows, k] <- h_{idx[r, j]} (unfeature-scaled) for slots with idx >= 0.
cudaError_t LaunchSaeTopKValuesToH(const float* pre, int n_parts, int64_t n_rows, int64_t d_sae, const float* bias,
                                   float scale_in, const int32_t* idx, int k, float* val, cudaStream_t stream);
// out [n_rows, m] = val[r, s] where idx[r, s] == ids[j] (top-k lists idx / val
// [n_rows, k]), else 0.
cudaError_t LaunchSaeListLookup(const int32_t* idx, const float* val, int64_t n_rows, int k, int64_t d_sae,
                                const int32_t* ids, int64_t m, float* out, cudaStream_t stream);
// out [n_rows, d] = (sum of h_i * dec[i, :] over the active i + b_dec) / scale_out,
// dec [d_sae, d] feature-major. Active: the nonzeros of dense [n_rows, d_sae]
// where dense is non-null and dense_row is null or dense_row[r] != 0, else
// the slots of idx / val [n_rows, k] with idx >= 0 (val = h).
cudaError_t LaunchSaeSparseDecode(const float* dense, const int32_t* dense_row, int64_t d_sae, const int32_t* idx,
                                  const float* val, int k, const void* dec, ElemType dec_type, int64_t n_rows,
                                  int64_t d, const float* b_dec, float scale_out, float* out, cudaStream_t stream);
// out [n_rows] = ||y - y_hat||^2 / ||y||^2 per row (fp64 sums; 0/0 -> 0, x/0 -> +inf).
cudaError_t LaunchRelativeSquaredError(const float* y_hat, const float* y, int64_t n_rows, int64_t cols, float* out,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_LAUNCHERS_H_
