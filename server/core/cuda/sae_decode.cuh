// SAE ops around the fused top-k encode (sae_topk.cuh): values of a watch
// list of features, the reconstruction y_hat, and its per-row relative error.
// The heavy lifting is the encoder GEMM (cuBLAS, cuda_backend.cc), which
// gives the pre-activations; the kernels here are the memory-bound rest:
//   SaeEncodeSelected, JumpReLU: gather the m watched encoder rows, GEMM
//     against them only, then apply the rule per (token, feature).
//   SaeEncodeSelected, TopK: activity depends on every feature, so the
//     encode goes through the same top-k as SaeEncodeTopK (rescoring by
//     default, sae_rescore.cuh); each watched id is looked up in its row's
//     (index, value) list.
//   SaeReconstruct: the active features with their h (JumpReLU: a dense
//     F row, in place over the pre-activations; TopK: the top-k's list,
//     values replaced by h, recomputed exactly or read from the GEMM parts),
//     then a sparse decode that reads only the active features' rows of the
//     feature-major decoder: y_hat = (sum h_i d_i + b_dec) / scale_out.
// Pre-activation buffers are [n_parts, n_rows, cols]: the GEMM's partial
// products for the bf16 split of x (see LaunchSplitToBf16); every reader adds
// the parts smallest first, the order SaeTopKKernel uses.
#ifndef SAE_CORE_CUDA_SAE_DECODE_CUH_
#define SAE_CORE_CUDA_SAE_DECODE_CUH_

#include <math_constants.h>

#include "core/cuda/common.cuh"

namespace sae {
namespace cuda {

constexpr int kSaeGlueThreads = 256;
constexpr int kRelErrThreads = 256;     // a multiple of 32 (warp reduction below)
constexpr int kSaeDecodeThreads = 256;  // a multiple of 32 (warp ballots below)
constexpr int kSaeDecodeCols = 16;      // output columns per thread and pass: 4096 per pass
static_assert(kSaeDecodeThreads % 32 == 0, "the decode's compaction takes whole warps");

// ---- kernels ----

// h = scale_in * (sum of the parts at `off`) + bias: the SAELens-form value,
// computed as the CPU twin and SaeTopKKernel compute it.
__device__ __forceinline__ float SaeH(const float* pre, int64_t part_stride, int n_parts, int64_t off, float bias,
                                      float scale_in) {
  float s = pre[(n_parts - 1) * part_stride + off];
  for (int p = n_parts - 2; p >= 0; --p) s += pre[p * part_stride + off];
  return fmaf(scale_in, s, bias);
}

// dst [m, cols] = src [ids[j], :] for each j, raw elements (T = uint16_t for
// BF16/F16, float for F32), so the GEMM sees the encoder's own dtype. An id
// outside [0, n_src_rows) gives a zero row (the host validated ids already;
// this only keeps a bad one from reading out of bounds).
template <typename T>
__global__ void GatherRowsKernel(const T* __restrict__ src, int64_t n_src_rows, int64_t cols,
                                 const int32_t* __restrict__ ids, int64_t m, T* __restrict__ dst) {
  const int64_t total = m * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i / cols, c = i - j * cols;
    const int32_t id = ids[j];
    dst[i] = (id >= 0 && id < n_src_rows) ? src[static_cast<int64_t>(id) * cols + c] : T(0);
  }
}

// JumpReLU watch list: pre [n_parts, n_rows, m] holds w_{ids[j]} . x_t;
// out [n_rows, m] = v if v > threshold else 0, v = h * feature_scale (same
// expression as the CPU twin).
__global__ void SaeSelectedEpilogueKernel(const float* __restrict__ pre, int n_parts, int64_t n_rows, int64_t m,
                                          const int32_t* __restrict__ ids, int64_t d_sae,
                                          const float* __restrict__ bias, const float* __restrict__ fscale,
                                          float scale_in, float threshold, float* __restrict__ out) {
  const int64_t total = n_rows * m;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t id = ids[i % m];
    if (id < 0 || id >= d_sae) {
      out[i] = 0.0f;
      continue;
    }
    float v = SaeH(pre, total, n_parts, i, bias[id], scale_in);
    if (fscale != nullptr) v *= fscale[id];
    out[i] = v > threshold ? v : 0.0f;  // NaN is never active
  }
}

