#include "core/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/op_checks.h"

namespace sae {
namespace {

// Weight rows converted to fp32 at a time; bounds the scratch memory so BF16
// weights never need a full fp32 copy, and keeps the chunk in cache.
constexpr int64_t kMatMulRowChunk = 64;

// A dot product with one fixed summation order (16 interleaved partial sums,
// then a fixed tree). Every MatMul output is one such dot of its own two rows,
// so a token's result is bit-identical whatever else is in the batch (batch
// invariance by construction; a BLAS sgemm picks kernels by matrix shape).
inline float DotF32(const float* a, const float* b, int64_t k) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; i < k; ++i, ++l) acc[l] += a[i] * b[i];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

int MatMulThreads() {
  static const int n = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
  return n;
}
// Tokens encoded per SAE chunk (scratch = chunk * d_sae floats).
constexpr int64_t kSaeTokenChunk = 32;

void RowToF32(const Tensor& t, int64_t row, float* dst) {
  const char* src = static_cast<const char*>(t.data) + static_cast<size_t>(row * t.cols) * DTypeSize(t.dtype);
  ConvertToF32(src, t.dtype, static_cast<size_t>(t.cols), dst);
}

// One element of a BF16/F16/F32 tensor (the decoder's active rows are read element by element).
inline float ElementToF32(const char* p, DType dtype) {
  uint16_t half;
  float f;
  switch (dtype) {
    case DType::kBF16:
      std::memcpy(&half, p, sizeof(half));
      return Bf16ToF32(half);
    case DType::kF16:
      std::memcpy(&half, p, sizeof(half));
      return F16ToF32(half);
    default:
      std::memcpy(&f, p, sizeof(f));
      return f;
  }
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  absl::StatusOr<OwnedTensor> Alloc(DType dtype, int64_t rows, int64_t cols) override {
    if (rows < 0 || cols < 0) return absl::InvalidArgumentError("negative tensor shape");
    const size_t bytes = std::max<size_t>(64, static_cast<size_t>(rows * cols) * DTypeSize(dtype));
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes"));
    std::memset(p, 0, bytes);
    const int64_t held = static_cast<int64_t>(bytes);
    *live_bytes_ += held;
    return OwnedTensor(Tensor{p, dtype, rows, cols}, [live = live_bytes_, held](void* q) {
      *live -= held;
      std::free(q);
    });
  }

  // Host memory only: the tensors this backend holds (no device figures).
  MemoryUsage Memory() override {
    MemoryUsage m;
    m.tensors = live_bytes_->load();
    return m;
  }

  absl::StatusOr<OwnedTensor> Upload(const HostTensor& src, DType dtype) override {
    int64_t rows = src.shape.empty() ? 1 : src.shape[0];
    int64_t cols = rows == 0 ? 0 : src.numel() / std::max<int64_t>(rows, 1);
    if (src.shape.size() == 1) {
      rows = 1;
      cols = src.shape[0];
    }
    ASSIGN_OR_RETURN(OwnedTensor t, Alloc(dtype, rows, cols));
    const size_t n = static_cast<size_t>(src.numel());
    if (dtype == src.dtype) {
      std::memcpy(t->data, src.data, src.nbytes());
    } else if (dtype == DType::kF32) {
      ConvertToF32(src.data, src.dtype, n, t->as<float>());
    } else {
      std::vector<float> tmp(n);
      ConvertToF32(src.data, src.dtype, n, tmp.data());
      auto* dst = t->as<uint16_t>();
      for (size_t i = 0; i < n; ++i) dst[i] = dtype == DType::kBF16 ? F32ToBf16(tmp[i]) : F32ToF16(tmp[i]);
    }
    return t;
  }

  absl::Status CopyFromHost(const void* src, const Tensor& dst) override {
    std::memcpy(dst.data, src, dst.nbytes());
    return absl::OkStatus();
  }
  absl::Status CopyToHost(const Tensor& src, void* dst) override {
    if (src.nbytes() > 0) std::memcpy(dst, src.data, src.nbytes());
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Embed(const Tensor& table, const Tensor& ids, const Tensor& out) override {
    RETURN_IF_ERROR(CheckF32(out, "embed output"));
    RETURN_IF_ERROR(CheckShape(out, ids.numel(), table.cols, "embed output"));
    if (ids.dtype != DType::kI32) return absl::InvalidArgumentError("embed: ids must be I32");
    const int32_t* id = ids.as<int32_t>();
    for (int64_t t = 0; t < ids.numel(); ++t) {
      if (id[t] < 0 || id[t] >= table.rows) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id[t], " outside the vocabulary [0, ", table.rows, ")"));
      }
      RowToF32(table, id[t], out.as<float>() + t * out.cols);
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override {
    RETURN_IF_ERROR(CheckF32(x, "rmsnorm input"));
    RETURN_IF_ERROR(CheckF32(out, "rmsnorm output"));
    RETURN_IF_ERROR(CheckShape(out, x.rows, x.cols, "rmsnorm output"));
    std::vector<float> w;
    if (weight.data != nullptr) {
      RETURN_IF_ERROR(CheckShape(weight, 1, x.cols, "rmsnorm weight"));
      w.resize(x.cols);
      RowToF32(weight, 0, w.data());
    }
    for (int64_t r = 0; r < x.rows; ++r) {
      const float* xi = x.as<float>() + r * x.cols;
      float* yo = out.as<float>() + r * x.cols;
      double ss = 0;
      for (int64_t c = 0; c < x.cols; ++c) ss += static_cast<double>(xi[c]) * xi[c];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / x.cols) + eps);
      for (int64_t c = 0; c < x.cols; ++c) yo[c] = xi[c] * inv * (w.empty() ? 1.0f : w[c]);
    }
    return absl::OkStatus();
  }

  absl::Status MatMul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    return MatMulInto(x, w, out, /*accumulate=*/false);
  }

  // Bit-identical to MatMul into a temporary, then Add.
  absl::Status MatMulAdd(const Tensor& x, const Tensor& w, const Tensor& out) override {
    return MatMulInto(x, w, out, /*accumulate=*/true);
  }

  absl::Status MatMulInto(const Tensor& x, const Tensor& w, const Tensor& out, bool accumulate) {
    RETURN_IF_ERROR(CheckF32(x, "matmul input"));
    RETURN_IF_ERROR(CheckF32(out, "matmul output"));
    if (w.cols != x.cols) {
      return absl::InvalidArgumentError(absl::StrCat("matmul: input has ", x.cols, " columns, weight has ", w.cols));
    }
    RETURN_IF_ERROR(CheckShape(out, x.rows, w.rows, "matmul output"));
    if (x.rows == 0 || w.rows == 0) return absl::OkStatus();
    const int64_t n = x.rows, k = x.cols;
    // Weight rows are split among threads; every output element is one
    // DotF32 whatever the split, so results never depend on threading.
    const int64_t work = n * w.rows * k;
    const int n_threads = static_cast<int>(std::clamp<int64_t>(work >> 22, 1, MatMulThreads()));
    auto run = [&](int64_t m_begin, int64_t m_end) {
      std::vector<float> chunk;
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kMatMulRowChunk) {
        const int64_t mc = std::min(kMatMulRowChunk, m_end - m0);
        const float* wp;
        if (w.dtype == DType::kF32) {
          wp = w.as<float>() + m0 * k;
        } else {
          chunk.resize(static_cast<size_t>(mc * k));
          for (int64_t r = 0; r < mc; ++r) RowToF32(w, m0 + r, chunk.data() + r * k);
          wp = chunk.data();
        }
        for (int64_t i = 0; i < n; ++i) {
          const float* xi = x.as<float>() + i * k;
          float* oi = out.as<float>() + i * out.cols + m0;
          for (int64_t r = 0; r < mc; ++r) {
            const float dot = DotF32(xi, wp + r * k, k);
            oi[r] = accumulate ? oi[r] + dot : dot;
          }
        }
      }
    };
    if (n_threads == 1) {
      run(0, w.rows);
      return absl::OkStatus();
    }
    std::vector<std::thread> threads;
    const int64_t per = (w.rows + n_threads - 1) / n_threads;
    for (int t = 0; t < n_threads; ++t) {
      const int64_t b = t * per, e = std::min(w.rows, b + per);
      if (b < e) threads.emplace_back(run, b, e);
    }
    for (auto& th : threads) th.join();
    return absl::OkStatus();
  }

  absl::Status Rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int head_dim) override {
    RETURN_IF_ERROR(CheckF32(x, "rope input"));
    if (head_dim <= 0 || head_dim % 2 != 0 || x.cols % head_dim != 0 || inv_freq.numel() != head_dim / 2 ||
        positions.numel() != x.rows) {
      return absl::InvalidArgumentError("rope: inconsistent shapes");
    }
    if (positions.dtype != DType::kI32 || inv_freq.dtype != DType::kF32) {
      return absl::InvalidArgumentError("rope: positions must be I32 and inv_freq F32");
    }
    const int half = head_dim / 2;
    const int64_t n_heads = x.cols / head_dim;
    const float* inv = inv_freq.as<float>();
    for (int64_t t = 0; t < x.rows; ++t) {
      const float pos = static_cast<float>(positions.as<int32_t>()[t]);
      for (int j = 0; j < half; ++j) {
        const float angle = pos * inv[j];  // fp32, as HF computes it
        const float c = std::cos(angle), s = std::sin(angle);
        for (int64_t h = 0; h < n_heads; ++h) {
          float* v = x.as<float>() + t * x.cols + h * head_dim;
          const float a = v[j], b = v[j + half];
          v[j] = a * c - b * s;
          v[j + half] = b * c + a * s;
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status Attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_starts, int n_seqs,
                         int max_seq_len, int n_heads, int n_kv_heads, int head_dim, const Tensor& out) override {
    if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || q.cols != n_heads * head_dim ||
        k.cols != n_kv_heads * head_dim || v.cols != k.cols || out.cols != q.cols || out.rows != q.rows ||
        k.rows != q.rows || v.rows != q.rows || seq_starts.numel() != n_seqs + 1) {
      return absl::InvalidArgumentError("attention: inconsistent shapes");
    }
    for (const Tensor* t : {&q, &k, &v, &out}) RETURN_IF_ERROR(CheckF32(*t, "attention tensor"));
    if (seq_starts.dtype != DType::kI32) return absl::InvalidArgumentError("attention: seq_starts must be I32");
    const int32_t* starts = seq_starts.as<int32_t>();
    if (starts[0] != 0 || starts[n_seqs] != q.rows) {
      return absl::InvalidArgumentError("attention: seq_starts must cover all rows");
    }
    const int group = n_heads / n_kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    std::vector<float> scores(static_cast<size_t>(std::max(max_seq_len, 1)));
    for (int s = 0; s < n_seqs; ++s) {
      const int64_t begin = starts[s], len = starts[s + 1] - starts[s];
      if (len < 0 || len > max_seq_len) return absl::InvalidArgumentError("attention: bad sequence length");
      for (int h = 0; h < n_heads; ++h) {
        const int kvh = h / group;
        for (int64_t i = 0; i < len; ++i) {
          const float* qi = q.as<float>() + (begin + i) * q.cols + h * head_dim;
          float mx = -INFINITY;
          for (int64_t j = 0; j <= i; ++j) {
            const float* kj = k.as<float>() + (begin + j) * k.cols + kvh * head_dim;
            float dot = 0;
            for (int d = 0; d < head_dim; ++d) dot += qi[d] * kj[d];
            scores[j] = dot * scale;
            mx = std::max(mx, scores[j]);
          }
          float sum = 0;
          for (int64_t j = 0; j <= i; ++j) {
            scores[j] = std::exp(scores[j] - mx);
            sum += scores[j];
          }
          float* oi = out.as<float>() + (begin + i) * out.cols + h * head_dim;
          std::fill(oi, oi + head_dim, 0.0f);
          for (int64_t j = 0; j <= i; ++j) {
            const float p = scores[j] / sum;
            const float* vj = v.as<float>() + (begin + j) * v.cols + kvh * head_dim;
            for (int d = 0; d < head_dim; ++d) oi[d] += p * vj[d];
          }
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status SiluMul(const Tensor& gate, const Tensor& up, const Tensor& out) override {
    RETURN_IF_ERROR(CheckShape(up, gate.rows, gate.cols, "silu_mul up"));
    RETURN_IF_ERROR(CheckShape(out, gate.rows, gate.cols, "silu_mul output"));
    for (const Tensor* t : {&gate, &up, &out}) RETURN_IF_ERROR(CheckF32(*t, "silu_mul tensor"));
    const float* g = gate.as<float>();
    const float* u = up.as<float>();
    float* o = out.as<float>();
    for (int64_t i = 0; i < gate.numel(); ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    return absl::OkStatus();
  }

  absl::Status Add(const Tensor& a, const Tensor& b, const Tensor& out) override {
    RETURN_IF_ERROR(CheckShape(b, a.rows, a.cols, "add rhs"));
    RETURN_IF_ERROR(CheckShape(out, a.rows, a.cols, "add output"));
    for (const Tensor* t : {&a, &b, &out}) RETURN_IF_ERROR(CheckF32(*t, "add tensor"));
    for (int64_t i = 0; i < a.numel(); ++i) out.as<float>()[i] = a.as<float>()[i] + b.as<float>()[i];
    return absl::OkStatus();
  }

  absl::Status SaeEncodeTopK(const Tensor& x, const SaeEncoderWeights& sae, int k, const Tensor& out_indices,
                             const Tensor& out_values) override {
    RETURN_IF_ERROR(CheckSaeTopKArgs(x, sae, k, out_indices, out_values));
    const int64_t d_sae = sae.encoder.rows;
    const int keep = sae.max_active > 0 ? std::min(k, sae.max_active) : k;
    std::vector<float> pre(static_cast<size_t>(kSaeTokenChunk * d_sae));
    std::vector<std::pair<float, int32_t>> cand;
    for (int64_t t0 = 0; t0 < x.rows; t0 += kSaeTokenChunk) {
      const int64_t tc = std::min(kSaeTokenChunk, x.rows - t0);
      RETURN_IF_ERROR(PreActivations(x.Rows(t0, tc), sae, pre.data()));
      for (int64_t r = 0; r < tc; ++r) {
        const size_t n_keep = TopActive(sae, pre.data() + r * d_sae, d_sae, keep, &cand);
        int32_t* idx = out_indices.as<int32_t>() + (t0 + r) * k;
        float* val = out_values.as<float>() + (t0 + r) * k;
        for (int j = 0; j < k; ++j) {
          const bool have = static_cast<size_t>(j) < n_keep;
          idx[j] = have ? cand[j].second : -1;
          val[j] = have ? cand[j].first : 0.0f;
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status Copy(const Tensor& src, const Tensor& dst) override {
    RETURN_IF_ERROR(CheckCopy(src, dst));
    if (src.nbytes() > 0) std::memmove(dst.data, src.data, src.nbytes());
    return absl::OkStatus();
  }

  absl::Status SaeEncodeSelected(const Tensor& x, const SaeEncoderWeights& sae, const Tensor& feature_ids,
                                 const Tensor& out_values) override {
    RETURN_IF_ERROR(CheckSaeSelectedArgs(x, sae, feature_ids, out_values));
    const int64_t d_sae = sae.encoder.rows, d = x.cols, m = out_values.cols;
    const int32_t* ids = feature_ids.as<int32_t>();
    for (int64_t j = 0; j < m; ++j) {
      if (ids[j] < 0 || ids[j] >= d_sae) {
        return absl::InvalidArgumentError(
            absl::StrCat("sae selected: feature id ", ids[j], " outside [0, ", d_sae, ")"));
      }
    }
    if (x.rows == 0 || m == 0) return absl::OkStatus();
    float* out = out_values.as<float>();
    if (sae.max_active > 0) {
      // TopK SAE: whether a feature is active depends on every feature, so
      // encode them all and look the selected ones up.
      ASSIGN_OR_RETURN(OwnedTensor idx, Alloc(DType::kI32, x.rows, sae.max_active));
      ASSIGN_OR_RETURN(OwnedTensor val, Alloc(DType::kF32, x.rows, sae.max_active));
      RETURN_IF_ERROR(SaeEncodeTopK(x, sae, sae.max_active, idx.get(), val.get()));
      std::vector<float> dense(static_cast<size_t>(d_sae), 0.0f);
      for (int64_t t = 0; t < x.rows; ++t) {
        const int32_t* ti = idx->as<int32_t>() + t * sae.max_active;
        const float* tv = val->as<float>() + t * sae.max_active;
        for (int j = 0; j < sae.max_active && ti[j] >= 0; ++j) dense[ti[j]] = tv[j];
        for (int64_t j = 0; j < m; ++j) out[t * m + j] = dense[ids[j]];
        for (int j = 0; j < sae.max_active && ti[j] >= 0; ++j) dense[ti[j]] = 0.0f;
      }
      return absl::OkStatus();
    }
    // JumpReLU: each feature decides alone, so only the selected encoder rows are needed.
    std::vector<float> rows(static_cast<size_t>(m * d));
    for (int64_t j = 0; j < m; ++j) RowToF32(sae.encoder, ids[j], rows.data() + j * d);
    RETURN_IF_ERROR(MatMul(x, Tensor{rows.data(), DType::kF32, m, d}, out_values));
    const float* bias = sae.bias.as<float>();
    const float* fscale = sae.feature_scale.as<float>();
    for (int64_t t = 0; t < x.rows; ++t) {
      for (int64_t j = 0; j < m; ++j) {
        float v = std::fma(sae.scale_in, out[t * m + j], bias[ids[j]]);
        if (fscale != nullptr) v *= fscale[ids[j]];
        out[t * m + j] = v > sae.threshold ? v : 0.0f;
      }
    }
    return absl::OkStatus();
  }

  absl::Status SaeReconstruct(const Tensor& x, const SaeEncoderWeights& enc, const SaeDecoderWeights& dec,
                              const Tensor& out) override {
    RETURN_IF_ERROR(CheckSaeReconstructArgs(x, enc, dec, out));
    const int64_t d_sae = enc.encoder.rows, d = x.cols;
    std::vector<float> pre(static_cast<size_t>(kSaeTokenChunk * d_sae));
    std::vector<std::pair<float, int32_t>> cand;
    std::vector<double> acc(static_cast<size_t>(d));
    const int keep = enc.max_active > 0 ? enc.max_active : static_cast<int>(d_sae);
    const size_t esize = DTypeSize(dec.decoder.dtype);
    const char* w = static_cast<const char*>(dec.decoder.data);
    for (int64_t t0 = 0; t0 < x.rows; t0 += kSaeTokenChunk) {
      const int64_t tc = std::min(kSaeTokenChunk, x.rows - t0);
      RETURN_IF_ERROR(PreActivations(x.Rows(t0, tc), enc, pre.data()));
      for (int64_t r = 0; r < tc; ++r) {
        const float* h = pre.data() + r * d_sae;
        const size_t n_active = TopActive(enc, h, d_sae, keep, &cand);
        // Sparse decode: only the rows of the active features contribute.
        std::fill(acc.begin(), acc.end(), 0.0);
        for (size_t a = 0; a < n_active; ++a) {
          const int32_t i = cand[a].second;
          const double hi = h[i];  // h_i, not the feature-scaled value that chose it
          const char* row = w + static_cast<size_t>(i) * d * esize;
          for (int64_t c = 0; c < d; ++c) acc[c] += hi * ElementToF32(row + c * esize, dec.decoder.dtype);
        }
        float* y = out.as<float>() + (t0 + r) * d;
        for (int64_t c = 0; c < d; ++c) {
          y[c] = static_cast<float>((acc[c] + dec.bias.as<float>()[c]) / dec.scale_out);
        }
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<int64_t> RecordTimePoint() override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  absl::StatusOr<double> SecondsBetween(int64_t start, int64_t end) override {
    return static_cast<double>(end - start) * 1e-9;
  }

  absl::Status RelativeSquaredError(const Tensor& y_hat, const Tensor& y, const Tensor& out) override {
    RETURN_IF_ERROR(CheckRelativeSquaredErrorArgs(y_hat, y, out));
    for (int64_t t = 0; t < y.rows; ++t) {
      const float* a = y_hat.as<float>() + t * y.cols;
      const float* b = y.as<float>() + t * y.cols;
      double num = 0, den = 0;
      for (int64_t c = 0; c < y.cols; ++c) {
        const double diff = static_cast<double>(b[c]) - a[c];
        num += diff * diff;
        den += static_cast<double>(b[c]) * b[c];
      }
      out.as<float>()[t] = den > 0 ? static_cast<float>(num / den) : (num > 0 ? INFINITY : 0.0f);
    }
    return absl::OkStatus();
  }

 private:
  // h_i = scale_in * (w_i . x) + b_i for every row of x: pre [x.rows, d_sae].
  absl::Status PreActivations(const Tensor& x, const SaeEncoderWeights& sae, float* pre) {
    const int64_t d_sae = sae.encoder.rows;
    RETURN_IF_ERROR(MatMul(x, sae.encoder, Tensor{pre, DType::kF32, x.rows, d_sae}));
    const float* bias = sae.bias.as<float>();
    for (int64_t r = 0; r < x.rows; ++r) {
      float* h = pre + r * d_sae;
      for (int64_t i = 0; i < d_sae; ++i) h[i] = std::fma(sae.scale_in, h[i], bias[i]);
    }
    return absl::OkStatus();
  }

  // The active features of one row of h, largest v_i first (ties: lower
  // index), at most `keep`: (*cand)[0, returned) holds (v_i, i) with
  // v_i = h_i * feature_scale_i > threshold.
  static size_t TopActive(const SaeEncoderWeights& sae, const float* h, int64_t d_sae, int keep,
                          std::vector<std::pair<float, int32_t>>* cand) {
    const float* fscale = sae.feature_scale.as<float>();
    cand->clear();
    for (int64_t i = 0; i < d_sae; ++i) {
      const float v = fscale != nullptr ? h[i] * fscale[i] : h[i];
      if (v > sae.threshold) cand->emplace_back(v, static_cast<int32_t>(i));
    }
    const size_t n_keep = std::min<size_t>(static_cast<size_t>(keep), cand->size());
    std::partial_sort(cand->begin(), cand->begin() + n_keep, cand->end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    return n_keep;
  }

  // Shared with every tensor's release callback: tensors may outlive the backend.
  std::shared_ptr<std::atomic<int64_t>> live_bytes_ = std::make_shared<std::atomic<int64_t>>(0);
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace sae
