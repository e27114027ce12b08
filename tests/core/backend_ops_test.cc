// Every Backend op against a plain double-precision reference written here,
// over swept shapes (odd sizes, head_dim 64/128, GQA ratios, packed sequences).
// Runs for every backend this build has; a backend without its device skips.
// Tolerance: |got - ref| <= atol + rtol * |ref| per element (llm.c style).
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <random>
#include <string>

#include "core/backend.h"
#include "gtest/gtest.h"

namespace sae {
namespace {

struct Tol {
  double atol;
  double rtol;
};

class BackendOpsTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto b = CreateBackend(GetParam());
    if (!b.ok()) {
      // ctest's emulated-CUDA entries set this: there a missing backend is a failure, not a skip.
      if (std::getenv("SAE_TEST_REQUIRE_CUDA") != nullptr)
        FAIL() << GetParam() << " backend unavailable: " << b.status();
      GTEST_SKIP() << GetParam() << " backend unavailable: " << b.status();
    }
    backend_ = *std::move(b);
  }

  OwnedTensor Upload(const std::vector<float>& v, int64_t rows, int64_t cols, DType dtype = DType::kF32) {
    std::vector<char> bytes;
    HostTensor h;
    std::vector<uint16_t> half;
    if (dtype == DType::kF32) {
      h.data = v.data();
    } else {
      half.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) half[i] = dtype == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
      h.data = half.data();
    }
    h.dtype = dtype;
    h.shape = {rows, cols};
    auto t = backend_->Upload(h, dtype);
    EXPECT_TRUE(t.ok()) << t.status();
    return *std::move(t);
  }
  OwnedTensor UploadI32(const std::vector<int32_t>& v) {
    auto t = backend_->Alloc(DType::kI32, static_cast<int64_t>(v.size()), 1);
    EXPECT_TRUE(t.ok());
    EXPECT_TRUE(backend_->CopyFromHost(v.data(), t->get()).ok());
    return *std::move(t);
  }
  OwnedTensor Zeros(int64_t rows, int64_t cols, DType dtype = DType::kF32) {
    auto t = backend_->Alloc(dtype, rows, cols);
    EXPECT_TRUE(t.ok());
    return *std::move(t);
  }
  template <typename T>
  std::vector<T> Download(const OwnedTensor& t) {
    std::vector<T> v(t->numel());
    EXPECT_TRUE(backend_->CopyToHost(t.get(), v.data()).ok());
    return v;
  }
  static void ExpectClose(const std::vector<float>& got, const std::vector<double>& ref, Tol tol,
                          const std::string& what) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    int bad = 0;
    for (size_t i = 0; i < got.size() && bad < 5; ++i) {
      if (!(std::abs(got[i] - ref[i]) <= tol.atol + tol.rtol * std::abs(ref[i]))) {
        ADD_FAILURE() << what << ": element " << i << " got " << got[i] << " want " << ref[i];
        ++bad;
      }
    }
  }
  // Values rounded through the weight dtype, so the reference sees what the backend sees.
  static std::vector<float> Rounded(std::vector<float> v, DType dtype) {
    for (float& x : v) {
      if (dtype == DType::kBF16) x = Bf16ToF32(F32ToBf16(x));
      if (dtype == DType::kF16) x = F16ToF32(F32ToF16(x));
    }
    return v;
  }
  // x [n, k] . w^T (w [m, k]) in double precision: [n, m].
  static std::vector<double> MatMulRef(const std::vector<float>& x, const std::vector<float>& w, int n, int k, int m) {
    std::vector<double> ref(static_cast<size_t>(n) * m);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < m; ++j) {
        double s = 0;
        for (int c = 0; c < k; ++c)
          s += static_cast<double>(x[static_cast<size_t>(i) * k + c]) * w[static_cast<size_t>(j) * k + c];
        ref[static_cast<size_t>(i) * m + j] = s;
      }
    return ref;
  }
  static std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (float& x : v) x = scale * u(rng);
    return v;
  }

  // The attention kernels of this backend, each with the tolerance it is held
  // to: the CPU's fp32 loop; on CUDA the fp32 kernel (exact mode) and the
  // tensor-core one (the default: Q, K, P and V rounded to bf16, ~2^-8 of a
  // value per product), chosen per call by SAE_CUDA_ATTENTION.
  struct AttentionKernel {
    const char* name;  // SAE_CUDA_ATTENTION, or nullptr: the backend's only kernel
    Tol tol;
  };
  std::vector<AttentionKernel> AttentionKernels() const {
    if (GetParam() == "cpu") return {{nullptr, {1e-5, 1e-4}}};
    return {{"fp32", {1e-5, 1e-4}}, {"mma", {1.5e-2, 1e-2}}};
  }
  absl::Status RunAttention(const AttentionKernel& kernel, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& starts, int n_seqs, int max_len, int heads, int kv_heads, int hd,
                            const Tensor& out) {
    if (kernel.name != nullptr) setenv("SAE_CUDA_ATTENTION", kernel.name, 1);
    absl::Status s = backend_->Attention(q, k, v, starts, n_seqs, max_len, heads, kv_heads, hd, out);
    unsetenv("SAE_CUDA_ATTENTION");
    return s;
  }

  // Rotary embedding of x [n, heads*hd] in double precision, with the fp32
  // angle position * inv_freq the op contract fixes.
  static std::vector<double> RopeRef(const std::vector<float>& x, const std::vector<int32_t>& pos,
                                     const std::vector<float>& inv, int heads, int hd) {
    std::vector<double> ref(x.size());
    for (size_t t = 0; t < pos.size(); ++t)
      for (int h = 0; h < heads; ++h)
        for (int j = 0; j < hd / 2; ++j) {
          const double angle = static_cast<float>(pos[t]) * inv[j];
          const size_t base = t * heads * hd + h * hd;
          const double a = x[base + j], b = x[base + j + hd / 2];
          ref[base + j] = a * std::cos(angle) - b * std::sin(angle);
          ref[base + j + hd / 2] = b * std::cos(angle) + a * std::sin(angle);
        }
    return ref;
  }

  // Double-precision causal attention for query row i (of the sequence
  // starting at seq_begin) and head h: its head_dim outputs. q: [n, heads*hd],
  // k/v: [n, kv_heads*hd]; query head h reads kv head h / group.
  static std::vector<double> AttentionRef(const std::vector<float>& q, const std::vector<float>& k,
                                          const std::vector<float>& v, int seq_begin, int i, int h, int heads,
                                          int kv_heads, int hd) {
    const size_t qd = static_cast<size_t>(heads) * hd, kvd = static_cast<size_t>(kv_heads) * hd;
    const int kvh = h / (heads / kv_heads);
    std::vector<double> p;
    double mx = -1e300;
    for (int j = seq_begin; j <= i; ++j) {
      double dot = 0;
      for (int d = 0; d < hd; ++d) dot += static_cast<double>(q[i * qd + h * hd + d]) * k[j * kvd + kvh * hd + d];
      p.push_back(dot / std::sqrt(static_cast<double>(hd)));
      mx = std::max(mx, p.back());
    }
    double sum = 0;
    for (double& x : p) sum += (x = std::exp(x - mx));
    std::vector<double> o(hd, 0.0);
    for (int d = 0; d < hd; ++d)
      for (int j = seq_begin; j <= i; ++j) o[d] += p[j - seq_begin] / sum * v[j * kvd + kvh * hd + d];
    return o;
  }

  // AttentionRef for every row of every sequence: [n, heads*hd].
  static std::vector<double> AttentionRefAll(const std::vector<float>& q, const std::vector<float>& k,
                                             const std::vector<float>& v, const std::vector<int32_t>& starts, int heads,
                                             int kv_heads, int hd) {
    const size_t qd = static_cast<size_t>(heads) * hd;
    std::vector<double> ref(static_cast<size_t>(starts.back()) * qd);
    for (size_t s = 0; s + 1 < starts.size(); ++s)
      for (int h = 0; h < heads; ++h)
        for (int i = starts[s]; i < starts[s + 1]; ++i) {
          const auto o = AttentionRef(q, k, v, starts[s], i, h, heads, kv_heads, hd);
          std::copy(o.begin(), o.end(), ref.begin() + static_cast<size_t>(i) * qd + h * hd);
        }
    return ref;
  }

  std::unique_ptr<Backend> backend_;
};

// Host->device copies return before the device has them (CUDA: through a
// ring of staging slots on a copy stream). Each copy must still land before
// the ops issued after it and after the ops issued before it, whatever slot
// it reused, and the caller's buffer is free as soon as the call returns.
TEST_P(BackendOpsTest, CopyFromHostKeepsIssueOrder) {
  constexpr int64_t kN = 1000;
  constexpr int kCopies = 37;  // more than the CUDA backend's 16 input slots, twice round
  auto dst = Zeros(1, kN), zero = Zeros(1, kN);
  std::vector<OwnedTensor> seen;
  std::vector<float> host(kN);
  // More copies than staging slots, all into one tensor, each read by an op
  // before the next overwrites it; `host` is rewritten at once each time.
  for (int i = 0; i < kCopies; ++i) {
    for (int64_t j = 0; j < kN; ++j) host[j] = static_cast<float>(i * kN + j);
    ASSERT_TRUE(backend_->CopyFromHost(host.data(), dst.get()).ok());
    seen.push_back(Zeros(1, kN));
    ASSERT_TRUE(backend_->Add(dst.get(), zero.get(), seen.back().get()).ok());
    std::fill(host.begin(), host.end(), -1.0f);
  }
  for (int i = 0; i < kCopies; ++i) {
    const auto got = Download<float>(seen[i]);
    for (int64_t j = 0; j < kN; ++j)
      ASSERT_EQ(got[j], static_cast<float>(i * kN + j)) << "copy " << i << " [" << j << "]";
  }
  // One copy larger than all slots together (chunks wrap around the ring),
  // landing in a tensor an op wrote just before.
  const int64_t big = 11 << 20;  // 44 MiB of F32
  std::vector<float> v(big);
  for (int64_t j = 0; j < big; ++j) v[j] = static_cast<float>(j % 65521);
  auto large = Zeros(1, big), ones = Upload(std::vector<float>(big, 1.0f), 1, big);
  ASSERT_TRUE(backend_->Add(ones.get(), ones.get(), large.get()).ok());
  ASSERT_TRUE(backend_->CopyFromHost(v.data(), large.get()).ok());
  std::fill(v.begin(), v.end(), -1.0f);
  const auto got = Download<float>(large);
  for (int64_t j = 0; j < big; ++j) ASSERT_EQ(got[j], static_cast<float>(j % 65521)) << "[" << j << "]";
}

// CopyToHostAfter(point) sees everything issued before the point. On the CPU
// emulator, which runs queued work only when something waits for it, it is
// also shown not to wait for work issued after the point (on a GPU that work
// may or may not have run by then, so only the emulator can assert it).
TEST_P(BackendOpsTest, CopyToHostAfterWaitsOnlyForWorkBeforeItsPoint) {
  const char* lib = std::getenv("SAE_CUDA_BACKEND_LIB");
  const bool emulated =
      GetParam() == "cuda" && lib != nullptr && std::string(lib).find("sae_cuda_emu") != std::string::npos;
  auto a = Upload({1, 2, 3}, 1, 3), out = Zeros(1, 3);
  ASSERT_TRUE(backend_->Add(a.get(), a.get(), out.get()).ok());
  auto point = backend_->RecordTimePoint();
  ASSERT_TRUE(point.ok()) << point.status();
  ASSERT_TRUE(backend_->Add(out.get(), a.get(), out.get()).ok());  // after the point
  std::vector<float> got(3);
  ASSERT_TRUE(backend_->CopyToHostAfter(out.get(), got.data(), -1, *point).ok());
  if (emulated) {
    EXPECT_EQ(got, (std::vector<float>{2, 4, 6}));  // the second Add has not run
  } else if (GetParam() == "cpu") {
    EXPECT_EQ(got, (std::vector<float>{3, 6, 9}));  // every op finished when it returned
  } else {
    EXPECT_TRUE(got == (std::vector<float>{2, 4, 6}) || got == (std::vector<float>{3, 6, 9}));
  }
  EXPECT_EQ(Download<float>(out), (std::vector<float>{3, 6, 9}));
  backend_->ReleaseTimePoint(*point);
  // A copy larger than the staging ring, after a point that follows its producer.
  const int64_t big = 5 << 20;
  auto ones = Upload(std::vector<float>(big, 1.0f), 1, big), twos = Zeros(1, big);
  ASSERT_TRUE(backend_->Add(ones.get(), ones.get(), twos.get()).ok());
  auto end = backend_->RecordTimePoint();
  ASSERT_TRUE(end.ok());
  std::vector<float> host(big);
  ASSERT_TRUE(backend_->CopyToHostAfter(twos.get(), host.data(), -1, *end).ok());
  EXPECT_EQ(std::count(host.begin(), host.end(), 2.0f), big);
  backend_->ReleaseTimePoint(*end);
  if (GetParam() == "cuda") {
    EXPECT_EQ(backend_->CopyToHostAfter(twos.get(), host.data(), -1, 1 << 20).code(),
              absl::StatusCode::kInvalidArgument);
    auto p1 = backend_->RecordTimePoint(), p2 = backend_->RecordTimePoint();
    ASSERT_TRUE(p1.ok() && p2.ok());
    EXPECT_EQ(backend_->CopyToHostAfter(Tensor(), nullptr, 1 << 20, *p2).code(), absl::StatusCode::kInvalidArgument)
        << "an unknown since";
    EXPECT_TRUE(backend_->CopyToHostAfter(Tensor(), nullptr, *p1, *p2).ok());
    backend_->ReleaseTimePoint(*p1);
    backend_->ReleaseTimePoint(*p2);
  }
}

