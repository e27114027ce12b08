// Benchmark of the CUDA backend on Llama-3.1-8B shapes with random bf16
// weights (nothing to download), through the same Backend ops the engine uses:
//   * the 7 forward GEMMs per layer: time, TFLOP/s, % of the bf16 dense peak
//     (target: >= 60% at 8k-token batches);
//   * the attention kernels (bf16 tensor cores, the default; fp32 CUDA cores);
//   * the forward pass (embed + L layers) for early exit at L = 8, 16, 32:
//     tokens/s and MFU, and the latency of one 32-token request;
//   * SAE encode + top-k for 8x (d_sae 32768) and 32x (d_sae 131072) SAEs,
//     as a share of the forward time (target: < 10%).
// Usage: sae-bench-cuda [--tokens=8192] [--seq_len=1024] [--iters=5]
//                       [--layers=8,16,32] [--k=50] [--peak_tflops=X] [--no_sae]
// The last lines are "RESULT key=value", one figure each, for scripts.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "core/backend.h"
#include "core/llama_config.h"
#include "core/llama_model.h"

#ifdef SAE_BENCH_HAVE_CUDART
#include <cuda_runtime_api.h>
#endif

namespace sae {
namespace {

struct Options {
  int tokens = 8192;
  int seq_len = 1024;
  int iters = 5;
  std::vector<int> layers = {8, 16, 32};
  int k = 50;
  double peak_tflops = 0;  // 0: from the device
  bool sae = true;
};

bool Usage(const char* argv0, const std::string& why) {
  std::fprintf(stderr,
               "%s: %s\nusage: %s [--tokens=8192] [--seq_len=1024] [--iters=5] [--layers=8,16,32] [--k=50] "
               "[--peak_tflops=X] [--no_sae]\n",
               argv0, why.c_str(), argv0);
  return false;
}

bool ParseFlags(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      const size_t n = std::strlen(name);
      return a.compare(0, n, name) == 0 && a.size() > n && a[n] == '=' ? a.c_str() + n + 1 : nullptr;
    };
    if (const char* v = value("--tokens")) {
      o->tokens = std::atoi(v);
    } else if (const char* v = value("--seq_len")) {
      o->seq_len = std::atoi(v);
    } else if (const char* v = value("--iters")) {
      o->iters = std::max(1, std::atoi(v));
    } else if (const char* v = value("--k")) {
      o->k = std::atoi(v);
    } else if (const char* v = value("--peak_tflops")) {
      o->peak_tflops = std::atof(v);
    } else if (const char* v = value("--layers")) {
      o->layers.clear();
      for (absl::string_view s : absl::StrSplit(v, ',')) o->layers.push_back(std::atoi(std::string(s).c_str()));
    } else if (a == "--no_sae") {
      o->sae = false;
    } else {
      return Usage(argv[0], absl::StrCat("unknown argument ", a));
    }
  }
  for (int l : o->layers) {
    if (l < 1 || l > 32) return Usage(argv[0], absl::StrCat("--layers: ", l, " is outside 1..32"));
  }
  if (o->tokens <= 0 || o->seq_len <= 0 || o->layers.empty() || o->k <= 0) {
    return Usage(argv[0], "--tokens, --seq_len, --k and --layers must be positive");
  }
  return true;
}

// Llama-3.1-8B.
LlamaConfig Llama8B() {
  LlamaConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.max_position_embeddings = 131072;
  c.rope_scaling = RopeScaling{"llama3", 8.0, 1.0, 4.0, 8192};
  return c;
}

struct Device {
  std::string name = "unknown";
  double peak_tflops = 0;
  std::string peak_source;
};

