// CUDA runtime emulation: memory, streams, events and kernel execution on the
// CPU (see README.md). Work queued on a stream runs when something waits for
// it (a stream / event / device synchronisation, a wait on another stream, a
// copy into pageable host memory), never at the call: host code that reads a
// result, or reuses a pinned buffer, before waiting for it sees stale data.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_runtime_api.h"
#include "emu_internal.h"
#include "sae_emu_device.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

struct CUstream_st {
  std::deque<std::function<void()>> ops;
  uint64_t executed = 0;  // ops run so far; ops.size() more are queued
};
struct CUevent_st {
  CUstream_st* stream = nullptr;  // nullptr: never recorded (complete)
  uint64_t target = 0;            // complete once stream->executed >= target
  bool timing = true;             // created without cudaEventDisableTiming
  // Host clock (ms) when the last record was reached; shared with the queued
  // op that stamps it, which may outlive the event.
  std::shared_ptr<double> reached_ms = std::make_shared<double>(-1.0);
};
struct CUmemPoolHandle_st {};

namespace sae_emu {

[[noreturn]] void Fatal(const std::string& message) {
  std::fprintf(stderr, "cuda emulator: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

namespace {

// ---- global state ----

std::recursive_mutex& Mu() {
  static auto* mu = new std::recursive_mutex();
  return *mu;
}

thread_local cudaError_t last_error = cudaSuccess;

// A kernel that faulted leaves the context unusable, as on a GPU: from then on
// every runtime call returns this error (guarded by Mu()). Tests inject one:
// while the file named by SAE_CUDA_EMU_FAULT_FILE exists, the next kernel to
// run faults instead of running, with the cudaError_t number the file starts
// with, else cudaErrorIllegalAddress.
cudaError_t sticky_error = cudaSuccess;

cudaError_t InjectedFault() {
  const char* path = std::getenv("SAE_CUDA_EMU_FAULT_FILE");
  if (path == nullptr || path[0] == '\0') return cudaSuccess;
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return cudaSuccess;
  int code = 0;
  const bool numbered = std::fscanf(f, "%d", &code) == 1 && code > 0;
  std::fclose(f);
  return numbered ? static_cast<cudaError_t>(code) : cudaErrorIllegalAddress;
}

// Tests hang the device too: while the file named by SAE_CUDA_EMU_HANG_FILE
// exists, the next kernel to run does not end (it looks for the file every
// 10 ms), so whatever waits for it waits, as behind a kernel that never ends.
void HangWhileFileExists() {
  const char* path = std::getenv("SAE_CUDA_EMU_HANG_FILE");
  if (path == nullptr || path[0] == '\0') return;
  while (access(path, F_OK) == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

cudaError_t Fail(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

enum class Region { kDevice, kPinned };
struct Allocation {
  size_t bytes;
  Region region;
  bool pooled = false;  // from cudaMallocAsync: counted as the pool's reserved memory
};
std::map<uintptr_t, Allocation>& Allocations() {
  static auto* a = new std::map<uintptr_t, Allocation>();
  return *a;
}
size_t device_bytes = 0;
size_t pool_bytes = 0;  // the pooled allocations not yet freed in stream order

size_t DeviceCapacity() {
  static const size_t cap = [] {
    const char* v = std::getenv("SAE_CUDA_EMU_MEMORY_MB");
    const long mb = v != nullptr ? std::atol(v) : 0;
    return static_cast<size_t>(mb > 0 ? mb : 8192) << 20;
  }();
  return cap;
}

size_t DeviceBytesInUse() { return device_bytes; }

// The allocation of `region` holding [p, p + n), or nullptr.
const Allocation* Find(const void* p, size_t n, Region region) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  auto& allocs = Allocations();
  auto it = allocs.upper_bound(u);
  if (it == allocs.begin()) return nullptr;
  --it;
  if (it->second.region != region || u + n > it->first + it->second.bytes) return nullptr;
  return &it->second;
}

}  // namespace

void CheckDeviceRange(const void* p, size_t n, const char* what) {
  if (n == 0) return;
  if (Find(p, n, Region::kDevice) == nullptr && Find(p, n, Region::kPinned) == nullptr) {
    Fatal(std::string(what) + ": " + std::to_string(n) + " bytes at " + std::to_string(reinterpret_cast<uintptr_t>(p)) +
          " are not inside one live device allocation (out of bounds, or used after a stream-ordered free)");
  }
}

namespace {

void* AllocBytes(size_t bytes, Region region) {
  if (region == Region::kDevice && device_bytes + bytes > DeviceCapacity()) return nullptr;
  // Exactly `bytes` (256-aligned, like cudaMalloc): under AddressSanitizer a
  // kernel reading past the end of a buffer is reported.
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<size_t>(bytes, 1)) != 0) return nullptr;
  // Fresh device memory holds garbage on a GPU (the pool recycles blocks):
  // 0xff bytes (NaN floats, -1 ints) make a read before the first write show.
  if (region == Region::kDevice) std::memset(p, 0xff, bytes);
  Allocations()[reinterpret_cast<uintptr_t>(p)] = Allocation{bytes, region, false};
  if (region == Region::kDevice) device_bytes += bytes;
  return p;
}

bool FreeBytes(void* p, Region region) {
  auto& allocs = Allocations();
  auto it = allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == allocs.end() || it->second.region != region) return false;
  if (region == Region::kDevice) device_bytes -= it->second.bytes;
  if (it->second.pooled) pool_bytes -= it->second.bytes;
  allocs.erase(it);
  std::free(p);
  return true;
}

// ---- streams ----

// Queued ops the host had to run because it waited (a synchronisation, a
// host event wait, a copy to pageable memory, cudaFree), not counting the
// ops those ran in turn: SaeEmuOpsRunForHost() lets a test check that code
// meant only to queue work made the host wait for none.
uint64_t ops_run_for_host = 0;
int flush_depth = 0;

std::set<CUstream_st*>& Streams() {
  static auto* s = new std::set<CUstream_st*>();
  return *s;
}

void Flush(CUstream_st* s, uint64_t target) {
  while (s->executed < target && !s->ops.empty()) {
    std::function<void()> op = std::move(s->ops.front());
    s->ops.pop_front();
    ++s->executed;
    if (flush_depth == 0) ++ops_run_for_host;
    ++flush_depth;
    op();
    --flush_depth;
  }
}
void FlushAll() {
  for (CUstream_st* s : Streams()) Flush(s, s->executed + s->ops.size());
}
uint64_t Enqueued(const CUstream_st* s) { return s->executed + s->ops.size(); }

bool ValidStream(cudaStream_t s) { return s == nullptr || Streams().count(s) > 0; }

// The legacy default stream (nullptr) runs at once, after everything queued.
void Enqueue(cudaStream_t s, std::function<void()> op) {
  if (s == nullptr) {
    FlushAll();
    op();
    return;
  }
  s->ops.push_back(std::move(op));
}

std::map<const void*, int>& MaxDynamicShared() {
  static auto* m = new std::map<const void*, int>();
  return *m;
}
constexpr int kDefaultDynamicShared = 48 << 10;
// The dynamic shared memory a block may opt in to: by default the smallest
// of the targeted archs (sm_80: 163 KiB; sm_90: 227 KiB);
// SAE_CUDA_EMU_SHARED_KIB sets another (99 on sm_86 / sm_89).
int MaxDynamicSharedOptin() {
  static const int optin = [] {
    const char* v = std::getenv("SAE_CUDA_EMU_SHARED_KIB");
    const long kib = v != nullptr ? std::atol(v) : 0;
    return (kib >= 48 && kib <= 1024 ? static_cast<int>(kib) : 163) << 10;
  }();
  return optin;
}

// ---- fibers ----

constexpr size_t kStackBytes = 256 << 10;

#if defined(__x86_64__)
extern "C" void sae_emu_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer, loads the other one and restores.
asm(R"(
  .text
  .globl sae_emu_switch
  .hidden sae_emu_switch
  .type sae_emu_switch,@function
sae_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sae_emu_switch,.-sae_emu_switch
)");
#endif

enum class Wait { kNone, kBlock, kWarp };

// A cp.async issued by a thread and not yet landed (SAE_CP_ASYNC_16).
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  int tid = 0, warp = 0, lane = 0;
  std::vector<AsyncCopy> async_copies;  // issued, oldest first
  std::vector<size_t> async_groups;     // committed groups in flight: each one's end in async_copies
  dim3 idx;
  bool done = false;
  Wait wait = Wait::kNone;
  uint64_t wait_gen = 0;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

struct WarpState {
  unsigned live_mask = 0;
  int live = 0, arrived = 0, site = 0;
  uint64_t gen = 0;
  uint64_t slots[2][32] = {};
};

struct BlockState {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int live = 0, arrived = 0, site = 0;
  uint64_t gen = 0;
  dim3 idx, dim, grid;
  std::vector<uint64_t> dynamic_shared;
  const std::function<void()>* body = nullptr;
  int line_of_kernel = 0;
};

// AddressSanitizer must be told about every stack switch.
#if defined(__SANITIZE_ADDRESS__)
thread_local const void* scheduler_stack_bottom = nullptr;
thread_local size_t scheduler_stack_size = 0;
thread_local void* scheduler_fake_stack = nullptr;
void BeforeSwitchToFiber(const char* stack) {
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, stack, kStackBytes);
}
void AfterSwitchToScheduler() { __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr); }
void BeforeSwitchToScheduler(Fiber* f, bool exiting) {
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, scheduler_stack_bottom, scheduler_stack_size);
}
void AfterSwitchToFiber(Fiber* f) {
  __sanitizer_finish_switch_fiber(f->fake_stack, &scheduler_stack_bottom, &scheduler_stack_size);
}
#else
void BeforeSwitchToFiber(const char*) {}
void AfterSwitchToScheduler() {}
void BeforeSwitchToScheduler(Fiber*, bool) {}
void AfterSwitchToFiber(Fiber*) {}
#endif

