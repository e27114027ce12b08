// The op-level compute interface. The CPU reference backend and the CUDA
// backend implement it; the Llama forward pass and the SAE encoder are written
// once against it. Adding an op = one implementation per backend + one case
// in tests/core/backend_ops_test.cc. Every op needs a CUDA twin in
// server/core/cuda/; ops added after the CUDA backend are non-pure virtuals
// whose default answers UNIMPLEMENTED until the twin lands.
//
// Conventions: tensors are 2-D row-major views in the backend's memory.
// Activations are F32 [n_tokens, dim] (GEMM-only inputs may be BF16, see
// gemm_input_dtype); weights are [out_features, in_features] in BF16, F16 or
// F32 (as stored). Ops run in issue order on the backend's one
// stream; CopyToHost waits for the work before it.
//
// Errors an asynchronous backend finds on the device (an input that only
// device memory holds is out of range: a token id, a sequence start, a
// feature id) are INVALID_ARGUMENT from a later read-back, the first that
// waited for the op: CopyToHostAfter on a time point after the op, or a
// full wait (CopyToHost, Synchronize) when no live time point (recorded, not
// yet released) follows the op. So with batches in flight, each followed by
// a point and read back through it, every code is reported with the batch
// whose op stored it, and a wait inside one batch does not take the codes of
// the batch before; once its points are released, the next read-back
// reports a code that was never read. A code is reported at most once, and
// several found by one read-back are reported as the earliest.
#ifndef SAE_CORE_BACKEND_H_
#define SAE_CORE_BACKEND_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "core/safetensors.h"

namespace sae {

// A non-owning view of a 2-D row-major tensor in backend memory.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;

