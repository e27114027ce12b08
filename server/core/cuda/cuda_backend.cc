// The CUDA backend (built into libsae_cuda.so; see cuda_backend.h for how it
// is loaded). Host side: validation, memory, streams, cuBLAS, launching the
// kernels declared in launchers.h. Every CUDA / cuBLAS error becomes an
// absl::Status naming the op (RESOURCE_EXHAUSTED for out-of-memory, INTERNAL
// otherwise); nothing here aborts the process.
//
// Streams: `stream` runs every op in issue order (the interface's contract);
// `upload_stream` carries weight uploads through two pinned staging buffers
// so the host read/convert of chunk i+1 overlaps the DMA of chunk i. Small
// host->device copies (a batch's token ids, positions, sequence starts, watch
// lists) go through a ring of pinned slots on `input_stream`, into device
// staging buffers, and return at once: the caller (the one executor thread
// that owns this backend) queues batch i+1 while batch i computes, and its
// inputs cross PCIe during that compute; `stream` then copies them device to
// device in issue order. Only CopyToHost / Synchronize wait.
//
// Memory: cudaMallocAsync on `stream` from the device's default pool with an
// unlimited release threshold, i.e. a stream-ordered caching allocator:
// per-batch activations cost no cudaMalloc/cudaFree round trip, and a free is
// ordered after the kernels that used the buffer. Never managed memory.
//
// GEMMs: cublasGemmEx, bf16 x bf16 -> fp32 accumulate -> F32 output. A BF16
// x (what RmsNorm / Attention / SiluMul write when gemm_input_dtype() is
// BF16, the default with one model part) goes in as it is; an F32 x is
// rounded to bf16 into a scratch buffer first (once for all the weights of a
// MatMulShared). SAE encoders
// (BF16) select their top-k by rescoring (sae_rescore.cuh): a plain bf16
// GEMM, a top-k with a few extra candidates under a proven error bound, the
// candidates' values recomputed from the fp32 activations, and an exact
// recompute of the rare rows where the bound cannot rule out a swap. The
// result is the top-k of exactly computed values at about the cost of one
// bf16 GEMM. SAE_CUDA_SAE_SPLIT=1|2|3 instead splits the activations into
// that many bf16 parts (x ~= hi + lo + ..., 8/16/24 mantissa bits) and takes
// the top-k of the summed GEMM parts (2 is the precision rescoring replaced;
// sae-bench-cuda compares them). A JumpReLU reconstruction needs the exact h
// of every active feature: the same bound picks the features within reach
// of the threshold after a 1-part GEMM, and only those are recomputed
// (sae_rescore.cuh); JumpReLU watch lists do the same on the watched rows.
// The model's own GEMMs use one part (bf16 activations, as bf16 inference
// does); SAE_CUDA_MODEL_SPLIT=2|3 splits them too, at 2-3x the GEMM cost, for
// hook activations within ~1e-6 of an fp32 forward pass (read when the
// backend is created; SAE_CUDA_SAE_SPLIT at every call, so sae-bench-cuda can
// compare settings on one backend).
// Attention follows the same choice: bf16 tensor-core QK^T / PV by default,
// the fp32 CUDA-core kernel with SAE_CUDA_MODEL_SPLIT >= 2 (attention.cuh).
// F32 weights use an fp32 GEMM (no TF32); F16 weights are widened to F32 in
// bounded row chunks (activations may overflow fp16, so x is never narrowed to it).
//
// SAE watch lists and reconstructions (sae_decode.cuh) reuse that GEMM path
// and the top-k kernel, chunked over tokens under the same scratch budget as
// SaeEncodeTopK. The decode is sparse: the decoder is held feature-major
// ([d_sae, d_model], see SaeDecoderWeights), and each token reads only the
// rows of its active features (~50-200 of 131072), in fp32 (with exact h
// under the default rescoring; from the summed parts under SAE_CUDA_SAE_SPLIT).
#include "core/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/cuda/launchers.h"
#include "core/op_checks.h"

namespace sae {
namespace {

using cuda::ElemType;

// ---- errors ----

// Errors after which the CUDA context is unusable: every later call in the
// process fails the same way, and only a new process gets a working device
// (the codes driver_types.h documents as "the process must be terminated",
// and uncorrectable ECC / NVLink errors).
bool IsStickyError(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorLaunchTimeout:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContained:
    case cudaErrorTensorMemoryLeak:
    case cudaErrorMpsClientTerminated:
    case cudaErrorExternalDevice:
      return true;
    default:
      return false;
  }
}

// After an error not known to be sticky (cudaErrorUnknown from a GPU that
// fell off the bus, a cuBLAS execution failure, ...): clears the thread's
// last error, which a later launch would otherwise report as its own, and
// asks the driver whether the context still works. A stream query does not
// wait; on a lost context it fails with the context's error. (A cuBLAS
// failure never reaches our runtime's last error, and a sticky error is
// only documented to fail every later call: so ask with a call.)
bool ContextLostAfterError() {
  cudaGetLastError();
  const cudaError_t e = cudaStreamQuery(nullptr);
  cudaGetLastError();
  return e != cudaSuccess && e != cudaErrorNotReady;
}

// The first sticky error of this process (the CUDA context is per process,
// so it is shared by every backend object). Ops return it at once.
std::mutex& FaultMu() {
  static std::mutex mu;
  return mu;
}
absl::Status& Fault() {
  static absl::Status* fault = new absl::Status();
  return *fault;
}
absl::Status DeviceFault() {
  std::lock_guard<std::mutex> lock(FaultMu());
  return Fault();
}

// Records `msg` as the process's device fault (the first one wins) and returns the fault.
absl::Status RecordFault(const std::string& msg) {
  std::lock_guard<std::mutex> lock(FaultMu());
  if (Fault().ok()) {
    Fault() = absl::InternalError(absl::StrCat(msg, " (the GPU context is lost; the process must restart)"));
  }
  return Fault();
}

absl::Status FromCuda(cudaError_t e, absl::string_view op) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat("cuda ", op, ": ", cudaGetErrorName(e), ": ", cudaGetErrorString(e));
  if (IsStickyError(e)) return RecordFault(msg);
  if (ContextLostAfterError()) return RecordFault(msg);
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

absl::Status FromCublas(cublasStatus_t s, absl::string_view op) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg =
      absl::StrCat("cuda ", op, ": cuBLAS ", cublasGetStatusName(s), ": ", cublasGetStatusString(s));
  // cuBLAS reports a lost context as EXECUTION_FAILED (or worse); the runtime knows whether it is.
  if (ContextLostAfterError()) return RecordFault(msg);
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

#define CUDA_RETURN_IF_ERROR(expr, op) RETURN_IF_ERROR(FromCuda((expr), (op)))
#define CUBLAS_RETURN_IF_ERROR(expr, op) RETURN_IF_ERROR(FromCublas((expr), (op)))

// ---- dtypes (conversions come from common/dtype.h) ----

ElemType ToElem(DType t) {
  return t == DType::kBF16 ? ElemType::kBF16 : (t == DType::kF16 ? ElemType::kF16 : ElemType::kF32);
}

float LoadAsFloat(const void* src, DType t, size_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(src)[i];
    case DType::kBF16:
      return Bf16ToF32(static_cast<const uint16_t*>(src)[i]);
    case DType::kF16:
      return F16ToF32(static_cast<const uint16_t*>(src)[i]);
    case DType::kI32:
      break;
  }
  return 0.0f;
}

void ConvertHost(const void* src, DType src_type, size_t n, DType dst_type, void* dst) {
  for (size_t i = 0; i < n; ++i) {
    const float f = LoadAsFloat(src, src_type, i);
    switch (dst_type) {
      case DType::kF32:
        static_cast<float*>(dst)[i] = f;
        break;
      case DType::kBF16:
        static_cast<uint16_t*>(dst)[i] = F32ToBf16(f);
        break;
      case DType::kF16:
        static_cast<uint16_t*>(dst)[i] = F32ToF16(f);
        break;
      case DType::kI32:
        break;
    }
  }
}

// An integer SAE_CUDA_* setting: its name, default and range, in one place
// for the reads (EnvInt) and the check at creation (CheckEnvironment).
struct IntSetting {
  const char* name;
  int fallback, lo, hi;
};
constexpr IntSetting kModelSplit{"SAE_CUDA_MODEL_SPLIT", 1, 1, 3};
constexpr IntSetting kBf16Activations{"SAE_CUDA_BF16_ACTIVATIONS", 1, 0, 1};
constexpr IntSetting kSaeSplit{"SAE_CUDA_SAE_SPLIT", 0, 0, 3};
constexpr IntSetting kSaeScratchMb{"SAE_CUDA_SAE_SCRATCH_MB", 512, 16, 1 << 20};
IntSetting DeviceSetting(int device_count) { return {"SAE_CUDA_DEVICE", 0, 0, device_count - 1}; }

// The setting's value when its variable holds an integer in range; nullopt
// when it is unset, empty or not valid.
std::optional<int> ReadSetting(const IntSetting& s) {
  const char* v = std::getenv(s.name);
  int x = 0;
  if (v == nullptr || !absl::SimpleAtoi(v, &x) || x < s.lo || x > s.hi) return std::nullopt;
  return x;
}

// The setting, or its default. Values were checked by CheckEnvironment when
// the backend was created; one set since (sae-bench-cuda switches
// SAE_CUDA_SAE_SPLIT between runs) that is not valid also gives the default.
int EnvInt(const IntSetting& s) { return ReadSetting(s).value_or(s.fallback); }

// Every SAE_CUDA_* setting that is set must be valid: a typo fails the
// backend's creation naming the variable, instead of quietly running with the
// default (SAE_CUDA_DEVICE=3 on a two-GPU host would have used GPU 0).
absl::Status CheckEnvironment(int device_count) {
  for (const IntSetting& s : {DeviceSetting(device_count), kModelSplit, kBf16Activations, kSaeSplit, kSaeScratchMb}) {
    const char* v = std::getenv(s.name);
    if (v == nullptr || v[0] == '\0' || ReadSetting(s).has_value()) continue;
    return absl::InvalidArgumentError(absl::StrCat(
        "environment variable ", s.name, "=\"", v, "\" is not an integer in [", s.lo, ", ", s.hi, "]",
        std::string(s.name) == "SAE_CUDA_DEVICE"
            ? absl::StrCat(" (", device_count,
                           " CUDA devices are visible to this process; CUDA_VISIBLE_DEVICES renumbers them from 0)")
            : ""));
  }
  const char* attention = std::getenv("SAE_CUDA_ATTENTION");
  if (attention != nullptr && attention[0] != '\0' && std::strcmp(attention, "mma") != 0 &&
      std::strcmp(attention, "fp32") != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("environment variable SAE_CUDA_ATTENTION=\"", attention, "\" is not \"mma\" or \"fp32\""));
  }
  return absl::OkStatus();
}