thread_local BlockState* cur_block = nullptr;
thread_local Fiber* cur_fiber = nullptr;
#if defined(__x86_64__)
thread_local void* scheduler_sp = nullptr;
#else
thread_local ucontext_t scheduler_ctx;
#endif

// Stacks for up to 1024 fibers, reserved once per host thread; the lowest
// page of each is a guard.
char* StackFor(int tid) {
  thread_local std::vector<char*> stacks;
  while (static_cast<int>(stacks.size()) <= tid) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) Fatal("cannot map a fiber stack");
    mprotect(p, static_cast<size_t>(sysconf(_SC_PAGESIZE)), PROT_NONE);
    stacks.push_back(static_cast<char*>(p));
  }
  return stacks[static_cast<size_t>(tid)];
}

void YieldToScheduler(bool exiting = false) {
  Fiber* f = cur_fiber;
  BeforeSwitchToScheduler(f, exiting);
#if defined(__x86_64__)
  sae_emu_switch(&f->sp, scheduler_sp);
#else
  swapcontext(&f->ctx, &scheduler_ctx);
#endif
  AfterSwitchToFiber(f);
}

void OnExit(Fiber* f) {
  BlockState& b = *cur_block;
  WarpState& w = b.warps[static_cast<size_t>(f->warp)];
  f->done = true;
  --b.live;
  --w.live;
  w.live_mask &= ~(1u << f->lane);
  if (w.arrived > 0) {
    Fatal("thread " + std::to_string(f->tid) + " exited while its warp waits in a warp intrinsic at line " +
          std::to_string(w.site) + " with a full mask");
  }
  if (b.arrived > 0 && b.arrived == b.live) {  // exited threads do not hold a barrier back
    b.arrived = 0;
    ++b.gen;
  }
}