// A code a kernel stores on the device (a token id outside the vocabulary)
// is reported with the batch whose op stored it: two batches in flight,
// each between its own start and end points, both finished before either
// is read back, and read back in either order (the executor re-runs a
// failed batch's requests alone while the next batch is in flight). The
// good batch's read-back is OK; the bad batch's call (CPU) or read-back
// (CUDA) fails; and the code is reported once.
TEST_P(BackendOpsTest, DeviceErrorsAreReportedWithTheirOwnBatch) {
  const int vocab = 6, d = 5, n = 3;
  const auto table = Random(vocab * d, 121);
  auto tt = Upload(table, vocab, d);
  for (const auto& [bad_first, read_a_first] :
       std::vector<std::pair<bool, bool>>{{false, true}, {true, true}, {false, false}, {true, false}}) {
    const std::vector<int32_t> good = {0, 5, 2}, bad = {1, vocab, 3};
    auto ids_a = UploadI32(bad_first ? bad : good), ids_b = UploadI32(bad_first ? good : bad);
    auto out_a = Zeros(n, d), out_b = Zeros(n, d);
    auto start_a = backend_->RecordTimePoint();
    const absl::Status call_a = backend_->Embed(tt.get(), ids_a.get(), out_a.get());
    auto point_a = backend_->RecordTimePoint();
    auto start_b = backend_->RecordTimePoint();
    const absl::Status call_b = backend_->Embed(tt.get(), ids_b.get(), out_b.get());
    auto point_b = backend_->RecordTimePoint();
    ASSERT_TRUE(start_a.ok() && point_a.ok() && start_b.ok() && point_b.ok());
    {  // wait for both batches without reading anything back
      auto t0 = backend_->RecordTimePoint(), t1 = backend_->RecordTimePoint();
      ASSERT_TRUE(t0.ok() && t1.ok());
      ASSERT_TRUE(backend_->SecondsBetween(*t0, *t1).ok());
    }
    std::vector<float> host_a(n * d), host_b(n * d);
    absl::Status read_a, read_b;
    if (read_a_first) read_a = backend_->CopyToHostAfter(out_a.get(), host_a.data(), *start_a, *point_a);
    read_b = backend_->CopyToHostAfter(out_b.get(), host_b.data(), *start_b, *point_b);
    if (!read_a_first) read_a = backend_->CopyToHostAfter(out_a.get(), host_a.data(), *start_a, *point_a);
    for (auto* p : {&start_a, &point_a, &start_b, &point_b}) backend_->ReleaseTimePoint(**p);
    const absl::Status& bad_call = bad_first ? call_a : call_b;
    const absl::Status& bad_read = bad_first ? read_a : read_b;
    EXPECT_TRUE((bad_first ? call_b : call_a).ok());
    EXPECT_TRUE((bad_first ? read_b : read_a).ok()) << "a neighbour's code, bad_first " << bad_first << " read_a_first "
                                                    << read_a_first << ": " << (bad_first ? read_b : read_a);
    const absl::Status& failed = GetParam() == "cpu" ? bad_call : bad_read;
    EXPECT_TRUE((GetParam() == "cpu" ? bad_read : bad_call).ok());
    EXPECT_EQ(failed.code(), absl::StatusCode::kInvalidArgument) << bad_first << " " << read_a_first << " " << failed;
    EXPECT_NE(failed.message().find("vocabulary"), std::string::npos) << failed;
    const std::vector<float>& good_host = bad_first ? host_b : host_a;
    for (int t = 0; t < n; ++t)
      for (int c = 0; c < d; ++c) ASSERT_EQ(good_host[t * d + c], table[good[t] * d + c]) << t << " " << c;
    EXPECT_TRUE(backend_->Synchronize().ok());  // reported once
  }
}

