// Exact SAE top-k from a plain-bf16 encoder GEMM ("rescoring", the default
// for BF16 encoders; see cuda_backend.cc for the sequence of launches).
//
// The expensive part of an SAE encode is the GEMM x . W^T over all d_sae
// features. Running it on bf16-rounded activations (one part) halves it
// against the hi+lo split, but moves every value by up to
//   |v_i(x) - v_i(bf16(x))| <= |scale_in| ||w_i|| |fs_i| ||x - bf16(x)|| (+ fp32 accumulation error),
// enough to swap features near the k-th value. So the top-k kernel keeps
// n_cand > k candidates with the threshold lowered by that per-row bound
// (margin), these kernels recompute the candidates' values exactly (fp32
// activations, one fixed summation order) and select the k best of those.
// That is provably the exact top-k unless the candidate list was full and a
// feature outside it could still beat the k-th exact value: those rows are
// flagged and recomputed exactly over all features (rare: it needs many
// features within ~1e-3 relative of the k-th value).
#ifndef SAE_CORE_CUDA_SAE_RESCORE_CUH_
#define SAE_CORE_CUDA_SAE_RESCORE_CUH_

#include <utility>

#include "core/cuda/common.cuh"
#include "core/cuda/sae_keys.cuh"

namespace sae {
namespace cuda {

constexpr int kRescoreThreads = 256;
constexpr int kRescoreWarps = kRescoreThreads / 32;
constexpr float kUnitRoundoff = 5.9604645e-8f;  // 2^-24
// Active-feature list slots per warp in SaeJumpReluExactKernel: 512 per row,
// for ~50-300 active features of a Llama Scope SAE spread over 8 warps.
constexpr int kJumpReluListCap = 64;
static_assert(kRescoreWarps * kJumpReluListCap == kJumpReluListSlots, "launchers.h states the list size");

// ---- kernels ----

// w . x for one BF16 encoder row against x in shared memory, summed in one
// fixed order (lane-strided fmas, then the xor butterfly, which leaves the
// same bits in every lane). Every reader of exact values uses this.
__device__ __forceinline__ float ExactDot(const __nv_bfloat16* __restrict__ w, const float* xs, int64_t d, int lane) {
  float s = 0.0f;
  for (int64_t c = lane; c < d; c += 32) s = fmaf(__bfloat162float(w[c]), xs[c], s);
  return WarpSum(s);
}

// The encoded value of a feature from its exact dot product (the expression
// of SaeValue in sae_topk.cuh), -0 normalised to +0.
__device__ __forceinline__ float ExactValue(float dot, float scale_in, float bias, const float* fscale, int64_t i) {
  float v = fmaf(scale_in, dot, bias);
  if (fscale != nullptr) v *= fscale[i];
  return v == 0.0f ? 0.0f : v;
}

// Loads row `row` of x [.., d] into shared memory; ends with a barrier.
__device__ __forceinline__ void LoadRow(const float* __restrict__ x, int64_t row, int64_t d, float* xs) {
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) xs[c] = x[row * d + c];
  __syncthreads();
}

// Running maxima into *bound (SaeValueBounds): m and w, one warp per
// encoder row, the squares summed in fp64 (in fp32 they underflow for weights
// below ~1e-19, and the norm would come out 0). Non-negative floats order as
// their bit patterns, so atomicMax on the bits is a float max.
__global__ void SaeValueBoundKernel(const __nv_bfloat16* __restrict__ w, int64_t d_sae, int64_t d,
                                    const float* __restrict__ fscale, float scale_in, SaeValueBounds* bound) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  double local_m = 0.0, local_w = 0.0;
  for (int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; r < d_sae; r += warps) {
    double s = 0.0;
    for (int64_t c = lane; c < d; c += 32) {
      const double v = __bfloat162float(w[r * d + c]);
      s = fma(v, v, s);
    }
    const double norm = sqrt(WarpSum(s));
    local_w = fmax(local_w, norm);
    local_m = fmax(local_m, fabsf(scale_in) * norm * (fscale != nullptr ? fabsf(fscale[r]) : 1.0f));
  }
  // Rounded to fp32 (the margin's slack covers it); above FLT_MAX, inf.
  if (lane == 0) {
    atomicMax(reinterpret_cast<unsigned*>(&bound->m), __float_as_uint(static_cast<float>(local_m)));
    atomicMax(reinterpret_cast<unsigned*>(&bound->w), __float_as_uint(static_cast<float>(local_w)));
  }
}