void FiberMain() {
  AfterSwitchToFiber(cur_fiber);
  (*cur_block->body)();
  OnExit(cur_fiber);
  YieldToScheduler(/*exiting=*/true);
  Fatal("a finished fiber was resumed");
}

void StartFiber(Fiber* f) {
  char* stack = f->stack;
#if defined(__SANITIZE_ADDRESS__)
  // The previous fiber on this stack never returned: clear its frames' poison.
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);
#endif
#if defined(__x86_64__)
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~static_cast<uintptr_t>(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                  // FiberMain's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(&FiberMain);             // where sae_emu_switch returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;                      // rbp rbx r12 r13 r14 r15
  *--sp = 0x1f80ull | (static_cast<uint64_t>(0x037f) << 32);  // default MXCSR, x87 control word
  f->sp = sp;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = stack;
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = nullptr;
  makecontext(&f->ctx, &FiberMain, 0);
#endif
}

void RunBlock(BlockState& b) {
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.fibers.assign(static_cast<size_t>(n), Fiber());
  b.warps.assign(static_cast<size_t>((n + 31) / 32), WarpState());
  b.live = n;
  b.arrived = 0;
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[static_cast<size_t>(t)];
    f.tid = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.idx = dim3(static_cast<unsigned>(t) % b.dim.x, (static_cast<unsigned>(t) / b.dim.x) % b.dim.y,
                 static_cast<unsigned>(t) / (b.dim.x * b.dim.y));
    f.stack = StackFor(t);
    StartFiber(&f);
    WarpState& w = b.warps[static_cast<size_t>(f.warp)];
    w.live_mask |= 1u << f.lane;
    ++w.live;
  }
  std::fill(b.dynamic_shared.begin(), b.dynamic_shared.end(), ~0ull);  // uninitialised, like shared memory
  while (b.live > 0) {
    bool ran = false;
    for (Fiber& f : b.fibers) {
      if (f.done) continue;
      if (f.wait == Wait::kBlock && f.wait_gen == b.gen) continue;
      if (f.wait == Wait::kWarp && f.wait_gen == b.warps[static_cast<size_t>(f.warp)].gen) continue;
      f.wait = Wait::kNone;
      cur_fiber = &f;
      BeforeSwitchToFiber(f.stack);
#if defined(__x86_64__)
      sae_emu_switch(&scheduler_sp, f.sp);
#else
      swapcontext(&scheduler_ctx, &f.ctx);
#endif
      AfterSwitchToScheduler();
      ran = true;
    }
    if (!ran) {
      std::string who;
      for (const Fiber& f : b.fibers) {
        if (f.done || !who.empty()) continue;
        who = "thread " + std::to_string(f.tid) + " waits at " +
              (f.wait == Wait::kBlock
                   ? "__syncthreads (line " + std::to_string(b.site) + ")"
                   : "a warp intrinsic (line " + std::to_string(b.warps[static_cast<size_t>(f.warp)].site) + ")");
      }
      Fatal("deadlock in block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + "): " + who +
            " but no thread can reach it");
    }
  }
  cur_fiber = nullptr;
}

