// Argument checks shared by the backends, so every backend rejects a bad op
// call with the same message.
#ifndef SAE_CORE_OP_CHECKS_H_
#define SAE_CORE_OP_CHECKS_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/backend.h"

namespace sae {

inline absl::Status CheckF32(const Tensor& t, const char* what) {
  if (t.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be F32, got ", DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

// An activation that feeds a GEMM: F32, or BF16 where the backend keeps
// those in BF16 (Backend::gemm_input_dtype).
inline absl::Status CheckGemmInput(const Tensor& t, DType allowed, const char* what) {
  if (t.dtype != DType::kF32 && t.dtype != allowed) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be F32", allowed == DType::kF32 ? "" : " or BF16", ", got ", DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

inline absl::Status CheckShape(const Tensor& t, int64_t rows, int64_t cols, const char* what) {
  if (t.rows != rows || t.cols != cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has shape [", t.rows, ", ", t.cols, "], expected [", rows, ", ", cols, "]"));
  }
  return absl::OkStatus();
}

inline absl::Status CheckCopy(const Tensor& src, const Tensor& dst) {
  if (src.dtype != dst.dtype || src.numel() != dst.numel()) {
    return absl::InvalidArgumentError(absl::StrCat("copy: ", DTypeName(src.dtype), "[", src.rows, ", ", src.cols,
                                                   "] into ", DTypeName(dst.dtype), "[", dst.rows, ", ", dst.cols,
                                                   "] (dtype and element count must match)"));
  }
  return absl::OkStatus();
}

inline bool IsFloatDType(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

// x [n, d_model] F32 against an encoder [d_sae, d_model] with F32 bias (and scale).
inline absl::Status CheckSaeArgs(const Tensor& x, const SaeEncoderWeights& sae) {
  RETURN_IF_ERROR(CheckF32(x, "sae input"));
  const int64_t d_sae = sae.encoder.rows;
  if (sae.encoder.cols != x.cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("sae: input has ", x.cols, " columns, encoder expects ", sae.encoder.cols));
  }
  RETURN_IF_ERROR(CheckShape(sae.bias, 1, d_sae, "sae bias"));
  RETURN_IF_ERROR(CheckF32(sae.bias, "sae bias"));
  if (sae.feature_scale.data != nullptr) {
    RETURN_IF_ERROR(CheckShape(sae.feature_scale, 1, d_sae, "sae scale"));
    RETURN_IF_ERROR(CheckF32(sae.feature_scale, "sae scale"));
  }
  return absl::OkStatus();
}

inline absl::Status CheckSaeTopKArgs(const Tensor& x, const SaeEncoderWeights& sae, int k, const Tensor& out_indices,
                                     const Tensor& out_values) {
  RETURN_IF_ERROR(CheckSaeArgs(x, sae));
  if (k < 0) return absl::InvalidArgumentError("sae: k must be >= 0");
  RETURN_IF_ERROR(CheckShape(out_indices, x.rows, k, "sae indices"));
  RETURN_IF_ERROR(CheckShape(out_values, x.rows, k, "sae values"));
  if (out_indices.dtype != DType::kI32) return absl::InvalidArgumentError("sae indices must be I32");
  return CheckF32(out_values, "sae values");
}

// The ids' range is checked where they are read (host or device).
inline absl::Status CheckSaeSelectedArgs(const Tensor& x, const SaeEncoderWeights& sae, const Tensor& feature_ids,
                                         const Tensor& out_values) {
  RETURN_IF_ERROR(CheckSaeArgs(x, sae));
  const int64_t m = out_values.cols;
  RETURN_IF_ERROR(CheckF32(out_values, "sae selected values"));
  RETURN_IF_ERROR(CheckShape(out_values, x.rows, m, "sae selected values"));
  if (feature_ids.dtype != DType::kI32 || feature_ids.numel() != m) {
    return absl::InvalidArgumentError(absl::StrCat("sae selected: feature_ids must be I32 with ", m, " elements"));
  }
  return absl::OkStatus();
}

inline absl::Status CheckSaeReconstructArgs(const Tensor& x, const SaeEncoderWeights& enc, const SaeDecoderWeights& dec,
                                            const Tensor& out) {
  RETURN_IF_ERROR(CheckSaeArgs(x, enc));
  const int64_t d_sae = enc.encoder.rows, d = x.cols;
  RETURN_IF_ERROR(CheckShape(dec.decoder, d_sae, d, "sae decoder (feature-major)"));
  if (!IsFloatDType(dec.decoder.dtype)) return absl::InvalidArgumentError("sae decoder must be F32, BF16 or F16");
  RETURN_IF_ERROR(CheckF32(dec.bias, "sae decoder bias"));
  RETURN_IF_ERROR(CheckShape(dec.bias, 1, d, "sae decoder bias"));
  RETURN_IF_ERROR(CheckF32(out, "sae reconstruction"));
  return CheckShape(out, x.rows, d, "sae reconstruction");
}

inline absl::Status CheckRelativeSquaredErrorArgs(const Tensor& y_hat, const Tensor& y, const Tensor& out) {
  RETURN_IF_ERROR(CheckF32(y_hat, "relative error y_hat"));
  RETURN_IF_ERROR(CheckF32(y, "relative error target"));
  RETURN_IF_ERROR(CheckShape(y_hat, y.rows, y.cols, "relative error y_hat"));
  RETURN_IF_ERROR(CheckF32(out, "relative error output"));
  return CheckShape(out, y.rows, 1, "relative error output");
}

}  // namespace sae

#endif  // SAE_CORE_OP_CHECKS_H_