// Running maxima into *bound (SaeValueBounds): b, s and bias.
__global__ void SaeBiasBoundKernel(const float* __restrict__ bias, int64_t d_sae, const float* __restrict__ fscale,
                                   float scale_in, SaeValueBounds* bound) {
  float local_b = 0.0f, local_s = 0.0f, local_bias = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < d_sae;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float fs = fscale != nullptr ? fabsf(fscale[i]) : 1.0f;
    local_b = fmaxf(local_b, fabsf(bias[i]) * fs);
    local_s = fmaxf(local_s, fabsf(scale_in) * fs);
    local_bias = fmaxf(local_bias, fabsf(bias[i]));
  }
  atomicMax(reinterpret_cast<unsigned*>(&bound->b), __float_as_uint(local_b));
  atomicMax(reinterpret_cast<unsigned*>(&bound->s), __float_as_uint(local_s));
  atomicMax(reinterpret_cast<unsigned*>(&bound->bias), __float_as_uint(local_bias));
}

// One block per row:
//   margin = [M (||x - bf16(x)|| + 3.01 d u ||x||) + 8 u (M ||x|| + B) + S 2^-126 (4d + 16 + ||x||_1)] (1 + 2^-10),
// M, B, S = bound.m, .b, .s: the bf16 rounding of x, the fp32 accumulation
// of both GEMMs and the epilogue's roundings, underflow, with slack for
// rounding the bound itself. ExactDot rounds to nearest (<= d u sum |w_i
// x_i|). cuBLAS runs on tensor cores, which align a block's products to the
// largest exponent with truncation and normalise by rounding toward zero
// (Fasi et al. 2021 for A100, Khattak & Mikaitis 2025 for H100): up to 2u per
// step, so 2 d u sum |w_i x_i| for that GEMM. Those terms are relative. The
// last covers subnormals, which Fasi et al. found kept but which we do not
// rely on: a product or partial sum below the smallest normal fp32 (2^-126)
// may lose up to 2^-126 outright if flushed, at most 2d times in each of the
// two dot products; a subnormal bf16 weight, |w_ij x_j| < 2^-126 |x_j| (the
// ||x||_1 term); a subnormal bf16 part of x counts as flushed in ||x -
// bf16(x)||; the epilogue's roundings, 16 more. The sums run in fp64, where
// no square of an fp32 value under- or overflows (in fp32 they would below
// |x| ~ 1e-19 or above ~ 1e19), and the result is rounded up to fp32.
// Where no bound holds the margin is +inf, which sends the row to the exact
// path: x not finite, or large enough that a partial sum (|w_i . x| <= W
// ||x||) or the epilogue (|scale_in h + b|, |v|) could reach fp32's overflow.
__global__ void __launch_bounds__(kRescoreThreads)
    SaeMarginKernel(const float* __restrict__ x, int64_t d, SaeValueBounds bound, float scale_in,
                    float* __restrict__ margin) {
  __shared__ double scratch[32];
  const float* xr = x + blockIdx.x * d;
  double d2 = 0.0, x2 = 0.0, x1 = 0.0;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const double v = xr[c];
    const double part = __bfloat162float(Bf16Part(xr[c]));  // the GEMM operand
    const double r = fabs(part) < 0x1p-126 ? v : v - part;  // exact in fp64
    d2 = fma(r, r, d2);
    x2 = fma(v, v, x2);
    x1 += fabs(v);
  }
  d2 = BlockSum(d2, scratch);
  x2 = BlockSum(x2, scratch);
  x1 = BlockSum(x1, scratch);
  if (threadIdx.x == 0) {
    const double nx = sqrt(x2), nx_up = nx * (1.0 + 0x1p-7), u = kUnitRoundoff, big = 0x1p126;
    const double mb = bound.m, dd = static_cast<double>(d);
    const double m = mb * (sqrt(d2) + 3.01 * dd * u * nx) + 8.0 * u * (mb * nx + bound.b) +
                     bound.s * 0x1p-126 * (4.0 * dd + 16.0 + x1);
    const bool in_range = bound.w * nx_up < big &&
                          fabs(static_cast<double>(scale_in)) * bound.w * nx_up + bound.bias < big &&
                          mb * nx_up + bound.b < big;  // false for NaN
    float mf = INFINITY;
    const double slack = m * (1.0 + 1.0 / 1024.0);
    if (in_range && slack <= 0x1.fffffep127) {  // FLT_MAX
      mf = static_cast<float>(slack);
      if (static_cast<double>(mf) < slack) mf = nextafterf(mf, INFINITY);  // rounded up (a subnormal margin too)
    }
    margin[blockIdx.x] = mf;
  }
}