void RunGrid(const LaunchConfig& c, const std::function<void()>& body) {
  BlockState b;
  b.dim = c.block;
  b.grid = c.grid;
  b.body = &body;
  b.dynamic_shared.resize((c.shared_bytes + 7) / 8);
  BlockState* saved = cur_block;
  cur_block = &b;
  for (unsigned z = 0; z < c.grid.z; ++z) {
    for (unsigned y = 0; y < c.grid.y; ++y) {
      for (unsigned x = 0; x < c.grid.x; ++x) {
        b.idx = dim3(x, y, z);
        RunBlock(b);
      }
    }
  }
  cur_block = saved;
}

BlockState& Block() {
  if (cur_block == nullptr || cur_fiber == nullptr) Fatal("device code called outside a kernel");
  return *cur_block;
}

}  // namespace

// ---- device side (sae_emu_device.h) ----

const dim3& ThreadIdx() {
  Block();
  return cur_fiber->idx;
}
const dim3& BlockIdx() { return Block().idx; }
const dim3& BlockDim() { return Block().dim; }
const dim3& GridDim() { return Block().grid; }
int LaneId() {
  Block();
  return cur_fiber->lane;
}
void* DynamicSharedMemory() { return Block().dynamic_shared.data(); }

void SyncThreads(int line) {
  BlockState& b = Block();
  Fiber* f = cur_fiber;
  if (b.arrived == 0) {
    b.site = line;
  } else if (b.site != line) {
    Fatal("divergent __syncthreads: thread " + std::to_string(f->tid) + " is at line " + std::to_string(line) +
          " while others wait at line " + std::to_string(b.site));
  }
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f->wait = Wait::kBlock;
  f->wait_gen = b.gen;
  YieldToScheduler();
}

const uint64_t* WarpGather(unsigned mask, uint64_t bits, int line) {
  BlockState& b = Block();
  Fiber* f = cur_fiber;
  WarpState& w = b.warps[static_cast<size_t>(f->warp)];
  if (mask != 0xffffffffu || w.live_mask != 0xffffffffu) {
    Fatal("warp intrinsic at line " + std::to_string(line) + " with mask " + std::to_string(mask) +
          " in a warp whose live lanes are " + std::to_string(w.live_mask) +
          " (only full-warp intrinsics are emulated)");
  }
  if (w.arrived == 0) {
    w.site = line;
  } else if (w.site != line) {
    Fatal("divergent warp intrinsic: lane " + std::to_string(f->lane) + " is at line " + std::to_string(line) +
          " while its warp waits at line " + std::to_string(w.site));
  }
  uint64_t* slots = w.slots[w.gen & 1];
  slots[f->lane] = bits;
  if (++w.arrived == w.live) {
    w.arrived = 0;
    ++w.gen;
    return slots;
  }
  f->wait = Wait::kWarp;
  f->wait_gen = w.gen;
  YieldToScheduler();
  return slots;
}