// A full wait (Synchronize, CopyToHost) reports the codes of ops that no
// live time point follows. Codes a live point follows are left to
// CopyToHostAfter on that point, so waiting while the next batch is queued
// does not take the codes of the batch before it; once the point is
// released, the next read-back reports them. No code is lost, however many
// points pass.
TEST_P(BackendOpsTest, FullWaitsLeaveCodesOfLivePointsToTheirReadBack) {
  const int vocab = 4, d = 3;
  auto tt = Upload(Random(vocab * d, 122), vocab, d), ids = UploadI32({vocab}), out = Zeros(1, d);
  std::vector<float> host(d);
  auto embed_bad = [&] { return backend_->Embed(tt.get(), ids.get(), out.get()); };
  if (GetParam() == "cpu") {  // the CPU fails the call itself
    EXPECT_EQ(embed_bad().code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  // Read back through the live point.
  ASSERT_TRUE(embed_bad().ok());
  auto point = backend_->RecordTimePoint();
  ASSERT_TRUE(point.ok());
  EXPECT_TRUE(backend_->Synchronize().ok());
  EXPECT_TRUE(backend_->CopyToHost(out.get(), host.data()).ok());
  EXPECT_EQ(backend_->CopyToHostAfter(out.get(), host.data(), -1, *point).code(), absl::StatusCode::kInvalidArgument);
  backend_->ReleaseTimePoint(*point);
  EXPECT_TRUE(backend_->Synchronize().ok());
  // The point released unread: the next full wait reports the code.
  ASSERT_TRUE(embed_bad().ok());
  point = backend_->RecordTimePoint();
  ASSERT_TRUE(point.ok());
  backend_->ReleaseTimePoint(*point);
  backend_->ReleaseTimePoint(*point);  // a second release is ignored, not a second free entry
  EXPECT_EQ(backend_->Synchronize().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->CopyToHostAfter(out.get(), host.data(), -1, *point).code(), absl::StatusCode::kInvalidArgument)
      << "a released point";
  // A code, then more stretches between points than there are error words
  // (each with a checked input, so each takes a word of its own).
  ASSERT_TRUE(embed_bad().ok());
  auto good_ids = UploadI32({1});
  for (int i = 0; i < 2500; ++i) {
    ASSERT_TRUE(backend_->Embed(tt.get(), good_ids.get(), out.get()).ok());
    auto p = backend_->RecordTimePoint();
    ASSERT_TRUE(p.ok());
    backend_->ReleaseTimePoint(*p);
  }
  EXPECT_EQ(backend_->CopyToHost(out.get(), host.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(backend_->Synchronize().ok());
  // Points around stretches without a checked input (hooks without watch
  // lists) take no error words: a batch with many of them, over 1024 in
  // all, still gets its own code back through its point.
  ASSERT_TRUE(embed_bad().ok());
  auto batch_end = backend_->RecordTimePoint();
  ASSERT_TRUE(batch_end.ok());
  for (int i = 0; i < 1500; ++i) {
    auto p = backend_->RecordTimePoint();
    ASSERT_TRUE(p.ok());
    backend_->ReleaseTimePoint(*p);
  }
  EXPECT_EQ(backend_->CopyToHostAfter(Tensor(), nullptr, -1, *batch_end).code(), absl::StatusCode::kInvalidArgument);
  backend_->ReleaseTimePoint(*batch_end);
  EXPECT_TRUE(backend_->Synchronize().ok());
  // Two points from one free slot are distinct.
  auto p1 = backend_->RecordTimePoint(), p2 = backend_->RecordTimePoint();
  ASSERT_TRUE(p1.ok() && p2.ok());
  EXPECT_NE(*p1, *p2);
  backend_->ReleaseTimePoint(*p1);
  backend_->ReleaseTimePoint(*p2);
}

// A batch's small input copies (token ids, positions, sequence starts, one
// per watch list) and its watch-list encodes queue behind the batch before
// without waiting for it, so the host prepares batch i+1 while batch i
// computes. The CPU emulator runs queued work only when something waits for
// it: there an op queued before them must still be pending afterwards.
TEST_P(BackendOpsTest, InputCopiesAndWatchListEncodesDoNotWait) {
  const char* lib = std::getenv("SAE_CUDA_BACKEND_LIB");
  const bool emulated =
      GetParam() == "cuda" && lib != nullptr && std::string(lib).find("sae_cuda_emu") != std::string::npos;
  const int n = 3, d = 8, d_sae = 10;
  const auto x = Random(n * d, 91), w = Random(d_sae * d, 92), b = Random(d_sae, 93);
  auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d), tb = Upload(b, 1, d_sae);  // before the pending op
  auto a = Upload({1, 2, 3}, 1, 3), out = Zeros(1, 3);
  ASSERT_TRUE(backend_->Add(a.get(), a.get(), out.get()).ok());
  auto point = backend_->RecordTimePoint();
  ASSERT_TRUE(point.ok()) << point.status();
  ASSERT_TRUE(backend_->Add(out.get(), a.get(), out.get()).ok());  // the batch before, still queued

  constexpr int kCopies = 12;  // a batch's inputs plus watch lists
  std::vector<OwnedTensor> copies;
  for (int i = 0; i < kCopies; ++i) {
    const std::vector<int32_t> v(64, i);
    copies.push_back(Zeros(1, 64, DType::kI32));
    ASSERT_TRUE(backend_->CopyFromHost(v.data(), copies.back().get()).ok());
  }
  const std::vector<int32_t> ids = {7, 0, 3};
  auto tid = Zeros(1, 3, DType::kI32), sel = Zeros(n, 3);
  ASSERT_TRUE(backend_->CopyFromHost(ids.data(), tid.get()).ok());
  const SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, 0};
  ASSERT_TRUE(backend_->SaeEncodeSelected(tx.get(), sae, tid.get(), sel.get()).ok());

  std::vector<float> got(3);
  ASSERT_TRUE(backend_->CopyToHostAfter(out.get(), got.data(), -1, *point).ok());
  if (emulated) {
    EXPECT_EQ(got, (std::vector<float>{2, 4, 6}));  // nothing above waited for the queued Add
  } else if (GetParam() == "cpu") {
    EXPECT_EQ(got, (std::vector<float>{3, 6, 9}));
  }
  backend_->ReleaseTimePoint(*point);
  EXPECT_EQ(Download<float>(out), (std::vector<float>{3, 6, 9}));
  for (int i = 0; i < kCopies; ++i) EXPECT_EQ(Download<int32_t>(copies[i]), std::vector<int32_t>(64, i)) << i;
  const auto values = Download<float>(sel);
  for (int t = 0; t < n; ++t) {
    for (int j = 0; j < 3; ++j) {
      double h = b[ids[j]];
      for (int c = 0; c < d; ++c) h += static_cast<double>(x[t * d + c]) * w[ids[j] * d + c];
      if (std::abs(h) < 1e-3) continue;  // too close to the threshold to call
      EXPECT_NEAR(values[t * 3 + j], h > 0 ? h : 0.0, 2e-2 * (1 + std::abs(h))) << t << " " << j;
    }
  }
}

// Copy: dst = src for F32, BF16 and I32 tensors, row views included (the
// engine copies one request's rows of a hook); another dtype or element
// count is INVALID_ARGUMENT and leaves dst alone.
TEST_P(BackendOpsTest, CopyCopiesRowsOfAnyDtype) {
  const auto v = Random(5 * 7, 61);
  auto src = Upload(v, 5, 7), dst = Zeros(2, 7);
  ASSERT_TRUE(backend_->Copy(src->Rows(1, 2), dst.get()).ok());
  EXPECT_EQ(Download<float>(dst), std::vector<float>(v.begin() + 7, v.begin() + 21));
  auto src16 = Upload(v, 5, 7, DType::kBF16), dst16 = Zeros(5, 7, DType::kBF16);
  ASSERT_TRUE(backend_->Copy(src16.get(), dst16.get()).ok());
  EXPECT_EQ(Download<uint16_t>(dst16), Download<uint16_t>(src16));
  auto ids = UploadI32({4, -1, 7}), ids_copy = Zeros(3, 1, DType::kI32);
  ASSERT_TRUE(backend_->Copy(ids.get(), ids_copy.get()).ok());
  EXPECT_EQ(Download<int32_t>(ids_copy), (std::vector<int32_t>{4, -1, 7}));
  EXPECT_TRUE(backend_->Copy(src->Rows(0, 0), dst->Rows(0, 0)).ok());
  EXPECT_EQ(backend_->Copy(src16.get(), Zeros(5, 7).get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->Copy(src.get(), dst.get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Download<float>(dst), std::vector<float>(v.begin() + 7, v.begin() + 21));
}

TEST_P(BackendOpsTest, MatMul) {
  for (DType wt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (auto [n, k, m] :
         std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {3, 17, 5}, {37, 64, 130}, {8, 4096, 3}, {129, 96, 2049}}) {
      const auto x = Random(static_cast<size_t>(n) * k, 1 + n);
      const auto w = Rounded(Random(static_cast<size_t>(m) * k, 2 + m), wt);
      auto tx = Upload(x, n, k), tw = Upload(w, m, k, wt), out = Zeros(n, m);
      ASSERT_TRUE(backend_->MatMul(tx.get(), tw.get(), out.get()).ok());
      const std::vector<double> ref = MatMulRef(x, w, n, k, m);
      // bf16 GEMM inputs on a GPU round x too: allow for it.
      const Tol tol = GetParam() == "cpu" ? Tol{1e-4, 1e-4} : Tol{2e-2 * std::sqrt(k / 64.0), 1e-2};
      ExpectClose(Download<float>(out), ref, tol, "matmul " + std::string(DTypeName(wt)));
    }
  }
}

// SAE_CUDA_MODEL_SPLIT=3 (read when a backend is created) makes the CUDA
// backend's BF16-weight GEMMs carry the full fp32 activations (3 bf16 parts),
// so they meet the CPU's tolerance; the CPU backend ignores the variable.
// Several weights on one input (q/k/v, gate/up) give exactly what one MatMul
// per weight gives (CUDA rounds x to bf16 once instead of once per weight),
// for odd shapes, a weight with no rows, and mixed weight dtypes.
TEST_P(BackendOpsTest, MatMulSharedEqualsOneMatMulPerWeight) {
  for (auto [n, k] : std::vector<std::pair<int, int>>{{1, 1}, {37, 64}, {130, 333}}) {
    for (bool mixed : {false, true}) {
      const auto x = Random(static_cast<size_t>(n) * k, 91 + n, 2.0f);
      auto tx = Upload(x, n, k);
      std::vector<OwnedTensor> ws, shared, single;
      std::vector<Tensor> w_views, out_views;
      const std::vector<int> rows = {130, 3, 0, 3};
      for (size_t i = 0; i < rows.size(); ++i) {
        const DType dt = mixed && i == 1 ? DType::kF32 : DType::kBF16;
        ws.push_back(rows[i] == 0
                         ? Zeros(0, k, dt)
                         : Upload(Rounded(Random(static_cast<size_t>(rows[i]) * k, 92 + i), dt), rows[i], k, dt));
        shared.push_back(Zeros(n, rows[i]));
        single.push_back(Zeros(n, rows[i]));
        w_views.push_back(ws.back().get());
        out_views.push_back(shared.back().get());
      }
      const absl::Status st = backend_->MatMulShared(tx.get(), w_views, out_views);
      ASSERT_TRUE(st.ok()) << st;
      for (size_t i = 0; i < rows.size(); ++i) {
        ASSERT_TRUE(backend_->MatMul(tx.get(), w_views[i], single[i].get()).ok());
        EXPECT_EQ(Download<float>(shared[i]), Download<float>(single[i]))
            << "weight " << i << " n " << n << " k " << k << (mixed ? " mixed" : "");
      }
      const std::vector<Tensor> one_out = {out_views[0]};
      EXPECT_EQ(backend_->MatMulShared(tx.get(), w_views, one_out).code(), absl::StatusCode::kInvalidArgument);
      std::vector<Tensor> wrong = out_views;
      wrong[1] = shared[0].get();  // [n, 130] where [n, 3] belongs
      EXPECT_EQ(backend_->MatMulShared(tx.get(), w_views, wrong).code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

// MatMulAdd(x, w, out) is out + MatMul(x, w): bit for bit on the CPU (the
// reference forward pass must not change), and on CUDA up to the one
// rounding cuBLAS saves by adding in its epilogue (and a summation order it
// may choose differently with beta = 1), for every weight dtype,
// F32 and BF16 x, an empty inner dimension and no rows. Bad shapes are
// INVALID_ARGUMENT and leave out as it was.
TEST_P(BackendOpsTest, MatMulAddIsMatMulThenAdd) {
  const bool exact = GetParam() == "cpu";
  for (DType wt : {DType::kBF16, DType::kF32, DType::kF16}) {
    for (DType xt : {DType::kF32, DType::kBF16}) {
      if (xt == DType::kBF16 && backend_->gemm_input_dtype() != DType::kBF16) continue;
      for (auto [n, k, m] : std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {37, 64, 130}, {5, 0, 7}, {0, 8, 3}}) {
        const auto x = Rounded(Random(static_cast<size_t>(n) * k, 31 + n, 2.0f), xt);
        const auto w = Rounded(Random(static_cast<size_t>(m) * k, 32 + m), wt);
        const auto init = Random(static_cast<size_t>(n) * m, 33 + m, 4.0f);
        // (Upload makes an empty tensor [0, 0]; Zeros keeps the column count.)
        auto tx = n == 0 ? Zeros(0, k, xt) : Upload(x, n, k, xt), tw = Upload(w, m, k, wt),
             out = n == 0 ? Zeros(0, m) : Upload(init, n, m), prod = Zeros(n, m);
        const std::string where = absl::StrCat(DTypeName(wt), " weights, ", DTypeName(xt), " x, ", n, "x", k, "x", m);
        absl::Status st = backend_->MatMul(tx.get(), tw.get(), prod.get());
        ASSERT_TRUE(st.ok()) << where << ": " << st;
        st = backend_->MatMulAdd(tx.get(), tw.get(), out.get());
        ASSERT_TRUE(st.ok()) << where << ": " << st;
        const auto p = Download<float>(prod), got = Download<float>(out);
        std::vector<double> sum_abs(got.size(), 0.0);  // sum_c |x_c w_c|: the accumulation error scale
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < m; ++j)
            for (int c = 0; c < k; ++c)
              sum_abs[i * m + j] += std::abs(static_cast<double>(x[i * k + c]) * w[j * k + c]);
        for (size_t i = 0; i < got.size(); ++i) {
          const float want = init[i] + p[i];
          if (exact) {
            ASSERT_EQ(got[i], want) << where << " [" << i << "]";
          } else {
            // One rounding fewer, and cuBLAS may sum in another order with beta = 1.
            const double tol = 1e-6 * (std::abs(init[i]) + std::abs(p[i])) + 2.4e-7 * k * sum_abs[i] + 1e-30;
            ASSERT_NEAR(got[i], want, tol) << where << " [" << i << "]";
          }
        }
      }
    }
  }
  const auto init = Random(6, 41);
  auto tx = Upload(Random(2 * 4, 42), 2, 4), tw = Upload(Random(3 * 4, 43), 3, 4, DType::kBF16);
  auto wrong = Upload(init, 3, 2);  // [n, m] transposed
  EXPECT_EQ(backend_->MatMulAdd(tx.get(), tw.get(), wrong.get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Download<float>(wrong), init);
}

// BF16 outputs of the ops that feed GEMMs (RmsNorm, SiluMul, Attention) are
// their F32 outputs rounded to nearest even, bit for bit; a BF16 x in MatMul /
// MatMulShared gives exactly what the F32 x it was rounded from gives (the
// GEMM rounds it the same way), for BF16 and F32 weights. The CPU keeps GEMM
// inputs in F32 and refuses BF16 ones with INVALID_ARGUMENT.
TEST_P(BackendOpsTest, Bf16GemmInputsAreF32OutputsRounded) {
  const int n = 37, d = 96, hd = 64, heads = 4, kv_heads = 2, ffn = 130;
  auto bits = [&](const OwnedTensor& t) { return Download<uint16_t>(t); };
  auto rounded = [&](const OwnedTensor& t) {
    std::vector<uint16_t> r;
    for (float f : Download<float>(t)) r.push_back(F32ToBf16(f));
    return r;
  };
  auto x = Upload(Random(static_cast<size_t>(n) * d, 71, 3.0f), n, d);
  auto norm_w = Upload(Random(d, 72), 1, d);
  auto h32 = Zeros(n, d), h16 = Zeros(n, d, DType::kBF16);
  if (GetParam() == "cpu") {
    EXPECT_EQ(backend_->gemm_input_dtype(), DType::kF32);
    EXPECT_EQ(backend_->RmsNorm(x.get(), norm_w.get(), 1e-5f, h16.get()).code(), absl::StatusCode::kInvalidArgument);
    auto w = Upload(Random(8 * d, 73), 8, d, DType::kBF16);
    auto out = Zeros(n, 8);
    EXPECT_EQ(backend_->MatMul(h16.get(), w.get(), out.get()).code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  EXPECT_EQ(backend_->gemm_input_dtype(), DType::kBF16);
  ASSERT_TRUE(backend_->RmsNorm(x.get(), norm_w.get(), 1e-5f, h32.get()).ok());
  ASSERT_TRUE(backend_->RmsNorm(x.get(), norm_w.get(), 1e-5f, h16.get()).ok());
  EXPECT_EQ(bits(h16), rounded(h32)) << "rmsnorm";

  auto gate = Upload(Random(static_cast<size_t>(n) * ffn, 74, 4.0f), n, ffn);
  auto up = Upload(Random(static_cast<size_t>(n) * ffn, 75), n, ffn);
  auto a32 = Zeros(n, ffn), a16 = Zeros(n, ffn, DType::kBF16);
  ASSERT_TRUE(backend_->SiluMul(gate.get(), up.get(), a32.get()).ok());
  ASSERT_TRUE(backend_->SiluMul(gate.get(), up.get(), a16.get()).ok());
  EXPECT_EQ(bits(a16), rounded(a32)) << "silu_mul";

  const std::vector<int32_t> starts = {0, 5, 30, n};
  auto q = Upload(Random(static_cast<size_t>(n) * heads * hd, 76, 2.0f), n, heads * hd);
  auto k = Upload(Random(static_cast<size_t>(n) * kv_heads * hd, 77, 2.0f), n, kv_heads * hd);
  auto v = Upload(Random(static_cast<size_t>(n) * kv_heads * hd, 78), n, kv_heads * hd);
  auto ts = UploadI32(starts);
  for (const AttentionKernel& kernel : AttentionKernels()) {  // mma stores BF16; fp32 goes through scratch
    auto o32 = Zeros(n, heads * hd), o16 = Zeros(n, heads * hd, DType::kBF16);
    ASSERT_TRUE(RunAttention(kernel, q.get(), k.get(), v.get(), ts.get(), 3, 25, heads, kv_heads, hd, o32.get()).ok());
    ASSERT_TRUE(RunAttention(kernel, q.get(), k.get(), v.get(), ts.get(), 3, 25, heads, kv_heads, hd, o16.get()).ok());
    EXPECT_EQ(bits(o16), rounded(o32)) << "attention " << kernel.name;
  }

  for (DType wt : {DType::kBF16, DType::kF32}) {
    auto w1 = Upload(Rounded(Random(130 * d, 79), wt), 130, d, wt);
    auto w2 = Upload(Rounded(Random(3 * d, 80), wt), 3, d, wt);
    auto y32 = Zeros(n, 130), y16 = Zeros(n, 130), z16 = Zeros(n, 3), s1 = Zeros(n, 130), s2 = Zeros(n, 3);
    // F32 x holding exactly the BF16 values, so both GEMMs see the same input.
    std::vector<float> widened;
    for (uint16_t b : bits(h16)) widened.push_back(Bf16ToF32(b));
    auto hw = Upload(widened, n, d);
    ASSERT_TRUE(backend_->MatMul(hw.get(), w1.get(), y32.get()).ok());
    ASSERT_TRUE(backend_->MatMul(h16.get(), w1.get(), y16.get()).ok());
    ASSERT_TRUE(backend_->MatMul(h16.get(), w2.get(), z16.get()).ok());
    EXPECT_EQ(Download<float>(y16), Download<float>(y32)) << "matmul " << DTypeName(wt);
    const std::vector<Tensor> ws = {w1.get(), w2.get()}, outs = {s1.get(), s2.get()};
    ASSERT_TRUE(backend_->MatMulShared(h16.get(), ws, outs).ok());
    EXPECT_EQ(Download<float>(s1), Download<float>(y16)) << "matmul shared " << DTypeName(wt);
    EXPECT_EQ(Download<float>(s2), Download<float>(z16)) << "matmul shared " << DTypeName(wt);
  }
  // An empty inner dimension: the products are zeros (no GEMM with k = 0).
  auto x0 = Zeros(n, 0, DType::kBF16), w0 = Zeros(3, 0, DType::kBF16), w0b = Zeros(2, 0, DType::kBF16);
  auto y0 = Upload(std::vector<float>(n * 3, 7.0f), n, 3), y0b = Upload(std::vector<float>(n * 2, 7.0f), n, 2);
  ASSERT_TRUE(backend_->MatMul(x0.get(), w0.get(), y0.get()).ok());
  EXPECT_EQ(Download<float>(y0), std::vector<float>(n * 3, 0.0f));
  const std::vector<Tensor> ws0 = {w0.get(), w0b.get()}, outs0 = {y0.get(), y0b.get()};
  ASSERT_TRUE(backend_->MatMulShared(x0.get(), ws0, outs0).ok());
  EXPECT_EQ(Download<float>(y0b), std::vector<float>(n * 2, 0.0f));
  auto x0f = Zeros(n, 0);  // an F32 input with k = 0, through the shared rounding
  auto z0 = Upload(std::vector<float>(n * 3, 7.0f), n, 3), z0b = Upload(std::vector<float>(n * 2, 7.0f), n, 2);
  const std::vector<Tensor> outs0f = {z0.get(), z0b.get()};
  ASSERT_TRUE(backend_->MatMulShared(x0f.get(), ws0, outs0f).ok());
  EXPECT_EQ(Download<float>(z0), std::vector<float>(n * 3, 0.0f));
  EXPECT_EQ(Download<float>(z0b), std::vector<float>(n * 2, 0.0f));
  // Not a GEMM input: F16 activations stay refused.
  auto h_f16 = Zeros(n, d, DType::kF16);
  EXPECT_EQ(backend_->RmsNorm(x.get(), norm_w.get(), 1e-5f, h_f16.get()).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(BackendOpsTest, MatMulSplitActivationsMatchFp32) {
  setenv("SAE_CUDA_MODEL_SPLIT", "3", 1);
  auto created = CreateBackend(GetParam());
  unsetenv("SAE_CUDA_MODEL_SPLIT");
  ASSERT_TRUE(created.ok()) << created.status();
  backend_ = *std::move(created);
  for (auto [n, k, m] : std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {37, 64, 130}, {65, 1000, 333}}) {
    const auto x = Random(static_cast<size_t>(n) * k, 81 + n, 3.0f);
    const auto w = Rounded(Random(static_cast<size_t>(m) * k, 82 + m), DType::kBF16);
    auto tx = Upload(x, n, k), tw = Upload(w, m, k, DType::kBF16), out = Zeros(n, m);
    ASSERT_TRUE(backend_->MatMul(tx.get(), tw.get(), out.get()).ok());
    const std::vector<double> ref = MatMulRef(x, w, n, k, m);
    ExpectClose(Download<float>(out), ref, {1e-4 * std::sqrt(k / 64.0), 1e-4}, "split matmul");
  }
}

// A SAE_CUDA_* setting that is not valid fails the backend's creation naming
// the variable (it used to fall back to the default without a word).
TEST_P(BackendOpsTest, BadCudaSettingsAreRefusedAtCreation) {
  if (GetParam() != "cuda") GTEST_SKIP() << "CUDA settings";
  for (const auto& [name, value] :
       std::vector<std::pair<const char*, const char*>>{{"SAE_CUDA_DEVICE", "64"},
                                                        {"SAE_CUDA_DEVICE", "one"},
                                                        {"SAE_CUDA_MODEL_SPLIT", "4"},
                                                        {"SAE_CUDA_BF16_ACTIVATIONS", "yes"},
                                                        {"SAE_CUDA_SAE_SPLIT", "-1"},
                                                        {"SAE_CUDA_SAE_SCRATCH_MB", "8"},
                                                        {"SAE_CUDA_ATTENTION", "flash"}}) {
    SCOPED_TRACE(std::string(name) + "=" + value);
    const char* was = std::getenv(name);
    const std::optional<std::string> saved = was ? std::optional<std::string>(was) : std::nullopt;
    setenv(name, value, 1);
    auto created = CreateBackend("cuda");
    if (saved) {
      setenv(name, saved->c_str(), 1);  // the run's own setting (a GPU picked with SAE_CUDA_DEVICE) stays
    } else {
      unsetenv(name);
    }
    ASSERT_FALSE(created.ok());
    EXPECT_EQ(created.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(created.status().message().find(std::string(name) + "=\"" + value + "\""), std::string::npos)
        << created.status();
  }
  EXPECT_TRUE(CreateBackend("cuda").ok());  // the run's own settings are valid
}

// An allocation far beyond the device (or host) memory is RESOURCE_EXHAUSTED,
// and the backend keeps working.
TEST_P(BackendOpsTest, AllocBeyondMemoryIsResourceExhausted) {
  auto huge = backend_->Alloc(DType::kF32, int64_t{1} << 21, int64_t{1} << 20);  // 8 TiB
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  auto a = Upload({1, 2, 3}, 1, 3), b = Upload({10, 20, 30}, 1, 3), out = Zeros(1, 3);
  ASSERT_TRUE(backend_->Add(a.get(), b.get(), out.get()).ok());
  EXPECT_EQ(Download<float>(out), (std::vector<float>{11, 22, 33}));
}

// Memory(): live tensors counted from allocation to release (weights from
// Upload too); on CUDA the device figures are present and consistent.
TEST_P(BackendOpsTest, MemoryCountsLiveTensors) {
  const int64_t before = backend_->Memory().tensors;
  {
    auto a = Zeros(1000, 3);
    auto w = Upload(Random(64 * 16, 5), 64, 16, DType::kBF16);
    const MemoryUsage m = backend_->Memory();
    EXPECT_GE(m.tensors - before, 1000 * 3 * 4 + 64 * 16 * 2);
    EXPECT_LE(m.tensors - before, 1000 * 3 * 4 + 64 * 16 * 2 + 2 * 256);  // allocation rounding
    if (GetParam() == "cpu") {
      EXPECT_EQ(m.reserved, -1);
      EXPECT_EQ(m.device_total, -1);
      EXPECT_EQ(m.device_free, -1);
    } else {
      EXPECT_GE(m.reserved, m.tensors);
      EXPECT_GT(m.device_total, 0);
      EXPECT_GE(m.device_free, 0);
      EXPECT_LE(m.device_free + m.reserved, m.device_total);
    }
  }
  EXPECT_EQ(backend_->Memory().tensors, before);
}

// A tensor of the wrong dtype is INVALID_ARGUMENT in every op, never a
// buffer read or written as another type.
TEST_P(BackendOpsTest, OpsRejectWrongDtypes) {
  const int n = 4, d = 8;
  auto f = Zeros(n, d), i32 = Zeros(n, d, DType::kI32), w = Zeros(1, d), ids = Zeros(n, 1, DType::kI32);
  auto ids_f = Zeros(n, 1), inv = Zeros(1, d / 2), starts = UploadI32({0, n}), starts_f = Zeros(2, 1);
  auto table = Zeros(16, d), mw = Zeros(3, d, DType::kBF16), mo = Zeros(n, 3);
  const auto bad = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(backend_->Embed(table.get(), ids_f.get(), f.get()).code(), bad);
  EXPECT_EQ(backend_->Embed(table.get(), ids.get(), i32.get()).code(), bad);
  EXPECT_EQ(backend_->RmsNorm(i32.get(), w.get(), 1e-5f, f.get()).code(), bad);
  EXPECT_EQ(backend_->RmsNorm(f.get(), w.get(), 1e-5f, i32.get()).code(), bad);
  EXPECT_EQ(backend_->MatMul(i32.get(), mw.get(), mo.get()).code(), bad);
  EXPECT_EQ(backend_->Rope(i32.get(), ids.get(), inv.get(), d).code(), bad);
  EXPECT_EQ(backend_->Rope(f.get(), ids_f.get(), inv.get(), d).code(), bad);
  EXPECT_EQ(backend_->Attention(f.get(), f.get(), f.get(), starts_f.get(), 1, n, 1, 1, d, f.get()).code(), bad);
  EXPECT_EQ(backend_->Attention(f.get(), i32.get(), f.get(), starts.get(), 1, n, 1, 1, d, f.get()).code(), bad);
  EXPECT_EQ(backend_->Attention(f.get(), f.get(), f.get(), starts.get(), 1, n, 1, 1, d, i32.get()).code(), bad);
  EXPECT_EQ(backend_->SiluMul(i32.get(), f.get(), f.get()).code(), bad);
  EXPECT_EQ(backend_->SiluMul(f.get(), f.get(), i32.get()).code(), bad);
  EXPECT_EQ(backend_->Add(f.get(), i32.get(), f.get()).code(), bad);
  EXPECT_EQ(backend_->Add(f.get(), f.get(), i32.get()).code(), bad);
}

TEST_P(BackendOpsTest, MatMulRejectsMismatchedShapes) {
  auto x = Zeros(2, 3), w = Zeros(4, 5), out = Zeros(2, 4);
  EXPECT_EQ(backend_->MatMul(x.get(), w.get(), out.get()).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(BackendOpsTest, RmsNorm) {
  for (int d : {1, 7, 64, 4096}) {
    for (bool with_weight : {true, false}) {
      const int n = 5;
      const auto x = Random(static_cast<size_t>(n) * d, d, 3.0f);
      const auto w = Random(d, d + 1);
      auto tx = Upload(x, n, d), tw = Upload(w, 1, d), out = Zeros(n, d);
      ASSERT_TRUE(backend_->RmsNorm(tx.get(), with_weight ? tw.get() : Tensor(), 1e-5f, out.get()).ok());
      std::vector<double> ref(x.size());
      for (int r = 0; r < n; ++r) {
        double ss = 0;
        for (int c = 0; c < d; ++c) ss += static_cast<double>(x[r * d + c]) * x[r * d + c];
        const double inv = 1.0 / std::sqrt(ss / d + 1e-5);
        for (int c = 0; c < d; ++c) ref[r * d + c] = x[r * d + c] * inv * (with_weight ? w[c] : 1.0);
      }
      ExpectClose(Download<float>(out), ref, {1e-5, 1e-4}, "rmsnorm d=" + std::to_string(d));
    }
  }
}

TEST_P(BackendOpsTest, Embed) {
  const int vocab = 50, d = 33;
  const std::vector<int32_t> ids = {0, 49, 7, 7, 13};
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {  // embed_tokens as the checkpoint stores it
    const auto table = Rounded(Random(vocab * d, 9, 100.0f), dtype);
    auto tt = Upload(table, vocab, d, dtype), ti = UploadI32(ids), out = Zeros(5, d);
    ASSERT_TRUE(backend_->Embed(tt.get(), ti.get(), out.get()).ok());
    std::vector<double> ref;
    for (int32_t id : ids)
      for (int c = 0; c < d; ++c) ref.push_back(table[id * d + c]);
    ExpectClose(Download<float>(out), ref, {0, 0}, absl::StrCat("embed ", DTypeName(dtype)));
  }
}

TEST_P(BackendOpsTest, Rope) {
  for (int hd : {16, 64, 128}) {
    const int n = 11, heads = 3;
    const auto x = Random(static_cast<size_t>(n) * heads * hd, hd);
    std::vector<int32_t> pos(n);
    for (int i = 0; i < n; ++i) pos[i] = i * 977;  // large positions stress the angle precision
    std::vector<float> inv(hd / 2);
    for (int j = 0; j < hd / 2; ++j) inv[j] = 1.0f / std::pow(500000.0f, 2.0f * j / hd);
    auto tx = Upload(x, n, heads * hd), tp = UploadI32(pos), ti = Upload(inv, 1, hd / 2);
    ASSERT_TRUE(backend_->Rope(tx.get(), tp.get(), ti.get(), hd).ok());
    const std::vector<double> ref = RopeRef(x, pos, inv, heads, hd);
    ExpectClose(Download<float>(tx), ref, {1e-5, 1e-4}, "rope hd=" + std::to_string(hd));
  }
}

TEST_P(BackendOpsTest, AttentionPackedCausalGqa) {
  struct Case {
    int hd, heads, kv_heads;
    std::vector<int> lens;
  };
  for (const Case& c : std::vector<Case>{{64, 4, 4, {1}},
                                         {64, 8, 2, {5, 1, 17}},
                                         {128, 4, 1, {33, 2}},
                                         {16, 6, 3, {300}},
                                         {128, 32, 8, {3, 7}},
                                         {128, 4, 2, {150, 70}}}) {
    std::vector<int32_t> starts = {0};
    for (int l : c.lens) starts.push_back(starts.back() + l);
    const int n = starts.back(), max_len = *std::max_element(c.lens.begin(), c.lens.end());
    const int qd = c.heads * c.hd, kvd = c.kv_heads * c.hd;
    const auto q = Random(static_cast<size_t>(n) * qd, 11, 2.0f), k = Random(static_cast<size_t>(n) * kvd, 12, 2.0f),
               v = Random(static_cast<size_t>(n) * kvd, 13);
    auto tq = Upload(q, n, qd), tk = Upload(k, n, kvd), tv = Upload(v, n, kvd), ts = UploadI32(starts);
    const std::vector<double> ref = AttentionRefAll(q, k, v, starts, c.heads, c.kv_heads, c.hd);
    for (const AttentionKernel& kernel : AttentionKernels()) {
      auto out = Zeros(n, qd);
      ASSERT_TRUE(RunAttention(kernel, tq.get(), tk.get(), tv.get(), ts.get(), static_cast<int>(c.lens.size()), max_len,
                               c.heads, c.kv_heads, c.hd, out.get())
                      .ok());
      ExpectClose(Download<float>(out), ref, kernel.tol,
                  "attention hd=" + std::to_string(c.hd) + " " + (kernel.name ? kernel.name : ""));
    }
  }
}

TEST_P(BackendOpsTest, SiluMulAndAdd) {
  const int n = 7, d = 45;
  const auto a = Random(n * d, 21, 4.0f), b = Random(n * d, 22, 4.0f);
  auto ta = Upload(a, n, d), tb = Upload(b, n, d), out = Zeros(n, d);
  ASSERT_TRUE(backend_->SiluMul(ta.get(), tb.get(), out.get()).ok());
  std::vector<double> ref(a.size()), sum(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ref[i] = a[i] / (1.0 + std::exp(-static_cast<double>(a[i]))) * b[i];
    sum[i] = static_cast<double>(a[i]) + b[i];
  }
  ExpectClose(Download<float>(out), ref, {1e-6, 1e-5}, "silu_mul");
  ASSERT_TRUE(backend_->Add(ta.get(), tb.get(), ta.get()).ok());  // in place
  ExpectClose(Download<float>(ta), sum, {1e-6, 1e-6}, "add");
  // Gates where exp(-x) overflows or underflows fp32: silu(x) -> 0 or x, never NaN.
  const std::vector<float> gate = {-1000.0f, -100.0f, -88.8f, -87.0f, 87.0f, 89.0f, 100.0f, 3e38f, -3e38f};
  const std::vector<float> up(gate.size(), 0.5f);
  auto tg = Upload(gate, 1, static_cast<int64_t>(gate.size())), tu = Upload(up, 1, static_cast<int64_t>(up.size())),
       ext = Zeros(1, static_cast<int64_t>(gate.size()));
  ASSERT_TRUE(backend_->SiluMul(tg.get(), tu.get(), ext.get()).ok());
  std::vector<double> ext_ref;
  for (float g : gate) ext_ref.push_back(g / (1.0 + std::exp(-static_cast<double>(g))) * 0.5);
  ExpectClose(Download<float>(ext), ext_ref, {1e-6, 1e-5}, "silu_mul at the ends of exp");
}

// Reference SAE encode + top-k: value-descending, ties by lower index.
std::vector<std::pair<int32_t, float>> RefTopK(const std::vector<float>& x, const std::vector<float>& w,
                                               const std::vector<float>& b, const std::vector<float>& scale, int d,
                                               int d_sae, float s_in, float threshold, int k) {
  std::vector<std::pair<double, int32_t>> cand;
  for (int i = 0; i < d_sae; ++i) {
    double h = 0;
    for (int c = 0; c < d; ++c) h += static_cast<double>(w[static_cast<size_t>(i) * d + c]) * x[c];
    h = s_in * h + b[i];
    if (!scale.empty()) h *= scale[i];
    if (h > threshold) cand.emplace_back(h, i);
  }
  std::sort(cand.begin(), cand.end(),
            [](auto& p, auto& q) { return p.first != q.first ? p.first > q.first : p.second < q.second; });
  std::vector<std::pair<int32_t, float>> out;
  for (int j = 0; j < k && j < static_cast<int>(cand.size()); ++j) out.emplace_back(cand[j].second, cand[j].first);
  return out;
}

TEST_P(BackendOpsTest, SaeEncodeTopK) {
  for (auto [n, d, d_sae, k, with_scale, max_active] :
       std::vector<std::tuple<int, int, int, int, bool, int>>{{1, 8, 16, 4, false, 0},
                                                              {5, 64, 512, 50, false, 0},
                                                              {70, 33, 1000, 7, true, 0},
                                                              {3, 64, 2048, 64, false, 0},
                                                              {4, 16, 300, 10, false, 5}}) {
    const auto x = Random(static_cast<size_t>(n) * d, 31 + n);
    const auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 32), DType::kBF16);
    const auto b = Random(d_sae, 33, 0.5f);
    const auto scale = with_scale ? Random(d_sae, 34) : std::vector<float>();
    auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae);
    OwnedTensor ts;
    if (with_scale) ts = Upload(scale, 1, d_sae);
    SaeEncoderWeights sae{tw.get(), tb.get(), with_scale ? ts.get() : Tensor(), 1.7f, 0.3f, max_active};
    auto idx = Zeros(n, k, DType::kI32), val = Zeros(n, k);
    ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
    const auto got_i = Download<int32_t>(idx);
    const auto got_v = Download<float>(val);
    for (int t = 0; t < n; ++t) {
      const auto ref = RefTopK(std::vector<float>(x.begin() + t * d, x.begin() + (t + 1) * d), w, b, scale, d, d_sae,
                               1.7f, 0.3f, max_active > 0 ? std::min(k, max_active) : k);
      for (int j = 0; j < k; ++j) {
        if (j < static_cast<int>(ref.size())) {
          EXPECT_EQ(got_i[t * k + j], ref[j].first) << "token " << t << " slot " << j;
          EXPECT_NEAR(got_v[t * k + j], ref[j].second, 1e-4 + 1e-4 * std::abs(ref[j].second));
        } else {
          EXPECT_EQ(got_i[t * k + j], -1) << "token " << t << " slot " << j;
          EXPECT_EQ(got_v[t * k + j], 0.0f);
        }
      }
    }
  }
}

TEST_P(BackendOpsTest, SaeTopKBreaksTiesByLowerIndex) {
  const int d = 4, d_sae = 6, k = 6;
  const std::vector<float> x = {1, 0, 0, 0};
  // Features 1, 3 and 4 have the same activation; 0 is below the threshold.
  std::vector<float> w(d_sae * d, 0.0f);
  const float row0[] = {0.0f, 2.0f, 1.0f, 2.0f, 2.0f, 3.0f};
  for (int i = 0; i < d_sae; ++i) w[i * d] = row0[i];
  auto tx = Upload(x, 1, d), tw = Upload(w, d_sae, d), tb = Upload(std::vector<float>(d_sae, 0.0f), 1, d_sae);
  SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.5f, 0};
  auto idx = Zeros(1, k, DType::kI32), val = Zeros(1, k);
  ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
  EXPECT_EQ(Download<int32_t>(idx), (std::vector<int32_t>{5, 1, 3, 4, 2, -1}));
}

// Long packed sequences (lengths 1..4096), head_dim 64/128, GQA ratios 1/4/8.
// The double reference is evaluated on a sample of rows (every 97th, the
// first and the last few of each sequence) to keep the test fast.
TEST_P(BackendOpsTest, AttentionLongSequencesGqa) {
  struct Case {
    int hd, heads, kv_heads;
    std::vector<int> lens;
  };
  for (const Case& c : std::vector<Case>{{64, 2, 2, {4096, 3}},
                                         {128, 4, 1, {1, 2500, 7, 640}},
                                         {128, 8, 1, {1024, 33, 1}},
                                         {64, 8, 2, {129, 511, 64, 1, 1000}}}) {
    std::vector<int32_t> starts = {0};
    for (int l : c.lens) starts.push_back(starts.back() + l);
    const int n = starts.back(), max_len = *std::max_element(c.lens.begin(), c.lens.end());
    const int qd = c.heads * c.hd, kvd = c.kv_heads * c.hd;
    const auto q = Random(static_cast<size_t>(n) * qd, 41, 2.0f), k = Random(static_cast<size_t>(n) * kvd, 42, 2.0f),
               v = Random(static_cast<size_t>(n) * kvd, 43);
    auto tq = Upload(q, n, qd), tk = Upload(k, n, kvd), tv = Upload(v, n, kvd), ts = UploadI32(starts);
    std::vector<std::vector<float>> got;  // per kernel
    for (const AttentionKernel& kernel : AttentionKernels()) {
      auto out = Zeros(n, qd);
      ASSERT_TRUE(RunAttention(kernel, tq.get(), tk.get(), tv.get(), ts.get(), static_cast<int>(c.lens.size()), max_len,
                               c.heads, c.kv_heads, c.hd, out.get())
                      .ok());
      got.push_back(Download<float>(out));
    }
    std::vector<std::vector<float>> got_rows(got.size());
    std::vector<double> ref_rows;
    const int group = c.heads / c.kv_heads;
    for (size_t s = 0; s + 1 < starts.size(); ++s) {
      for (int i = starts[s]; i < starts[s + 1]; ++i) {
        const int rel = i - starts[s];
        if (!(rel < 2 || i >= starts[s + 1] - 2 || rel % 97 == 0)) continue;
        for (int h = 0; h < c.heads; ++h) {
          const auto o = AttentionRef(q, k, v, starts[s], i, h, c.heads, c.kv_heads, c.hd);
          for (int d = 0; d < c.hd; ++d) {
            ref_rows.push_back(o[d]);
            for (size_t kn = 0; kn < got.size(); ++kn) {
              got_rows[kn].push_back(got[kn][static_cast<size_t>(i) * qd + h * c.hd + d]);
            }
          }
        }
      }
    }
    for (size_t kn = 0; kn < got.size(); ++kn) {
      const AttentionKernel kernel = AttentionKernels()[kn];
      ExpectClose(got_rows[kn], ref_rows, kernel.tol,
                  "attention hd=" + std::to_string(c.hd) + " gqa=" + std::to_string(group) +
                      " max_len=" + std::to_string(max_len) + " " + (kernel.name ? kernel.name : ""));
    }
  }
}

// With K = 0 every score is 0, so every visible key gets weight exactly 1
// (also in bf16), and with small integer V the sums are exact in fp32 (and
// on tensor cores): row i of a sequence must be exactly the mean of V over
// its keys 0..i. A key too many or too few (a mask, tile or sequence
// boundary off by one, a wrong kv head) moves a value by ~1 / len, far
// above the 1e-6 the CUDA kernels are held to here (their sums of integers
// are exact; only the final division rounds), so this checks the masking of long rows
// that the rounding tolerances of the tests above cannot (on the tensor-core
// kernel, dropping one key of 1500 moves an output by ~1e-3). Shapes: tile
// boundaries (32 and 64 rows / keys), empty sequences anywhere, more
// sequences than the tile table's 1024 threads, head dims of every kernel
// instantiation (8..256, odd ones), GQA ratios 1..8, Llama's 32/8 heads.
TEST_P(BackendOpsTest, AttentionMasksExactlyOnUniformScores) {
  struct Case {
    int hd, heads, kv_heads;
    std::vector<int> lens;
  };
  std::vector<Case> cases = {{64, 2, 1, {31, 32, 33, 63, 64, 65, 127, 128, 129}},
                             {128, 4, 2, {0, 3, 0, 0, 65, 0, 1, 0}},
                             {32, 8, 1, {97, 0, 200}},
                             {16, 4, 4, {1, 2, 3}},
                             {8, 2, 1, {40}},
                             {33, 3, 1, {70, 5}},
                             {48, 2, 2, {66}},
                             {80, 2, 1, {33}},
                             {96, 4, 1, {65, 1}},
                             {130, 2, 2, {34}},
                             {256, 2, 1, {70}},
                             {128, 32, 8, {150, 47}},
                             {64, 2, 1, {1500}}};
  Case many{64, 2, 1, {}};
  for (int s = 0; s < 1300; ++s) many.lens.push_back(std::vector<int>{0, 1, 2, 3, 33}[(s * 7 + s / 5) % 5]);
  cases.push_back(many);
  for (const Case& c : cases) {
    std::vector<int32_t> starts = {0};
    for (int l : c.lens) starts.push_back(starts.back() + l);
    const int n = starts.back(), max_len = std::max(1, *std::max_element(c.lens.begin(), c.lens.end()));
    const int qd = c.heads * c.hd, kvd = c.kv_heads * c.hd, group = c.heads / c.kv_heads;
    std::vector<float> v(static_cast<size_t>(n) * kvd);
    std::mt19937 rng(c.hd * 131 + c.heads);
    for (float& x : v) x = static_cast<float>(static_cast<int>(rng() % 9) - 4);
    const auto q = Random(static_cast<size_t>(n) * qd, 44, 2.0f);
    auto tq = Upload(q, n, qd), tk = Zeros(n, kvd), tv = Upload(v, n, kvd), ts = UploadI32(starts);
    std::vector<double> ref(static_cast<size_t>(n) * qd);
    for (size_t s = 0; s + 1 < starts.size(); ++s) {
      std::vector<double> sum(kvd, 0.0);
      for (int i = starts[s]; i < starts[s + 1]; ++i) {
        for (int e = 0; e < kvd; ++e) sum[e] += v[static_cast<size_t>(i) * kvd + e];
        for (int h = 0; h < c.heads; ++h)
          for (int d = 0; d < c.hd; ++d) {
            ref[static_cast<size_t>(i) * qd + h * c.hd + d] = sum[(h / group) * c.hd + d] / (i - starts[s] + 1);
          }
      }
    }
    for (const AttentionKernel& kernel : AttentionKernels()) {
      auto out = Zeros(n, qd);
      const absl::Status st =
          RunAttention(kernel, tq.get(), tk.get(), tv.get(), ts.get(), static_cast<int>(c.lens.size()), max_len,
                       c.heads, c.kv_heads, c.hd, out.get());
      ASSERT_TRUE(st.ok()) << st;
      // The CPU's fp32 loop sums p_j v_j with p_j = 1 / len rounded: ~len ulps of 4 at worst.
      ExpectClose(Download<float>(out), ref, kernel.name == nullptr ? Tol{2e-5, 0} : Tol{1e-7, 1e-6},
                  "uniform attention hd=" + std::to_string(c.hd) + " heads=" + std::to_string(c.heads) + "/" +
                      std::to_string(c.kv_heads) + " n_seqs=" + std::to_string(c.lens.size()) + " " +
                      (kernel.name ? kernel.name : ""));
    }
  }
}

// An inf or NaN in one token's V or K reaches that token's row and the later
// rows of its sequence, in the heads that read it, and nothing else: the CPU
// loops over each row's visible keys only, and the CUDA kernels must not let
// a key in a row's future add P * V = 0 * inf = NaN to it, also within the
// tile the row shares with that key (V at the first and last key of a 64-key
// tile, a row's own key, a key two rows on). A finite V beyond bf16's range
// stays finite on the tensor cores (saturated, not rounded to inf). Every
// other output keeps its usual tolerance; non-finite references must be
// matched exactly (NaN by NaN, inf by the same inf).
TEST_P(BackendOpsTest, AttentionKeepsNonFiniteValuesCausal) {
  constexpr float kInf = std::numeric_limits<float>::infinity(), kNaN = std::numeric_limits<float>::quiet_NaN();
  struct Poison {
    bool in_v;  // else in K
    int token, col;
    float value;
  };
  struct Case {
    int hd, heads, kv_heads;
    std::vector<int> lens;
    std::vector<Poison> poison;
  };
  for (const Case& c : std::vector<Case>{{64,
                                          4,
                                          2,
                                          {100, 70},
                                          {{true, 40, 69, kNaN},
                                           {true, 90, 7, kInf},
                                           {true, 110, 64, -kInf},
                                           {false, 150, 3, kNaN},
                                           {true, 30, 2, 3.4e38f}}},
                                         {128,
                                          4,
                                          1,
                                          {200},
                                          {{true, 130, 9, kNaN},
                                           {true, 131, 9, kInf},
                                           {true, 63, 127, kInf},
                                           {true, 64, 0, kNaN},
                                           {true, 5, 50, -3.4e38f}}},
                                         {48, 2, 1, {40}, {{true, 20, 1, kNaN}, {true, 22, 47, kInf}}}}) {
    std::vector<int32_t> starts = {0};
    for (int l : c.lens) starts.push_back(starts.back() + l);
    const int n = starts.back(), max_len = *std::max_element(c.lens.begin(), c.lens.end());
    const int qd = c.heads * c.hd, kvd = c.kv_heads * c.hd;
    const auto q = Random(static_cast<size_t>(n) * qd, 48, 2.0f);
    auto k = Random(static_cast<size_t>(n) * kvd, 49, 2.0f), v = Random(static_cast<size_t>(n) * kvd, 50);
    for (const Poison& p : c.poison) (p.in_v ? v : k)[static_cast<size_t>(p.token) * kvd + p.col] = p.value;
    auto tq = Upload(q, n, qd), tk = Upload(k, n, kvd), tv = Upload(v, n, kvd), ts = UploadI32(starts);
    const std::vector<double> ref = AttentionRefAll(q, k, v, starts, c.heads, c.kv_heads, c.hd);
    int non_finite = 0;
    for (double r : ref) non_finite += !std::isfinite(r);
    ASSERT_GT(non_finite, 0);  // the poison reaches some rows
    for (const AttentionKernel& kernel : AttentionKernels()) {
      const std::string what = "hd=" + std::to_string(c.hd) + " " + (kernel.name ? kernel.name : "");
      auto out = Zeros(n, qd);
      ASSERT_TRUE(RunAttention(kernel, tq.get(), tk.get(), tv.get(), ts.get(), static_cast<int>(c.lens.size()), max_len,
                               c.heads, c.kv_heads, c.hd, out.get())
                      .ok());
      const auto got = Download<float>(out);
      int bad = 0;
      for (size_t e = 0; e < got.size() && bad < 5; ++e) {
        // An output carried by the huge V has the relative error of that key's weight, which on the tensor
        // cores follows the bf16 rounding of the score (a few percent here), not the atol-dominated one.
        const double rtol = std::abs(ref[e]) > 1e30 ? 5e-2 : kernel.tol.rtol;
        const bool ok = std::isnan(ref[e])   ? std::isnan(got[e])
                        : std::isinf(ref[e]) ? got[e] == ref[e]
                                             : std::abs(got[e] - ref[e]) <= kernel.tol.atol + rtol * std::abs(ref[e]);
        if (!ok) {
          ADD_FAILURE() << what << ": token " << e / qd << " head " << (e % qd) / c.hd << " dim " << e % c.hd << " got "
                        << got[e] << " want " << ref[e];
          ++bad;
        }
      }
    }
  }
}

// Sequence layouts that do not cover the rows are INVALID_ARGUMENT: from the
// call where the host can tell (the CPU reads seq_starts; no sequences for
// some rows), else, where seq_starts live on the device, from the next
// read-back; and the backend serves on.
TEST_P(BackendOpsTest, AttentionRejectsBadSequenceStarts) {
  const int hd = 64, heads = 2, n = 10;
  auto tq = Upload(Random(n * heads * hd, 45), n, heads * hd), tk = Upload(Random(n * hd, 46), n, hd),
       tv = Upload(Random(n * hd, 47), n, hd);
  struct Case {
    const char* name;
    std::vector<int32_t> starts;
    int max_len;
  };
  for (const Case& c : std::vector<Case>{{"no sequences", {0}, 10},
                                         {"first start not 0", {1, 10}, 10},
                                         {"last start short of the rows", {0, 4, 9}, 10},
                                         {"last start past the rows", {0, 4, 11}, 10},
                                         {"decreasing", {0, 6, 4, 10}, 10},
                                         {"longer than max_seq_len", {0, 3, 10}, 6}}) {
    for (const AttentionKernel& kernel : AttentionKernels()) {
      const std::string what = std::string(c.name) + " " + (kernel.name ? kernel.name : "");
      auto ts = UploadI32(c.starts);
      auto out = Zeros(n, heads * hd);
      absl::Status st = RunAttention(kernel, tq.get(), tk.get(), tv.get(), ts.get(),
                                     static_cast<int>(c.starts.size()) - 1, c.max_len, heads, 1, hd, out.get());
      if (st.ok()) st = backend_->Synchronize();
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << what << ": " << st;
      const std::vector<int32_t> good = {0, 10};
      auto tg = UploadI32(good);
      EXPECT_TRUE(RunAttention(kernel, tq.get(), tk.get(), tv.get(), tg.get(), 1, 10, heads, 1, hd, out.get()).ok());
      EXPECT_TRUE(backend_->Synchronize().ok()) << what;
    }
  }
}

TEST_P(BackendOpsTest, RopeLargePositions) {
  const int hd = 128, n = 9, heads = 2;
  const auto x = Random(static_cast<size_t>(n) * heads * hd, 51);
  const std::vector<int32_t> pos = {0, 1, 4095, 4096, 8191, 8192, 65535, 100000, 131071};
  std::vector<float> inv(hd / 2);
  for (int j = 0; j < hd / 2; ++j) inv[j] = 1.0f / std::pow(500000.0f, 2.0f * j / hd);
  auto tx = Upload(x, n, heads * hd), tp = UploadI32(pos), ti = Upload(inv, 1, hd / 2);
  ASSERT_TRUE(backend_->Rope(tx.get(), tp.get(), ti.get(), hd).ok());
  const std::vector<double> ref = RopeRef(x, pos, inv, heads, hd);
  ExpectClose(Download<float>(tx), ref, {1e-5, 1e-4}, "rope large positions");
}

TEST_P(BackendOpsTest, MatMulModelShapes) {
  // Odd row counts against Llama-like widths, BF16 weights (what the engine loads).
  for (auto [n, k, m] : std::vector<std::tuple<int, int, int>>{{65, 4096, 1000}, {7, 1000, 4096}}) {
    const auto x = Random(static_cast<size_t>(n) * k, 61 + n);
    const auto w = Rounded(Random(static_cast<size_t>(m) * k, 62 + m, 0.05f), DType::kBF16);
    auto tx = Upload(x, n, k), tw = Upload(w, m, k, DType::kBF16), out = Zeros(n, m);
    ASSERT_TRUE(backend_->MatMul(tx.get(), tw.get(), out.get()).ok());
    const std::vector<double> ref = MatMulRef(x, w, n, k, m);
    const Tol tol = GetParam() == "cpu" ? Tol{1e-4, 1e-4} : Tol{2e-2 * 0.05 * std::sqrt(k / 64.0), 1e-2};
    ExpectClose(Download<float>(out), ref, tol,
                "matmul " + std::to_string(n) + "x" + std::to_string(k) + "x" + std::to_string(m));
  }
}

// Selection paths of the top-k beyond "few active features": thousands of
// active features (radix refinement), a dense ramp of nearly equal values,
// and exact ties (lowest indices win).
TEST_P(BackendOpsTest, SaeTopKManyActiveRampsAndTies) {
  {  // ~all of 40000 features active
    const int n = 3, d = 64, d_sae = 40000, k = 50;
    const auto x = Random(static_cast<size_t>(n) * d, 71);
    const auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 72), DType::kBF16);
    const auto b = Random(d_sae, 73, 0.5f);
    auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae);
    SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, -100.0f, 0};
    auto idx = Zeros(n, k, DType::kI32), val = Zeros(n, k);
    ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
    const auto got_i = Download<int32_t>(idx);
    const auto got_v = Download<float>(val);
    for (int t = 0; t < n; ++t) {
      const auto ref =
          RefTopK(std::vector<float>(x.begin() + t * d, x.begin() + (t + 1) * d), w, b, {}, d, d_sae, 1.0f, -100.0f, k);
      ASSERT_EQ(ref.size(), static_cast<size_t>(k));
      for (int j = 0; j < k; ++j) {
        EXPECT_EQ(got_i[t * k + j], ref[j].first) << "many active: token " << t << " slot " << j;
        EXPECT_NEAR(got_v[t * k + j], ref[j].second, 1e-4 + 1e-4 * std::abs(ref[j].second));
      }
    }
  }
  for (bool scaled : {false, true}) {
    // 200 identical (nonzero) encoder rows dominate: exact ties among features
    // that do read x. The top k are the 50 lowest of them, and with a
    // rescoring backend the candidate list is all ties, so this needs its
    // exact fallback.
    const int n = 2, d = 64, d_sae = 3000, k = 50;
    const auto x = Random(static_cast<size_t>(n) * d, 75);
    auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 76, 0.1f), DType::kBF16);
    std::vector<float> dup(d);
    for (int c = 0; c < d; ++c) dup[c] = Bf16ToF32(F32ToBf16(x[c] > 0 ? 1.0f : -1.0f));  // large for token 0
    for (int i = 0; i < 200; ++i) std::copy(dup.begin(), dup.end(), w.begin() + static_cast<size_t>(i) * d);
    const std::vector<float> b(d_sae, 0.0f), scale(d_sae, 0.5f);
    auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae),
         ts = Upload(scale, 1, d_sae);
    SaeEncoderWeights sae{tw.get(), tb.get(), scaled ? ts.get() : Tensor(), 1.0f, 0.0f, 0};
    auto idx = Zeros(n, k, DType::kI32), val = Zeros(n, k);
    ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
    const auto got_i = Download<int32_t>(idx);
    const auto got_v = Download<float>(val);
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(got_i[j], j) << "duplicate rows, slot " << j;
      EXPECT_EQ(got_v[j], got_v[0]) << "duplicate rows, slot " << j;
    }
    const auto ref = RefTopK(std::vector<float>(x.begin() + d, x.end()), w, b, scaled ? scale : std::vector<float>{}, d,
                             d_sae, 1.0f, 0.0f, k);
    for (size_t j = 0; j < ref.size(); ++j) {
      EXPECT_NEAR(got_v[k + j], ref[j].second, 1e-4 + 1e-4 * std::abs(ref[j].second)) << "token 1 slot " << j;
    }
  }
  for (bool ties : {false, true}) {
    // w = 0, so v_i = bias_i exactly: a ramp 1 + i * 2^-20 or 5000 copies of 0.75.
    const int d = 8, d_sae = 5000, k = 40;
    std::vector<float> b(d_sae);
    for (int i = 0; i < d_sae; ++i) b[i] = ties ? 0.75f : 1.0f + static_cast<float>(i) * (1.0f / 1048576.0f);
    auto tx = Upload(Random(2 * d, 74), 2, d),
         tw = Upload(std::vector<float>(static_cast<size_t>(d_sae) * d, 0.0f), d_sae, d, DType::kBF16),
         tb = Upload(b, 1, d_sae);
    SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.5f, 0};
    auto idx = Zeros(2, k, DType::kI32), val = Zeros(2, k);
    ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
    const auto got_i = Download<int32_t>(idx);
    const auto got_v = Download<float>(val);
    for (int t = 0; t < 2; ++t)
      for (int j = 0; j < k; ++j) {
        const int want = ties ? j : d_sae - 1 - j;
        EXPECT_EQ(got_i[t * k + j], want) << (ties ? "ties" : "ramp") << " token " << t << " slot " << j;
        EXPECT_EQ(got_v[t * k + j], b[want]);
      }
  }
}