struct RescoreParams {
  const float* x;          // [n_rows, d] F32 activations
  const __nv_bfloat16* w;  // [d_sae, d]
  int64_t d;
  const float* bias;    // [d_sae]
  const float* fscale;  // [d_sae] or nullptr
  float scale_in;
  float threshold;
  const float* margin;      // [n_rows]
  const int32_t* cand_idx;  // [n_rows, n_cand], valid slots first
  const float* cand_val;    // [n_rows, n_cand], approximate values, descending
  int n_cand;
  int k_keep;
  int k;
  uint32_t cap;                        // power of two >= n_cand
  int32_t* out_idx;                    // [n_rows, k]
  float* out_val;                      // [n_rows, k]
  int32_t* fallback;                   // [n_rows]
  unsigned long long* fallback_count;  // nullable: += 1 per row with fallback 1
};

// One block per row; shared memory: cap packed candidates, then x's row.
__global__ void __launch_bounds__(kRescoreThreads) SaeRescoreKernel(RescoreParams p) {
  SAE_DYNAMIC_SHARED(uint64_t, smem_u64);
  uint64_t* cand = smem_u64;
  float* xs = reinterpret_cast<float*>(cand + p.cap);
  __shared__ uint32_t s_n_active;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const int32_t* ci = p.cand_idx + row * p.n_cand;
  const float* cv = p.cand_val + row * p.n_cand;
  LoadRow(p.x, row, p.d, xs);

  int n_c = 0;  // the top-k kernel writes its valid slots first
  while (n_c < p.n_cand && ci[n_c] >= 0) ++n_c;
  for (int c = warp; c < n_c; c += kRescoreWarps) {
    const int32_t i = ci[c];
    const float v =
        ExactValue(ExactDot(p.w + static_cast<int64_t>(i) * p.d, xs, p.d, lane), p.scale_in, p.bias[i], p.fscale, i);
    if (lane == 0) cand[c] = v > p.threshold ? PackCandidate(OrderedKey(v), i) : 0;
  }
  __syncthreads();
  BlockSortCandidatesDesc(cand, static_cast<uint32_t>(n_c));
  if (tid == 0) {
    uint32_t n = 0;
    while (n < static_cast<uint32_t>(n_c) && cand[n] != 0) ++n;
    s_n_active = n;
  }
  __syncthreads();
  const uint32_t n_active = s_n_active;

  // Provably exact? If the list is not full, every feature whose exact value
  // can pass the threshold was a candidate. If it is full, a feature outside
  // it has an approximate value <= the last candidate's, so an exact value
  // <= limit; it cannot enter if the k-th exact value beats limit (or, with
  // fewer than k exact actives, if limit cannot pass the threshold).
  bool exact = p.margin[row] < INFINITY;  // no bound (x not finite): the exact path
  if (exact && n_c == p.n_cand) {
    const float last = cv[p.n_cand - 1], m = p.margin[row];
    const float limit = last + m + (fabsf(last) + m) * (1.0f / 1048576.0f);
    if (n_active >= static_cast<uint32_t>(p.k_keep)) {
      exact = KeyToFloat(static_cast<uint32_t>(cand[p.k_keep - 1] >> 32)) > limit;
    } else {
      exact = limit <= p.threshold;
    }
  }
  if (tid == 0) {
    p.fallback[row] = exact ? 0 : 1;
    if (!exact && p.fallback_count != nullptr) atomicAdd(p.fallback_count, 1ull);
  }
  if (!exact) return;  // block-uniform: the outputs come from the exact-row path
  WriteTopKRow(cand, min(n_active, static_cast<uint32_t>(p.k_keep)), p.k, p.out_idx + row * p.k, p.out_val + row * p.k);
}