// bf16 dense tensor-core peak (fp32 accumulate), from NVIDIA's datasheets
// (half the "with sparsity" figure). A device not listed has no peak, so no
// % of peak or MFU, unless --peak_tflops gives one: an estimate from SMs and
// clocks is wrong by 2x or more on as many cards as it is right.
Device QueryDevice(double override_tflops) {
  Device d;
#ifdef SAE_BENCH_HAVE_CUDART
  cudaDeviceProp p;
  int dev = 0;
  if (const char* e = std::getenv("SAE_CUDA_DEVICE")) dev = std::atoi(e);
  if (cudaGetDeviceProperties(&p, dev) == cudaSuccess) {
    d.name = absl::StrCat(p.name, " (sm_", p.major, p.minor, ", ", p.multiProcessorCount, " SMs)");
    const std::string n = p.name;
    auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
    if ((has("H100") || has("H200")) && has("NVL")) {
      d.peak_tflops = 835.5;  // H100 NVL, H200 NVL
    } else if ((has("H100") || has("H800")) && has("PCIe")) {
      d.peak_tflops = 756.5;
    } else if (has("H100") || has("H200") || has("H800") || has("GH200")) {
      d.peak_tflops = 989.4;  // SXM
    } else if (has("A100") || has("A800")) {
      d.peak_tflops = 312.0;
    } else if (has("L40S")) {
      d.peak_tflops = 362.1;
    }
    if (d.peak_tflops > 0) d.peak_source = "datasheet";
  }
#endif
  if (override_tflops > 0) {
    d.peak_tflops = override_tflops;
    d.peak_source = "--peak_tflops";
  }
  return d;
}

// Mean seconds per call of fn over `iters` calls, after warm-up calls for at
// least 50 ms (cuBLAS heuristics, allocator, attribute setup, and clocks: an
// idle GPU sits at a fraction of its boost clock).
double Seconds(const std::function<absl::Status()>& fn, Backend* b, int iters, absl::Status* status) {
  const auto w0 = std::chrono::steady_clock::now();
  do {
    *status = fn();
    if (status->ok()) *status = b->Synchronize();
  } while (status->ok() && std::chrono::steady_clock::now() - w0 < std::chrono::milliseconds(50));
  if (!status->ok()) return 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters && status->ok(); ++i) *status = fn();
  if (status->ok()) *status = b->Synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