// The largest k the backend says it holds (Backend::max_sae_top_k; the CPU:
// any, tested at CUDA's 8192) gives the exact top-k with every feature
// active; one more is UNIMPLEMENTED, naming the limit, from every SAE op that
// keeps a top-k, and the backend serves on. CUDA's limit comes from the
// device's shared memory per block: ctest's cuda_emulated.small_shared_memory
// entry runs this on an emulated 99 KiB (sm_86 / sm_89) device.
TEST_P(BackendOpsTest, SaeTopKAtTheLargestKTheBackendHolds) {
  const int n = 2, d = 64;
  const int limit = backend_->max_sae_top_k(d);
  if (GetParam() == "cpu") {
    EXPECT_EQ(limit, std::numeric_limits<int>::max());
  }
  const char* emu_kib = std::getenv("SAE_CUDA_EMU_SHARED_KIB");
  if (GetParam() == "cuda" && emu_kib != nullptr && std::string(emu_kib) == "99") {
    // 3277 + 819 candidates = 4096: an 8192-slot top-k buffer, 80 KiB of 99.
    EXPECT_EQ(limit, 3277);
  } else if (GetParam() == "cuda") {
    EXPECT_EQ(limit, 8192);  // sm_80 (163 KiB) and sm_90 (227 KiB) hold the kernel's most
  }
  const int k = std::min(limit, 8192), d_sae = k + 700;
  const auto x = Random(static_cast<size_t>(n) * d, 77, 0.125f);
  const auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 78), DType::kBF16);
  const auto b = Random(d_sae, 79, 0.5f);
  auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae);
  const SaeEncoderWeights jump{tw.get(), tb.get(), Tensor(), 1.0f, -100.0f, 0};
  auto idx = Zeros(n, k, DType::kI32), val = Zeros(n, k);
  ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), jump, k, idx.get(), val.get()).ok());
  const auto got_i = Download<int32_t>(idx);
  const auto got_v = Download<float>(val);
  for (int t = 0; t < n; ++t) {
    // All d_sae values, sorted: slot j must hold the j-th value, from a
    // feature whose value that is (near-ties of 8192 values may swap).
    const auto ref = RefTopK(std::vector<float>(x.begin() + t * d, x.begin() + (t + 1) * d), w, b, {}, d, d_sae, 1.0f,
                             -100.0f, d_sae);
    ASSERT_EQ(ref.size(), static_cast<size_t>(d_sae));
    std::vector<double> value_of(d_sae);
    for (const auto& [i, v] : ref) value_of[i] = v;
    std::vector<bool> seen(d_sae);
    int wrong = 0;
    for (int j = 0; j < k; ++j) {
      const int32_t i = got_i[t * k + j];
      const double want = ref[j].second, tol = 1e-5 + 1e-5 * std::abs(want);
      const bool ok = i >= 0 && i < d_sae && !seen[i] && std::abs(value_of[i] - want) <= tol &&
                      std::abs(got_v[t * k + j] - want) <= tol;
      if (ok) seen[i] = true;
      if (!ok && ++wrong <= 5) ADD_FAILURE() << "k=" << k << " token " << t << " slot " << j << ": " << i;
    }
    EXPECT_EQ(wrong, 0) << "k=" << k << " token " << t;
  }
  if (limit == std::numeric_limits<int>::max()) return;

  // One more: d_sae is larger, so a TopK SAE's max_active is not capped by it.
  const std::string limit_text = "larger than " + std::to_string(limit);
  auto idx1 = Zeros(n, k + 1, DType::kI32), val1 = Zeros(n, k + 1);
  absl::Status st = backend_->SaeEncodeTopK(tx.get(), jump, k + 1, idx1.get(), val1.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
  EXPECT_NE(st.message().find(limit_text), std::string::npos) << st;
  const SaeEncoderWeights topk{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, k + 1};
  const std::vector<int32_t> ids = {0, 5};
  auto tid = Zeros(1, 2, DType::kI32), sel = Zeros(n, 2);
  ASSERT_TRUE(backend_->CopyFromHost(ids.data(), tid.get()).ok());
  st = backend_->SaeEncodeSelected(tx.get(), topk, tid.get(), sel.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
  EXPECT_NE(st.message().find(limit_text), std::string::npos) << st;
  auto tdec = Upload(std::vector<float>(static_cast<size_t>(d_sae) * d, 0.5f), d_sae, d, DType::kBF16),
       tbd = Zeros(1, d), y = Zeros(n, d);
  st = backend_->SaeReconstruct(tx.get(), topk, SaeDecoderWeights{tdec.get(), tbd.get(), 1.0f}, y.get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
  EXPECT_NE(st.message().find(limit_text), std::string::npos) << st;
  // ... while the same calls at the limit run.
  const SaeEncoderWeights at_limit{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, k};
  EXPECT_TRUE(backend_->SaeEncodeSelected(tx.get(), at_limit, tid.get(), sel.get()).ok());
  EXPECT_TRUE(
      backend_->SaeReconstruct(tx.get(), at_limit, SaeDecoderWeights{tdec.get(), tbd.get(), 1.0f}, y.get()).ok());
  EXPECT_TRUE(backend_->Synchronize().ok());
}

// A feature that beats 200 others only by less than the bf16 rounding of x:
// x0 = 1 + 2^-10 rounds to 1 = x1, so from bf16 activations feature 1000
// (w = e0) ties with features 0..199 (w = e1) and loses on index. The exact
// top-k puts it first. (A backend that selects from bf16 GEMMs must rescore.)
TEST_P(BackendOpsTest, SaeTopKResolvesDifferencesBelowBf16) {
  const int d = 16, d_sae = 2000, k = 50;
  std::vector<float> x(d, 0.0f), w(static_cast<size_t>(d_sae) * d, 0.0f);
  x[0] = 1.0f + 1.0f / 1024.0f;
  x[1] = 1.0f;
  for (int i = 0; i < 200; ++i) w[static_cast<size_t>(i) * d + 1] = 1.0f;
  w[static_cast<size_t>(1000) * d + 0] = 1.0f;
  auto tx = Upload(x, 1, d), tw = Upload(w, d_sae, d, DType::kBF16),
       tb = Upload(std::vector<float>(d_sae, 0.0f), 1, d_sae);
  SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, 0};
  auto idx = Zeros(1, k, DType::kI32), val = Zeros(1, k);
  ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
  const auto got_i = Download<int32_t>(idx);
  const auto got_v = Download<float>(val);
  EXPECT_EQ(got_i[0], 1000);
  EXPECT_EQ(got_v[0], x[0]);
  for (int j = 1; j < k; ++j) {
    EXPECT_EQ(got_i[j], j - 1) << "slot " << j;
    EXPECT_EQ(got_v[j], 1.0f) << "slot " << j;
  }
}

// At Llama's d_model the rescoring error bound is ~0.16 standard deviations
// of the pre-activations, wider than the gap between the k-th value and
// k + k/4 values down: with that few candidates every one of these rows (a
// TopK-style SAE, half the features active, k = 128) went to the all-features
// exact path, many times the GEMM's cost (simulated at 131072 features: most
// rows from k = 50 on). The candidates the backend keeps now settle them
// (Backend::SaeExactRows counts the others). The top-k is exact either way.
TEST_P(BackendOpsTest, SaeTopKSettlesRowsFromCandidatesAtLlamaWidth) {
  const int n = 16, d = 4096, d_sae = 8192, k = 128;
  const float a = std::sqrt(3.0f / d);  // w . x ~ N(0, 1) over the features
  const auto x = Random(static_cast<size_t>(n) * d, 91);
  const auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 92, a), DType::kBF16);
  const std::vector<float> b(d_sae, 0.0f);
  auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae);
  const SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, 0};
  const absl::StatusOr<int64_t> before = backend_->SaeExactRows();
  if (GetParam() == "cpu") {
    EXPECT_EQ(before.status().code(), absl::StatusCode::kUnimplemented);
  } else {
    ASSERT_TRUE(before.ok()) << before.status();
  }
  auto idx = Zeros(n, k, DType::kI32), val = Zeros(n, k);
  ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
  if (GetParam() == "cuda") {
    const absl::StatusOr<int64_t> after = backend_->SaeExactRows();
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_LE(*after - *before, n / 8) << "rows the bound could not settle from the candidates";
  }
  const auto got_i = Download<int32_t>(idx);
  const auto got_v = Download<float>(val);
  for (int t = 0; t < n; ++t) {
    const auto ref =
        RefTopK(std::vector<float>(x.begin() + t * d, x.begin() + (t + 1) * d), w, b, {}, d, d_sae, 1.0f, 0.0f, k);
    ASSERT_EQ(ref.size(), static_cast<size_t>(k));
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(got_i[t * k + j], ref[j].first) << "token " << t << " slot " << j;
      EXPECT_NEAR(got_v[t * k + j], ref[j].second, 1e-4 + 1e-4 * std::abs(ref[j].second));
    }
  }
}