// One block per flagged row: pre [n_rows, d_sae] <- exact dot products.
__global__ void __launch_bounds__(kRescoreThreads)
    SaeExactRowsKernel(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, int64_t d, int64_t d_sae,
                       const int32_t* __restrict__ fallback, float* __restrict__ pre) {
  SAE_DYNAMIC_SHARED(float, xs);
  const int64_t row = blockIdx.x;
  if (fallback[row] == 0) return;  // block-uniform
  LoadRow(x, row, d, xs);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t i = warp; i < d_sae; i += kRescoreWarps) {
    const float dot = ExactDot(w + i * d, xs, d, lane);
    if (lane == 0) pre[row * d_sae + i] = dot;
  }
}

// One block per row: h [n_rows, k] = scale_in * exact dot + bias for idx >= 0.
__global__ void __launch_bounds__(kRescoreThreads)
    SaeExactHKernel(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, int64_t d,
                    const float* __restrict__ bias, float scale_in, const int32_t* __restrict__ idx, int k,
                    float* __restrict__ h) {
  SAE_DYNAMIC_SHARED(float, xs);
  const int64_t row = blockIdx.x;
  LoadRow(x, row, d, xs);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j = warp; j < k; j += kRescoreWarps) {
    const int32_t i = idx[row * k + j];
    float v = 0.0f;
    if (i >= 0) v = fmaf(scale_in, ExactDot(w + static_cast<int64_t>(i) * d, xs, d, lane), bias[i]);
    if (lane == 0) h[row * k + j] = v;
  }
}

// One pass of SaeJumpReluExactKernel over row f (pre [d_sae]: w_i . bf16(x)):
// the candidates (approximate value above cut, or not comparable: NaN) get
// their exact h (0 when the exact value does not pass); each warp takes 32
// consecutive features, marks its candidates with a ballot and computes their
// dot products together. List pass: the active (index, h) go to the warp's
// kJumpReluListCap slots in scan order, f is not written; returns the warp's
// active count (> kJumpReluListCap: overflow). Dense pass: f[i] <- h where
// active, else 0, in place (a feature is read and written by its own lane).
template <bool kDense>
__device__ __forceinline__ int JumpReluExactPass(const __nv_bfloat16* __restrict__ w, const float* xs, int64_t d,
                                                 int64_t d_sae, const float* __restrict__ bias,
                                                 const float* __restrict__ fscale, float scale_in, float threshold,
                                                 float cut, float* f, int32_t* list_idx, float* list_h) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int n_listed = 0;  // warp-uniform
  for (int64_t base = static_cast<int64_t>(warp) * 32; base < d_sae; base += kRescoreThreads) {
    const int64_t i = base + lane;
    // !(v <= cut): a NaN approximation (x near FLT_MAX rounds to inf in bf16) defers to the exact value.
    const bool candidate = i < d_sae && !(ExactValue(f[i], scale_in, bias[i], fscale, i) <= cut);
    float h_own = 0.0f;  // this lane's feature: its exact h when active
    for (unsigned todo = __ballot_sync(kFullMask, candidate); todo != 0; todo &= todo - 1) {
      const int src = __ffs(static_cast<int>(todo)) - 1;
      const int64_t j = base + src;
      const float dot = ExactDot(w + j * d, xs, d, lane);
      if (lane == src) {
        const float h = fmaf(scale_in, dot, bias[j]);
        h_own = ExactValue(dot, scale_in, bias[j], fscale, j) > threshold ? h : 0.0f;
      }
    }
    if (kDense) {
      if (i < d_sae) f[i] = h_own;
    } else {
      const unsigned listed = __ballot_sync(kFullMask, h_own != 0.0f);  // an h of 0 adds nothing
      const int at = n_listed + __popc(listed & ((1u << lane) - 1u));
      if (h_own != 0.0f && at < kJumpReluListCap) {
        list_idx[at] = static_cast<int32_t>(i);
        list_h[at] = h_own;
      }
      n_listed += __popc(listed);
    }
  }
  return n_listed;
}