void MmaBf16M16N8K16(int line, float* d, const uint32_t* a, const uint32_t* b) {
  struct Operands {
    const uint32_t* a;  // 4 registers
    const uint32_t* b;  // 2 registers
  };
  const Operands mine{a, b};
  // Every lane publishes where its fragments are; each lane then reads the
  // rows of A and the columns of B its outputs need from their owners. The
  // second gather keeps every lane here until all have read, so no fragment
  // changes under a reader.
  const uint64_t* all = WarpGather(0xffffffffu, reinterpret_cast<uint64_t>(&mine), line);
  auto operands = [&](int lane) { return reinterpret_cast<const Operands*>(all[lane]); };
  auto half = [](uint32_t reg, int i) {
    return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(reg >> (16 * (i & 1)))});
  };
  const int lane = LaneId(), g = lane >> 2, t = lane & 3;
  // A rows g and g + 8, from the four lanes of group g: lane 4g + tt holds
  // columns 2tt, 2tt+1 (a[0] / a[1]) and 2tt+8, 2tt+9 (a[2] / a[3]).
  float rows[2][16];
  for (int tt = 0; tt < 4; ++tt) {
    const uint32_t* fa = operands(4 * g + tt)->a;
    for (int i = 0; i < 2; ++i) {
      rows[0][2 * tt + i] = half(fa[0], i);
      rows[1][2 * tt + i] = half(fa[1], i);
      rows[0][2 * tt + 8 + i] = half(fa[2], i);
      rows[1][2 * tt + 8 + i] = half(fa[3], i);
    }
  }
  // B columns 2t and 2t + 1: column n lives in the lanes of group n; lane
  // 4n + tt holds rows 2tt, 2tt+1 (b[0]) and 2tt+8, 2tt+9 (b[1]).
  float cols[2][16];
  for (int c = 0; c < 2; ++c) {
    for (int tt = 0; tt < 4; ++tt) {
      const uint32_t* fb = operands(4 * (2 * t + c) + tt)->b;
      for (int i = 0; i < 2; ++i) {
        cols[c][2 * tt + i] = half(fb[0], i);
        cols[c][2 * tt + 8 + i] = half(fb[1], i);
      }
    }
  }
  WarpGather(0xffffffffu, 0, line);
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 2; ++c) {
      float acc = d[2 * r + c];
      for (int kk = 0; kk < 16; ++kk) acc += rows[r][kk] * cols[c][kk];
      d[2 * r + c] = acc;
    }
  }
}

namespace {

// Aborts unless p is a multiple of `bytes` (a vector access a GPU would fault on).
void CheckAligned(const void* p, size_t bytes, int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    Fatal("misaligned " + std::to_string(bytes) + "-byte access at address " +
          std::to_string(reinterpret_cast<uintptr_t>(p)) + " (line " + std::to_string(line) + ")");
  }
}

// Aborts unless [p, p + bytes) lies in the block's dynamic shared memory.
void CheckDynamicShared(const void* p, size_t bytes, int line, const char* what) {
  const BlockState& b = Block();
  const auto* begin = reinterpret_cast<const char*>(b.dynamic_shared.data());
  const auto* end = begin + b.dynamic_shared.size() * sizeof(uint64_t);
  const auto* q = static_cast<const char*>(p);
  if (q < begin || q + bytes > end) {
    Fatal(std::string(what) + " at line " + std::to_string(line) + " is outside the block's dynamic shared memory");
  }
}

}  // namespace

void LdMatrixX4(int line, uint32_t* r, const void* row, bool trans) {
  CheckDynamicShared(row, 16, line, "an ldmatrix row");
  CheckAligned(row, 16, line);
  const uint64_t* all = WarpGather(0xffffffffu, reinterpret_cast<uint64_t>(row), line);
  const int lane = LaneId(), g = lane >> 2, t = lane & 3;
  uint32_t out[4];
  for (int i = 0; i < 4; ++i) {
    // Element (row rr, column cc) of matrix i: 16 bits at column cc of the row lane 8i + rr named.
    auto element = [&](int rr, int cc) -> uint32_t {
      uint16_t v;
      std::memcpy(&v, reinterpret_cast<const char*>(all[8 * i + rr]) + 2 * cc, sizeof(v));
      return v;
    };
    out[i] =
        trans ? element(2 * t, g) | (element(2 * t + 1, g) << 16) : element(g, 2 * t) | (element(g, 2 * t + 1) << 16);
  }
  // Like the MMA: no lane goes on (and may write shared memory) before all have read.
  WarpGather(0xffffffffu, 0, line);
  std::memcpy(r, out, sizeof(out));
}

void CpAsync16(int line, void* dst, const void* src, int src_bytes) {
  CheckDynamicShared(dst, 16, line, "a cp.async destination");
  CheckAligned(dst, 16, line);
  CheckAligned(src, 16, line);
  if (src_bytes < 0 || src_bytes > 16)
    Fatal("cp.async at line " + std::to_string(line) + " with a source size over 16");
  AsyncCopy c{dst, {}};
  std::memcpy(c.bytes, src, static_cast<size_t>(src_bytes));
  cur_fiber->async_copies.push_back(c);
}