// The rescoring margin must bound how far the bf16 GEMM moves a value at any
// scale of x. After bf16 rounding every feature ties at (1 + 2^-7) s; the
// exact values are C (features 0..49) (1 + 2^-7 + 2^-9) s, B (50..1998)
// (1 + 2^-7) s and A (1999) (1 + 2^-7 + 2^-8 - 2^-12) s, the largest. The tie
// makes C and B the candidates, and only a margin that covers A's rounding
// sends the row to the exact path. At s = 2^-100 the squares of x underflow
// fp32 (a margin summed in fp32 is 0); at 2^70 they overflow it. The weights
// are 1, or 2^-80, whose squares underflow fp32 too (a norm of 0).
TEST_P(BackendOpsTest, SaeTopKIsExactAtExtremeScales) {
  const int d = 3, d_sae = 2000, k = 50;
  for (const auto& [s, ws] : std::vector<std::pair<float, float>>{
           {1.0f, 1.0f}, {std::ldexp(1.0f, -100), 1.0f}, {std::ldexp(1.0f, 70), 1.0f}, {1.0f, std::ldexp(1.0f, -80)}}) {
    const std::vector<float> x = {(1 + 0x1p-7f + 0x1p-8f - 0x1p-12f) * s, (1 + 0x1p-7f) * s,
                                  (1 + 0x1p-7f + 0x1p-9f) * s};
    std::vector<float> w(static_cast<size_t>(d_sae) * d, 0.0f);
    for (int i = 0; i < d_sae; ++i) w[static_cast<size_t>(i) * d + (i < k ? 2 : i < d_sae - 1 ? 1 : 0)] = ws;
    auto tx = Upload(x, 1, d), tw = Upload(w, d_sae, d, DType::kBF16),
         tb = Upload(std::vector<float>(d_sae, 0.0f), 1, d_sae);
    const SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, 0};
    auto idx = Zeros(1, k, DType::kI32), val = Zeros(1, k);
    ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), sae, k, idx.get(), val.get()).ok());
    const auto got_i = Download<int32_t>(idx);
    const auto got_v = Download<float>(val);
    const std::string what = (::testing::Message() << "x scale " << s << ", w scale " << ws).GetString();
    EXPECT_EQ(got_i[0], d_sae - 1) << what;
    EXPECT_EQ(got_v[0], x[0] * ws) << what;
    for (int j = 1; j < k; ++j) {
      ASSERT_EQ(got_i[j], j - 1) << what << " slot " << j;
      ASSERT_EQ(got_v[j], x[2] * ws) << what << " slot " << j;
    }
  }
}