// JumpReLU activations from a plain-bf16 encoder GEMM, for reconstructions:
// pre [n_rows, d_sae] holds w_i . bf16(x_r). A feature's exact v_i can pass
// the threshold only if its approximate value is within the row's margin of
// it (the bound SaeMarginKernel proves), so only those candidates are
// recomputed (ExactDot over the fp32 row): the active features and the few
// near the threshold, however many, with no fallback. The active (index, h)
// go to a list, so the decode reads neither F nor d_sae values: warp w fills
// its own kJumpReluListCap slots of the row's list [kJumpReluListSlots] in
// scan order (deterministic, no atomics), unused slots get index -1. A row
// where some warp has more actives than slots sets dense_row[row] = 1 and
// takes a second, dense pass that writes F in place (exact h where active,
// else 0) for the decode to read; else dense_row[row] = 0 and pre is left
// as it was. One block per row; shared memory: x's row.
__global__ void __launch_bounds__(kRescoreThreads, 6)  // 6 blocks per SM: up to 42 registers, no spill on sm_80
    SaeJumpReluExactKernel(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w, int64_t d, int64_t d_sae,
                           const float* __restrict__ bias, const float* __restrict__ fscale, float scale_in,
                           float threshold, const float* __restrict__ margin, float* __restrict__ pre,
                           int32_t* __restrict__ list_idx, float* __restrict__ list_h,
                           int32_t* __restrict__ dense_row) {
  SAE_DYNAMIC_SHARED(float, xs);
  __shared__ int s_overflow;
  if (threadIdx.x == 0) s_overflow = 0;
  const int64_t row = blockIdx.x;
  LoadRow(x, row, d, xs);  // ends with a barrier
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* f = pre + row * d_sae;
  const int64_t slot0 = (row * kRescoreWarps + warp) * kJumpReluListCap;
  // No bound (x not finite): every feature is a candidate (!(v <= NaN)).
  const float cut = margin[row] < INFINITY ? LoweredThreshold(threshold, margin[row]) : NAN;
  const int n_listed = JumpReluExactPass<false>(w, xs, d, d_sae, bias, fscale, scale_in, threshold, cut, f,
                                                list_idx + slot0, list_h + slot0);
  for (int s = n_listed + lane; s < kJumpReluListCap; s += 32) list_idx[slot0 + s] = -1;
  if (lane == 0 && n_listed > kJumpReluListCap) s_overflow = 1;
  __syncthreads();
  const int overflow = s_overflow;  // block-uniform
  if (threadIdx.x == 0) dense_row[row] = overflow;
  if (overflow) {
    JumpReluExactPass<true>(w, xs, d, d_sae, bias, fscale, scale_in, threshold, cut, f, nullptr, nullptr);
  }
}