// JumpReLU reconstruction: part 0 of pre [n_parts, n_rows, d_sae] becomes
// F [n_rows, d_sae] in place: h where v = h * feature_scale > threshold,
// else 0. In place is safe: element i (all its parts) is read and written by
// one thread only. feature_scale only picks the active set; F carries h.
__global__ void SaeJumpReluActivationsKernel(float* pre, int n_parts, int64_t n_rows, int64_t d_sae,
                                             const float* __restrict__ bias, const float* __restrict__ fscale,
                                             float scale_in, float threshold) {
  const int64_t total = n_rows * d_sae;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % d_sae;
    const float h = SaeH(pre, total, n_parts, i, bias[c], scale_in);
    const float v = fscale != nullptr ? h * fscale[c] : h;
    pre[i] = v > threshold ? h : 0.0f;
  }
}

// TopK reconstruction: the top-k kernel's values are v (feature-scaled); the
// decode sums h. val[r, j] <- h_{idx[r, j]} read back from pre [n_parts,
// n_rows, d_sae] (slots with idx -1 are left alone). Recomputing h rather
// than dividing v by the scale keeps it exact and safe for a zero scale.
__global__ void SaeTopKValuesToHKernel(const float* __restrict__ pre, int n_parts, int64_t n_rows, int64_t d_sae,
                                       const float* __restrict__ bias, float scale_in, const int32_t* __restrict__ idx,
                                       int k, float* __restrict__ val) {
  const int64_t total = n_rows * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t id = idx[i];
    if (id < 0 || id >= d_sae) continue;
    const int64_t r = i / k;
    val[i] = SaeH(pre, n_rows * d_sae, n_parts, r * d_sae + id, bias[id], scale_in);
  }
}

// TopK watch list: out [n_rows, m] = val[r, s] where idx[r, s] == ids[j]
// (the top-k list of row r holds feature ids[j]), else 0. A list holds k <=
// kSaeTopKMaxK distinct ids, so a linear search per output is cheaper than
// scattering every row into a dense d_sae-wide one. An id outside [0,
// d_sae) gives 0 (empty slots hold -1 and must not match it).
__global__ void SaeListLookupKernel(const int32_t* __restrict__ idx, const float* __restrict__ val, int64_t n_rows,
                                    int k, int64_t d_sae, const int32_t* __restrict__ ids, int64_t m,
                                    float* __restrict__ out) {
  const int64_t total = n_rows * m;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / m;
    const int32_t id = ids[i - r * m];
    float v = 0.0f;
    if (id >= 0 && id < d_sae) {
      for (int s = 0; s < k; ++s) {
        if (idx[r * k + s] == id) {
          v = val[r * k + s];
          break;
        }
      }
    }
    out[i] = v;
  }
}

// Sparse decode, one block per row r:
//   out[r, :] = (sum over active i of h_i * dec[i, :] + b_dec) / scale_out
// with dec [d_sae, d] feature-major, so each active feature is one
// contiguous row read. The active features come from a list (idx / val
// [n_rows, k], val = h, idx -1 in empty slots: a top-k, or the JumpReLU
// actives SaeJumpReluExactKernel lists) or from a dense F row (dense
// [n_rows, d_sae]: h where active, 0 elsewhere) where dense is given and
// dense_row is null or dense_row[r] != 0 (a row whose list overflowed). Each step
// the block takes kSaeDecodeThreads candidates, compacts the active ones
// into shared memory in candidate order (warp ballots, then the warps'
// counts), and every thread adds them into its kSaeDecodeCols output
// columns. Rows wider than kSaeDecodeThreads * kSaeDecodeCols take several
// passes. The sum runs in candidate order in fp32; the division by
// scale_out matches the CPU twin (not a multiply by a rounded reciprocal).
// Cost per row: the candidates (d_sae floats, or 2k words) plus one decoder
// row per active feature, against a dense decode's whole decoder per chunk
// of rows and d_sae multiply-adds per output.
template <typename T>
__global__ void __launch_bounds__(kSaeDecodeThreads)
    SaeSparseDecodeKernel(const float* __restrict__ dense, const int32_t* __restrict__ dense_row, int64_t d_sae,
                          const int32_t* __restrict__ idx, const float* __restrict__ val, int k,
                          const T* __restrict__ dec, int64_t d, const float* __restrict__ b_dec, float scale_out,
                          float* __restrict__ out) {
  __shared__ int32_t s_idx[kSaeDecodeThreads];
  __shared__ float s_h[kSaeDecodeThreads];
  __shared__ int s_count[kSaeDecodeThreads / 32];
  const int64_t r = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool from_dense = dense != nullptr && (dense_row == nullptr || dense_row[r] != 0);  // block-uniform
  const int64_t n_cand = from_dense ? d_sae : k;
  for (int64_t c0 = 0; c0 < d; c0 += static_cast<int64_t>(kSaeDecodeThreads) * kSaeDecodeCols) {
    float acc[kSaeDecodeCols];
#pragma unroll
    for (int j = 0; j < kSaeDecodeCols; ++j) acc[j] = 0.0f;
    for (int64_t p0 = 0; p0 < n_cand; p0 += kSaeDecodeThreads) {
      const int64_t p = p0 + threadIdx.x;
      int32_t i = -1;
      float h = 0.0f;
      if (p < n_cand) {
        if (from_dense) {
          h = dense[r * d_sae + p];
          i = h != 0.0f ? static_cast<int32_t>(p) : -1;
        } else {
          i = idx[r * k + p];
          if (i >= 0) h = val[r * k + p];  // an empty slot's value may be unwritten
        }
      }
      const bool active = i >= 0 && i < d_sae;
      const unsigned mask = __ballot_sync(kFullMask, active);
      if (lane == 0) s_count[warp] = __popc(mask);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < kSaeDecodeThreads / 32; ++w) {
        before += w < warp ? s_count[w] : 0;
        total += s_count[w];
      }
      if (active) {
        const int slot = before + __popc(mask & ((1u << lane) - 1u));
        s_idx[slot] = i;
        s_h[slot] = h;
      }
      __syncthreads();
#pragma unroll 2  // two features' loads in flight
      for (int a = 0; a < total; ++a) {
        const T* row = dec + static_cast<int64_t>(s_idx[a]) * d;
        const float ha = s_h[a];
#pragma unroll
        for (int j = 0; j < kSaeDecodeCols; ++j) {
          const int64_t c = c0 + threadIdx.x + j * kSaeDecodeThreads;
          if (c < d) acc[j] = fmaf(ha, ToFloat(row[c]), acc[j]);
        }
      }
      __syncthreads();  // s_count, s_idx and s_h are rewritten by the next step
    }
#pragma unroll
    for (int j = 0; j < kSaeDecodeCols; ++j) {
      const int64_t c = c0 + threadIdx.x + j * kSaeDecodeThreads;
      if (c < d) out[r * d + c] = (acc[j] + b_dec[c]) / scale_out;
    }
  }
}