// Double-precision SAE pre-activations of one token: h_i = s_in * (w_i . x) + b_i,
// and the active set under the encoder's rule (v_i = h_i * scale_i > threshold;
// TopK SAEs keep only the max_active largest v_i, ties to the lower index).
struct RefEncoded {
  std::vector<double> h;      // [d_sae]
  std::vector<double> v;      // [d_sae]
  std::vector<bool> active;   // [d_sae]
  double min_margin = 1e300;  // min |v_i - threshold|: how close a decision came to flipping
};
RefEncoded RefEncode(const float* x, const std::vector<float>& w, const std::vector<float>& b,
                     const std::vector<float>& scale, int d, int d_sae, float s_in, float threshold, int max_active) {
  RefEncoded e;
  e.h.resize(d_sae);
  e.v.resize(d_sae);
  e.active.assign(d_sae, false);
  std::vector<std::pair<double, int>> cand;
  for (int i = 0; i < d_sae; ++i) {
    // Neumaier's compensated sum of the (exact in double) products: small
    // terms survive next to large ones that cancel later.
    double sum = 0, comp = 0;
    for (int c = 0; c < d; ++c) {
      const double t = static_cast<double>(w[static_cast<size_t>(i) * d + c]) * x[c], u = sum + t;
      comp += std::abs(sum) >= std::abs(t) ? (sum - u) + t : (t - u) + sum;
      sum = u;
    }
    const double dot = std::isfinite(sum) ? sum + comp : sum;  // (inf - inf in comp)
    e.h[i] = s_in * dot + b[i];
    e.v[i] = scale.empty() ? e.h[i] : e.h[i] * scale[i];
    e.min_margin = std::min(e.min_margin, std::abs(e.v[i] - threshold));
    if (e.v[i] > threshold) cand.emplace_back(e.v[i], i);
  }
  std::sort(cand.begin(), cand.end(),
            [](auto& p, auto& q) { return p.first != q.first ? p.first > q.first : p.second < q.second; });
  const size_t keep = max_active > 0 ? std::min<size_t>(max_active, cand.size()) : cand.size();
  for (size_t j = 0; j < keep; ++j) e.active[cand[j].second] = true;
  // For TopK SAEs the cut between rank max_active and the next one can flip too.
  if (max_active > 0 && cand.size() > keep) {
    e.min_margin = std::min(e.min_margin, cand[keep - 1].first - cand[keep].first);
  }
  return e;
}