// JumpReLU watch list from a plain-bf16 GEMM against the watched rows, exact
// (see LaunchSaeSelectedExact): as SaeJumpReluExactKernel decides, the
// features whose approximate value is within the row's margin of the
// threshold or above it get their exact value (ExactDot over the fp32 row),
// the rest are inactive for sure. Warp w takes 32 consecutive watched
// features at a time, marks its candidates with a ballot and computes their
// dot products together. One block per row; shared memory: x's row.
__global__ void __launch_bounds__(kRescoreThreads)
    SaeSelectedExactKernel(const float* __restrict__ x, const __nv_bfloat16* __restrict__ rows, int64_t d,
                           const int32_t* __restrict__ ids, int64_t m, int64_t d_sae, const float* __restrict__ bias,
                           const float* __restrict__ fscale, float scale_in, float threshold,
                           const float* __restrict__ margin, const float* __restrict__ pre, float* __restrict__ out) {
  SAE_DYNAMIC_SHARED(float, xs);
  const int64_t row = blockIdx.x;
  LoadRow(x, row, d, xs);  // ends with a barrier
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // No bound (x not finite, or near fp32's overflow): every feature is a candidate (!(v <= NaN)).
  const float cut = margin[row] < INFINITY ? LoweredThreshold(threshold, margin[row]) : NAN;
  for (int64_t base = static_cast<int64_t>(warp) * 32; base < m; base += kRescoreThreads) {
    const int64_t j = base + lane;
    const int32_t id = j < m ? ids[j] : -1;
    const bool valid = id >= 0 && id < d_sae;
    const bool candidate = valid && !(ExactValue(pre[row * m + j], scale_in, bias[id], fscale, id) <= cut);
    float v_own = 0.0f;  // this lane's feature: its exact value when active
    for (unsigned todo = __ballot_sync(kFullMask, candidate); todo != 0; todo &= todo - 1) {
      const int src = __ffs(static_cast<int>(todo)) - 1;
      const float dot = ExactDot(rows + (base + src) * d, xs, d, lane);
      if (lane == src) {
        const float v = ExactValue(dot, scale_in, bias[id], fscale, id);
        v_own = v > threshold ? v : 0.0f;  // NaN is never active
      }
    }
    if (j < m) out[row * m + j] = v_own;
  }
}

// ---- launchers ----

cudaError_t LaunchSaeValueBound(const void* encoder_bf16, const float* bias, int64_t d_sae, int64_t d,
                                const float* feature_scale, float scale_in, SaeValueBounds* bound,
                                cudaStream_t stream) {
  if (d_sae == 0) return cudaSuccess;
  const auto* w = static_cast<const __nv_bfloat16*>(encoder_bf16);
  SAE_KERNEL_LAUNCH(SaeValueBoundKernel, GridFor(d_sae * 32, kRescoreThreads), kRescoreThreads, 0, stream)
  (w, d_sae, d, feature_scale, scale_in, bound);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  SAE_KERNEL_LAUNCH(SaeBiasBoundKernel, GridFor(d_sae, kRescoreThreads), kRescoreThreads, 0, stream)
  (bias, d_sae, feature_scale, scale_in, bound);
  return cudaGetLastError();
}

cudaError_t LaunchSaeMargins(const float* x, int64_t n_rows, int64_t d, const SaeValueBounds& bound, float scale_in,
                             float* margin, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffff) return cudaErrorInvalidValue;
  SAE_KERNEL_LAUNCH(SaeMarginKernel, static_cast<unsigned>(n_rows), kRescoreThreads, 0, stream)
  (x, d, bound, scale_in, margin);
  return cudaGetLastError();
}

