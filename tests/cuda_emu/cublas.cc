// cuBLAS emulation: cublasGemmEx with an fp32 accumulator, as on the GPU,
// fed with the sums of 16 products at a time taken in float64 (at least as
// accurate as a tensor core's block sum; so an fp32 accumulator overflows
// where the GPU's would), queued on the handle's stream. Written from the
// cuBLAS documentation, not from any caller.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_internal.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace {

size_t ElementBytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

double Load(const void* base, cudaDataType_t t, int64_t i) {
  switch (t) {
    case CUDA_R_32F:
      return static_cast<const float*>(base)[i];
    case CUDA_R_16BF:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case CUDA_R_16F:
      return __half2float(static_cast<const __half*>(base)[i]);
  }
  return 0.0;
}

bool Supported(cudaDataType_t a, cudaDataType_t b, cudaDataType_t c, cublasComputeType_t compute) {
  if (a != b) return false;
  switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      return c == CUDA_R_32F || (a == CUDA_R_16BF && c == CUDA_R_16BF);
    case CUBLAS_COMPUTE_32F_FAST_TF32:
    case CUBLAS_COMPUTE_32F_FAST_16F:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
      return a == CUDA_R_32F && c == CUDA_R_32F;
    case CUBLAS_COMPUTE_16F:
      return false;
  }
  return false;
}

}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void* workspace, size_t bytes) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && workspace == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  sae_emu::CheckDeviceRange(workspace, bytes, "cublasSetWorkspace");
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    default:
      return "an internal operation failed";
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || k < 0 || alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  if (lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (!Supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  // Pointer mode host: alpha and beta are read now.
  const double a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  const cudaError_t e = sae_emu::EnqueueHostWork(handle->stream, [=]() {
    // Column-major extents actually touched.
    const int64_t a_cols = ta ? m : k, a_rows = ta ? k : m, b_cols = tb ? k : n, b_rows = tb ? n : k;
    if (k > 0) {
      sae_emu::CheckDeviceRange(A, ((a_cols - 1) * lda + a_rows) * ElementBytes(Atype), "cublasGemmEx A");
      sae_emu::CheckDeviceRange(B, ((b_cols - 1) * ldb + b_rows) * ElementBytes(Btype), "cublasGemmEx B");
    }
    sae_emu::CheckDeviceRange(C, ((static_cast<int64_t>(n) - 1) * ldc + m) * ElementBytes(Ctype), "cublasGemmEx C");
    std::vector<double> col(static_cast<size_t>(k));
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < k; ++l)
        col[l] = Load(B, Btype, tb ? j + static_cast<int64_t>(l) * ldb : l + static_cast<int64_t>(j) * ldb);
      for (int i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (int l0 = 0; l0 < k; l0 += 16) {
          double block = 0.0;
          for (int l = l0; l < std::min(k, l0 + 16); ++l) {
            block +=
                Load(A, Atype, ta ? l + static_cast<int64_t>(i) * lda : i + static_cast<int64_t>(l) * lda) * col[l];
          }
          // (Beyond FLT_MAX the block overflows to inf, as an explicit choice:
          // C++ leaves that conversion to the implementation.)
          acc += std::abs(block) <= FLT_MAX ? static_cast<float>(block) : std::copysign(INFINITY, block);
        }
        const int64_t ci = i + static_cast<int64_t>(j) * ldc;
        double r = a * acc;
        if (b != 0.0) r += b * Load(C, Ctype, ci);  // beta == 0: C is not read (it may hold NaN)
        if (Ctype == CUDA_R_32F) {
          static_cast<float*>(C)[ci] = static_cast<float>(r);
        } else {
          static_cast<__nv_bfloat16*>(C)[ci] = __float2bfloat16_rn(static_cast<float>(r));  // bf16 C only
        }
      }
    }
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}