TEST_P(BackendOpsTest, SaeEncodeSelected) {
  for (auto [n, d, d_sae, with_scale, max_active] :
       std::vector<std::tuple<int, int, int, bool, int>>{{1, 8, 16, false, 0},
                                                         {5, 64, 512, false, 0},
                                                         {70, 33, 1000, true, 0},
                                                         {4, 16, 300, false, 5},
                                                         {3, 64, 2048, true, 7}}) {
    const auto x = Random(static_cast<size_t>(n) * d, 81 + n);
    const auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 82), DType::kBF16);
    const auto b = Random(d_sae, 83, 0.5f);
    const auto scale = with_scale ? Random(d_sae, 84) : std::vector<float>();
    // Every 3rd feature in descending order, then a few repeats of the lowest ids: order is the caller's.
    std::vector<int32_t> ids;
    for (int i = d_sae - 1; i >= 0; i -= 3) ids.push_back(i);
    ids.push_back(0);
    if (d_sae > 1) ids.push_back(1);
    const int m = static_cast<int>(ids.size());
    auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae);
    OwnedTensor ts;
    if (with_scale) ts = Upload(scale, 1, d_sae);
    SaeEncoderWeights sae{tw.get(), tb.get(), with_scale ? ts.get() : Tensor(), 1.7f, 0.3f, max_active};
    auto tid = Zeros(1, m, DType::kI32), out = Zeros(n, m);
    ASSERT_TRUE(backend_->CopyFromHost(ids.data(), tid.get()).ok());
    const absl::Status st = backend_->SaeEncodeSelected(tx.get(), sae, tid.get(), out.get());
    ASSERT_TRUE(st.ok()) << st;
    const auto got = Download<float>(out);
    // Both backends compute the values in fp32 from the fp32 activations
    // (CUDA: rescoring, or the exact recompute of the watched features).
    const Tol tol{1e-4, 1e-4};
    // How close a threshold/top-k decision may come to its cut before a flip
    // is legitimate: the fp32 error of a pre-activation, not the output tolerance.
    const double decision_margin = 1e-4;
    int compared = 0;
    for (int t = 0; t < n; ++t) {
      const RefEncoded e =
          RefEncode(x.data() + static_cast<size_t>(t) * d, w, b, scale, d, d_sae, 1.7f, 0.3f, max_active);
      if (e.min_margin < decision_margin) continue;  // a decision within rounding of its cut may legitimately flip
      ++compared;
      for (int j = 0; j < m; ++j) {
        const double want = e.active[ids[j]] ? e.v[ids[j]] : 0.0;
        EXPECT_NEAR(got[static_cast<size_t>(t) * m + j], want, tol.atol + tol.rtol * std::abs(want))
            << "d_sae " << d_sae << " token " << t << " feature " << ids[j];
      }
    }
    EXPECT_GE(compared, (n + 1) / 2) << "too many near-threshold tokens to compare, d_sae " << d_sae;
  }
}

TEST_P(BackendOpsTest, SaeEncodeSelectedRejectsBadFeatureIds) {
  const int d = 4, d_sae = 6;
  auto tx = Upload(Random(2 * d, 85), 2, d), tb = Upload(Random(d_sae, 87), 1, d_sae);
  // The CPU fails the call; CUDA checks the ids on the device and fails the
  // next read-back (reading them back would wait for the queue), also where
  // the call itself waits for the device (a BF16 encoder's first use
  // computes its error bounds).
  for (const auto& [dtype, max_active] :
       std::vector<std::pair<DType, int>>{{DType::kF32, 0}, {DType::kF32, 2}, {DType::kBF16, 0}, {DType::kBF16, 2}}) {
    auto tw = Upload(Random(d_sae * d, 86 + max_active), d_sae, d, dtype);
    const SaeEncoderWeights sae{tw.get(), tb.get(), Tensor(), 1.0f, 0.0f, max_active};
    for (int32_t bad : {-1, d_sae}) {
      const std::vector<int32_t> ids = {0, bad};
      auto tid = Zeros(1, 2, DType::kI32), out = Zeros(2, 2);
      ASSERT_TRUE(backend_->CopyFromHost(ids.data(), tid.get()).ok());
      absl::Status st = backend_->SaeEncodeSelected(tx.get(), sae, tid.get(), out.get());
      if (GetParam() == "cpu") {
        EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad << " " << st;
        continue;
      }
      ASSERT_TRUE(st.ok()) << DTypeName(dtype) << " max_active " << max_active << " bad " << bad << ": " << st;
      std::vector<float> host(4);
      st = backend_->CopyToHost(out.get(), host.data());
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << DTypeName(dtype) << " " << bad << " " << st;
      EXPECT_NE(st.message().find("feature id"), std::string::npos) << st;
      EXPECT_TRUE(backend_->Synchronize().ok());  // reported once, then the backend serves on
    }
  }
}

// y_hat = (sum_{i active} h_i d_i + b_dec) / s_out against a double reference,
// for BF16, F16 and F32 decoders (feature-major: row i is d_i), JumpReLU and
// TopK, with and without feature_scale (which decides activity but never
// scales h_i in the sum); d_sae above a CUDA decode step (256 candidates) and
// d_model above one CUDA pass (4096 columns).
TEST_P(BackendOpsTest, SaeReconstruct) {
  for (auto [n, d, d_sae, with_scale, max_active, dec_type] :
       std::vector<std::tuple<int, int, int, bool, int, DType>>{{1, 8, 16, false, 0, DType::kF32},
                                                                {5, 64, 512, false, 0, DType::kBF16},
                                                                {37, 33, 1000, true, 0, DType::kBF16},
                                                                {4, 16, 300, false, 5, DType::kF32},
                                                                {3, 64, 2048, true, 0, DType::kF16},
                                                                {2, 4500, 40, false, 3, DType::kBF16},
                                                                {2, 4200, 300, false, 0, DType::kF32}}) {
    const float s_in = 1.7f, s_out = 0.6f, threshold = 0.3f;
    // x scaled so h stays O(1) at any d_model (fp32 dot products of h ~ 100 would need a looser tolerance).
    const auto x = Random(static_cast<size_t>(n) * d, 91 + n, std::min(1.0f, 8.0f / std::sqrt(static_cast<float>(d))));
    const auto w = Rounded(Random(static_cast<size_t>(d_sae) * d, 92), DType::kBF16);
    const auto b = Random(d_sae, 93, 0.5f);
    const auto scale = with_scale ? Random(d_sae, 94) : std::vector<float>();
    const auto dec = Rounded(Random(static_cast<size_t>(d_sae) * d, 95), dec_type);  // [d_sae, d]
    const auto b_dec = Random(d, 96, 2.0f);
    auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae),
         tdec = Upload(dec, d_sae, d, dec_type), tbd = Upload(b_dec, 1, d), out = Zeros(n, d);
    OwnedTensor ts;
    if (with_scale) ts = Upload(scale, 1, d_sae);
    SaeEncoderWeights enc{tw.get(), tb.get(), with_scale ? ts.get() : Tensor(), s_in, threshold, max_active};
    SaeDecoderWeights decw{tdec.get(), tbd.get(), s_out};
    const absl::Status st = backend_->SaeReconstruct(tx.get(), enc, decw, out.get());
    ASSERT_TRUE(st.ok()) << st;
    const auto got = Download<float>(out);
    const Tol tol = GetParam() == "cpu" ? Tol{1e-4, 1e-4} : Tol{1e-4, 1e-5};  // CUDA: exact h, fp32 sums
    const double decision_margin = 1e-4;                                      // see SaeEncodeSelected
    std::vector<float> got_rows;
    std::vector<double> ref_rows;
    int n_active = 0;
    for (int t = 0; t < n; ++t) {
      const RefEncoded e =
          RefEncode(x.data() + static_cast<size_t>(t) * d, w, b, scale, d, d_sae, s_in, threshold, max_active);
      if (e.min_margin < decision_margin) continue;
      for (int c = 0; c < d; ++c) {
        double y = b_dec[c];
        for (int i = 0; i < d_sae; ++i) {
          if (e.active[i]) y += e.h[i] * dec[static_cast<size_t>(i) * d + c];
        }
        ref_rows.push_back(y / s_out);
        got_rows.push_back(got[static_cast<size_t>(t) * d + c]);
      }
      for (int i = 0; i < d_sae; ++i) n_active += e.active[i];
    }
    EXPECT_GE(ref_rows.size(), static_cast<size_t>((n + 1) / 2 * d)) << "too many near-threshold tokens";
    EXPECT_GT(n_active, 0) << "the case must exercise the decoder";
    ExpectClose(got_rows, ref_rows, tol, "reconstruct d_sae=" + std::to_string(d_sae));
  }
}

