// Device helpers shared by the kernel headers.
#ifndef SAE_CORE_CUDA_COMMON_CUH_
#define SAE_CORE_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "core/cuda/launchers.h"

// Kernels are launched, and dynamic shared memory declared, through these
// macros: the CPU emulator that tests the kernels (tests/cuda_emu) compiles
// the same headers with the host compiler and defines its own versions.
#ifndef SAE_KERNEL_LAUNCH
#define SAE_KERNEL_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define SAE_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace sae {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Two bf16 in one 32-bit register, `lo` in the low half: the element order
// of mma's .bf16x2 operands.
__device__ __forceinline__ uint32_t PackBf16Pair(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
// Two floats rounded to bf16 (nearest even), packed so.
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  return PackBf16Pair(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

// d += a * b on the tensor cores, one warp: mma.sync.aligned.m16n8k16.row.col
// .f32.bf16.bf16.f32. Fragments as the PTX ISA lays them out (g = lane / 4,
// t = lane % 4; each register holds two bf16, the lower column/row first):
//   a[4]: A [16 x 16] row-major: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..],
//         a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b[2]: B [16 x 8]: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   d[4]: D [16 x 8] f32: d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..]
// Every lane of the warp must call it together. The CPU emulator provides its
// own (same contract) through SAE_MMA_BF16_M16N8K16.
#ifndef SAE_MMA_BF16_M16N8K16
__device__ __forceinline__ void MmaBf16M16N8K16(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#define SAE_MMA_BF16_M16N8K16(d, a, b) ::sae::cuda::MmaBf16M16N8K16(d, a, b)
#endif

// Shared-memory fragment loads and asynchronous global->shared copies (sm_80+).
// The CPU emulator provides its own, same contracts, through the macros.
//
// SAE_LDMATRIX_X4(r, row): ldmatrix.sync.aligned.m8n8.x4.shared.b16, one warp.
// Four 8x8 matrices of 16-bit elements; lanes 8i..8i+7 give the addresses of
// matrix i's rows 0..7 (16 bytes each, 16-byte aligned, shared memory). Lane
// l receives in r[i] row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i (lower
// column in the low half): the layout of mma's A and B fragments.
// SAE_LDMATRIX_X4_TRANS(r, row): the same with .trans: r[i] holds rows
// 2(l%4) and 2(l%4)+1 of column l/4 (lower row in the low half), so a
// row-major [k][n] tile in shared memory gives mma's B fragments directly.
//
// SAE_CP_ASYNC_16(dst, src, src_bytes): cp.async.cg.shared.global of 16
// bytes (both 16-byte aligned); bytes past src_bytes (0 or 16 here) are
// zero-filled, not read. The copy lands only once the thread has waited for
// its group: SAE_CP_ASYNC_COMMIT() closes the thread's current group and
// SAE_CP_ASYNC_WAIT(n) (n a constant) waits until at most n of its committed
// groups are still in flight. Other threads see the data after that wait and
// a __syncthreads.
#ifndef SAE_LDMATRIX_X4
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void LdMatrixX4(uint32_t* r, const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row))
               : "memory");
#endif
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row))
               : "memory");
#endif
}
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(dst)), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#define SAE_LDMATRIX_X4(r, row) ::sae::cuda::LdMatrixX4(r, row)
#define SAE_LDMATRIX_X4_TRANS(r, row) ::sae::cuda::LdMatrixX4Trans(r, row)
#define SAE_CP_ASYNC_16(dst, src, src_bytes) ::sae::cuda::CpAsync16(dst, src, src_bytes)
#define SAE_CP_ASYNC_COMMIT() ::sae::cuda::CpAsyncCommit()
#define SAE_CP_ASYNC_WAIT(n) ::sae::cuda::CpAsyncWait<n>()
#endif

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n items: enough blocks to fill the
// device many times over, never more than the items need.
inline unsigned GridFor(int64_t n, int threads) {
  const int64_t blocks = CeilDiv(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

// Raises `kernel`'s dynamic shared memory limit on the current device to at
// least `bytes`. The attribute belongs to the process, not to a launch, so it
// is only ever raised: setting a lower value for one call could fail the
// launch of another thread that has just set a higher one.
template <typename F>
cudaError_t RaiseSharedLimit(F* kernel, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> raised;  // (device, kernel) -> limit set
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  size_t& limit = raised[{device, reinterpret_cast<const void*>(kernel)}];
  if (bytes <= limit) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) limit = bytes;
  return err;
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

// An fp32 activation as a GEMM's bf16 operand: rounded to nearest even, but
// saturated at the largest finite bf16 (2^128 - 2^120), where plain rounding
// would turn the top of the fp32 range into inf. So a finite x keeps a finite
// bf16 part and a finite rest x - part (LaunchSplitToBf16); inf and NaN stay.
__device__ __forceinline__ __nv_bfloat16 Bf16Part(float v) {
  constexpr float kMaxBf16 = 0x1.fep127f;
  const float a = fabsf(v);
  return __float2bfloat16_rn(a > kMaxBf16 && a < INFINITY ? copysignf(kMaxBf16, v) : v);
}

// Two floats as Bf16Part rounds them, packed as PackBf16x2 packs.
__device__ __forceinline__ uint32_t PackBf16Parts(float lo, float hi) {
  return PackBf16Pair(Bf16Part(lo), Bf16Part(hi));
}

// The float whose upper 16 bits are the low half of `bits` (a bf16 value).
__device__ __forceinline__ float Bf16BitsToFloat(uint32_t bits) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ float RoundToBf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Whether either bf16 of a packed pair is inf or NaN (exponent all ones).
__device__ __forceinline__ bool Bf16x2NonFinite(uint32_t w) {
  return (w & 0x7f80u) == 0x7f80u || (w & 0x7f800000u) == 0x7f800000u;
}

// Activation stores: F32 as is, or BF16 as Bf16Part rounds (the rounding
// LaunchSplitToBf16 applies before a GEMM, so a BF16-output op feeds the GEMM
// the same bits as its F32 output would after that pass).
__device__ __forceinline__ void StoreAs(float* p, float v) { *p = v; }
__device__ __forceinline__ void StoreAs(__nv_bfloat16* p, float v) { *p = Bf16Part(v); }

template <typename T>  // float or double
__device__ __forceinline__ T WarpSum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sum over the block, returned to every thread. `scratch` holds >= 32 Ts;
// the block size is a multiple of 32.
template <typename T>  // float or double
__device__ __forceinline__ T BlockSum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < n_warps; ++w) total += scratch[w];  // same order in every thread: same result
  __syncthreads();                                        // scratch may be reused right after
  return total;
}

}  // namespace cuda
}  // namespace sae

#endif  // SAE_CORE_CUDA_COMMON_CUH_