// One block per row; fp64 accumulation like the CPU twin (the ratio of two
// nearly equal sums for a good reconstruction would lose digits in fp32).
// num and den run through the same fixed thread/warp order, so y_hat = 0
// gives exactly 1 and y_hat = y exactly 0.
__global__ void __launch_bounds__(kRelErrThreads)
    RelativeSquaredErrorKernel(const float* __restrict__ y_hat, const float* __restrict__ y, int64_t cols,
                               float* __restrict__ out) {
  __shared__ double s_num[kRelErrThreads / 32], s_den[kRelErrThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* a = y_hat + blockIdx.x * cols;
  const float* b = y + blockIdx.x * cols;
  double num = 0.0, den = 0.0;
  for (int64_t c = threadIdx.x; c < cols; c += kRelErrThreads) {
    const double yb = b[c];
    const double diff = yb - static_cast<double>(a[c]);
    num += diff * diff;
    den += yb * yb;
  }
  num = WarpSum(num);
  den = WarpSum(den);
  if (lane == 0) {
    s_num[warp] = num;
    s_den[warp] = den;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    num = 0.0;
    den = 0.0;
    for (int w = 0; w < kRelErrThreads / 32; ++w) {
      num += s_num[w];
      den += s_den[w];
    }
    // 0/0: a zero target reproduced exactly; x/0: any miss of a zero target is infinitely bad.
    out[blockIdx.x] = den > 0.0 ? static_cast<float>(num / den) : (num > 0.0 ? CUDART_INF_F : 0.0f);
  }
}

// ---- launchers ----

cudaError_t LaunchGatherRows(const void* src, int elem_bytes, int64_t n_src_rows, int64_t cols, const int32_t* ids,
                             int64_t m, void* dst, cudaStream_t stream) {
  if (m * cols == 0) return cudaSuccess;
  const unsigned grid = GridFor(m * cols, kSaeGlueThreads);
  if (elem_bytes == 2) {
    SAE_KERNEL_LAUNCH(GatherRowsKernel<uint16_t>, grid, kSaeGlueThreads, 0, stream)
    (static_cast<const uint16_t*>(src), n_src_rows, cols, ids, m, static_cast<uint16_t*>(dst));
  } else if (elem_bytes == 4) {
    SAE_KERNEL_LAUNCH(GatherRowsKernel<float>, grid, kSaeGlueThreads, 0, stream)
    (static_cast<const float*>(src), n_src_rows, cols, ids, m, static_cast<float*>(dst));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchSaeSelectedEpilogue(const float* pre, int n_parts, int64_t n_rows, int64_t m, const int32_t* ids,
                                      int64_t d_sae, const float* bias, const float* feature_scale, float scale_in,
                                      float threshold, float* out, cudaStream_t stream) {
  if (n_rows * m == 0) return cudaSuccess;
  if (n_parts < 1) return cudaErrorInvalidValue;
  SAE_KERNEL_LAUNCH(SaeSelectedEpilogueKernel, GridFor(n_rows * m, kSaeGlueThreads), kSaeGlueThreads, 0, stream)
  (pre, n_parts, n_rows, m, ids, d_sae, bias, feature_scale, scale_in, threshold, out);
  return cudaGetLastError();
}

cudaError_t LaunchSaeJumpReluActivations(float* pre, int n_parts, int64_t n_rows, int64_t d_sae, const float* bias,
                                         const float* feature_scale, float scale_in, float threshold,
                                         cudaStream_t stream) {
  if (n_rows * d_sae == 0) return cudaSuccess;
  if (n_parts < 1) return cudaErrorInvalidValue;
  SAE_KERNEL_LAUNCH(SaeJumpReluActivationsKernel, GridFor(n_rows * d_sae, kSaeGlueThreads), kSaeGlueThreads, 0, stream)
  (pre, n_parts, n_rows, d_sae, bias, feature_scale, scale_in, threshold);
  return cudaGetLastError();
}

cudaError_t LaunchSaeTopKValuesToH(const float* pre, int n_parts, int64_t n_rows, int64_t d_sae, const float* bias,
                                   float scale_in, const int32_t* idx, int k, float* val, cudaStream_t stream) {
  if (n_rows * k == 0) return cudaSuccess;
  if (n_parts < 1) return cudaErrorInvalidValue;
  SAE_KERNEL_LAUNCH(SaeTopKValuesToHKernel, GridFor(n_rows * k, kSaeGlueThreads), kSaeGlueThreads, 0, stream)
  (pre, n_parts, n_rows, d_sae, bias, scale_in, idx, k, val);
  return cudaGetLastError();
}

cudaError_t LaunchSaeListLookup(const int32_t* idx, const float* val, int64_t n_rows, int k, int64_t d_sae,
                                const int32_t* ids, int64_t m, float* out, cudaStream_t stream) {
  if (n_rows * m == 0) return cudaSuccess;
  SAE_KERNEL_LAUNCH(SaeListLookupKernel, GridFor(n_rows * m, kSaeGlueThreads), kSaeGlueThreads, 0, stream)
  (idx, val, n_rows, k, d_sae, ids, m, out);
  return cudaGetLastError();
}

cudaError_t LaunchSaeSparseDecode(const float* dense, const int32_t* dense_row, int64_t d_sae, const int32_t* idx,
                                  const float* val, int k, const void* dec, ElemType dec_type, int64_t n_rows,
                                  int64_t d, const float* b_dec, float scale_out, float* out, cudaStream_t stream) {
  if (n_rows * d == 0) return cudaSuccess;
  if (n_rows > 0x7fffffff) return cudaErrorInvalidValue;  // one block per row: gridDim.x limit
  const unsigned grid = static_cast<unsigned>(n_rows);
  switch (dec_type) {
    case ElemType::kF32:
      SAE_KERNEL_LAUNCH(SaeSparseDecodeKernel<float>, grid, kSaeDecodeThreads, 0, stream)
      (dense, dense_row, d_sae, idx, val, k, static_cast<const float*>(dec), d, b_dec, scale_out, out);
      break;
    case ElemType::kBF16:
      SAE_KERNEL_LAUNCH(SaeSparseDecodeKernel<__nv_bfloat16>, grid, kSaeDecodeThreads, 0, stream)
      (dense, dense_row, d_sae, idx, val, k, static_cast<const __nv_bfloat16*>(dec), d, b_dec, scale_out, out);
      break;
    case ElemType::kF16:
      SAE_KERNEL_LAUNCH(SaeSparseDecodeKernel<__half>, grid, kSaeDecodeThreads, 0, stream)
      (dense, dense_row, d_sae, idx, val, k, static_cast<const __half*>(dec), d, b_dec, scale_out, out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchRelativeSquaredError(const float* y_hat, const float* y, int64_t n_rows, int64_t cols, float* out,
                                       cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffff) return cudaErrorInvalidValue;  // one block per row: gridDim.x limit
  SAE_KERNEL_LAUNCH(RelativeSquaredErrorKernel, static_cast<unsigned>(n_rows), kRelErrThreads, 0, stream)
  (y_hat, y, cols, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_SAE_DECODE_CUH_