void CpAsyncCommit() {
  Block();
  cur_fiber->async_groups.push_back(cur_fiber->async_copies.size());
}

void CpAsyncWait(int n) {
  Block();
  Fiber* f = cur_fiber;
  if (f->async_groups.size() <= static_cast<size_t>(n)) return;
  const size_t landing = f->async_groups.size() - static_cast<size_t>(n);
  const size_t end = f->async_groups[landing - 1];
  for (size_t i = 0; i < end; ++i) std::memcpy(f->async_copies[i].dst, f->async_copies[i].bytes, 16);
  f->async_copies.erase(f->async_copies.begin(), f->async_copies.begin() + static_cast<std::ptrdiff_t>(end));
  f->async_groups.erase(f->async_groups.begin(), f->async_groups.begin() + static_cast<std::ptrdiff_t>(landing));
  for (size_t& e : f->async_groups) e -= end;
}

void EnqueueKernel(const LaunchConfig& c, std::function<void()> thread_body) {
  std::lock_guard<std::recursive_mutex> lock(Mu());
  const uint64_t threads = static_cast<uint64_t>(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535) {
    Fail(cudaErrorInvalidConfiguration);
    return;
  }
  auto it = MaxDynamicShared().find(c.func);
  const int limit = it == MaxDynamicShared().end() ? kDefaultDynamicShared : it->second;
  if (c.shared_bytes > static_cast<size_t>(limit)) {
    Fail(cudaErrorInvalidValue);
    return;
  }
  if (!ValidStream(c.stream)) {
    Fail(cudaErrorInvalidResourceHandle);
    return;
  }
  const LaunchConfig config = c;
  Enqueue(c.stream, [config, body = std::move(thread_body)]() {
    if (sticky_error != cudaSuccess) return;
    if (const cudaError_t fault = InjectedFault(); fault != cudaSuccess) {
      sticky_error = fault;
      return;
    }
    HangWhileFileExists();
    RunGrid(config, body);
  });
}

cudaError_t FuncSetMaxDynamicSharedMemory(const void* func, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::recursive_mutex> lock(Mu());
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > MaxDynamicSharedOptin()) {
    return Fail(cudaErrorInvalidValue);
  }
  MaxDynamicShared()[func] = value;
  return cudaSuccess;
}

// For cublas.cc: queue host work on a stream.
cudaError_t EnqueueHostWork(cudaStream_t stream, std::function<void()> work) {
  std::lock_guard<std::recursive_mutex> lock(Mu());
  if (!ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  Enqueue(stream, std::move(work));
  return cudaSuccess;
}

}  // namespace sae_emu

// ---- runtime API ----

using sae_emu::Fail;
using sae_emu::Mu;

namespace {
using Lock = std::lock_guard<std::recursive_mutex>;
}  // namespace

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError:
      return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorIllegalAddress:
      return "cudaErrorIllegalAddress";
    default:
      break;  // errors the emulator never raises
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInitializationError:
      return "initialization error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    default:
      break;
  }
  return "unknown error";
}

// After a fault every call returns the sticky error; a sync that runs the
// faulting kernel returns it too.
#define SAE_EMU_RETURN_IF_STICKY()                                                \
  do {                                                                            \
    if (sae_emu::sticky_error != cudaSuccess) return Fail(sae_emu::sticky_error); \
  } while (0)

cudaError_t cudaGetLastError() {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();  // not cleared
  const cudaError_t e = sae_emu::last_error;
  sae_emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  return sae_emu::last_error;
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return Fail(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return Fail(cudaErrorInvalidValue);
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "sae CUDA CPU emulator");
  prop->totalGlobalMem = sae_emu::DeviceCapacity();
  prop->sharedMemPerBlock = sae_emu::kDefaultDynamicShared;
  prop->sharedMemPerBlockOptin = sae_emu::MaxDynamicSharedOptin();
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return Fail(cudaErrorInvalidValue);
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrClockRate:
      *value = 1980000;  // kHz
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = sae_emu::MaxDynamicSharedOptin();
      return cudaSuccess;
    case cudaDevAttrMemoryPoolsSupported:
      *value = 1;
      return cudaSuccess;
  }
  return Fail(cudaErrorInvalidValue);
}