// JumpReLU decisions closer to the threshold than the bf16 rounding of x
// moves them: x = 1 +- 2^-10 rounds to 1, so a plain bf16 encoder GEMM sees
// v = 64 where the exact values are 64 +- 1/16. Row 0's feature 0 is active
// only exactly (64.0625 > 64.0615, bf16: 64; its feature 1 is clearly
// active); row 1's feature 1 only in bf16 (exact 64.0605 < 64.0615, bf16:
// 64.123). CUDA takes the 1-part GEMM and
// recomputes the features within its proven error bound of the threshold.
TEST_P(BackendOpsTest, SaeReconstructDecidesNearTheThresholdExactly) {
  const int d = 64, d_sae = 2;
  std::vector<float> x(2 * d);
  for (int c = 0; c < d; ++c) {
    x[c] = 1.0f + 1.0f / 1024;
    x[d + c] = 1.0f - 1.0f / 1024;
  }
  const std::vector<float> bias = {0.0f, 0.123f};
  const float threshold = 64.0615f;
  std::vector<float> dec(static_cast<size_t>(d_sae) * d);
  for (int c = 0; c < d; ++c) {
    dec[c] = 1.0f;
    dec[d + c] = 2.0f;
  }
  auto tx = Upload(x, 2, d), tw = Upload(std::vector<float>(d_sae * d, 1.0f), d_sae, d, DType::kBF16),
       tb = Upload(bias, 1, d_sae), tdec = Upload(dec, d_sae, d, DType::kBF16), tbd = Zeros(1, d), out = Zeros(2, d);
  const SaeEncoderWeights enc{tw.get(), tb.get(), Tensor(), 1.0f, threshold, 0};
  ASSERT_TRUE(backend_->SaeReconstruct(tx.get(), enc, SaeDecoderWeights{tdec.get(), tbd.get(), 1.0f}, out.get()).ok());
  const auto got = Download<float>(out);
  const double h0 = 64.0625, h1 = 64.0625 + static_cast<double>(bias[1]);  // row 0: both pass
  for (int c = 0; c < d; ++c) {
    ASSERT_NEAR(got[c], h0 * 1.0 + h1 * 2.0, 1e-4) << "row 0 (feature 0 passes only exactly) column " << c;
    ASSERT_EQ(got[d + c], 0.0f) << "row 1 (feature 1 passes only in bf16) column " << c;
  }
}

// A JumpReLU watch list decides below what two bf16 parts of x resolve:
// row 0 is x = 1 + 2^-10 + 2^-20 and row 1 x = 1 + 2^-10 - 2^-20 in all 64
// columns, which a hi + lo split rounds both to 1 + 2^-10 (and one part to
// 1). Every feature weighs all columns by 1; feature 0 has bias 0, feature 1
// bias 2^-14, the threshold is 64.0625 + 2^-15. Exactly, row 0 has both
// active (64.0625 + 2^-14, + 2^-13) and row 1 neither (64.0625 - 2^-14,
// 64.0625); two parts would give row 0 only feature 1 and row 1 feature 1.
TEST_P(BackendOpsTest, SaeEncodeSelectedDecidesNearTheThresholdExactly) {
  const int d = 64, d_sae = 2;
  std::vector<float> x(2 * d);
  for (int c = 0; c < d; ++c) {
    x[c] = 1.0f + 0x1p-10f + 0x1p-20f;
    x[d + c] = 1.0f + 0x1p-10f - 0x1p-20f;
  }
  const float threshold = 64.0625f + 0x1p-15f;
  auto tx = Upload(x, 2, d), tw = Upload(std::vector<float>(d_sae * d, 1.0f), d_sae, d, DType::kBF16),
       tb = Upload({0.0f, 0x1p-14f}, 1, d_sae), tid = UploadI32({1, 0}), out = Zeros(2, 2);
  const SaeEncoderWeights enc{tw.get(), tb.get(), Tensor(), 1.0f, threshold, 0};
  ASSERT_TRUE(backend_->SaeEncodeSelected(tx.get(), enc, tid.get(), out.get()).ok());
  const auto got = Download<float>(out);  // [row][watched: feature 1, feature 0]
  EXPECT_EQ(got[0], 64.0625f + 0x1p-13f) << "row 0, feature 1";
  EXPECT_EQ(got[1], 64.0625f + 0x1p-14f) << "row 0, feature 0 (active only exactly)";
  EXPECT_EQ(got[2], 0.0f) << "row 1, feature 1 (active with two bf16 parts)";
  EXPECT_EQ(got[3], 0.0f) << "row 1, feature 0";
}

// Activations at the ends of the fp32 range follow IEEE arithmetic on every
// backend. Rows:
//   0-2: +inf, NaN, -inf in column 0: each w_i . x is +-inf or NaN (0 * inf),
//        a NaN value is never active, +inf values tie (the lower indices win);
//   3:   FLT_MAX in column 0: finite values (1.7 * 0.5 * FLT_MAX) whose sums
//        in the fp32 reconstruction overflow;
//   4:   -1.5 * 2^126 in columns 4-7, 0.75 * 2^126 in columns 20-23 and
//        36-39, all weighed by 1: they cancel exactly where columns j, j + 16
//        and j + 32 are added first (both backends' exact dot products; the
//        float64 reference sums with compensation), but a GEMM that adds
//        blocks of 16 columns into an fp32 accumulator (tensor cores, and the
//        CPU emulator's cuBLAS) overflows to -inf in the first block;
//   5:   finite, sharing their chunk.
// Feature i weighs column 0 by +0.5, -0.5 or 0 as i % 3; the decoder rows are
// positive, so a reconstruction from infinite h is +inf, and from no active
// feature the decoder bias. (CUDA's error bound for its bf16 GEMM does not
// hold on rows 0-4, so they must take its exact path, and a bf16 operand for
// FLT_MAX must not round to inf.)
TEST_P(BackendOpsTest, SaeOpsFollowIeeeAtTheEndsOfTheRange) {
  const int n = 6, d = 48, d_sae = 300, k = 10;
  const float s_in = 1.7f, s_out = 0.6f, threshold = 0.3f;
  std::vector<float> x = Random(static_cast<size_t>(n) * d, 101);
  x[0] = std::numeric_limits<float>::infinity();
  x[d] = std::numeric_limits<float>::quiet_NaN();
  x[2 * d] = -std::numeric_limits<float>::infinity();
  x[3 * d] = std::numeric_limits<float>::max();
  for (int c = 4; c < 8; ++c) {
    x[4 * d + c] = -std::ldexp(1.5f, 126);
    x[4 * d + 16 + c] = x[4 * d + 32 + c] = std::ldexp(0.75f, 126);
  }
  std::vector<float> w = Rounded(Random(static_cast<size_t>(d_sae) * d, 102), DType::kBF16);
  for (int i = 0; i < d_sae; ++i) {
    float* wi = w.data() + static_cast<size_t>(i) * d;
    wi[0] = i % 3 == 0 ? 0.5f : i % 3 == 1 ? -0.5f : 0.0f;
    for (int c = 4; c < 8; ++c) wi[c] = wi[16 + c] = wi[32 + c] = 1.0f;
  }
  const auto b = Random(d_sae, 103, 0.5f);
  std::vector<float> dec = Random(static_cast<size_t>(d_sae) * d, 104);
  for (float& v : dec) v = std::abs(v) + 0.125f;
  dec = Rounded(dec, DType::kBF16);
  const auto b_dec = Random(d, 105);
  auto tx = Upload(x, n, d), tw = Upload(w, d_sae, d, DType::kBF16), tb = Upload(b, 1, d_sae),
       tdec = Upload(dec, d_sae, d, DType::kBF16), tbd = Upload(b_dec, 1, d);
  std::vector<int32_t> ids(d_sae);
  for (int i = 0; i < d_sae; ++i) ids[i] = i;
  auto tid = UploadI32(ids);
  // Equal, both NaN, or (finite) within tol.
  auto same = [](double got, double want, Tol tol) {
    if (std::isnan(want)) return std::isnan(got);
    if (std::isinf(want)) return got == want;
    return std::abs(got - want) <= tol.atol + tol.rtol * std::abs(want);
  };
  const Tol tol = GetParam() == "cpu" ? Tol{1e-4, 1e-4} : Tol{2e-3, 1e-3};
  for (const int max_active : {0, k}) {
    const std::string what = max_active > 0 ? "topk sae" : "jumprelu sae";
    const SaeEncoderWeights enc{tw.get(), tb.get(), Tensor(), s_in, threshold, max_active};
    auto idx = Zeros(n, k, DType::kI32), val = Zeros(n, k), sel = Zeros(n, d_sae), out = Zeros(n, d);
    ASSERT_TRUE(backend_->SaeEncodeTopK(tx.get(), enc, k, idx.get(), val.get()).ok()) << what;
    ASSERT_TRUE(backend_->SaeEncodeSelected(tx.get(), enc, tid.get(), sel.get()).ok()) << what;
    ASSERT_TRUE(
        backend_->SaeReconstruct(tx.get(), enc, SaeDecoderWeights{tdec.get(), tbd.get(), s_out}, out.get()).ok())
        << what;
    const auto got_i = Download<int32_t>(idx);
    const auto got_v = Download<float>(val);
    const auto got_sel = Download<float>(sel);
    const auto got_out = Download<float>(out);
    for (int t = 0; t < n; ++t) {
      const RefEncoded e =
          RefEncode(x.data() + static_cast<size_t>(t) * d, w, b, {}, d, d_sae, s_in, threshold, max_active);
      const std::string row = what + " row " + std::to_string(t);
      if (t == n - 1) {
        ASSERT_GE(e.min_margin, 1e-3) << row << ": the finite row must decide clearly";
      }
      std::vector<std::pair<double, int>> act;
      for (int i = 0; i < d_sae; ++i) {
        if (e.active[i]) act.emplace_back(e.v[i], i);
      }
      std::sort(act.begin(), act.end(),
                [](auto& p, auto& q) { return p.first != q.first ? p.first > q.first : p.second < q.second; });
      if (t == 0) {
        ASSERT_EQ(act.size(), static_cast<size_t>(max_active > 0 ? k : d_sae / 3)) << row;
      }
      if (t == 1) {
        ASSERT_TRUE(act.empty()) << row;
      }
      for (int j = 0; j < k; ++j) {
        const size_t at = static_cast<size_t>(t) * k + j;
        const int want_i = static_cast<size_t>(j) < act.size() ? act[j].second : -1;
        EXPECT_EQ(got_i[at], want_i) << row << " top-k slot " << j;
        EXPECT_TRUE(same(got_v[at], want_i >= 0 ? act[j].first : 0.0, tol))
            << row << " top-k slot " << j << " got " << got_v[at];
      }
      for (int i = 0; i < d_sae; ++i) {
        const float g = got_sel[static_cast<size_t>(t) * d_sae + i];
        EXPECT_TRUE(same(g, e.active[i] ? e.v[i] : 0.0, tol))
            << row << " selected feature " << i << " got " << g << " want " << (e.active[i] ? e.v[i] : 0.0);
      }
      for (int c = 0; c < d; ++c) {
        double y = b_dec[c];
        for (int i = 0; i < d_sae; ++i) {
          if (e.active[i]) y += e.h[i] * dec[static_cast<size_t>(i) * d + c];
        }
        const float g = got_out[static_cast<size_t>(t) * d + c];
        EXPECT_TRUE(same(g, static_cast<float>(y / s_out), tol))
            << row << " reconstruction column " << c << " got " << g << " want " << y / s_out;
      }
    }
  }
}

TEST_P(BackendOpsTest, RelativeSquaredError) {
  const int n = 6, d = 129;
  auto y = Random(static_cast<size_t>(n) * d, 97, 3.0f), y_hat = Random(static_cast<size_t>(n) * d, 98, 3.0f);
  // Row 1: perfect; row 2: predicts zero (error 1); rows 4/5: zero target with zero / nonzero y_hat.
  for (int c = 0; c < d; ++c) {
    y_hat[1 * d + c] = y[1 * d + c];
    y_hat[2 * d + c] = 0.0f;
    y[4 * d + c] = 0.0f;
    y_hat[4 * d + c] = 0.0f;
    y[5 * d + c] = 0.0f;
  }
  auto ty = Upload(y, n, d), ty_hat = Upload(y_hat, n, d), out = Zeros(n, 1);
  const absl::Status st = backend_->RelativeSquaredError(ty_hat.get(), ty.get(), out.get());
  ASSERT_TRUE(st.ok()) << st;
  const auto got = Download<float>(out);
  std::vector<double> ref;
  for (int t = 0; t < 4; ++t) {
    double num = 0, den = 0;
    for (int c = 0; c < d; ++c) {
      const double diff = static_cast<double>(y[t * d + c]) - y_hat[t * d + c];
      num += diff * diff;
      den += static_cast<double>(y[t * d + c]) * y[t * d + c];
    }
    ref.push_back(num / den);
  }
  ExpectClose(std::vector<float>(got.begin(), got.begin() + 4), ref, {1e-6, 1e-5}, "relative squared error");
  EXPECT_EQ(got[1], 0.0f);
  EXPECT_NEAR(got[2], 1.0f, 1e-6f);
  EXPECT_EQ(got[4], 0.0f) << "0/0 is a perfect reconstruction of a zero target";
  EXPECT_TRUE(std::isinf(got[5]) && got[5] > 0) << got[5];
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BackendOpsTest, ::testing::Values("cpu", "cuda"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace sae