int Run(const Options& o) {
  auto backend_or = CreateBackend("cuda");
  if (!backend_or.ok()) {
    std::printf(
        "sae-bench-cuda: no CUDA backend, nothing measured.\n  %s\n"
        "This benchmark needs an NVIDIA GPU (sm_80 or newer) and libsae_cuda.so (built when nvcc is found;\n"
        "set SAE_CUDA_BACKEND_LIB to its path if it is not found automatically).\n",
        backend_or.status().ToString().c_str());
    return 2;
  }
  std::unique_ptr<Backend> backend = *std::move(backend_or);
  Backend* b = backend.get();
  const LlamaConfig c = Llama8B();
  const int64_t d = c.hidden_size, ffn = c.intermediate_size, hd = c.head_dim;
  const int64_t q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
  const int64_t n = o.tokens;
  const int max_layers = *std::max_element(o.layers.begin(), o.layers.end());
  const Device dev = QueryDevice(o.peak_tflops);
  const double peak = dev.peak_tflops * 1e12;

  std::printf("== sae-server CUDA benchmark: Llama-3.1-8B shapes, random bf16 weights ==\n");
  std::printf("device: %s\n", dev.name.c_str());
  if (peak > 0) {
    std::printf("bf16 dense peak: %.1f TFLOP/s (%s)\n", dev.peak_tflops, dev.peak_source.c_str());
  } else {
    std::printf("bf16 dense peak: unknown (pass --peak_tflops=X for %% of peak / MFU)\n");
  }

  // Packed batch: sequences of seq_len tokens (the last one shorter).
  PackedBatch batch;
  std::mt19937 rng(1234);
  for (int64_t t0 = 0; t0 < n; t0 += o.seq_len) {
    std::vector<int32_t> seq(static_cast<size_t>(std::min<int64_t>(o.seq_len, n - t0)));
    for (int32_t& id : seq) id = static_cast<int32_t>(rng() % c.vocab_size);
    batch.Append(seq);
  }
  const std::vector<int32_t>& starts = batch.seq_starts;
  const int n_seqs = batch.n_seqs();
  const int max_len = std::min<int>(o.seq_len, static_cast<int>(n));
  double attn_pairs = 0;  // sum over sequences of len * (len + 1) / 2 (causal query-key pairs)
  for (int s = 0; s < n_seqs; ++s) {
    const double len = starts[s + 1] - starts[s];
    attn_pairs += len * (len + 1) / 2;
  }
  std::printf("batch: %lld tokens = %d packed sequences of <= %d tokens\n", static_cast<long long>(n), n_seqs, max_len);

  // Random weights, std ~0.02 like a trained model; one host buffer, sliced.
  std::printf("uploading %d layers of random weights...\n", max_layers);
  std::fflush(stdout);
  const size_t host_elems = static_cast<size_t>(c.vocab_size) * d;
  std::vector<uint16_t> host(host_elems);
  {
    uint32_t s = 0x9e3779b9u;
    for (auto& v : host) {
      s ^= s << 13;
      s ^= s >> 17;
      s ^= s << 5;
      v = F32ToBf16((static_cast<float>(s >> 8) / 16777216.0f - 0.5f) * 0.07f);
    }
  }
  std::vector<float> ones(ffn, 1.0f);
  // The model the server runs (LlamaModel), its weights from here instead of
  // safetensors: norms of ones, matrices sliced from `host` at a per-name offset.
  auto random_weight = [&](const std::string& name, const std::vector<int64_t>& shape,
                           DType dtype) -> absl::StatusOr<OwnedTensor> {
    HostTensor h;
    h.shape = shape;
    if (shape.size() == 1) {
      h.data = ones.data();
      h.dtype = DType::kF32;
    } else {
      const size_t elems = static_cast<size_t>(shape[0] * shape[1]);
      const size_t off = (std::hash<std::string>()(name) % 1000003) * 64 % (host_elems - elems + 1);
      h.data = host.data() + off;
      h.dtype = DType::kBF16;
    }
    return b->Upload(h, dtype);
  };
  auto fail = [](const absl::Status& s) {
    std::printf("FAILED: %s\n", s.ToString().c_str());
    return 1;
  };
#define BENCH_ASSIGN(lhs, expr)                       \
  auto lhs##_or = (expr);                             \
  if (!lhs##_or.ok()) return fail(lhs##_or.status()); \
  auto lhs = *std::move(lhs##_or)

  BENCH_ASSIGN(model, LlamaModel::Build(c, b, max_layers, DType::kBF16, random_weight));
  // Device memory: the weights alone, then (below) the pool's high-water mark
  // after the largest forward pass, which it keeps reserved (no release threshold).
  auto print_memory = [&](const char* when) {
    const MemoryUsage m = b->Memory();
    const double gib = 1024.0 * 1024.0 * 1024.0;
    std::printf("device memory %s: %.2f GiB in tensors, %.2f GiB reserved, %.2f of %.2f GiB free\n", when,
                m.tensors / gib, m.reserved / gib, m.device_free / gib, m.device_total / gib);
  };
  print_memory("with the weights");
  host.clear();
  host.shrink_to_fit();
  // Buffers for the ops timed alone (the forward allocates its own).
  BENCH_ASSIGN(t_starts, b->Alloc(DType::kI32, n_seqs + 1, 1));
  // GEMM inputs in the dtype the forward keeps them in (BF16 on the GPU by default).
  const DType gin = b->gemm_input_dtype();
  BENCH_ASSIGN(h, b->Alloc(gin, n, d));
  BENCH_ASSIGN(h_f32, b->Alloc(DType::kF32, n, d));  // the SAE input (hooks are F32)
  BENCH_ASSIGN(q, b->Alloc(DType::kF32, n, q_dim));
  BENCH_ASSIGN(k, b->Alloc(DType::kF32, n, kv_dim));
  BENCH_ASSIGN(v, b->Alloc(DType::kF32, n, kv_dim));
  BENCH_ASSIGN(attn, b->Alloc(gin, n, q_dim));
  BENCH_ASSIGN(proj, b->Alloc(DType::kF32, n, d));
  BENCH_ASSIGN(gate, b->Alloc(DType::kF32, n, ffn));
  BENCH_ASSIGN(up, b->Alloc(DType::kF32, n, ffn));
  BENCH_ASSIGN(act, b->Alloc(gin, n, ffn));
  BENCH_ASSIGN(resid, b->Alloc(DType::kF32, n, d));  // what o_proj / down_proj add into
  // Random inputs, unit variance: tensor cores draw less power on zeros (the
  // fresh buffers' contents) and would run faster than on real activations.
  auto fill_random = [&](const Tensor& t, uint32_t seed) -> absl::Status {
    uint32_t s = seed;
    auto next = [&s] {
      s ^= s << 13;
      s ^= s >> 17;
      s ^= s << 5;
      return (static_cast<float>(s >> 8) / 16777216.0f - 0.5f) * 3.4641f;  // uniform, variance 1
    };
    const size_t count = static_cast<size_t>(t.numel());
    if (t.dtype == DType::kBF16) {
      std::vector<uint16_t> v(count);
      for (auto& e : v) e = F32ToBf16(next());
      return b->CopyFromHost(v.data(), t);
    }
    std::vector<float> v(count);
    for (auto& e : v) e = next();
    return b->CopyFromHost(v.data(), t);
  };
  uint32_t seed = 0x2545f491u;
  for (const Tensor* t : {&h.get(), &q.get(), &k.get(), &v.get(), &attn.get(), &act.get(), &resid.get()}) {
    if (absl::Status s = fill_random(*t, seed += 0x9e3779b9u); !s.ok()) return fail(s);
  }
  if (absl::Status s = b->CopyFromHost(starts.data(), t_starts.get()); !s.ok()) return fail(s);
  if (absl::Status s = b->Synchronize(); !s.ok()) return fail(s);

  // The forward pass exactly as the engine runs it (token upload included),
  // stopping after layer n_layers - 1, where on_hook sees the residual stream.
  const float eps = static_cast<float>(c.rms_norm_eps);
  auto forward = [&](int n_layers, const HookFn& on_hook) -> absl::Status {
    return model->Forward(batch, {HookPoint{n_layers - 1, HookSite::kResid}}, on_hook);
  };
  const HookFn no_hook = [](const HookPoint&, const Tensor&) { return absl::OkStatus(); };
  const double gemm_params = static_cast<double>(q_dim * d + 2 * kv_dim * d + d * q_dim + 3 * ffn * d);
  const double gemm_flops_layer = 2.0 * n * gemm_params;
  const double attn_flops_layer = 4.0 * hd * c.num_attention_heads * attn_pairs;  // QK^T + PV, causal
  auto pct = [&](double flops, double sec) { return peak > 0 ? 100.0 * flops / sec / peak : 0.0; };
  absl::Status st;
  std::vector<std::string> results;  // "key=value", printed last
  auto result = [&](const std::string& key, double value) {
    results.push_back(absl::StrFormat("%s=%.4g", key, value));
  };
  results.push_back(absl::StrCat("device=\"", dev.name, "\""));
  result("peak_tflops", dev.peak_tflops);
  result("tokens", static_cast<double>(n));

  // Clocks up before the first figure: half a second of the largest GEMM.
  {
    const LlamaModel::Layer& L = model->layer(0);
    const auto c0 = std::chrono::steady_clock::now();
    while (st.ok() && std::chrono::steady_clock::now() - c0 < std::chrono::milliseconds(500)) {
      st = b->MatMul(h.get(), L.w_gate.get(), gate.get());
      if (st.ok()) st = b->Synchronize();
    }
    if (!st.ok()) return fail(st);
  }

  // ---- forward GEMMs ----
  std::printf(
      "\n-- forward GEMMs: bf16 x bf16 -> fp32 accumulate (cuBLAS), %lld tokens --\n"
      "   (each row repeats layer 0's weight, which may stay in L2: the chain of all layers is the figure to quote)\n",
      static_cast<long long>(n));
  struct Gemm {
    const char* name;
    const Tensor* in;
    const OwnedTensor* w;
    const Tensor* out;
  };
  const LlamaModel::Layer& L0 = model->layer(0);
  const std::vector<Gemm> gemms = {{"q_proj", &h.get(), &L0.wq, &q.get()},
                                   {"k_proj", &h.get(), &L0.wk, &k.get()},
                                   {"v_proj", &h.get(), &L0.wv, &v.get()},
                                   {"o_proj", &attn.get(), &L0.wo, &proj.get()},
                                   {"gate_proj", &h.get(), &L0.w_gate, &gate.get()},
                                   {"up_proj", &h.get(), &L0.w_up, &up.get()},
                                   {"down_proj", &act.get(), &L0.w_down, &proj.get()}};
  for (const Gemm& g : gemms) {
    const double sec = Seconds([&] { return b->MatMul(*g.in, g.w->get(), *g.out); }, b, 4 * o.iters, &st);
    if (!st.ok()) return fail(st);
    const double flops = 2.0 * n * (*g.w)->rows * (*g.w)->cols;
    std::printf("  %-9s [%lld x %lld] . [%lld x %lld]^T  %8.3f ms  %7.1f TFLOP/s  %5.1f%% of peak\n", g.name,
                static_cast<long long>(n), static_cast<long long>((*g.w)->cols), static_cast<long long>((*g.w)->rows),
                static_cast<long long>((*g.w)->cols), sec * 1e3, flops / sec / 1e12, pct(flops, sec));
  }
  const double gemm_sec = Seconds(
      [&]() -> absl::Status {
        for (int l = 0; l < max_layers; ++l) {
          const LlamaModel::Layer& L = model->layer(l);
          RETURN_IF_ERROR(b->MatMulShared(h.get(), {L.wq.get(), L.wk.get(), L.wv.get()}, {q.get(), k.get(), v.get()}));
          RETURN_IF_ERROR(b->MatMulAdd(attn.get(), L.wo.get(), resid.get()));
          RETURN_IF_ERROR(b->MatMulShared(h.get(), {L.w_gate.get(), L.w_up.get()}, {gate.get(), up.get()}));
          RETURN_IF_ERROR(b->MatMulAdd(act.get(), L.w_down.get(), resid.get()));
        }
        return absl::OkStatus();
      },
      b, o.iters, &st);
  if (!st.ok()) return fail(st);
  const double gemm_pct = pct(gemm_flops_layer * max_layers, gemm_sec);
  std::printf(
      "  all 7 x %d GEMMs as the forward runs them (%s): %.2f ms  %.1f TFLOP/s  %.1f%% of peak  "
      "[target >= 60%%: %s]\n",
      max_layers,
      gin == DType::kBF16 ? "bf16 inputs as the ops before them write them; o/down add into the residual"
                          : "F32 inputs rounded to bf16 first; o/down add into the residual",
      gemm_sec * 1e3, gemm_flops_layer * max_layers / gemm_sec / 1e12, gemm_pct,
      peak > 0 ? (gemm_pct >= 60 ? "PASS" : "FAIL") : "n/a");
  result("gemm_tflops", gemm_flops_layer * max_layers / gemm_sec / 1e12);
  if (peak > 0) result("gemm_pct_of_peak", gemm_pct);

  // ---- attention alone: both kernels (SAE_CUDA_ATTENTION picks one per call) ----
  double attn_mma_sec = 0;
  std::printf("\n-- attention (packed causal, GQA 32/8, head_dim 128), one layer --\n");
  for (const char* kernel : {"mma", "fp32"}) {
    setenv("SAE_CUDA_ATTENTION", kernel, 1);
    const double attn_sec = Seconds(
        [&] {
          return b->Attention(q.get(), k.get(), v.get(), t_starts.get(), n_seqs, max_len, c.num_attention_heads,
                              c.num_key_value_heads, static_cast<int>(hd), attn.get());
        },
        b, o.iters, &st);
    if (!st.ok()) return fail(st);
    std::printf("  %-4s %-40s %8.3f ms  %6.1f TFLOP/s  (%.1f%% of the bf16 peak)\n", kernel,
                std::strcmp(kernel, "mma") == 0 ? "(bf16 tensor cores, the default)" : "(fp32 CUDA cores, exact mode)",
                attn_sec * 1e3, attn_flops_layer / attn_sec / 1e12, pct(attn_flops_layer, attn_sec));
    result(absl::StrCat("attention_", kernel, "_ms_per_layer"), attn_sec * 1e3);
    if (std::strcmp(kernel, "mma") == 0) attn_mma_sec = attn_sec;
  }
  unsetenv("SAE_CUDA_ATTENTION");

  // ---- forward with early exit ----
  std::printf("\n-- forward pass (embed + L layers; all ops, hooks excluded) --\n");
  std::vector<std::pair<int, double>> fwd;
  for (int nl : o.layers) {
    const double sec = Seconds([&] { return forward(nl, no_hook); }, b, o.iters, &st);
    if (!st.ok()) return fail(st);
    const double flops = nl * (gemm_flops_layer + attn_flops_layer);
    std::printf("  early exit at layer %2d: %8.2f ms  %9.0f tokens/s  MFU %5.1f%%  (%.1f TFLOP/s)\n", nl, sec * 1e3,
                n / sec, pct(flops, sec), flops / sec / 1e12);
    fwd.emplace_back(nl, sec);
    result(absl::StrCat("forward_L", nl, "_ms"), sec * 1e3);
    result(absl::StrCat("forward_L", nl, "_tokens_per_s"), n / sec);
    if (peak > 0) result(absl::StrCat("forward_L", nl, "_mfu_pct"), pct(flops, sec));
  }

  // A lone short request: the latency floor, where launch overheads and
  // partly filled GEMM tiles dominate rather than throughput.
  {
    PackedBatch small;
    small.Append(std::vector<int32_t>(batch.ids.begin(), batch.ids.begin() + std::min<int64_t>(32, n)));
    for (int nl : o.layers) {
      const double sec = Seconds(
          [&] {
            return model->Forward(small, {HookPoint{nl - 1, HookSite::kResid}}, no_hook);
          },
          b, o.iters, &st);
      if (!st.ok()) return fail(st);
      std::printf("  one %lld-token request, exit at layer %2d: %8.2f ms\n", static_cast<long long>(small.n_tokens()),
                  nl, sec * 1e3);
      result(absl::StrCat("request_", small.n_tokens(), "_tokens_L", nl, "_ms"), sec * 1e3);
    }
  }

  // ---- the rest of a layer, each op alone ----
  // What a layer spends beside its GEMMs and attention: the memory-bound ops,
  // timed alone on this batch, with the bytes each must move at least (so the
  // bandwidth it reaches), and what is left of the deepest forward's time per
  // layer after the GEMMs, attention (its bf16 K/V pass included) and these.
  {
    std::printf("\n-- the rest of a layer, each op alone (%lld tokens) --\n", static_cast<long long>(n));
    BENCH_ASSIGN(pos, b->Alloc(DType::kI32, n, 1));
    if (absl::Status s = b->CopyFromHost(batch.positions.data(), pos.get()); !s.ok()) return fail(s);
    const LlamaModel::Layer& L = model->layer(0);
    const double f32 = 4.0, gin_bytes = gin == DType::kBF16 ? 2.0 : 4.0;
    struct Op {
      const char* name;
      int per_layer;  // calls per layer
      double bytes;   // moved per call, at least
      std::function<absl::Status()> run;
    };
    const std::vector<Op> ops = {
        {"rmsnorm", 2, n * d * (f32 + gin_bytes),
         [&] { return b->RmsNorm(resid.get(), L.input_norm.get(), eps, h.get()); }},
        {"rope_q", 1, 2.0 * n * q_dim * f32,
         [&] { return b->Rope(q.get(), pos.get(), model->inv_freq().get(), static_cast<int>(hd)); }},
        {"rope_k", 1, 2.0 * n * kv_dim * f32,
         [&] { return b->Rope(k.get(), pos.get(), model->inv_freq().get(), static_cast<int>(hd)); }},
        {"silu_mul", 1, n * ffn * (2 * f32 + gin_bytes), [&] { return b->SiluMul(gate.get(), up.get(), act.get()); }},
    };
    double rest_sec = 0;
    for (const Op& op : ops) {
      const double sec = Seconds(op.run, b, 4 * o.iters, &st);
      if (!st.ok()) return fail(st);
      rest_sec += op.per_layer * sec;
      std::printf("  %-9s x%d per layer  %8.3f ms each  %7.0f GB/s\n", op.name, op.per_layer, sec * 1e3,
                  op.bytes / sec / 1e9);
      result(absl::StrCat(op.name, "_ms"), sec * 1e3);
    }
    const std::pair<int, double> deepest = *std::max_element(fwd.begin(), fwd.end());
    const double layer_sec = deepest.second / deepest.first;
    const double left = layer_sec - gemm_sec / max_layers - attn_mma_sec - rest_sec;
    std::printf(
        "  per layer of the %d-layer forward: %.3f ms = GEMMs %.3f + attention %.3f + these ops %.3f + the rest %.3f "
        "(embedding, launch gaps, timing noise)\n",
        deepest.first, layer_sec * 1e3, gemm_sec / max_layers * 1e3, attn_mma_sec * 1e3, rest_sec * 1e3, left * 1e3);
    result("other_ops_ms_per_layer", rest_sec * 1e3);
    result("unattributed_ms_per_layer", left * 1e3);
  }

  print_memory(absl::StrCat("after the forward passes (", n, " tokens)").c_str());

  // ---- SAE encode + top-k ----
  if (o.sae) {
    std::printf("\n-- SAE encode + top-k (k=%d) over %lld tokens of d_model 4096 --\n", o.k, static_cast<long long>(n));
    // Input: RMS-normalised activations; encoder rows scaled so w.x ~ N(0, 1).
    BENCH_ASSIGN(sae_out_idx, b->Alloc(DType::kI32, n, o.k));
    BENCH_ASSIGN(sae_out_val, b->Alloc(DType::kF32, n, o.k));
    absl::Status captured = forward(max_layers, [&](const HookPoint&, const Tensor& resid) {
      return b->RmsNorm(resid, Tensor(), eps, h_f32.get());
    });
    if (!captured.ok()) return fail(captured);
    const float a = std::sqrt(3.0f / 4096.0f);  // uniform(-a, a) has variance 1/4096
    std::vector<uint16_t> enc_host(static_cast<size_t>(131072) * d);
    {
      uint32_t s = 0x12345678u;
      for (auto& e : enc_host) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        e = F32ToBf16((static_cast<float>(s >> 8) / 16777216.0f - 0.5f) * 2.0f * a);
      }
    }
    for (auto [label, d_sae] : std::vector<std::pair<const char*, int64_t>>{{"8x", 32768}, {"32x", 131072}}) {
      HostTensor eh;
      eh.data = enc_host.data();
      eh.dtype = DType::kBF16;
      eh.shape = {d_sae, d};
      BENCH_ASSIGN(enc, b->Upload(eh, DType::kBF16));
      std::vector<float> bias(d_sae, 0.0f);
      BENCH_ASSIGN(tb, b->Alloc(DType::kF32, 1, d_sae));
      if (absl::Status s = b->CopyFromHost(bias.data(), tb.get()); !s.ok()) return fail(s);
      // JumpReLU with ~0.1-0.2% active (like Llama Scope), and TopK-style (half active).
      for (auto [mode, threshold] : std::vector<std::pair<const char*, float>>{{"jumprelu", 3.0f}, {"topk", 0.0f}}) {
        SaeEncoderWeights w{enc.get(), tb.get(), Tensor(), 1.0f, threshold, 0};
        for (int split : {0, 1, 2}) {  // 0: rescoring (the default)
          setenv("SAE_CUDA_SAE_SPLIT", std::to_string(split).c_str(), 1);
          const double sec =
              Seconds([&] { return b->SaeEncodeTopK(h_f32.get(), w, o.k, sae_out_idx.get(), sae_out_val.get()); }, b,
                      o.iters, &st);
          if (!st.ok()) return fail(st);
          const double flops = 2.0 * std::max(split, 1) * n * d_sae * d;  // the encoder GEMM(s)
          std::string shares;
          double share_full = 0;
          for (auto [nl, fsec] : fwd) {
            absl::StrAppend(&shares, " ", nl, ":", absl::StrFormat("%.1f%%", 100 * sec / fsec));
            if (nl == 32) share_full = 100 * sec / fsec;
          }
          const std::string how = split == 0 ? "rescore (default)" : absl::StrCat("split=", split);
          std::printf("  %-3s d_sae %6lld %-8s %-17s %7.2f ms  %6.1f TFLOP/s  share of forward at L ->%s", label,
                      static_cast<long long>(d_sae), mode, how.c_str(), sec * 1e3, flops / sec / 1e12, shares.c_str());
          if (split == 0 && share_full > 0) {  // the target is for the default path
            std::printf("  [target < 10%% of the 32-layer forward: %s]", share_full < 10 ? "PASS" : "FAIL");
          }
          std::printf("\n");
          if (split == 0) {
            const std::string key = absl::StrCat("sae_", label, "_", mode);
            result(key + "_ms", sec * 1e3);
            for (auto [nl, fsec] : fwd) result(absl::StrCat(key, "_share_L", nl, "_pct"), 100 * sec / fsec);
            // One more run, counting the rows the error bound could not
            // settle (recomputed over all d_sae features: the slow path).
            BENCH_ASSIGN(before, b->SaeExactRows());
            st = b->SaeEncodeTopK(h_f32.get(), w, o.k, sae_out_idx.get(), sae_out_val.get());
            if (!st.ok()) return fail(st);
            BENCH_ASSIGN(after, b->SaeExactRows());
            const double pct = 100.0 * static_cast<double>(after - before) / static_cast<double>(n);
            std::printf(
                "      rows recomputed over every feature (the bound could not settle them): %lld of %lld "
                "(%.2f%%)\n",
                static_cast<long long>(after - before), static_cast<long long>(n), pct);
            result(key + "_exact_rows_pct", pct);
          }
        }
      }
      unsetenv("SAE_CUDA_SAE_SPLIT");
      {  // Reconstruction (JumpReLU, ~0.1-0.2% active): the encode, then the sparse decode of the active rows.
        BENCH_ASSIGN(dec, b->Upload(eh, DType::kBF16));  // [d_sae, d]: random rows stand in for the directions
        BENCH_ASSIGN(tbd, b->Alloc(DType::kF32, 1, d));
        BENCH_ASSIGN(y_hat, b->Alloc(DType::kF32, n, d));
        const std::vector<float> b_dec(d, 0.0f);
        if (absl::Status s = b->CopyFromHost(b_dec.data(), tbd.get()); !s.ok()) return fail(s);
        const SaeEncoderWeights w{enc.get(), tb.get(), Tensor(), 1.0f, 3.0f, 0};
        const SaeDecoderWeights dw{dec.get(), tbd.get(), 1.0f};
        const double sec = Seconds([&] { return b->SaeReconstruct(h_f32.get(), w, dw, y_hat.get()); }, b, o.iters, &st);
        if (!st.ok()) return fail(st);
        std::printf("  %-3s d_sae %6lld jumprelu reconstruction (encode + sparse decode) %7.2f ms\n", label,
                    static_cast<long long>(d_sae), sec * 1e3);
        result(absl::StrCat("sae_", label, "_jumprelu_reconstruction_ms"), sec * 1e3);
      }
    }
    std::printf(
        "  (rescore = one bf16 GEMM, candidates rescored from fp32 activations: exact top-k; split = bf16 parts\n"
        "   of the activations: 1 = plain bf16 GEMM, near-ties may swap; 2 = hi+lo, twice the GEMM;\n"
        "   a JumpReLU reconstruction is one bf16 GEMM, the features near the threshold recomputed exactly,\n"
        "   then a decode of the active features' decoder rows only)\n");
  }
  std::printf(
      "\n(SAE share = SAE encode + top-k device time / forward time at that depth; the hook's copy and the\n"
      " read-back of k pairs per token are not in it. At shallow exits an SAE is a larger share by design.)\n");
  std::printf("\n");
  for (const std::string& r : results) std::printf("RESULT %s\n", r.c_str());
  std::printf("done.\n");
  return 0;
}

}  // namespace
}  // namespace sae

int main(int argc, char** argv) {
  // Line-buffered, so a crash or a timeout kill loses no figure already printed to a file.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  sae::Options o;
  if (!sae::ParseFlags(argc, argv, &o)) return 1;
  return sae::Run(o);
}
