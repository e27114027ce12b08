// Device side of the CUDA CPU emulator. Every CUDA thread of a block runs as
// a fiber on the host thread that executes the kernel; barriers and warp
// intrinsics switch fibers, so block-level code (shared memory, __syncthreads,
// shuffles, ballots, shared-memory atomics) runs with CUDA's semantics.
// Undefined behaviour the emulator can see (a divergent __syncthreads, a warp
// intrinsic with lanes missing, a deadlock) aborts with a message naming the
// source line. Blocks run one after another, so inter-block races cannot show.
#ifndef SAE_TESTS_CUDA_EMU_SAE_EMU_DEVICE_H_
#define SAE_TESTS_CUDA_EMU_SAE_EMU_DEVICE_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared by the fibers of a block (they all run on one host thread) and
// reused by the next block, as shared memory is.
#define __shared__ static thread_local

namespace sae_emu {

const dim3& ThreadIdx();
const dim3& BlockIdx();
const dim3& BlockDim();
const dim3& GridDim();
int LaneId();
// The launch's dynamic shared memory, filled with 0xff bytes at block start.
void* DynamicSharedMemory();
void SyncThreads(int line);
// Every lane of the caller's warp deposits `bits` (the mask must name all 32
// lanes, all alive); returns the 32 deposits once all lanes have arrived.
const uint64_t* WarpGather(unsigned mask, uint64_t bits, int line);

template <typename T>
uint64_t ToBits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T FromBits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
T Shfl(int line, unsigned mask, T v, int src_lane, int width = 32) {
  const uint64_t* all = WarpGather(mask, ToBits(v), line);
  const int base = LaneId() & ~(width - 1);
  return FromBits<T>(all[base + (src_lane & (width - 1))]);
}
template <typename T>
T ShflXor(int line, unsigned mask, T v, int lane_mask, int width = 32) {
  const uint64_t* all = WarpGather(mask, ToBits(v), line);
  const int lane = LaneId(), src = lane ^ lane_mask;
  return src / width > lane / width ? v : FromBits<T>(all[src & 31]);  // later groups: own value
}
template <typename T>
T ShflDown(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  const uint64_t* all = WarpGather(mask, ToBits(v), line);
  const int lane = LaneId();
  return (lane & (width - 1)) + static_cast<int>(delta) >= width ? v : FromBits<T>(all[lane + delta]);
}
template <typename T>
T ShflUp(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  const uint64_t* all = WarpGather(mask, ToBits(v), line);
  const int lane = LaneId();
  return (lane & (width - 1)) < static_cast<int>(delta) ? v : FromBits<T>(all[lane - delta]);
}
inline unsigned Ballot(int line, unsigned mask, int predicate) {
  const uint64_t* all = WarpGather(mask, predicate != 0 ? 1 : 0, line);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= static_cast<unsigned>(all[i] != 0) << i;
  return r & mask;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling warp:
// d += a * b with the fragment layout of the PTX ISA (see MmaBf16M16N8K16 in
// server/core/cuda/common.cuh). A warp-wide call: every lane must reach it at
// the same line with its own fragments; products of bf16 are exact in fp32
// and summed in fp32 in k order.
void MmaBf16M16N8K16(int line, float* d, const uint32_t* a, const uint32_t* b);

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for the calling warp (see
// SAE_LDMATRIX_X4 in server/core/cuda/common.cuh): every lane gives one row
// address (16-byte aligned, inside the block's dynamic shared memory) and
// receives its four registers once all lanes have arrived.
void LdMatrixX4(int line, uint32_t* r, const void* row, bool trans);

// cp.async of 16 bytes (src_bytes of them read, the rest zeros). The source
// is read at the call; the bytes reach dst (which must lie in the block's
// dynamic shared memory) only when the calling thread waits for the copy's
// group, so a reader that skips the wait or the barrier after it sees the
// old contents, as it may on a GPU.
void CpAsync16(int line, void* dst, const void* src, int src_bytes);
void CpAsyncCommit();
// Lands the copies of every committed group but the newest n.
void CpAsyncWait(int n);

// A kernel launch: `SAE_KERNEL_LAUNCH(k, grid, block, smem, stream)(args...)`.
// Arguments are converted to the kernel's parameter types and copied, as a
// real launch does; the grid runs when the stream reaches it.
struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  const void* func;
};
// Validates the configuration (an error is what cudaGetLastError returns
// next) and queues `thread_body` to run as every thread of every block.
void EnqueueKernel(const LaunchConfig& config, std::function<void()> thread_body);

template <typename... P>
class KernelLauncher {
 public:
  KernelLauncher(void (*kernel)(P...), const LaunchConfig& config) : kernel_(kernel), config_(config) {}
  void operator()(P... args) const {
    auto kernel = kernel_;
    std::tuple<std::decay_t<P>...> params(args...);
    EnqueueKernel(config_, [kernel, params]() { std::apply(kernel, params); });
  }

 private:
  void (*kernel_)(P...);
  LaunchConfig config_;
};

template <typename... P>
KernelLauncher<P...> Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream) {
  return KernelLauncher<P...>(kernel,
                              LaunchConfig{grid, block, shared_bytes, stream, reinterpret_cast<const void*>(kernel)});
}

// Atomics: the fibers of the emulator never run concurrently, so a plain
// read-modify-write is atomic.
template <typename T>
T AtomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T AtomicMax(T* address, T value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
template <typename T>
T AtomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T AtomicCas(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

}  // namespace sae_emu

#define SAE_KERNEL_LAUNCH(kernel, grid, block, smem, stream) ::sae_emu::Launch(kernel, grid, block, smem, stream)
#define SAE_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::sae_emu::DynamicSharedMemory())

#define threadIdx (::sae_emu::ThreadIdx())
#define blockIdx (::sae_emu::BlockIdx())
#define blockDim (::sae_emu::BlockDim())
#define gridDim (::sae_emu::GridDim())

#define __syncthreads() ::sae_emu::SyncThreads(__LINE__)
#define __shfl_sync(...) ::sae_emu::Shfl(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::sae_emu::ShflXor(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::sae_emu::ShflDown(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::sae_emu::ShflUp(__LINE__, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::sae_emu::Ballot(__LINE__, mask, predicate)
#define SAE_MMA_BF16_M16N8K16(d, a, b) ::sae_emu::MmaBf16M16N8K16(__LINE__, d, a, b)
#define SAE_LDMATRIX_X4(r, row) ::sae_emu::LdMatrixX4(__LINE__, r, row, false)
#define SAE_LDMATRIX_X4_TRANS(r, row) ::sae_emu::LdMatrixX4(__LINE__, r, row, true)
#define SAE_CP_ASYNC_16(dst, src, src_bytes) ::sae_emu::CpAsync16(__LINE__, dst, src, src_bytes)
#define SAE_CP_ASYNC_COMMIT() ::sae_emu::CpAsyncCommit()
#define SAE_CP_ASYNC_WAIT(n) ::sae_emu::CpAsyncWait(n)

#define atomicAdd(address, value) ::sae_emu::AtomicAdd(address, value)
#define atomicMax(address, value) ::sae_emu::AtomicMax(address, value)
#define atomicExch(address, value) ::sae_emu::AtomicExch(address, value)
#define atomicCAS(address, compare, value) ::sae_emu::AtomicCas(address, compare, value)

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
// CUDA's device min/max: one overload per type; mixed calls do not compile
// here, which keeps the kernels explicit about the type they compare in.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

#endif  // SAE_TESTS_CUDA_EMU_SAE_EMU_DEVICE_H_