  int64_t numel() const { return rows * cols; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
  // Rows [begin, begin + n) of this tensor.
  Tensor Rows(int64_t begin, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<char*>(data) + static_cast<size_t>(begin * cols) * DTypeSize(dtype);
    t.rows = n;
    return t;
  }
  // The same memory seen with another shape (same element count).
  Tensor Reshaped(int64_t r, int64_t c) const {
    Tensor t = *this;
    t.rows = r;
    t.cols = c;
    return t;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

// Owns one backend allocation; frees it on destruction.
class OwnedTensor {
 public:
  OwnedTensor() = default;
  OwnedTensor(Tensor t, std::function<void(void*)> release) : t_(t), release_(std::move(release)) {}
  ~OwnedTensor() { Reset(); }
  OwnedTensor(OwnedTensor&& o) noexcept : t_(o.t_), release_(std::move(o.release_)) { o.release_ = nullptr; }
  OwnedTensor& operator=(OwnedTensor&& o) noexcept {
    if (this != &o) {
      Reset();
      t_ = o.t_;
      release_ = std::move(o.release_);
      o.release_ = nullptr;
    }
    return *this;
  }
  OwnedTensor(const OwnedTensor&) = delete;
  OwnedTensor& operator=(const OwnedTensor&) = delete;

  const Tensor& get() const { return t_; }
  const Tensor* operator->() const { return &t_; }
  bool empty() const { return t_.data == nullptr; }

 private:
  void Reset() {
    if (release_) release_(t_.data);
    release_ = nullptr;
    t_ = Tensor();
  }
  Tensor t_;
  std::function<void(void*)> release_;
};

// Per-SAE encoder parameters, already folded for the chosen encode form:
//   v_i = (scale_in * (w_i . x) + b_i) * (feature_scale ? feature_scale[i] : 1)
//   f_i = v_i if v_i > threshold else 0
// SAELens form: feature_scale = none, threshold = theta * scale_in.
// lm_saes form:  feature_scale[i] = ||d_i|| / scale_out, threshold = theta.
// TopK activation: threshold = 0 and at most `max_active` features survive.
struct SaeEncoderWeights {
  Tensor encoder;        // [d_sae, d_model], BF16/F16/F32
  Tensor bias;           // [1, d_sae] F32
  Tensor feature_scale;  // [1, d_sae] F32, or data == nullptr
  float scale_in = 1.0f;
  float threshold = 0.0f;
  int max_active = 0;  // 0: no limit (JumpReLU); >0: TopK activation
};

// Per-SAE decoder parameters for reconstructions ("form B" in DESIGN.md):
//   y_hat = (sum_{i active} h_i d_i + b_dec) / scale_out,  h_i = scale_in * (w_i . x) + b_i
// where "active" is the encoder's rule above (v_i > threshold, and for TopK
// SAEs only the max_active largest v_i). h_i is the SAELens-form value in both
// encode forms: feature_scale only decides which features are active.
// The decoder is held feature-major, the transpose of decoder.weight on disk
// ([d_model, d_sae]), so a feature's direction is one contiguous row and a
// decode reads only the rows of the active features.
struct SaeDecoderWeights {
  Tensor decoder;  // [d_sae, d_model], BF16/F16/F32; row i is d_i
  Tensor bias;     // [1, d_model] F32 (b_dec)
  float scale_out = 1.0f;
};

// What a backend holds, for the server's memory gauges; -1 where the backend
// cannot tell.
struct MemoryUsage {
  int64_t tensors = 0;        // bytes of live tensors: weights, and activations of batches in flight
  int64_t reserved = -1;      // bytes held from the device: allocator pool, scratch, staging, cuBLAS workspace
  int64_t device_total = -1;  // the device's memory
  int64_t device_free = -1;   // free on the device now (other processes' use included)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory ----
  virtual absl::StatusOr<OwnedTensor> Alloc(DType dtype, int64_t rows, int64_t cols) = 0;
  // Copies host data (e.g. a memory-mapped weight) into backend memory,
  // converting to `dtype`. The result has rows = shape[0], cols = the rest.
  virtual absl::StatusOr<OwnedTensor> Upload(const HostTensor& src, DType dtype) = 0;
  virtual absl::Status CopyFromHost(const void* src, const Tensor& dst) = 0;  // dst.nbytes() bytes
  virtual absl::Status CopyToHost(const Tensor& src, void* dst) = 0;          // waits for pending work
  virtual absl::Status Synchronize() = 0;

  // ---- ops ----
  // out[t] = F32(table[ids[t]]). ids: I32 [n, 1]; table: [vocab, d]; out: F32 [n, d].
  virtual absl::Status Embed(const Tensor& table, const Tensor& ids, const Tensor& out) = 0;
  // out = x * rsqrt(mean(x^2) + eps) * weight (weight.data == nullptr: no weight).
  virtual absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) = 0;
  // out[n, m] = x[n, k] . w[m, k]^T, fp32 accumulate.
  virtual absl::Status MatMul(const Tensor& x, const Tensor& w, const Tensor& out) = 0;
  // outs[i] = MatMul(x, ws[i]) for several weights applied to one input
  // (q/k/v, gate/up), with the same results as one MatMul per weight; a
  // backend may prepare x once (CUDA rounds it to bf16 once, not per weight).
  virtual absl::Status MatMulShared(const Tensor& x, absl::Span<const Tensor> ws, absl::Span<const Tensor> outs) {
    if (ws.size() != outs.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("matmul shared: ", ws.size(), " weights but ", outs.size(), " outputs"));
    }
    for (size_t i = 0; i < ws.size(); ++i) RETURN_IF_ERROR(MatMul(x, ws[i], outs[i]));
    return absl::OkStatus();
  }
  // out += x . w^T (out: F32 [n, m]): the residual add folded into the GEMM.
  // The default is MatMul into a temporary, then Add; the CPU computes
  // exactly that. CUDA lets cuBLAS read out in the GEMM's epilogue (beta =
  // 1), which saves writing the product and reading it back, and rounds once
  // where MatMul then Add rounds twice.
  virtual absl::Status MatMulAdd(const Tensor& x, const Tensor& w, const Tensor& out) {
    ASSIGN_OR_RETURN(OwnedTensor product, Alloc(DType::kF32, out.rows, out.cols));
    RETURN_IF_ERROR(MatMul(x, w, product.get()));
    return Add(out, product.get(), out);
  }
  // In-place rotary embedding in half-split ("rotate_half") layout on each
  // head of x [n, n_heads * head_dim]: angle = positions[t] * inv_freq[j] (fp32).
  // positions: I32 [n, 1]; inv_freq: F32 [1, head_dim / 2].
  virtual absl::Status Rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int head_dim) = 0;
  // Causal attention over packed sequences: sequence s occupies rows
  // [seq_starts[s], seq_starts[s+1]) of q/k/v. q: [n, n_heads*hd]; k, v:
  // [n, n_kv_heads*hd]; out: [n, n_heads*hd]; seq_starts: I32 [n_seqs + 1, 1].
  // Query head h reads kv head h / (n_heads / n_kv_heads). Scale 1/sqrt(hd).
  virtual absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_starts,
                                 int n_seqs, int max_seq_len, int n_heads, int n_kv_heads, int head_dim,
                                 const Tensor& out) = 0;
  // out = silu(gate) * up.
  virtual absl::Status SiluMul(const Tensor& gate, const Tensor& up, const Tensor& out) = 0;
  // out = a + b (out may alias a).
  virtual absl::Status Add(const Tensor& a, const Tensor& b, const Tensor& out) = 0;
  // SAE encode fused with per-token top-k: for each row of x [n, d_model],
  // the k largest active features, value-descending (ties: lower index
  // first). out_indices: I32 [n, k]; out_values: F32 [n, k]; unused slots
  // hold index -1 and value 0.
  virtual absl::Status SaeEncodeTopK(const Tensor& x, const SaeEncoderWeights& sae, int k, const Tensor& out_indices,
                                     const Tensor& out_values) = 0;

  // ---- ops added after the first CUDA backend: the default answers
  // UNIMPLEMENTED so a backend without a twin fails clearly ----
  // dst = src, in issue order like any op (on a GPU a device-to-device copy:
  // the host does not wait). Same dtype and element count.
  virtual absl::Status Copy(const Tensor& src, const Tensor& dst) { return Unimplemented("Copy"); }
  // SAE encode of selected features only (feature watch lists):
  // out_values[t, j] = f_{feature_ids[j]}(x[t]), the activation after the
  // encoder's rule, 0 when that feature is not active (for TopK SAEs: not
  // among the max_active largest of ALL features). x: F32 [n, d_model];
  // feature_ids: I32 with m = out_values.cols elements, each in [0, d_sae);
  // out_values: F32 [n, m]. An id outside that range is INVALID_ARGUMENT:
  // from this call on the CPU; on an asynchronous backend, whose ids are in
  // device memory, from a later read-back (see the file comment; reading
  // the ids here would wait for all queued work). Callers that can should
  // check ids on the host.
  virtual absl::Status SaeEncodeSelected(const Tensor& x, const SaeEncoderWeights& sae, const Tensor& feature_ids,
                                         const Tensor& out_values) {
    return Unimplemented("SaeEncodeSelected");
  }
  // SAE reconstruction of every row of x (all active features, not a top-k):
  // out[t] = y_hat(x[t]) as defined at SaeDecoderWeights. x: F32 [n, d_model];
  // out: F32 [n, d_model].
  virtual absl::Status SaeReconstruct(const Tensor& x, const SaeEncoderWeights& enc, const SaeDecoderWeights& dec,
                                      const Tensor& out) {
    return Unimplemented("SaeReconstruct");
  }
  // Per-row fraction of variance unexplained:
  // out[t] = ||y[t] - y_hat[t]||^2 / ||y[t]||^2 (0 when both norms are 0,
  // +inf when only ||y[t]|| is 0). y_hat, y: F32 [n, d]; out: F32 [n, 1].
  // Kept apart from SaeReconstruct because a transcoder's target (the MLP
  // output) only exists after its input buffer has been overwritten.
  virtual absl::Status RelativeSquaredError(const Tensor& y_hat, const Tensor& y, const Tensor& out) {
    return Unimplemented("RelativeSquaredError");
  }

  // ---- device timing (with pipelined batches the host no longer waits at
  // each step, so elapsed device time has to be measured on the device) ----
  // Records a point after all work issued so far; the id is released by
  // SecondsBetween or ReleaseTimePoint. The CPU backend's ops have finished
  // when they return, so its points are host clock readings.
  virtual absl::StatusOr<int64_t> RecordTimePoint() { return Unimplemented("RecordTimePoint"); }
  // Waits until `end` has been reached and returns the device time from
  // `start` to `end` in seconds; releases both points.
  virtual absl::StatusOr<double> SecondsBetween(int64_t start, int64_t end) { return Unimplemented("SecondsBetween"); }
  virtual void ReleaseTimePoint(int64_t point) {}
  // CopyToHost that waits only for the work issued before time point `after`
  // (from RecordTimePoint; not released here), not for work issued since, so
  // a batch's results can be read back while the next batch computes. Work
  // issued after the point may or may not be visible in what is copied. An
  // empty src copies nothing: it waits for the point and reports the device
  // errors of the ops before it. `since` (a live point recorded before the
  // batch's first op, or -1) bounds those errors below: the codes of ops
  // before it belong to an earlier batch, which may be read back later (a
  // batch re-run alone while the next one is in flight, say).
  virtual absl::Status CopyToHostAfter(const Tensor& src, void* dst, int64_t since, int64_t after) {
    return CopyToHost(src, dst);
  }
  // OK while the device is usable. After an unrecoverable device error (on
  // CUDA a fault that leaves the context unusable for the rest of the
  // process: an illegal address, a failed launch, an uncorrectable ECC error)
  // that error, which every later op then returns at once.
  virtual absl::Status DeviceStatus() const { return absl::OkStatus(); }
  // The dtype for activations whose only use is as a GEMM input (normed
  // residual, attention output, silu(gate) * up). F32 by default. BF16 where
  // the GEMMs round their input to bf16 anyway (CUDA with one bf16 part): then
  // RmsNorm, Attention and SiluMul may write BF16 outputs and MatMul /
  // MatMulShared read BF16 x, saving the F32 write, its re-read and the
  // rounding pass, with bit-identical results.
  virtual DType gemm_input_dtype() const { return DType::kF32; }
  // Memory held now. Called by the thread that owns the backend, between ops.
  virtual MemoryUsage Memory() { return MemoryUsage{}; }
  // True when ops return before their work has finished (a GPU queue), so a
  // caller gains by issuing more work before it waits; false when each op
  // computes before it returns (the CPU).
  virtual bool asynchronous() const { return false; }
  // The most features per token the SAE ops keep for activations d_model
  // wide: SaeEncodeTopK's k (after a TopK SAE's max_active caps it), and a
  // TopK SAE's max_active in SaeEncodeSelected and SaeReconstruct. Beyond it
  // they fail with UNIMPLEMENTED; loaders and servers check against it up
  // front. Unlimited on the CPU; on CUDA the top-k holds its candidates in
  // shared memory, so it depends on the device (8192 on sm_80 / sm_90, 3277
  // on sm_86 / sm_89 at d_model 4096).
  virtual int max_sae_top_k(int64_t d_model) const { return std::numeric_limits<int>::max(); }
  // Rows (one token under one SAE) whose exact top-k the fast path could not
  // settle, so every feature of the row was recomputed exactly, since the
  // backend was created; waits for the work queued. CUDA: the rescoring
  // error bound left a feature outside the candidates able to enter the
  // top-k. UNIMPLEMENTED where every row takes the one path (the CPU).
  virtual absl::StatusOr<int64_t> SaeExactRows() { return Unimplemented("SaeExactRows"); }

 protected:
  absl::Status Unimplemented(absl::string_view op) const {
    return absl::UnimplementedError(absl::StrCat(op, " is not implemented on backend ", name()));
  }
};

// "cpu" (always available) or "cuda" (when built with CUDA and a device is present).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name);

}  // namespace sae

#endif  // SAE_CORE_BACKEND_H_