cudaError_t LaunchSaeRescore(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, const float* bias,
                             const float* feature_scale, float scale_in, float threshold, const float* margin,
                             const int32_t* cand_idx, const float* cand_val, int n_cand, int k_keep, int k,
                             int32_t* out_idx, float* out_val, int32_t* fallback, unsigned long long* fallback_count,
                             cudaStream_t stream) {
  if (n_rows == 0 || k == 0) return cudaSuccess;
  if (n_rows > 0x7fffffff || n_cand < 1 || k_keep < 1 || k_keep > n_cand || k_keep > k) return cudaErrorInvalidValue;
  const uint32_t cap = SaeRescoreCandidateCap(n_cand);
  const size_t smem = SaeRescoreSharedBytes(n_cand, d);
  cudaError_t err = RaiseSharedLimit(SaeRescoreKernel, smem);
  if (err != cudaSuccess) return err;
  const RescoreParams params{x,
                             static_cast<const __nv_bfloat16*>(encoder_bf16),
                             d,
                             bias,
                             feature_scale,
                             scale_in,
                             threshold,
                             margin,
                             cand_idx,
                             cand_val,
                             n_cand,
                             k_keep,
                             k,
                             cap,
                             out_idx,
                             out_val,
                             fallback,
                             fallback_count};
  SAE_KERNEL_LAUNCH(SaeRescoreKernel, static_cast<unsigned>(n_rows), kRescoreThreads, smem, stream)(params);
  return cudaGetLastError();
}

// One block per row of x (n_rows rows of d floats), the row in dynamic
// shared memory: the launch shape of the exact-value kernels below.
template <typename... Params, typename... Args>
cudaError_t LaunchPerRowOfX(void (*kernel)(Params...), int64_t n_rows, int64_t d, cudaStream_t stream, Args&&... args) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffff) return cudaErrorInvalidValue;  // gridDim.x limit
  const size_t smem = static_cast<size_t>(d) * sizeof(float);
  cudaError_t err = RaiseSharedLimit(kernel, smem);
  if (err != cudaSuccess) return err;
  SAE_KERNEL_LAUNCH(kernel, static_cast<unsigned>(n_rows), kRescoreThreads, smem, stream)
  (std::forward<Args>(args)...);
  return cudaGetLastError();
}

cudaError_t LaunchSaeExactRows(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, int64_t d_sae,
                               const int32_t* fallback, float* pre, cudaStream_t stream) {
  return LaunchPerRowOfX(SaeExactRowsKernel, n_rows, d, stream, x, static_cast<const __nv_bfloat16*>(encoder_bf16), d,
                         d_sae, fallback, pre);
}

cudaError_t LaunchSaeExactH(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, const float* bias,
                            float scale_in, const int32_t* idx, int k, float* h, cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  return LaunchPerRowOfX(SaeExactHKernel, n_rows, d, stream, x, static_cast<const __nv_bfloat16*>(encoder_bf16), d,
                         bias, scale_in, idx, k, h);
}

cudaError_t LaunchSaeJumpReluExact(const float* x, const void* encoder_bf16, int64_t n_rows, int64_t d, int64_t d_sae,
                                   const float* bias, const float* feature_scale, float scale_in, float threshold,
                                   const float* margin, float* pre, int32_t* list_idx, float* list_h,
                                   int32_t* dense_row, cudaStream_t stream) {
  if (d_sae == 0) return cudaSuccess;
  return LaunchPerRowOfX(SaeJumpReluExactKernel, n_rows, d, stream, x, static_cast<const __nv_bfloat16*>(encoder_bf16),
                         d, d_sae, bias, feature_scale, scale_in, threshold, margin, pre, list_idx, list_h, dense_row);
}

cudaError_t LaunchSaeSelectedExact(const float* x, const void* rows_bf16, int64_t n_rows, int64_t d, const int32_t* ids,
                                   int64_t m, int64_t d_sae, const float* bias, const float* feature_scale,
                                   float scale_in, float threshold, const float* margin, const float* pre, float* out,
                                   cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  return LaunchPerRowOfX(SaeSelectedExactKernel, n_rows, d, stream, x, static_cast<const __nv_bfloat16*>(rows_bf16), d,
                         ids, m, d_sae, bias, feature_scale, scale_in, threshold, margin, pre, out);
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_SAE_RESCORE_CUH_