// ---- the device state, shared with every tensor's release callback so
// tensors that outlive the Backend object still free safely ----

constexpr size_t kIoSlotBytes = 8 << 20;  // pinned slots for reading results back
constexpr int kIoSlots = 4;
// Pinned + device staging for CopyFromHost. A batch makes a few small copies
// (token ids, positions, sequence starts, one per watch list): each takes a
// slot, and a slot is free again only once the compute stream has copied out
// of it, i.e. after the batch before. So the count, not the size, decides how
// many copies a batch can queue before the host waits.
constexpr size_t kInputSlotBytes = 2 << 20;
constexpr int kInputSlots = 16;
constexpr size_t kUploadSlotBytes = 64 << 20;  // pinned double buffer for weights
constexpr size_t kCublasWorkspaceBytes = 32 << 20;
// Host-mapped error words: one per epoch (the ops between two time points),
// reused round robin, so a code a kernel stores is reported with the batch
// whose ops stored it, not with a neighbouring batch in flight. More live
// epochs than this only blurs which read-back reports a code; none is lost.
constexpr int64_t kErrorEpochs = 1024;

struct PinnedSlot {
  void* host = nullptr;
  cudaEvent_t done = nullptr;  // last transfer that used `host`
};

// A host->device input slot: the pinned source, the device buffer the DMA
// lands in (on input_stream, beside the running batch), and the events that
// order its reuse against the compute stream's copy out of it.
struct InputSlot {
  void* host = nullptr;
  void* device = nullptr;
  cudaEvent_t uploaded = nullptr;  // the DMA into `device` (input_stream)
  cudaEvent_t consumed = nullptr;  // the copy out of `device` (stream)
};

struct Device {
  int id = 0;
  std::string name;         // cudaDeviceProp::name
  size_t shared_optin = 0;  // dynamic shared memory a block may opt in to
  cudaStream_t stream = nullptr;
  cudaStream_t upload_stream = nullptr;
  cudaStream_t input_stream = nullptr;
  cudaStream_t readback_stream = nullptr;  // CopyToHostAfter: results of a batch, beside the next one
  cublasHandle_t cublas = nullptr;
  void* cublas_workspace = nullptr;
  int* error_words_host = nullptr;  // [kErrorEpochs], host-mapped: kernels store DeviceError codes
  int* error_words_dev = nullptr;
  std::array<PinnedSlot, kIoSlots> io;
  std::array<InputSlot, kInputSlots> in;
  std::array<PinnedSlot, 2> up;
  cudaEvent_t order = nullptr;         // cross-stream ordering
  std::atomic<int64_t> live_bytes{0};  // tensors from Alloc / Upload not yet freed
  int64_t fixed_bytes = 0;             // device memory outside the pool: cuBLAS workspace, input staging

  // SAE value bounds for rescoring (see SaeBounds), per encoder; an entry is
  // dropped when the memory of its encoder, bias or feature scale is freed,
  // so a new tensor at a reused address never sees a stale bound.
  struct SaeBound {
    const void* encoder;
    size_t encoder_bytes;
    const void* bias;
    const void* feature_scale;
    float scale_in;
    cuda::SaeValueBounds bound;
  };
  std::mutex bounds_mu;
  std::vector<SaeBound> bounds;

  void ForgetBounds(const void* p, size_t bytes) {
    const auto* lo = static_cast<const char*>(p);
    auto inside = [&](const void* q) {
      return q != nullptr && static_cast<const char*>(q) >= lo && static_cast<const char*>(q) < lo + bytes;
    };
    std::lock_guard<std::mutex> lock(bounds_mu);
    bounds.erase(std::remove_if(
                     bounds.begin(), bounds.end(),
                     [&](const SaeBound& b) { return inside(b.encoder) || inside(b.bias) || inside(b.feature_scale); }),
                 bounds.end());
  }