cudaError_t cudaSetDevice(int device) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  return device == 0 ? cudaSuccess : Fail(cudaErrorInvalidDevice);
}
cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return Fail(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  Lock lock(Mu());
  sae_emu::FlushAll();
  SAE_EMU_RETURN_IF_STICKY();
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (ptr == nullptr) return Fail(cudaErrorInvalidValue);
  *ptr = sae_emu::AllocBytes(size, sae_emu::Region::kDevice);
  return *ptr == nullptr ? Fail(cudaErrorMemoryAllocation) : cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  Lock lock(Mu());
  if (ptr == nullptr) return cudaSuccess;
  sae_emu::FlushAll();  // cudaFree synchronises the device
  return sae_emu::FreeBytes(ptr, sae_emu::Region::kDevice) ? cudaSuccess : Fail(cudaErrorInvalidValue);
}

cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t stream) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (!sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  const cudaError_t e = cudaMalloc(ptr, size);
  if (e == cudaSuccess) {
    sae_emu::Allocations()[reinterpret_cast<uintptr_t>(*ptr)].pooled = true;
    sae_emu::pool_bytes += size;
  }
  return e;
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  Lock lock(Mu());
  if (!sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (ptr == nullptr) return cudaSuccess;
  if (sae_emu::Find(ptr, 1, sae_emu::Region::kDevice) == nullptr) return Fail(cudaErrorInvalidValue);
  sae_emu::Enqueue(stream, [ptr]() {
    if (!sae_emu::FreeBytes(ptr, sae_emu::Region::kDevice)) sae_emu::Fatal("cudaFreeAsync of a pointer already freed");
  });
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned flags) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (ptr == nullptr) return Fail(cudaErrorInvalidValue);
  *ptr = sae_emu::AllocBytes(size, sae_emu::Region::kPinned);
  return *ptr == nullptr ? Fail(cudaErrorMemoryAllocation) : cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  Lock lock(Mu());
  if (ptr == nullptr) return cudaSuccess;
  sae_emu::FlushAll();
  return sae_emu::FreeBytes(ptr, sae_emu::Region::kPinned) ? cudaSuccess : Fail(cudaErrorInvalidValue);
}

cudaError_t cudaHostGetDevicePointer(void** device_ptr, void* host_ptr, unsigned flags) {
  Lock lock(Mu());
  if (device_ptr == nullptr || flags != 0 || sae_emu::Find(host_ptr, 1, sae_emu::Region::kPinned) == nullptr) {
    return Fail(cudaErrorInvalidValue);
  }
  *device_ptr = host_ptr;  // unified addressing: the same address on both sides
  return cudaSuccess;
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  static CUmemPoolHandle_st the_pool;
  if (pool == nullptr) return Fail(cudaErrorInvalidValue);
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  *pool = &the_pool;
  return cudaSuccess;
}

// The emulated pool caches nothing: what it has reserved is what is in use.
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  Lock lock(Mu());
  if (pool == nullptr || value == nullptr ||
      (attr != cudaMemPoolAttrReservedMemCurrent && attr != cudaMemPoolAttrUsedMemCurrent)) {
    return Fail(cudaErrorInvalidValue);
  }
  *static_cast<uint64_t*>(value) = sae_emu::pool_bytes;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (free == nullptr || total == nullptr) return Fail(cudaErrorInvalidValue);
  *total = sae_emu::DeviceCapacity();
  *free = *total - sae_emu::DeviceBytesInUse();
  return cudaSuccess;
}

cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  if (pool == nullptr || value == nullptr || attr != cudaMemPoolAttrReleaseThreshold)
    return Fail(cudaErrorInvalidValue);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (!sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return Fail(cudaErrorInvalidValue);
  using sae_emu::Region;
  switch (kind) {
    case cudaMemcpyHostToDevice:
      if (sae_emu::Find(src, count, Region::kPinned) == nullptr) {
        // Pageable source: staged at the call, so the caller may reuse it at once.
        auto staged =
            std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + count);
        sae_emu::Enqueue(stream, [dst, staged, count]() {
          sae_emu::CheckDeviceRange(dst, count, "cudaMemcpyAsync host to device");
          std::memcpy(dst, staged->data(), count);
        });
      } else {
        sae_emu::Enqueue(stream, [dst, src, count]() {  // pinned: read when the copy runs
          sae_emu::CheckDeviceRange(dst, count, "cudaMemcpyAsync host to device");
          std::memcpy(dst, src, count);
        });
      }
      return cudaSuccess;
    case cudaMemcpyDeviceToHost: {
      auto op = [dst, src, count]() {
        sae_emu::CheckDeviceRange(src, count, "cudaMemcpyAsync device to host");
        std::memcpy(dst, src, count);
      };
      if (sae_emu::Find(dst, count, Region::kPinned) == nullptr) {
        // Pageable destination: the call returns once the copy is done.
        if (stream != nullptr) sae_emu::Flush(stream, sae_emu::Enqueued(stream));
        sae_emu::Enqueue(stream, op);
        if (stream != nullptr) sae_emu::Flush(stream, sae_emu::Enqueued(stream));
        SAE_EMU_RETURN_IF_STICKY();
      } else {
        sae_emu::Enqueue(stream, op);
      }
      return cudaSuccess;
    }
    case cudaMemcpyDeviceToDevice:
      sae_emu::Enqueue(stream, [dst, src, count]() {
        sae_emu::CheckDeviceRange(src, count, "cudaMemcpyAsync device to device (source)");
        sae_emu::CheckDeviceRange(dst, count, "cudaMemcpyAsync device to device (destination)");
        std::memmove(dst, src, count);
      });
      return cudaSuccess;
    default:
      return Fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (!sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (count == 0) return cudaSuccess;
  sae_emu::Enqueue(stream, [ptr, value, count]() {
    sae_emu::CheckDeviceRange(ptr, count, "cudaMemsetAsync");
    std::memset(ptr, value, count);
  });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  Lock lock(Mu());
  if (stream == nullptr) return Fail(cudaErrorInvalidValue);
  *stream = new CUstream_st();
  sae_emu::Streams().insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  Lock lock(Mu());
  if (stream == nullptr || sae_emu::Streams().count(stream) == 0) return Fail(cudaErrorInvalidResourceHandle);
  sae_emu::Flush(stream, sae_emu::Enqueued(stream));  // queued work still completes
  sae_emu::Streams().erase(stream);
  delete stream;
  return cudaSuccess;
}

extern "C" __attribute__((visibility("default"))) uint64_t SaeEmuOpsRunForHost() {
  Lock lock(Mu());
  return sae_emu::ops_run_for_host;
}

// Runs nothing (queued work stays lazy): the sticky error after a fault,
// else whether the stream has work left.
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (!sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  return stream == nullptr || stream->ops.empty() ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Lock lock(Mu());
  if (!sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (stream == nullptr) {
    sae_emu::FlushAll();
  } else {
    sae_emu::Flush(stream, sae_emu::Enqueued(stream));
  }
  SAE_EMU_RETURN_IF_STICKY();
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (!sae_emu::ValidStream(stream) || event == nullptr) return Fail(cudaErrorInvalidResourceHandle);
  CUstream_st* on = event->stream;
  const uint64_t target = event->target;  // the record at the time of this call
  if (on == nullptr) return cudaSuccess;
  sae_emu::Enqueue(stream, [on, target]() {
    if (sae_emu::Streams().count(on) > 0) sae_emu::Flush(on, target);
  });
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  if (event == nullptr) return Fail(cudaErrorInvalidValue);
  *event = new CUevent_st();
  (*event)->timing = (flags & cudaEventDisableTiming) == 0;
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return Fail(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (event == nullptr || !sae_emu::ValidStream(stream)) return Fail(cudaErrorInvalidResourceHandle);
  if (stream == nullptr) {
    sae_emu::FlushAll();
    event->stream = nullptr;
    return cudaSuccess;
  }
  // A queued op stamps the time the stream reaches the record.
  auto stamp = std::make_shared<double>(-1.0);
  event->reached_ms = stamp;
  sae_emu::Enqueue(stream, [stamp]() {
    *stamp = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
  });
  event->stream = stream;
  event->target = sae_emu::Enqueued(stream);
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  Lock lock(Mu());
  if (event == nullptr) return Fail(cudaErrorInvalidResourceHandle);
  if (event->stream != nullptr && sae_emu::Streams().count(event->stream) > 0) {
    sae_emu::Flush(event->stream, event->target);
  }
  SAE_EMU_RETURN_IF_STICKY();
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  Lock lock(Mu());
  SAE_EMU_RETURN_IF_STICKY();
  if (ms == nullptr || start == nullptr || end == nullptr) return Fail(cudaErrorInvalidValue);
  if (!start->timing || !end->timing || start->stream == nullptr || end->stream == nullptr) {
    return Fail(cudaErrorInvalidResourceHandle);  // timing disabled, or never recorded on a stream
  }
  if (*start->reached_ms < 0 || *end->reached_ms < 0) return Fail(cudaErrorNotReady);
  *ms = static_cast<float>(*end->reached_ms - *start->reached_ms);
  return cudaSuccess;
}