  ~Device() {
    cudaSetDevice(id);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    if (upload_stream != nullptr) cudaStreamSynchronize(upload_stream);
    if (input_stream != nullptr) cudaStreamSynchronize(input_stream);
    if (readback_stream != nullptr) cudaStreamSynchronize(readback_stream);
    if (cublas != nullptr) cublasDestroy(cublas);
    if (cublas_workspace != nullptr) cudaFree(cublas_workspace);
    for (PinnedSlot* s : {&io[0], &io[1], &io[2], &io[3], &up[0], &up[1]}) {
      if (s->host != nullptr) cudaFreeHost(s->host);
      if (s->done != nullptr) cudaEventDestroy(s->done);
    }
    for (InputSlot& s : in) {
      if (s.host != nullptr) cudaFreeHost(s.host);
      if (s.device != nullptr) cudaFree(s.device);
      if (s.uploaded != nullptr) cudaEventDestroy(s.uploaded);
      if (s.consumed != nullptr) cudaEventDestroy(s.consumed);
    }
    if (error_words_host != nullptr) cudaFreeHost(error_words_host);
    if (order != nullptr) cudaEventDestroy(order);
    if (input_stream != nullptr) cudaStreamDestroy(input_stream);
    if (readback_stream != nullptr) cudaStreamDestroy(readback_stream);
    if (upload_stream != nullptr) cudaStreamDestroy(upload_stream);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

// Device scratch that grows on demand; the old buffer is freed in stream
// order, after the kernels already queued on it.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
};

class CudaBackend final : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create() {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("no usable CUDA device (", e == cudaSuccess ? "device count is 0" : cudaGetErrorString(e), ")"));
    }
    RETURN_IF_ERROR(CheckEnvironment(count));
    auto dev = std::make_shared<Device>();
    dev->id = EnvInt(DeviceSetting(count));
    // First, so an error below is probed (ContextLostAfterError) on this device, not on device 0.
    CUDA_RETURN_IF_ERROR(cudaSetDevice(dev->id), "set device");
    cudaDeviceProp prop;
    CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, dev->id), "get device properties");
    if (prop.major < 8) {
      return absl::FailedPreconditionError(absl::StrCat("device ", dev->id, " (", prop.name, ") is sm_", prop.major,
                                                        prop.minor, "; bf16 tensor cores need sm_80 or newer"));
    }
    dev->name = prop.name;
    dev->shared_optin = prop.sharedMemPerBlockOptin;
    int pools = 0;
    CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev->id), "query mempool");
    if (!pools) return absl::FailedPreconditionError("device has no stream-ordered memory pools (cudaMallocAsync)");
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->stream, cudaStreamNonBlocking), "create stream");
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->upload_stream, cudaStreamNonBlocking), "create stream");
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->input_stream, cudaStreamNonBlocking), "create stream");
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&dev->readback_stream, cudaStreamNonBlocking), "create stream");
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&dev->order, cudaEventDisableTiming), "create event");
    CUBLAS_RETURN_IF_ERROR(cublasCreate(&dev->cublas), "create cuBLAS handle");
    CUBLAS_RETURN_IF_ERROR(cublasSetStream(dev->cublas, dev->stream), "cuBLAS set stream");
    CUDA_RETURN_IF_ERROR(cudaMalloc(&dev->cublas_workspace, kCublasWorkspaceBytes), "cuBLAS workspace");
    dev->fixed_bytes += kCublasWorkspaceBytes;
    CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(dev->cublas, dev->cublas_workspace, kCublasWorkspaceBytes),
                           "cuBLAS set workspace");
    for (PinnedSlot& s : dev->io) {
      CUDA_RETURN_IF_ERROR(cudaHostAlloc(&s.host, kIoSlotBytes, cudaHostAllocDefault), "pinned staging");
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "create event");
    }
    for (InputSlot& s : dev->in) {
      CUDA_RETURN_IF_ERROR(cudaHostAlloc(&s.host, kInputSlotBytes, cudaHostAllocDefault), "pinned staging");
      CUDA_RETURN_IF_ERROR(cudaMalloc(&s.device, kInputSlotBytes), "input staging");
      dev->fixed_bytes += kInputSlotBytes;
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.uploaded, cudaEventDisableTiming), "create event");
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.consumed, cudaEventDisableTiming), "create event");
    }
    for (PinnedSlot& s : dev->up) {
      CUDA_RETURN_IF_ERROR(cudaHostAlloc(&s.host, kUploadSlotBytes, cudaHostAllocDefault), "pinned staging");
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "create event");
    }
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&dev->error_words_host), kErrorEpochs * sizeof(int),
                                       cudaHostAllocMapped),
                         "mapped error words");
    std::fill_n(dev->error_words_host, kErrorEpochs, cuda::kDeviceErrorNone);
    CUDA_RETURN_IF_ERROR(
        cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev->error_words_dev), dev->error_words_host, 0),
        "mapped error words");
    // Keep freed blocks in the pool: a stream-ordered caching allocator.
    cudaMemPool_t pool;
    CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, dev->id), "get mempool");
    uint64_t keep = std::numeric_limits<uint64_t>::max();
    CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "set mempool");
    return std::unique_ptr<CudaBackend>(new CudaBackend(std::move(dev)));
  }

  ~CudaBackend() override {
    cudaSetDevice(dev_->id);
    cudaStreamSynchronize(dev_->stream);
    for (cudaEvent_t e : points_) cudaEventDestroy(e);
    for (Scratch* s : {&x_bf16_, &w_f32_, &sae_pre_, &sae_topk_, &sae_rows_, &tile_table_, &mm_parts_, &sae_cand_,
                       &sae_bound_, &attn_f32_, &attn_kv_, &x_f32_, &sae_exact_rows_}) {
      if (s->ptr != nullptr) cudaFreeAsync(s->ptr, dev_->stream);
    }
  }

  std::string name() const override { return "cuda"; }
  DType gemm_input_dtype() const override { return bf16_activations_ ? DType::kBF16 : DType::kF32; }

  MemoryUsage Memory() override {
    MemoryUsage m;
    m.tensors = dev_->live_bytes.load();
    if (!Enter().ok()) return m;  // a lost device: only what the host knows
    cudaMemPool_t pool;
    uint64_t pooled = 0;
    if (cudaDeviceGetDefaultMemPool(&pool, dev_->id) == cudaSuccess &&
        cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &pooled) == cudaSuccess) {
      m.reserved = static_cast<int64_t>(pooled) + dev_->fixed_bytes;
    }
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      m.device_free = static_cast<int64_t>(free_bytes);
      m.device_total = static_cast<int64_t>(total_bytes);
    }
    cudaGetLastError();  // a failed query must not be reported by the next launch
    return m;
  }
  // The largest k for which TopKFits, by bisection (it is monotone in k).
  int max_sae_top_k(int64_t d_model) const override {
    if (TopKFits(cuda::kSaeTopKMaxK, d_model)) return cuda::kSaeTopKMaxK;
    if (!TopKFits(1, d_model)) return 0;
    int lo = 1, hi = cuda::kSaeTopKMaxK;  // fits(lo), !fits(hi)
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      (TopKFits(mid, d_model) ? lo : hi) = mid;
    }
    return lo;
  }

  absl::StatusOr<int64_t> SaeExactRows() override {
    if (sae_exact_rows_.ptr == nullptr) return 0;  // no rescoring has run
    unsigned long long n = 0;
    RETURN_IF_ERROR(CopyToHost(Tensor{sae_exact_rows_.ptr, DType::kI32, 1, 2}, &n));
    return static_cast<int64_t>(n);
  }

  bool asynchronous() const override { return true; }
  absl::Status DeviceStatus() const override { return DeviceFault(); }

  // ---- memory ----

  absl::StatusOr<OwnedTensor> Alloc(DType dtype, int64_t rows, int64_t cols) override {
    if (rows < 0 || cols < 0) return absl::InvalidArgumentError("negative tensor shape");
    RETURN_IF_ERROR(Enter());
    const size_t bytes = std::max<size_t>(256, static_cast<size_t>(rows * cols) * DTypeSize(dtype));
    void* p = nullptr;
    const cudaError_t e = cudaMallocAsync(&p, bytes, dev_->stream);
    if (e != cudaSuccess) {
      return FromCuda(e, absl::StrCat("alloc ", bytes, " bytes (", DTypeName(dtype), "[", rows, ", ", cols, "])"));
    }
    // Zeroed like the CPU twin's allocations.
    if (const cudaError_t z = cudaMemsetAsync(p, 0, bytes, dev_->stream); z != cudaSuccess) {
      cudaFreeAsync(p, dev_->stream);
      return FromCuda(z, "alloc memset");
    }
    std::shared_ptr<Device> dev = dev_;
    dev->live_bytes += static_cast<int64_t>(bytes);
    return OwnedTensor(Tensor{p, dtype, rows, cols}, [dev, bytes](void* q) {
      dev->live_bytes -= static_cast<int64_t>(bytes);
      dev->ForgetBounds(q, bytes);
      cudaSetDevice(dev->id);
      cudaFreeAsync(q, dev->stream);  // cannot report from a destructor; a failed free only leaks
    });
  }

  absl::StatusOr<OwnedTensor> Upload(const HostTensor& src, DType dtype) override {
    int64_t numel = 1;
    for (int64_t s : src.shape) numel *= s;
    int64_t rows = src.shape.empty() ? 1 : src.shape[0];
    int64_t cols = rows == 0 ? 0 : numel / std::max<int64_t>(rows, 1);
    if (src.shape.size() == 1) {
      rows = 1;
      cols = src.shape[0];
    }
    if (dtype != src.dtype && !(IsFloatDType(dtype) && IsFloatDType(src.dtype))) {
      return absl::UnimplementedError(
          absl::StrCat("cuda upload: cannot convert ", DTypeName(src.dtype), " to ", DTypeName(dtype)));
    }
    ASSIGN_OR_RETURN(OwnedTensor t, Alloc(dtype, rows, cols));
    if (numel == 0) return t;
    // The allocation (and its memset) is ordered on `stream`; the copy runs on upload_stream.
    CUDA_RETURN_IF_ERROR(cudaEventRecord(dev_->order, dev_->stream), "upload");
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->upload_stream, dev_->order, 0), "upload");
    const size_t src_size = DTypeSize(src.dtype), dst_size = DTypeSize(dtype);
    const size_t chunk = kUploadSlotBytes / std::max(src_size, dst_size);
    char* dst = static_cast<char*>(t->data);
    const char* from = static_cast<const char*>(src.data);
    auto copy = [&]() -> absl::Status {
      int slot_index = 0;
      for (size_t off = 0; off < static_cast<size_t>(numel); off += chunk, slot_index ^= 1) {
        const size_t n = std::min(chunk, static_cast<size_t>(numel) - off);
        PinnedSlot& slot = dev_->up[slot_index];
        CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done), "upload");  // its previous DMA is done
        if (dtype == src.dtype) {
          std::memcpy(slot.host, from + off * src_size, n * src_size);
        } else {
          ConvertHost(from + off * src_size, src.dtype, n, dtype, slot.host);
        }
        CUDA_RETURN_IF_ERROR(
            cudaMemcpyAsync(dst + off * dst_size, slot.host, n * dst_size, cudaMemcpyHostToDevice, dev_->upload_stream),
            "upload copy");
        CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done, dev_->upload_stream), "upload");
      }
      // Ops queued after this see the whole tensor.
      CUDA_RETURN_IF_ERROR(cudaEventRecord(dev_->order, dev_->upload_stream), "upload");
      return FromCuda(cudaStreamWaitEvent(dev_->stream, dev_->order, 0), "upload");
    };
    if (absl::Status s = copy(); !s.ok()) {
      // t's free is ordered on `stream` only: let the DMAs already queued
      // into it finish before the pool can hand its memory out again.
      cudaStreamSynchronize(dev_->upload_stream);
      return s;
    }
    return t;
  }

  absl::Status CopyFromHost(const void* src, const Tensor& dst) override {
    RETURN_IF_ERROR(Enter());
    const size_t bytes = dst.nbytes();
    const char* from = static_cast<const char*>(src);
    // The DMA crosses PCIe on input_stream while `stream` is still busy with
    // the batch before; `stream` then only waits for it and copies device to
    // device, in issue order. Slot reuse: the host rewrites a pinned buffer
    // once its DMA is done, and a DMA overwrites a device buffer once the
    // last copy out of it has run.
    for (size_t off = 0; off < bytes; off += kInputSlotBytes) {
      const size_t n = std::min(kInputSlotBytes, bytes - off);
      InputSlot& slot = dev_->in[next_in_];
      next_in_ = (next_in_ + 1) % kInputSlots;
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.uploaded), "copy from host");
      std::memcpy(slot.host, from + off, n);  // the caller may reuse src as soon as we return
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->input_stream, slot.consumed, 0), "copy from host");
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(slot.device, slot.host, n, cudaMemcpyHostToDevice, dev_->input_stream),
                           "copy from host");
      CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.uploaded, dev_->input_stream), "copy from host");
      CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->stream, slot.uploaded, 0), "copy from host");
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(static_cast<char*>(dst.data) + off, slot.device, n, cudaMemcpyDeviceToDevice, dev_->stream),
          "copy from host");
      CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.consumed, dev_->stream), "copy from host");
    }
    return absl::OkStatus();
  }

  absl::Status CopyToHost(const Tensor& src, void* dst) override {
    RETURN_IF_ERROR(Enter());
    if (src.nbytes() == 0) return Synchronize();
    RETURN_IF_ERROR(CopyToHostOn(dev_->stream, src, dst));
    return TakeErrorsAfterFullWait();
  }

  absl::Status CopyToHostAfter(const Tensor& src, void* dst, int64_t since, int64_t after) override {
    if (!ValidPoint(after)) return absl::InvalidArgumentError(absl::StrCat("copy to host: no time point ", after));
    if (since != -1 && (!ValidPoint(since) || point_epoch_[since] > point_epoch_[after])) {
      return absl::InvalidArgumentError(absl::StrCat("copy to host: no time point ", since, " before ", after));
    }
    RETURN_IF_ERROR(Enter());
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev_->readback_stream, points_[after], 0), "copy to host");
    if (src.nbytes() == 0) {
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev_->readback_stream), "copy to host");
    } else {
      RETURN_IF_ERROR(CopyToHostOn(dev_->readback_stream, src, dst));
    }
    // The ops before `after` have finished; those after `since` are in later epochs.
    return TakeErrors(since == -1 ? 0 : point_epoch_[since] + 1, point_epoch_[after]);
  }

  // The copy on `stream`, after the work queued there (device error words
  // are the caller's to take).
  absl::Status CopyToHostOn(cudaStream_t stream, const Tensor& src, void* dst) {
    const size_t bytes = src.nbytes();
    // Pipelined through the slots: the DMA of chunk c+1 overlaps the host copy of chunk c.
    struct Pending {
      PinnedSlot* slot;
      size_t off, n;
    };
    std::array<Pending, kIoSlots> pending{};
    size_t n_pending = 0, first = 0;
    auto drain_one = [&]() -> absl::Status {
      Pending& p = pending[first];
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(p.slot->done), "copy to host");
      std::memcpy(static_cast<char*>(dst) + p.off, p.slot->host, p.n);
      first = (first + 1) % kIoSlots;
      --n_pending;
      return absl::OkStatus();
    };
    for (size_t off = 0; off < bytes; off += kIoSlotBytes) {
      if (n_pending == kIoSlots) RETURN_IF_ERROR(drain_one());
      const size_t n = std::min(kIoSlotBytes, bytes - off);
      PinnedSlot& slot = NextIoSlot();
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done), "copy to host");
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(slot.host, static_cast<const char*>(src.data) + off, n, cudaMemcpyDeviceToHost, stream),
          "copy to host");
      CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done, stream), "copy to host");
      pending[(first + n_pending) % kIoSlots] = Pending{&slot, off, n};
      ++n_pending;
    }
    while (n_pending > 0) RETURN_IF_ERROR(drain_one());
    return absl::OkStatus();
  }

  absl::Status Synchronize() override {
    RETURN_IF_ERROR(Enter());
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev_->upload_stream), "synchronize");
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev_->input_stream), "synchronize");
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev_->readback_stream), "synchronize");
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev_->stream), "synchronize");
    return TakeErrorsAfterFullWait();
  }

  // ---- ops ----

  absl::Status Embed(const Tensor& table, const Tensor& ids, const Tensor& out) override {
    RETURN_IF_ERROR(CheckF32(out, "embed output"));
    RETURN_IF_ERROR(CheckShape(out, ids.rows * ids.cols, table.cols, "embed output"));
    if (ids.dtype != DType::kI32) return absl::InvalidArgumentError("embed: ids must be I32");
    if (!IsFloatDType(table.dtype)) return absl::InvalidArgumentError("embed: table must be F32, BF16 or F16");
    RETURN_IF_ERROR(Enter());
    return FromCuda(cuda::LaunchEmbed(table.data, ToElem(table.dtype), table.rows, table.cols, ids.as<int32_t>(),
                                      ids.rows * ids.cols, out.as<float>(), ErrorWord(), dev_->stream),
                    "embed");
  }

  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override {
    RETURN_IF_ERROR(CheckF32(x, "rmsnorm input"));
    RETURN_IF_ERROR(CheckGemmInput(out, DType::kBF16, "rmsnorm output"));
    RETURN_IF_ERROR(CheckShape(out, x.rows, x.cols, "rmsnorm output"));
    if (weight.data != nullptr) {
      RETURN_IF_ERROR(CheckShape(weight, 1, x.cols, "rmsnorm weight"));
      if (!IsFloatDType(weight.dtype)) return absl::InvalidArgumentError("rmsnorm: weight must be F32, BF16 or F16");
    }
    RETURN_IF_ERROR(Enter());
    return FromCuda(cuda::LaunchRmsNorm(x.as<float>(), weight.data, ToElem(weight.dtype), x.rows, x.cols, eps, out.data,
                                        ToElem(out.dtype), dev_->stream),
                    "rmsnorm");
  }

  static absl::Status CheckMatMul(const Tensor& x, const Tensor& w, const Tensor& out) {
    RETURN_IF_ERROR(CheckGemmInput(x, DType::kBF16, "matmul input"));
    RETURN_IF_ERROR(CheckF32(out, "matmul output"));
    if (w.cols != x.cols) {
      return absl::InvalidArgumentError(absl::StrCat("matmul: input has ", x.cols, " columns, weight has ", w.cols));
    }
    return CheckShape(out, x.rows, w.rows, "matmul output");
  }

  absl::Status MatMulShared(const Tensor& x, absl::Span<const Tensor> ws, absl::Span<const Tensor> outs) override {
    const bool all_bf16 = std::all_of(ws.begin(), ws.end(), [](const Tensor& w) { return w.dtype == DType::kBF16; });
    if (ws.size() != outs.size() || ws.size() < 2 || !all_bf16 || !PlainBf16Gemm(x)) {
      return Backend::MatMulShared(x, ws, outs);  // one MatMul each
    }
    for (size_t i = 0; i < ws.size(); ++i) {
      RETURN_IF_ERROR(CheckMatMul(x, ws[i], outs[i]));
      RETURN_IF_ERROR(CheckGemmDims(x.rows, ws[i], "matmul"));
    }
    if (x.rows == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    // x rounded to bf16 once, then one GEMM per weight on that copy.
    ASSIGN_OR_RETURN(const void* xb, Bf16Operand(x, "matmul"));
    for (size_t i = 0; i < ws.size(); ++i) {
      if (ws[i].rows > 0) RETURN_IF_ERROR(GemmBf16(xb, x.rows, ws[i], outs[i].as<float>(), "matmul"));
    }
    return absl::OkStatus();
  }

  absl::Status MatMul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    RETURN_IF_ERROR(CheckMatMul(x, w, out));
    if (x.rows == 0 || w.rows == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    if (x.dtype == DType::kBF16) {
      RETURN_IF_ERROR(CheckGemmDims(x.rows, w, "matmul"));
      if (w.dtype == DType::kBF16) return GemmBf16(x.data, x.rows, w, out.as<float>(), "matmul");
      // F32 / F16 weights take an F32 x (exact: a bf16 value widens exactly).
      ASSIGN_OR_RETURN(void* xf, Ensure(&x_f32_, static_cast<size_t>(x.numel()) * sizeof(float)));
      RETURN_IF_ERROR(FromCuda(
          cuda::LaunchToF32(x.data, ElemType::kBF16, x.numel(), static_cast<float*>(xf), dev_->stream), "matmul"));
      int parts = 1;
      return Gemm(static_cast<const float*>(xf), x.rows, w, /*n_parts=*/1, out.as<float>(), &parts, "matmul");
    }
    int parts = 1;
    if (w.dtype != DType::kBF16 || model_split_ == 1) {
      return Gemm(x.as<float>(), x.rows, w, /*n_parts=*/1, out.as<float>(), &parts, "matmul");
    }
    // Split activations: part products [n_parts, chunk, m], then summed.
    const int64_t m = w.rows, k = w.cols;
    const int64_t chunk = SaeChunkRows(x.rows, static_cast<size_t>(model_split_) * m * sizeof(float));
    ASSIGN_OR_RETURN(void* tmp, Ensure(&mm_parts_, static_cast<size_t>(model_split_ * chunk * m) * sizeof(float)));
    for (int64_t t0 = 0; t0 < x.rows; t0 += chunk) {
      const int64_t tc = std::min(chunk, x.rows - t0);
      RETURN_IF_ERROR(Gemm(x.as<float>() + t0 * k, tc, w, model_split_, static_cast<float*>(tmp), &parts, "matmul"));
      RETURN_IF_ERROR(FromCuda(
          cuda::LaunchSumParts(static_cast<const float*>(tmp), parts, tc * m, out.as<float>() + t0 * m, dev_->stream),
          "matmul"));
    }
    return absl::OkStatus();
  }

  // With BF16 weights and one bf16 part, cuBLAS adds the product to out in
  // its epilogue (beta = 1); other cases take MatMul then Add.
  absl::Status MatMulAdd(const Tensor& x, const Tensor& w, const Tensor& out) override {
    RETURN_IF_ERROR(CheckMatMul(x, w, out));
    if (w.dtype != DType::kBF16 || !PlainBf16Gemm(x)) return Backend::MatMulAdd(x, w, out);
    if (x.rows == 0 || w.rows == 0 || w.cols == 0) return absl::OkStatus();  // nothing to add
    RETURN_IF_ERROR(Enter());
    RETURN_IF_ERROR(CheckGemmDims(x.rows, w, "matmul add"));
    ASSIGN_OR_RETURN(const void* xb, Bf16Operand(x, "matmul add"));
    return GemmBf16(xb, x.rows, w, out.as<float>(), "matmul add", /*beta=*/1.0f);
  }

  absl::Status Rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int head_dim) override {
    RETURN_IF_ERROR(CheckF32(x, "rope input"));
    if (head_dim <= 0 || head_dim % 2 != 0 || x.cols % head_dim != 0 || inv_freq.rows * inv_freq.cols != head_dim / 2 ||
        positions.rows * positions.cols != x.rows) {
      return absl::InvalidArgumentError("rope: inconsistent shapes");
    }
    if (positions.dtype != DType::kI32 || inv_freq.dtype != DType::kF32) {
      return absl::InvalidArgumentError("rope: positions must be I32 and inv_freq F32");
    }
    RETURN_IF_ERROR(Enter());
    return FromCuda(cuda::LaunchRope(x.as<float>(), x.rows, static_cast<int>(x.cols / head_dim), head_dim,
                                     positions.as<int32_t>(), inv_freq.as<float>(), dev_->stream),
                    "rope");
  }

  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_starts, int n_seqs,
                         int max_seq_len, int n_heads, int n_kv_heads, int head_dim, const Tensor& out) override {
    if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || head_dim <= 0 ||
        q.cols != static_cast<int64_t>(n_heads) * head_dim || k.cols != static_cast<int64_t>(n_kv_heads) * head_dim ||
        v.cols != k.cols || out.cols != q.cols || out.rows != q.rows || k.rows != q.rows || v.rows != q.rows ||
        n_seqs < 0 || seq_starts.rows * seq_starts.cols != static_cast<int64_t>(n_seqs) + 1 || max_seq_len < 0) {
      return absl::InvalidArgumentError("attention: inconsistent shapes");
    }
    for (const Tensor* t : {&q, &k, &v}) RETURN_IF_ERROR(CheckF32(*t, "attention tensor"));
    RETURN_IF_ERROR(CheckGemmInput(out, DType::kBF16, "attention output"));
    if (seq_starts.dtype != DType::kI32) return absl::InvalidArgumentError("attention: seq_starts must be I32");
    if (!cuda::AttentionSupportsHeadDim(head_dim)) {
      return absl::UnimplementedError(absl::StrCat("cuda attention: head_dim ", head_dim, " > 256"));
    }
    if (q.rows == 0) return absl::OkStatus();
    // (The CPU's message; other bad layouts are found on the device.)
    if (n_seqs == 0) return absl::InvalidArgumentError("attention: seq_starts must cover all rows");
    RETURN_IF_ERROR(Enter());
    ASSIGN_OR_RETURN(void* table, Ensure(&tile_table_, (static_cast<size_t>(n_seqs) + 1) * sizeof(int32_t)));
    const bool tensor_cores = AttentionOnTensorCores();
    // The fp32 kernel stores F32 only: a BF16 output goes through scratch.
    const bool staged = out.dtype == DType::kBF16 && !(tensor_cores && cuda::AttentionMmaSupportsHeadDim(head_dim));
    void* dst = out.data;
    if (staged) {
      ASSIGN_OR_RETURN(dst, Ensure(&attn_f32_, static_cast<size_t>(out.numel()) * sizeof(float)));
    }
    void* kv_bf16 = nullptr;
    if (const size_t bytes = cuda::AttentionKvScratchBytes(q.rows, n_kv_heads, head_dim, tensor_cores)) {
      ASSIGN_OR_RETURN(kv_bf16, Ensure(&attn_kv_, bytes));
    }
    // Bad seq_starts (which live on the device) are reported at the next
    // CopyToHost / Synchronize as INVALID_ARGUMENT.
    RETURN_IF_ERROR(
        FromCuda(cuda::LaunchAttention(q.as<float>(), k.as<float>(), v.as<float>(), seq_starts.as<int32_t>(), n_seqs,
                                       max_seq_len, q.rows, n_heads, n_kv_heads, head_dim, tensor_cores, dst,
                                       staged ? ElemType::kF32 : ToElem(out.dtype), static_cast<int32_t*>(table),
                                       kv_bf16, ErrorWord(), dev_->stream),
                 "attention"));
    if (!staged) return absl::OkStatus();
    return FromCuda(cuda::LaunchSplitToBf16(static_cast<const float*>(dst), out.numel(), 1, out.data, dev_->stream),
                    "attention");
  }

  absl::Status SiluMul(const Tensor& gate, const Tensor& up, const Tensor& out) override {
    RETURN_IF_ERROR(CheckShape(up, gate.rows, gate.cols, "silu_mul up"));
    RETURN_IF_ERROR(CheckShape(out, gate.rows, gate.cols, "silu_mul output"));
    for (const Tensor* t : {&gate, &up}) RETURN_IF_ERROR(CheckF32(*t, "silu_mul tensor"));
    RETURN_IF_ERROR(CheckGemmInput(out, DType::kBF16, "silu_mul output"));
    RETURN_IF_ERROR(Enter());
    return FromCuda(cuda::LaunchSiluMul(gate.as<float>(), up.as<float>(), out.data, ToElem(out.dtype),
                                        gate.rows * gate.cols, dev_->stream),
                    "silu_mul");
  }

  absl::Status Add(const Tensor& a, const Tensor& b, const Tensor& out) override {
    RETURN_IF_ERROR(CheckShape(b, a.rows, a.cols, "add rhs"));
    RETURN_IF_ERROR(CheckShape(out, a.rows, a.cols, "add output"));
    for (const Tensor* t : {&a, &b, &out}) RETURN_IF_ERROR(CheckF32(*t, "add tensor"));
    RETURN_IF_ERROR(Enter());
    return FromCuda(cuda::LaunchAdd(a.as<float>(), b.as<float>(), out.as<float>(), a.rows * a.cols, dev_->stream),
                    "add");
  }

  absl::Status SaeEncodeTopK(const Tensor& x, const SaeEncoderWeights& sae, int k, const Tensor& out_indices,
                             const Tensor& out_values) override {
    RETURN_IF_ERROR(CheckSaeTopKArgs(x, sae, k, out_indices, out_values));
    const int64_t d_sae = sae.encoder.rows, d = x.cols;
    const int keep = sae.max_active > 0 ? std::min(k, sae.max_active) : k;
    RETURN_IF_ERROR(CheckTopKFits(keep, d, "cuda sae top-k: k"));
    if (x.rows == 0 || k == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    const int mode = SaeTopKMode(sae.encoder.dtype);
    const int64_t chunk = SaeChunkRows(x.rows, SaeTopKRowBytes(mode, d_sae, d, keep));
    ASSIGN_OR_RETURN(void* pre, Ensure(&sae_pre_, static_cast<size_t>(std::max(mode, 1) * chunk * d_sae) * 4));
    for (int64_t t0 = 0; t0 < x.rows; t0 += chunk) {
      const int64_t tc = std::min(chunk, x.rows - t0);
      int parts = 1;
      RETURN_IF_ERROR(ChunkTopK(x.as<float>() + t0 * d, tc, sae, mode, keep, k, static_cast<float*>(pre),
                                out_indices.as<int32_t>() + t0 * k, out_values.as<float>() + t0 * k, &parts,
                                "sae encode"));
    }
    return absl::OkStatus();
  }

  absl::Status Copy(const Tensor& src, const Tensor& dst) override {
    RETURN_IF_ERROR(CheckCopy(src, dst));
    if (src.nbytes() == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    return FromCuda(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice, dev_->stream), "copy");
  }

  absl::Status SaeEncodeSelected(const Tensor& x, const SaeEncoderWeights& sae, const Tensor& feature_ids,
                                 const Tensor& out_values) override {
    RETURN_IF_ERROR(CheckSaeSelectedArgs(x, sae, feature_ids, out_values));
    const int64_t d_sae = sae.encoder.rows, d = x.cols, m = out_values.cols;
    // TopK: every feature's top-k membership is needed, capped by d_sae (no
    // more can be active). The top-k kernel's candidate buffer bounds it.
    const int k = sae.max_active > 0 ? static_cast<int>(std::min<int64_t>(sae.max_active, d_sae)) : 0;
    RETURN_IF_ERROR(CheckTopKFits(k, d, "cuda sae selected: max_active"));
    if (m == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    // The ids live in device memory. Reading them back here would wait for
    // every op queued before (the previous batch's forward), so the check
    // runs on the device and a bad id is INVALID_ARGUMENT at the read-back
    // that waits for this op; the kernels zero an out-of-range id meanwhile.
    const int32_t* ids_dev = feature_ids.as<int32_t>();
    RETURN_IF_ERROR(FromCuda(cuda::LaunchCheckIds(ids_dev, m, d_sae, ErrorWord(), dev_->stream), "sae selected"));
    if (x.rows == 0) return absl::OkStatus();
    float* out = out_values.as<float>();
    if (k > 0) {
      // pre [parts, chunk, d_sae]; top-k idx [chunk, k] I32 then val [chunk, k] F32.
      const int mode = SaeTopKMode(sae.encoder.dtype);
      const size_t row_bytes = SaeTopKRowBytes(mode, d_sae, d, k) + static_cast<size_t>(k) * 8;
      const int64_t chunk = SaeChunkRows(x.rows, row_bytes);
      ASSIGN_OR_RETURN(void* pre_v, Ensure(&sae_pre_, static_cast<size_t>(std::max(mode, 1) * chunk * d_sae) * 4));
      ASSIGN_OR_RETURN(void* topk, Ensure(&sae_topk_, static_cast<size_t>(chunk) * k * 8));
      float* pre = static_cast<float*>(pre_v);
      int32_t* idx = static_cast<int32_t*>(topk);
      float* val = reinterpret_cast<float*>(idx + chunk * k);
      for (int64_t t0 = 0; t0 < x.rows; t0 += chunk) {
        const int64_t tc = std::min(chunk, x.rows - t0);
        int parts = 1;
        RETURN_IF_ERROR(
            ChunkTopK(x.as<float>() + t0 * d, tc, sae, mode, k, k, pre, idx, val, &parts, "sae selected encode"));
        RETURN_IF_ERROR(
            FromCuda(cuda::LaunchSaeListLookup(idx, val, tc, k, d_sae, ids_dev, m, out + t0 * m, dev_->stream),
                     "sae selected lookup"));
      }
      return absl::OkStatus();
    }
    // JumpReLU: each feature decides alone, so GEMM against the m watched
    // encoder rows only (m << d_sae), kept in the encoder's dtype. BF16 under
    // rescoring: one bf16 part, then the features the error bound cannot
    // decide (and the active ones) are recomputed exactly, as in
    // SaeReconstruct; the bounds of the whole encoder hold for its rows.
    const size_t esize = DTypeSize(sae.encoder.dtype);
    ASSIGN_OR_RETURN(void* rows, Ensure(&sae_rows_, static_cast<size_t>(m * d) * esize));
    RETURN_IF_ERROR(FromCuda(
        cuda::LaunchGatherRows(sae.encoder.data, static_cast<int>(esize), d_sae, d, ids_dev, m, rows, dev_->stream),
        "sae selected gather rows"));
    const Tensor watched{rows, sae.encoder.dtype, m, d};  // [m, d_model]
    const int mode = SaeTopKMode(sae.encoder.dtype);
    const bool rescore = mode == 0;
    const int n_parts = std::max(mode, 1);
    const size_t row_bytes = static_cast<size_t>(n_parts) * (m * sizeof(float) + d * 2) + (rescore ? sizeof(float) : 0);
    const int64_t chunk = SaeChunkRows(x.rows, row_bytes);
    ASSIGN_OR_RETURN(void* pre_v, Ensure(&sae_pre_, static_cast<size_t>(n_parts * chunk * m) * sizeof(float)));
    float* pre = static_cast<float*>(pre_v);  // [n_parts, chunk, m]
    float* margin = nullptr;                  // [chunk] (rescoring)
    cuda::SaeValueBounds bound;
    if (rescore) {
      ASSIGN_OR_RETURN(bound, SaeBounds(sae));
      ASSIGN_OR_RETURN(void* mv, Ensure(&sae_cand_, static_cast<size_t>(chunk) * sizeof(float)));
      margin = static_cast<float*>(mv);
    }
    for (int64_t t0 = 0; t0 < x.rows; t0 += chunk) {
      const int64_t tc = std::min(chunk, x.rows - t0);
      const float* xr = x.as<float>() + t0 * d;
      int parts = 1;
      RETURN_IF_ERROR(Gemm(xr, tc, watched, n_parts, pre, &parts, "sae selected encode"));
      if (rescore) {
        RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeMargins(xr, tc, d, bound, sae.scale_in, margin, dev_->stream),
                                 "sae selected margins"));
        RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeSelectedExact(xr, rows, tc, d, ids_dev, m, d_sae, sae.bias.as<float>(),
                                                              sae.feature_scale.as<float>(), sae.scale_in,
                                                              sae.threshold, margin, pre, out + t0 * m, dev_->stream),
                                 "sae selected exact"));
      } else {
        RETURN_IF_ERROR(
            FromCuda(cuda::LaunchSaeSelectedEpilogue(pre, parts, tc, m, ids_dev, d_sae, sae.bias.as<float>(),
                                                     sae.feature_scale.as<float>(), sae.scale_in, sae.threshold,
                                                     out + t0 * m, dev_->stream),
                     "sae selected epilogue"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status SaeReconstruct(const Tensor& x, const SaeEncoderWeights& enc, const SaeDecoderWeights& dec,
                              const Tensor& out) override {
    RETURN_IF_ERROR(CheckSaeReconstructArgs(x, enc, dec, out));
    const int64_t d_sae = enc.encoder.rows, d = x.cols;
    const int k = enc.max_active > 0 ? static_cast<int>(std::min<int64_t>(enc.max_active, d_sae)) : 0;
    RETURN_IF_ERROR(CheckTopKFits(k, d, "cuda sae reconstruct: max_active"));
    if (x.rows == 0 || d == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    // TopK SAEs select by ChunkTopK (mode 0: rescoring, 1 GEMM part).
    // JumpReLU ones need the exact h of every active feature: with rescoring
    // (BF16 encoders, the default) from a 1-part GEMM whose features within
    // the error bound of the threshold are recomputed exactly; else from a
    // split GEMM.
    const int mode = SaeTopKMode(enc.encoder.dtype);
    const bool jumprelu_rescore = k == 0 && mode == 0 && d_sae > 0;
    const int n_enc = std::max(mode, 1);
    // Per token: encoder parts, the bf16 GEMM input, the top-k list, rescoring scratch.
    const size_t row_bytes = static_cast<size_t>(n_enc) * d_sae * sizeof(float) + static_cast<size_t>(n_enc * d) * 2 +
                             static_cast<size_t>(k) * 8 + (k > 0 && mode == 0 ? SaeCandidateBytesPerRow(k, d) : 0) +
                             (jumprelu_rescore ? sizeof(float) + JumpReluListBytesPerRow() : 0);
    const int64_t chunk = SaeChunkRows(x.rows, row_bytes);
    ASSIGN_OR_RETURN(void* pre_v, Ensure(&sae_pre_, static_cast<size_t>(n_enc * chunk * d_sae) * sizeof(float)));
    float* pre = static_cast<float*>(pre_v);  // [n_enc, chunk, d_sae]; part 0 then F [chunk, d_sae]
    // The active features for the decode: a list idx / val [chunk, n_list]
    // (TopK: the top-k; JumpReLU with rescoring: the actives the exact kernel
    // lists, dense_row flagging rows whose actives did not fit), or F (dense).
    const int n_list = k > 0 ? k : (jumprelu_rescore ? cuda::kJumpReluListSlots : 0);
    int32_t* idx = nullptr;  // [chunk, n_list]
    float* val = nullptr;    // [chunk, n_list]
    int32_t* dense_row = nullptr;
    if (n_list > 0) {
      const size_t list_bytes = k > 0 ? static_cast<size_t>(k) * 8 : JumpReluListBytesPerRow();
      ASSIGN_OR_RETURN(void* lists, Ensure(&sae_topk_, static_cast<size_t>(chunk) * list_bytes));
      idx = static_cast<int32_t*>(lists);
      val = reinterpret_cast<float*>(idx + chunk * n_list);
      if (k == 0) dense_row = reinterpret_cast<int32_t*>(val + chunk * n_list);
    }
    float* margin = nullptr;  // [chunk] (JumpReLU rescoring)
    cuda::SaeValueBounds bound;
    if (jumprelu_rescore) {
      ASSIGN_OR_RETURN(bound, SaeBounds(enc));
      ASSIGN_OR_RETURN(void* m, Ensure(&sae_cand_, static_cast<size_t>(chunk) * sizeof(float)));
      margin = static_cast<float*>(m);
    }
    for (int64_t t0 = 0; t0 < x.rows; t0 += chunk) {
      const int64_t tc = std::min(chunk, x.rows - t0);
      const float* dense = nullptr;  // F [tc, d_sae] (JumpReLU), else only the list (none: no features)
      if (d_sae > 0) {
        int parts = 1;
        if (k > 0) {
          // Which features: ChunkTopK (v = h * scale, ties to the lower index,
          // exactly SaeEncodeTopK's set). What they add: h, recomputed exactly
          // (rescoring) or read back from the pre-activations before those are
          // overwritten by F.
          RETURN_IF_ERROR(
              ChunkTopK(x.as<float>() + t0 * d, tc, enc, mode, k, k, pre, idx, val, &parts, "sae reconstruct encode"));
          if (mode == 0) {
            RETURN_IF_ERROR(
                FromCuda(cuda::LaunchSaeExactH(x.as<float>() + t0 * d, enc.encoder.data, tc, d, enc.bias.as<float>(),
                                               enc.scale_in, idx, k, val, dev_->stream),
                         "sae reconstruct exact h"));
          } else {
            RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeTopKValuesToH(pre, parts, tc, d_sae, enc.bias.as<float>(),
                                                                  enc.scale_in, idx, k, val, dev_->stream),
                                     "sae reconstruct top-k"));
          }
        } else if (jumprelu_rescore) {
          const float* xr = x.as<float>() + t0 * d;
          RETURN_IF_ERROR(Gemm(xr, tc, enc.encoder, 1, pre, &parts, "sae reconstruct encode"));
          RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeMargins(xr, tc, d, bound, enc.scale_in, margin, dev_->stream),
                                   "sae reconstruct margins"));
          RETURN_IF_ERROR(
              FromCuda(cuda::LaunchSaeJumpReluExact(xr, enc.encoder.data, tc, d, d_sae, enc.bias.as<float>(),
                                                    enc.feature_scale.as<float>(), enc.scale_in, enc.threshold, margin,
                                                    pre, idx, val, dense_row, dev_->stream),
                       "sae reconstruct activations"));
          dense = pre;  // for the rows flagged in dense_row
        } else {
          RETURN_IF_ERROR(Gemm(x.as<float>() + t0 * d, tc, enc.encoder, n_enc, pre, &parts, "sae reconstruct encode"));
          RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeJumpReluActivations(pre, parts, tc, d_sae, enc.bias.as<float>(),
                                                                      enc.feature_scale.as<float>(), enc.scale_in,
                                                                      enc.threshold, dev_->stream),
                                   "sae reconstruct activations"));
          dense = pre;
        }
      }
      // Reads only the active features' rows of the feature-major decoder:
      // ~k rows per token, where a dense GEMM on F would multiply all d_sae.
      RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeSparseDecode(dense, dense_row, d_sae, idx, val, n_list, dec.decoder.data,
                                                           ToElem(dec.decoder.dtype), tc, d, dec.bias.as<float>(),
                                                           dec.scale_out, out.as<float>() + t0 * d, dev_->stream),
                               "sae reconstruct decode"));
    }
    return absl::OkStatus();
  }

  // Time points are timing events on the stream, recycled through a free
  // list. Each one also marks where the ops before it end for the error
  // words (below).
  absl::StatusOr<int64_t> RecordTimePoint() override {
    RETURN_IF_ERROR(Enter());
    int64_t id;
    if (!free_points_.empty()) {
      id = free_points_.back();
      free_points_.pop_back();
    } else {
      cudaEvent_t e = nullptr;
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDefault), "time point");
      points_.push_back(e);
      point_epoch_.push_back(-1);
      id = static_cast<int64_t>(points_.size()) - 1;
    }
    const cudaError_t e = cudaEventRecord(points_[id], dev_->stream);
    if (e != cudaSuccess) {
      free_points_.push_back(id);
      return FromCuda(e, "time point");
    }
    // An epoch no op stored into needs no word of its own: the point then
    // closes the epoch before, and the current one goes on. So only the
    // stretches with an input check (embed, attention, watch lists) use
    // words, not every hook's pair of points.
    point_epoch_[id] = epoch_used_ ? epoch_++ : epoch_ - 1;
    epoch_used_ = false;
    return id;
  }

  absl::StatusOr<double> SecondsBetween(int64_t start, int64_t end) override {
    // Both points are released on every path, as the interface promises
    // (ReleaseTimePoint ignores an unknown one).
    absl::Status usable =
        ValidPoint(start) && ValidPoint(end) ? Enter() : absl::InvalidArgumentError("cuda: unknown time point");
    if (!usable.ok()) {
      ReleaseTimePoint(start);
      ReleaseTimePoint(end);
      return usable;
    }
    const cudaError_t sync = cudaEventSynchronize(points_[end]);
    float ms = 0.0f;
    const cudaError_t elapsed = sync == cudaSuccess ? cudaEventElapsedTime(&ms, points_[start], points_[end]) : sync;
    ReleaseTimePoint(start);
    ReleaseTimePoint(end);
    CUDA_RETURN_IF_ERROR(elapsed, "elapsed time");
    return static_cast<double>(ms) * 1e-3;
  }

  void ReleaseTimePoint(int64_t point) override {
    if (!ValidPoint(point)) return;  // unknown or already released: never listed free twice
    point_epoch_[point] = -1;
    free_points_.push_back(point);
  }

  absl::Status RelativeSquaredError(const Tensor& y_hat, const Tensor& y, const Tensor& out) override {
    RETURN_IF_ERROR(CheckRelativeSquaredErrorArgs(y_hat, y, out));
    if (y.rows == 0) return absl::OkStatus();
    RETURN_IF_ERROR(Enter());
    return FromCuda(cuda::LaunchRelativeSquaredError(y_hat.as<float>(), y.as<float>(), y.rows, y.cols, out.as<float>(),
                                                     dev_->stream),
                    "relative squared error");
  }

 private:
  explicit CudaBackend(std::shared_ptr<Device> dev)
      : dev_(std::move(dev)),
        model_split_(EnvInt(kModelSplit)),
        bf16_activations_(model_split_ == 1 && EnvInt(kBf16Activations) == 1) {}

  // How SAE top-k selection runs for encoder weights of `dtype` (see the
  // file comment): 0 = rescoring (BF16, the default), else the number of
  // bf16 parts of the activations in the encoder GEMM (1 for F32/F16 weights,
  // whose GEMMs are fp32).
  // bf16 tensor-core attention goes with bf16 model GEMMs; fp32-faithful
  // GEMMs (SAE_CUDA_MODEL_SPLIT >= 2) get the fp32 kernel.
  // SAE_CUDA_ATTENTION=fp32|mma overrides, read at every call like
  // SAE_CUDA_SAE_SPLIT (sae-bench-cuda times both).
  bool AttentionOnTensorCores() const {
    const char* v = std::getenv("SAE_CUDA_ATTENTION");
    if (v != nullptr && std::strcmp(v, "fp32") == 0) return false;
    if (v != nullptr && std::strcmp(v, "mma") == 0) return true;
    return model_split_ == 1;
  }
  static int SaeTopKMode(DType dtype) { return dtype == DType::kBF16 ? EnvInt(kSaeSplit) : 1; }
  // JumpReLU reconstruction lists per row: index + h per slot, the dense-row flag.
  static size_t JumpReluListBytesPerRow() { return static_cast<size_t>(cuda::kJumpReluListSlots) * 8 + 4; }
  // Whether a top-k of k_keep <= kSaeTopKMaxK fits the device: the top-k
  // (LaunchSaeTopK) and the rescoring (LaunchSaeRescore) keep their
  // SaeCandidates(k_keep) candidates in shared memory.
  // The kernels' static __shared__ variables (tens of bytes, see ptxas -v)
  // come out of the same per-block opt-in budget: the driver refuses a
  // dynamic limit above shared_optin minus them in cudaFuncSetAttribute.
  bool TopKFits(int k_keep, int64_t d) const { return CandidatesFit(LeastSaeCandidates(k_keep), d); }
  bool CandidatesFit(int n_cand, int64_t d) const {
    constexpr size_t kStaticSharedReserve = 1024;
    const size_t budget = dev_->shared_optin - std::min(dev_->shared_optin, kStaticSharedReserve);
    return cuda::SaeTopKSharedBytes(n_cand) <= budget && cuda::SaeRescoreSharedBytes(n_cand, d) <= budget;
  }
  // UNIMPLEMENTED naming `what` when a top-k of k_keep features per token
  // does not fit the device (max_sae_top_k, computed only for the message).
  absl::Status CheckTopKFits(int k_keep, int64_t d, absl::string_view what) const {
    if (k_keep <= 0 || (k_keep <= cuda::kSaeTopKMaxK && TopKFits(k_keep, d))) return absl::OkStatus();
    const int limit = max_sae_top_k(d);
    return absl::UnimplementedError(
        absl::StrCat(what, "=", k_keep, " is larger than ", limit, ", the most features per token the top-k holds on ",
                     dev_->name, " (", dev_->shared_optin / 1024, " KiB of shared memory per block, d_model ", d, ")"));
  }
  // Rescoring keeps this many candidates per row for a top-k of k_keep.
  // A row is settled from its candidates when its k_keep-th exact value
  // beats the last candidate's by the error bound, about 0.16 standard
  // deviations of the pre-activations at d_model 4096. In the tail of 131072
  // (or 32768) features, k_keep + k_keep / 4 candidates leave a smaller gap
  // than that from k_keep ~ 50 on, so most rows took the all-features path;
  // 2 k_keep + 64 leave a gap of 0.3 or more up to k_keep = 4096 (simulated
  // with Gaussian encoder rows and activations: 0 of 24 rows at k_keep 16 to
  // 256, where k_keep + k_keep / 4 sent 4 of 8 at 50 and all from 100). Fewer
  // where the device's shared memory does not hold them, never fewer than
  // LeastSaeCandidates (what TopKFits and max_sae_top_k count).
  int SaeCandidates(int k_keep, int64_t d) const {
    const int least = LeastSaeCandidates(k_keep);
    int lo = least, hi = static_cast<int>(std::min<int64_t>(cuda::kSaeTopKMaxK, 2 * static_cast<int64_t>(k_keep) + 64));
    if (hi <= lo || CandidatesFit(hi, d)) return std::max(lo, hi);
    while (hi - lo > 1) {  // CandidatesFit(lo), !CandidatesFit(hi); monotone in n
      const int mid = lo + (hi - lo) / 2;
      (CandidatesFit(mid, d) ? lo : hi) = mid;
    }
    return lo;
  }
  static int LeastSaeCandidates(int k_keep) { return std::min(cuda::kSaeTopKMaxK, k_keep + std::max(32, k_keep / 4)); }
  // Rescoring scratch per row: candidates (index + value), margin, fallback flag.
  size_t SaeCandidateBytesPerRow(int k_keep, int64_t d) const {
    return static_cast<size_t>(SaeCandidates(k_keep, d)) * 8 + 8;
  }
  // Device bytes per token of ChunkTopK in `mode` (pre-activations, the bf16 GEMM input, candidates).
  size_t SaeTopKRowBytes(int mode, int64_t d_sae, int64_t d, int k_keep) const {
    const int parts = std::max(mode, 1);
    return static_cast<size_t>(parts) * (d_sae * sizeof(float) + d * 2) +
           (mode == 0 ? SaeCandidateBytesPerRow(k_keep, d) : 0);
  }

  // The error bound's constants of a BF16 encoder (cuda::SaeValueBounds),
  // computed on the device once per encoder (cached in the Device).
  absl::StatusOr<cuda::SaeValueBounds> SaeBounds(const SaeEncoderWeights& sae) {
    {
      std::lock_guard<std::mutex> lock(dev_->bounds_mu);
      for (const Device::SaeBound& b : dev_->bounds) {
        if (b.encoder == sae.encoder.data && b.encoder_bytes == sae.encoder.nbytes() && b.bias == sae.bias.data &&
            b.feature_scale == sae.feature_scale.data && b.scale_in == sae.scale_in) {
          return b.bound;
        }
      }
    }
    static_assert(sizeof(cuda::SaeValueBounds) == 5 * sizeof(float), "5 floats in device memory");
    ASSIGN_OR_RETURN(void* scratch, Ensure(&sae_bound_, sizeof(cuda::SaeValueBounds)));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(scratch, 0, sizeof(cuda::SaeValueBounds), dev_->stream), "sae bound");
    RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeValueBound(sae.encoder.data, sae.bias.as<float>(), sae.encoder.rows,
                                                       sae.encoder.cols, sae.feature_scale.as<float>(), sae.scale_in,
                                                       static_cast<cuda::SaeValueBounds*>(scratch), dev_->stream),
                             "sae bound"));
    cuda::SaeValueBounds bound;
    // Not CopyToHost: its full wait would take the error words of ops queued
    // before (a bad watch-list id checked on the device just now), which
    // belong to their own read-back.
    RETURN_IF_ERROR(CopyToHostOn(dev_->stream, Tensor{scratch, DType::kF32, 1, 5}, &bound));
    std::lock_guard<std::mutex> lock(dev_->bounds_mu);
    dev_->bounds.push_back(Device::SaeBound{sae.encoder.data, sae.encoder.nbytes(), sae.bias.data,
                                            sae.feature_scale.data, sae.scale_in, bound});
    return bound;
  }

  // The encoder GEMM and top-k of rows [0, tc) of x (F32 [tc, d]) into idx /
  // val [tc, k] (the k_keep largest active features). pre: scratch of
  // max(mode, 1) * tc * d_sae floats; on return it holds *parts GEMM parts
  // of the pre-activations (split modes) or is spent (rescoring, *parts = 0).
  absl::Status ChunkTopK(const float* x, int64_t tc, const SaeEncoderWeights& sae, int mode, int k_keep, int k,
                         float* pre, int32_t* idx, float* val, int* parts, const char* op) {
    const int64_t d_sae = sae.encoder.rows, d = sae.encoder.cols;
    const float* bias = sae.bias.as<float>();
    const float* fscale = sae.feature_scale.as<float>();
    if (mode != 0 || k_keep == 0 || d_sae == 0) {
      RETURN_IF_ERROR(Gemm(x, tc, sae.encoder, std::max(mode, 1), pre, parts, op));
      return FromCuda(cuda::LaunchSaeTopK(pre, *parts, tc, d_sae, bias, fscale, sae.scale_in, sae.threshold, nullptr,
                                          nullptr, k_keep, k, idx, val, dev_->stream),
                      op);
    }
    *parts = 0;
    ASSIGN_OR_RETURN(const auto bound, SaeBounds(sae));
    const int n_cand = SaeCandidates(k_keep, d);
    ASSIGN_OR_RETURN(void* cand_v, Ensure(&sae_cand_, static_cast<size_t>(tc) * SaeCandidateBytesPerRow(k_keep, d)));
    ASSIGN_OR_RETURN(unsigned long long* exact_rows, ExactRowCounter());
    auto* cand_idx = static_cast<int32_t*>(cand_v);
    auto* cand_val = reinterpret_cast<float*>(cand_idx + tc * n_cand);
    float* margin = cand_val + tc * n_cand;
    auto* fallback = reinterpret_cast<int32_t*>(margin + tc);
    int gemm_parts = 1;
    RETURN_IF_ERROR(Gemm(x, tc, sae.encoder, 1, pre, &gemm_parts, op));
    RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeMargins(x, tc, d, bound, sae.scale_in, margin, dev_->stream), op));
    RETURN_IF_ERROR(FromCuda(cuda::LaunchSaeTopK(pre, 1, tc, d_sae, bias, fscale, sae.scale_in, sae.threshold, margin,
                                                 nullptr, n_cand, n_cand, cand_idx, cand_val, dev_->stream),
                             op));
    RETURN_IF_ERROR(FromCuda(
        cuda::LaunchSaeRescore(x, sae.encoder.data, tc, d, bias, fscale, sae.scale_in, sae.threshold, margin, cand_idx,
                               cand_val, n_cand, k_keep, k, idx, val, fallback, exact_rows, dev_->stream),
        op));
    // Rows the bound could not settle: every feature exactly, then the plain top-k.
    RETURN_IF_ERROR(
        FromCuda(cuda::LaunchSaeExactRows(x, sae.encoder.data, tc, d, d_sae, fallback, pre, dev_->stream), op));
    return FromCuda(cuda::LaunchSaeTopK(pre, 1, tc, d_sae, bias, fscale, sae.scale_in, sae.threshold, nullptr, fallback,
                                        k_keep, k, idx, val, dev_->stream),
                    op);
  }

  // Tokens per SAE chunk so the per-token scratch (row_bytes) fits the
  // budget: d_sae = 131072 and 8k tokens would be 4 GiB at once.
  static int64_t SaeChunkRows(int64_t n_rows, size_t row_bytes) {
    const size_t budget = static_cast<size_t>(EnvInt(kSaeScratchMb)) << 20;
    return std::max<int64_t>(1,
                             std::min<int64_t>(n_rows, static_cast<int64_t>(budget / std::max<size_t>(row_bytes, 1))));
  }

  // The CUDA current device is per host thread; the executor may not be the
  // thread that created the backend.
  // After a sticky error nothing touches the device again: every op fails at once.
  absl::Status Enter() {
    RETURN_IF_ERROR(DeviceFault());
    return FromCuda(cudaSetDevice(dev_->id), "set device");
  }

  // A recorded time point not yet released (epochs start at 1, so a live
  // point's epoch is >= 0).
  bool ValidPoint(int64_t p) const {
    return p >= 0 && p < static_cast<int64_t>(points_.size()) && point_epoch_[p] >= 0;
  }

  PinnedSlot& NextIoSlot() {
    PinnedSlot& s = dev_->io[next_io_];
    next_io_ = (next_io_ + 1) % kIoSlots;
    return s;
  }

  // The error word of the current epoch, for kernels that check inputs only
  // the device holds (token ids, sequence starts, feature ids).
  int* ErrorWord() {
    epoch_used_ = true;
    return dev_->error_words_dev + epoch_ % kErrorEpochs;
  }

  // Takes (reads and clears) the error words of epochs [first, last], whose
  // ops have all finished, and reports the earliest code among them. An
  // epoch kErrorEpochs or more before the current one shares its word with a
  // newer epoch whose kernels may be storing into it now: it is left to that
  // epoch's read-back.
  absl::Status TakeErrors(int64_t first, int64_t last) {
    first = std::max(first, epoch_ - kErrorEpochs + 1);
    int code = cuda::kDeviceErrorNone;
    for (int64_t e = std::max<int64_t>(first, 0); e <= last; ++e) {
      int* word = dev_->error_words_host + e % kErrorEpochs;
      if (*static_cast<volatile int*>(word) == cuda::kDeviceErrorNone) continue;
      const int c = __atomic_exchange_n(word, cuda::kDeviceErrorNone, __ATOMIC_ACQ_REL);
      if (code == cuda::kDeviceErrorNone) code = c;
    }
    return DeviceErrorStatus(code);
  }

  // After waiting for all work: the epochs no live time point follows. Those
  // a live point follows are left to CopyToHostAfter on it, so a wait while
  // one batch is queued (an SAE's first use) does not report the codes of the
  // batch before, which is still to be read back.
  absl::Status TakeErrorsAfterFullWait() {
    int64_t covered = -1;
    for (int64_t e : point_epoch_) covered = std::max(covered, e);  // -1: free
    return TakeErrors(covered + 1, epoch_);
  }

  static absl::Status DeviceErrorStatus(int code) {
    if (code == cuda::kDeviceErrorNone) return absl::OkStatus();
    if (code == cuda::kDeviceErrorBadTokenId) {
      return absl::InvalidArgumentError("cuda embed: a token id is outside the vocabulary");
    }
    if (code == cuda::kDeviceErrorBadSeqStarts) {
      return absl::InvalidArgumentError(
          "cuda attention: seq_starts must start at 0, increase, cover all rows and respect max_seq_len");
    }
    if (code == cuda::kDeviceErrorBadFeatureId) {
      return absl::InvalidArgumentError("cuda sae selected: a feature id is outside [0, d_sae)");
    }
    return absl::InternalError(absl::StrCat("cuda: kernel error code ", code));
  }

  // SaeExactRows' device counter, zeroed when first made.
  absl::StatusOr<unsigned long long*> ExactRowCounter() {
    if (sae_exact_rows_.ptr == nullptr) {
      ASSIGN_OR_RETURN(void* p, Ensure(&sae_exact_rows_, sizeof(unsigned long long)));
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0, sizeof(unsigned long long), dev_->stream), "sae exact-row counter");
    }
    return static_cast<unsigned long long*>(sae_exact_rows_.ptr);
  }

  absl::StatusOr<void*> Ensure(Scratch* s, size_t bytes) {
    if (bytes <= s->bytes) return s->ptr;
    // Exactly what is asked, no growth margin (SAE pre-activations can take
    // gigabytes); a regrowth is cheap, the memory comes from the pool.
    if (s->ptr != nullptr) {
      CUDA_RETURN_IF_ERROR(cudaFreeAsync(s->ptr, dev_->stream), "free scratch");
      s->ptr = nullptr;
      s->bytes = 0;
    }
    const cudaError_t e = cudaMallocAsync(&s->ptr, bytes, dev_->stream);
    if (e != cudaSuccess) {
      s->ptr = nullptr;
      return FromCuda(e, absl::StrCat("scratch of ", bytes, " bytes"));
    }
    s->bytes = bytes;
    return s->ptr;
  }

  static absl::Status CheckGemmDims(int64_t rows, const Tensor& w, const char* op) {
    constexpr int64_t kMax = std::numeric_limits<int>::max();  // cuBLAS takes int dimensions
    if (rows > kMax || w.rows > kMax || w.cols > kMax) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": GEMM dimensions exceed int32"));
    }
    return absl::OkStatus();
  }

  // x [n, k] F32 as n_parts bf16 parts [n_parts, n, k] in the x_bf16_
  // scratch (valid until the next SplitToBf16).
  absl::StatusOr<const void*> SplitToBf16(const float* x, int64_t n, int64_t k, int n_parts, const char* op) {
    ASSIGN_OR_RETURN(void* xb, Ensure(&x_bf16_, static_cast<size_t>(n_parts * n * k) * 2));
    RETURN_IF_ERROR(FromCuda(cuda::LaunchSplitToBf16(x, n * k, n_parts, xb, dev_->stream), op));
    return xb;
  }

  // Whether x times BF16 weights is one plain bf16 GEMM: x is BF16, or F32
  // rounded once (one bf16 part; SAE_CUDA_MODEL_SPLIT > 1 splits it).
  bool PlainBf16Gemm(const Tensor& x) const { return x.dtype == DType::kBF16 || model_split_ == 1; }

  // x as a bf16 GEMM operand: as it is when BF16, else rounded into scratch
  // (valid until the next SplitToBf16).
  absl::StatusOr<const void*> Bf16Operand(const Tensor& x, const char* op) {
    if (x.dtype == DType::kBF16) return static_cast<const void*>(x.data);
    return SplitToBf16(x.as<float>(), x.rows, x.cols, 1, op);
  }

  // out (row-major [rows, w.rows]) = xb [rows, k] . w^T + beta * out, bf16 x
  // bf16 -> fp32 (beta 0: out is not read).
  absl::Status GemmBf16(const void* xb, int64_t rows, const Tensor& w, float* out, const char* op, float beta = 0.0f) {
    if (w.cols == 0) {                            // empty sums (cuBLAS refuses k = 0 with its leading dimensions)
      if (beta != 0.0f) return absl::OkStatus();  // out + 0
      return FromCuda(cudaMemsetAsync(out, 0, static_cast<size_t>(rows * w.rows) * sizeof(float), dev_->stream), op);
    }
    const float one = 1.0f;
    const int im = static_cast<int>(w.rows), ik = static_cast<int>(w.cols);
    return FromCublas(
        cublasGemmEx(dev_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, im, static_cast<int>(rows), ik, &one, w.data, CUDA_R_16BF,
                     ik, xb, CUDA_R_16BF, ik, &beta, out, CUDA_R_32F, im, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        op);
  }

  // out (row-major [n_parts_used * n, w.rows]) = x_parts [.., k] . w^T, where
  // x [n, k] F32 is split into n_parts bf16 parts for BF16 weights (part p's
  // product in rows [p n, (p+1) n)); F32/F16 weights give one exact-ish part.
  absl::Status Gemm(const float* x, int64_t n, const Tensor& w, int n_parts, float* out, int* parts_used,
                    const char* op) {
    const int64_t m = w.rows, k = w.cols;
    RETURN_IF_ERROR(CheckGemmDims(n * n_parts, w, op));
    if (k == 0) {
      *parts_used = 1;
      return FromCuda(cudaMemsetAsync(out, 0, static_cast<size_t>(n * m) * sizeof(float), dev_->stream), op);
    }
    const float one = 1.0f, zero = 0.0f;
    const int im = static_cast<int>(m), ik = static_cast<int>(k);
    // Column-major view: out^T [m, n] = W^T-op [m, k] x X^T [k, n] ("TN", the
    // layout cuBLAS is fastest at).
    switch (w.dtype) {
      case DType::kBF16: {
        *parts_used = n_parts;
        ASSIGN_OR_RETURN(const void* xb, SplitToBf16(x, n, k, n_parts, op));
        return GemmBf16(xb, n_parts * n, w, out, op);
      }
      case DType::kF32:
        *parts_used = 1;
        return FromCublas(cublasGemmEx(dev_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, im, static_cast<int>(n), ik, &one,
                                       w.data, CUDA_R_32F, ik, x, CUDA_R_32F, ik, &zero, out, CUDA_R_32F, im,
                                       CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
                          op);
      case DType::kF16: {
        *parts_used = 1;
        // Widen bounded row chunks of W to F32 (x is never narrowed to fp16: it may overflow).
        const int64_t rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>(m, (64 << 20) / (k * 4)));
        ASSIGN_OR_RETURN(void* wf, Ensure(&w_f32_, static_cast<size_t>(rows_per_chunk * k) * sizeof(float)));
        for (int64_t m0 = 0; m0 < m; m0 += rows_per_chunk) {
          const int64_t mc = std::min(rows_per_chunk, m - m0);
          RETURN_IF_ERROR(FromCuda(cuda::LaunchToF32(static_cast<const uint16_t*>(w.data) + m0 * k, ElemType::kF16,
                                                     mc * k, static_cast<float*>(wf), dev_->stream),
                                   op));
          RETURN_IF_ERROR(
              FromCublas(cublasGemmEx(dev_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(mc), static_cast<int>(n),
                                      ik, &one, wf, CUDA_R_32F, ik, x, CUDA_R_32F, ik, &zero, out + m0, CUDA_R_32F, im,
                                      CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
                         op));
        }
        return absl::OkStatus();
      }
      case DType::kI32:
        break;
    }
    return absl::UnimplementedError(absl::StrCat(op, ": weights of type ", DTypeName(w.dtype), " are not supported"));
  }

  std::shared_ptr<Device> dev_;
  std::vector<cudaEvent_t> points_;   // time points (timing events)
  std::vector<int64_t> free_points_;  // ids in points_ not in use
  std::vector<int64_t> point_epoch_;  // per point: the error epoch it closed; -1 while free
  int64_t epoch_ = 1;                 // error epoch of the ops issued now
  bool epoch_used_ = false;           // an op of epoch_ was given its error word
  const int model_split_;             // bf16 parts of the activations in model GEMMs
  const bool bf16_activations_;       // gemm_input_dtype() is BF16
  int next_io_ = 0;
  int next_in_ = 0;
  Scratch x_bf16_;          // [n_parts, n, k] bf16 GEMM input
  Scratch x_f32_;           // a BF16 GEMM input widened for an F32 / F16 weight
  Scratch attn_f32_;        // fp32 attention output before its BF16 rounding
  Scratch attn_kv_;         // bf16 k and v for the tensor-core attention
  Scratch w_f32_;           // F16 weight rows widened to F32
  Scratch mm_parts_;        // [n_parts, chunk, m] F32 model GEMM parts (SAE_CUDA_MODEL_SPLIT > 1)
  Scratch sae_pre_;         // [n_parts, chunk, d_sae] F32 pre-activations (then F [chunk, d_sae])
  Scratch sae_topk_;        // [chunk, n] I32 indices, then [chunk, n] F32 values (a top-k, or JumpReLU actives + flags)
  Scratch sae_cand_;        // rescoring: [chunk, n_cand] I32 + F32 candidates, [chunk] margins, [chunk] flags;
                            // JumpReLU reconstruction and watch list: [chunk] margins
  Scratch sae_bound_;       // SaeValueBounds: SaeBounds' device result
  Scratch sae_exact_rows_;  // one u64: rows rescoring sent to the all-features path (SaeExactRows)
  Scratch sae_rows_;        // [m, d_model] watched encoder rows, encoder dtype
  Scratch tile_table_;      // [n_seqs + 1] I32 attention tile table
};

}  // namespace
}  // namespace sae

extern "C" __attribute__((visibility("default"))) int SaeCudaBackendCreate(int abi_version, sae::Backend** out,
                                                                           char* err, size_t err_len) {
  auto fail = [&](const absl::Status& s) {
    if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "%s", std::string(s.message()).c_str());
    return static_cast<int>(s.code());
  };
  if (out == nullptr) return fail(absl::InvalidArgumentError("null output pointer"));
  *out = nullptr;
  if (abi_version != SAE_CUDA_BACKEND_ABI_VERSION) {
    return fail(absl::FailedPreconditionError(absl::StrCat("libsae_cuda.so has ABI version ",
                                                           SAE_CUDA_BACKEND_ABI_VERSION, " but the caller expects ",
                                                           abi_version, "; rebuild it with the server")));
  }
  try {
    auto backend = sae::CudaBackend::Create();
    if (!backend.ok()) return fail(backend.status());
    *out = backend->release();
    return 0;
  } catch (const std::exception& e) {
    return fail(absl::InternalError(absl::StrCat("creating the CUDA backend threw: ", e.what())));
  }
}
