// CPU reference backend: every op in fp32 (activations, accumulation; the latent cache in fp32 or, as on a
// GPU, in BF16 widened to fp32 on read). FP8 and BF16 weights
// are read in place from the mapped checkpoint and dequantised row by row inside the compute loops; the
// model is never copied in dequantised form. Work is split over a thread pool by output rows or heads.
// Every output element is computed in an order that does not depend on the batch or the thread count, so
// a sequence's results are bitwise the same alone or batched.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend/scratch_arena.h"
#include "core/dtype.h"
#include "core/memory.h"
#include "core/status.h"
#include "core/thread_pool.h"

namespace dsrt {
namespace {

using cpu::axpy;
using cpu::dot;
using cpu::thread_scratch;

// KV bytes that the live CPU pools of this process may still allocate: a pool promises its whole size at
// kv_init and hands the promise back page by page as it allocates (from then on the page shows in the
// system's free memory) and when it is freed. available_memory() subtracts it, so engines sized by
// kv_memory_fraction share the memory instead of each being given the same free bytes.
std::atomic<int64_t> g_kv_bytes_promised{0};

class CpuBackend final : public ArenaBackend {
 public:
  explicit CpuBackend(const BackendOptions &opt)
      : ArenaBackend(
            Device::host(),
            [](size_t n) {
              void *p = fault::alloc_should_fail() ? nullptr : mi_malloc_aligned(n, 64);
              if (!p) fail(DSRT_ERR_OUT_OF_MEMORY, "CPU backend: cannot allocate " + std::to_string(n) + " bytes of scratch");
              return p;
            },
            [](void *p) { mi_free(p); }, size_t(64) << 20, 64),
        pool_(opt.n_threads),
        fp8_activations_(opt.fp8_activations) {}
  ~CpuBackend() override {
    for (void *p : pages_) mi_free(p);
    g_kv_bytes_promised.fetch_sub(kv_promised_);
  }
  const char *name() const override { return "cpu"; }
  DType default_kv_dtype() const override { return DType::F32; }
  size_t available_memory() const override {
    const long pages = sysconf(_SC_AVPHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || size <= 0) return 0;
    const int64_t free_bytes = int64_t(pages) * int64_t(size), promised = g_kv_bytes_promised.load();
    return free_bytes > promised ? size_t(free_bytes - promised) : 1;  // 1: known, and less than a page
  }

  // ---- profiling
  void set_profiling(bool on) override {
    profiling_ = on;
    clear_op_times();
  }
  std::vector<OpTime> op_times() override { return sorted_op_times(); }
  struct Timed {
    CpuBackend *b;
    const char *op;
    const Weight *w;
    std::chrono::steady_clock::time_point t0;
    ~Timed() {
      if (!b) return;
      b->timing_ = false;
      b->add_op_time(w ? op_label_of_weight(w->name()) : op,
                     std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  };
  // Ops called inside an op (the experts' linears) count towards the outer one only.
  Timed timed(const char *op, const Weight *w) {
    if (!profiling_ || timing_) return {nullptr, op, w, {}};
    timing_ = true;
    return {this, op, w, std::chrono::steady_clock::now()};
  }
  bool profiling_ = false, timing_ = false;


  void kv_init(const KvCacheSpec &spec) override {
    if (spec.dtype != DType::F32 && spec.dtype != DType::BF16)
      failf(DSRT_ERR_UNSUPPORTED, "CPU backend: latent KV cache in ", dtype_name(spec.dtype), " (F32 or BF16 only)");
    for (void *p : pages_) mi_free(p);
    kv_ = spec;
    pages_.assign(size_t(spec.max_pages), nullptr);
    const int64_t promise = spec.max_pages * int64_t(kv_.page_bytes());
    g_kv_bytes_promised.fetch_add(promise - kv_promised_);
    kv_promised_ = promise;
  }

  // Pages are allocated on first use, so a large pool costs only what the sessions touch. Called only from
  // the thread running the step (the engine runs one step at a time), never from pool workers.
  char *page(int32_t idx) {
    if (idx < 0 || size_t(idx) >= pages_.size()) failf(DSRT_ERR_INTERNAL, "KV page ", idx, " out of range");
    void *&p = pages_[size_t(idx)];
    if (!p) {
      p = fault::alloc_should_fail() ? nullptr : mi_zalloc_aligned(kv_.page_bytes(), 64);
      if (!p) fail(DSRT_ERR_OUT_OF_MEMORY, "CPU backend: cannot allocate a KV page");
      const int64_t bytes = int64_t(kv_.page_bytes());
      kv_promised_ -= bytes;
      g_kv_bytes_promised.fetch_sub(bytes);
    }
    return static_cast<char *>(p);
  }
  int64_t kv_promised_ = 0;  // this pool's part of g_kv_bytes_promised
  bool kv_bf16() const { return kv_.dtype == DType::BF16; }
  // The cache entry (width values in the pool's dtype) of position pos in cache layer `layer`, given the
  // sequence's page table.
  char *kv_entry(const int32_t *pages, int64_t layer, int64_t pos) {
    return page(pages[pos / kPageTokens]) +
           size_t((layer * kPageTokens + pos % kPageTokens) * kv_.width) * dtype_size(kv_.dtype);
  }
  char *kv_slot(const Batch &b, const SeqSlice &s, int64_t layer, int64_t pos) {
    if (pos / kPageTokens >= s.n_pages) failf(DSRT_ERR_INTERNAL, "position ", pos, " beyond the sequence's page table");
    return kv_entry(b.pages_of(s), layer, pos);
  }
  // n values of a cache entry from fp32 (rounded to nearest even in a BF16 pool) and back to fp32.
  void kv_store(char *e, const float *src, int64_t n) const {
    if (kv_bf16()) {
      uint16_t *d = reinterpret_cast<uint16_t *>(e);
      for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
      std::memcpy(e, src, size_t(n) * sizeof(float));
    }
  }
  void kv_load(const char *e, float *dst, int64_t n) const {
    if (kv_bf16()) {
      const uint16_t *v = reinterpret_cast<const uint16_t *>(e);
      for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(v[i]);
    } else {
      std::memcpy(dst, e, size_t(n) * sizeof(float));
    }
  }

  void kv_copy_page(int32_t src, int32_t dst) override { std::memcpy(page(dst), page(src), kv_.page_bytes()); }

  void kv_read(const int32_t *pages, int64_t n, float *dst) override {
    for (int64_t pos = 0; pos < n; pos++)
      for (int64_t l = 0; l < kv_.n_layers; l++, dst += kv_.width) kv_load(kv_entry(pages, l, pos), dst, kv_.width);
  }
  void kv_write(const int32_t *pages, int64_t n, const float *src) override {
    for (int64_t pos = 0; pos < n; pos++)
      for (int64_t l = 0; l < kv_.n_layers; l++, src += kv_.width) kv_store(kv_entry(pages, l, pos), src, kv_.width);
  }

  void embed(const Weight &table, const Batch &b, Tensor out) override {
    const auto timer_ = timed("embed", nullptr);
    pool_.parallel_for(b.n_tokens(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) table.dequant_row(b.tokens[size_t(t)], 0, out.cols, out.f32() + t * out.cols);
    });
  }

  void rms_norm(Tensor x, const Weight &w, float eps, Tensor out) override {
    const auto timer_ = timed("rms_norm", nullptr);
    const int64_t n = x.cols;
    pool_.parallel_for(x.rows, 4, [&](int64_t r0, int64_t r1) {
      float *wv = thread_scratch(size_t(n));
      for (int64_t i = 0; i < n; i++) wv[i] = w.at(i);
      for (int64_t r = r0; r < r1; r++) {
        const float *xr = x.f32() + r * n;
        float *yr = out.f32() + r * n;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) ss += double(xr[i]) * double(xr[i]);
        const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * inv * wv[i];
      }
    });
  }

  // out[t, n] = sum_k x[t, k] W[n, k] (cpu_kernels.h).
  void linear(Tensor x, const Weight &w, Tensor out) override {
    const auto timer_ = timed("linear", &w);
    check_device(x, "linear");
    check_device(out, "linear");
    if (x.cols != w.cols || out.cols != w.rows || out.rows != x.rows)
      failf(DSRT_ERR_INTERNAL, "linear ", w.name(), ": shapes x[", x.rows, ",", x.cols, "] W[", w.rows, ",", w.cols,
            "] out[", out.rows, ",", out.cols, "]");
    multiply(gemm_input(x, x.rows, w), w, out);
  }

  // Under FP8 precision a linear of many rows takes the activations its weight's tensor-core GEMM takes on the
  // GPU: FP8 for FP8 weights (fp8_input), bf16 (nearest even) for BF16 weights (the lm_head).
  Tensor gemm_input(Tensor x, int64_t step_rows, const Weight &w) {
    if (!fp8_activations_ || step_rows < kFp8ActivationMinRows || w.dtype != DType::BF16) return fp8_input(x, step_rows, w);
    Tensor q = alloc(x.rows, x.cols);
    for (int64_t i = 0; i < x.rows * x.cols; i++) q.f32()[i] = bf16_to_f32(f32_to_bf16(x.f32()[i]));
    return q;
  }

  // x itself, or x rounded to FP8 activations when a GEMM of `step_rows` rows with weight w quantises them
  // on the GPU (BackendOptions::fp8_activations, kFp8ActivationMinRows).
  Tensor fp8_input(Tensor x, int64_t step_rows, const Weight &w) {
    if (!cpu::takes_fp8_activations(fp8_activations_, step_rows, w)) return x;
    Tensor q = alloc(x.rows, x.cols);
    const int64_t K = x.cols;
    pool_.parallel_for(x.rows, 1, [&](int64_t a, int64_t b) { cpu::round_rows_to_fp8(x.f32() + a * K, b - a, K, q.f32() + a * K); });
    return q;
  }

  // cpu_kernels.cpp, rows split over the threads: FP8 in blocks of 16 rows, BF16/F32 in tiles of 8.
  void multiply(Tensor x, const Weight &w, Tensor out) {
    const int64_t rows = w.dtype == DType::F8_E4M3 ? 16 : 8;
    pool_.parallel_for((w.rows + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
      cpu::matmul_rows(w, x.f32(), x.rows, x.cols, out.f32(), out.cols, b0 * rows, std::min(w.rows, b1 * rows));
    });
  }

  void add(Tensor x, Tensor y) override {
    const auto timer_ = timed("add", nullptr);
    const int64_t n = x.rows * x.cols;
    pool_.parallel_for(n, 1 << 14, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; i++) x.f32()[i] += y.f32()[i];
    });
  }

  void silu_mul(Tensor gate, Tensor up, Tensor out) override {
    const auto timer_ = timed("silu_mul", nullptr);
    const int64_t n = gate.rows * gate.cols;
    pool_.parallel_for(n, 1 << 14, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; i++) {
        out.f32()[i] = cpu::silu_mul(gate.f32()[i], up.f32()[i]);
      }
    });
  }

  static void rope_vec(float *v, int64_t pos, const RopeTable &rt) {
    const int64_t half = int64_t(rt.inv_freq.size());
    for (int64_t i = 0; i < half; i++) {
      // The angle is formed in fp32 as the references do; cos/sin in double, rounded once.
      const float angle = float(pos) * rt.inv_freq[size_t(i)];
      const float c = float(std::cos(double(angle))) * rt.attn_factor;
      const float s = float(std::sin(double(angle))) * rt.attn_factor;
      const float x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * c - x1 * s;
      v[2 * i + 1] = x0 * s + x1 * c;
    }
  }

  void rope(Tensor x, int64_t n_heads, int64_t head_dim, int64_t rope_off, const RopeTable &rt,
            const Batch &b) override {
    const auto timer_ = timed("rope", nullptr);
    pool_.parallel_for(x.rows, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++)
        for (int64_t h = 0; h < n_heads; h++)
          rope_vec(x.f32() + t * x.cols + h * head_dim + rope_off, b.positions[size_t(t)], rt);
    });
  }

  void mla_cache_write(int64_t layer, Tensor kv, const Weight &kv_norm, float eps, const RopeTable &rt,
                       const Batch &b) override {
    const auto timer_ = timed("mla_cache_write", nullptr);
    const int64_t dc = kv_norm.rows, dr = kv.cols - dc;
    float *dst = thread_scratch(size_t(kv.cols));  // the entry in fp32, then stored in the pool's dtype
    for (const SeqSlice &s : b.seqs) {
      for (int32_t i = 0; i < s.n_new; i++) {
        const float *src = kv.f32() + int64_t(s.row0 + i) * kv.cols;
        double ss = 0.0;
        for (int64_t j = 0; j < dc; j++) ss += double(src[j]) * double(src[j]);
        const float inv = float(1.0 / std::sqrt(ss / double(dc) + double(eps)));
        for (int64_t j = 0; j < dc; j++) dst[j] = src[j] * inv * kv_norm.at(j);
        std::memcpy(dst + dc, src + dc, size_t(dr) * sizeof(float));
        rope_vec(dst + dc, s.n_past + i, rt);
        kv_store(kv_slot(b, s, layer, s.n_past + i), dst, kv.cols);
      }
    }
  }

  void mla_attention(int64_t layer, Tensor q, const Weight &kv_b, const MlaDims &d, const Batch &b, AttnForm form,
                     Tensor out) override {
    const auto timer_ = timed("mla_attention", nullptr);
    for (const SeqSlice &s : b.seqs) {
      if (form == AttnForm::Naive)
        attention_naive(layer, q, kv_b, d, b, s, out);
      else
        attention_absorbed(layer, q, kv_b, d, b, s, out);
    }
  }

  // Spec §3.8: decompress every cached c_kv through kv_b into per-head k_nope and v, then MHA.
  void attention_naive(int64_t layer, Tensor q, const Weight &kv_b, const MlaDims &d, const Batch &b, const SeqSlice &s,
                       Tensor out) {
    const int64_t n_ctx = s.n_past + s.n_new, qk = d.nope + d.rope, kvw = d.nope + d.v;
    Tensor lat = alloc(n_ctx, d.latent), kpe = alloc(n_ctx, d.rope), kvd = alloc(n_ctx, d.n_heads * kvw);
    float *e = thread_scratch(size_t(kv_.width));
    for (int64_t j = 0; j < n_ctx; j++) {
      kv_load(kv_slot(b, s, layer, j), e, kv_.width);
      std::memcpy(lat.f32() + j * d.latent, e, size_t(d.latent) * sizeof(float));
      std::memcpy(kpe.f32() + j * d.rope, e + d.latent, size_t(d.rope) * sizeof(float));
    }
    multiply(fp8_input(lat, n_ctx, kv_b), kv_b, kvd);  // [n_ctx, nh*(dn+dv)] (FP8 activations as on the GPU): head h = [k_nope (dn) ; v (dv)]
    pool_.parallel_for(int64_t(s.n_new) * d.n_heads, 1, [&](int64_t a, int64_t bnd) {
      float *p = thread_scratch(size_t(n_ctx), 1);
      for (int64_t w = a; w < bnd; w++) {
        const int64_t i = w / d.n_heads, h = w % d.n_heads, row = s.row0 + i, pos = s.n_past + i;
        const float *qh = q.f32() + row * q.cols + h * qk;
        float mx = -INFINITY;
        for (int64_t j = 0; j <= pos; j++) {
          const float *kh = kvd.f32() + j * kvd.cols + h * kvw;
          float sc = dot(qh, kh, d.nope) + dot(qh + d.nope, kpe.f32() + j * d.rope, d.rope);
          p[j] = sc * d.softmax_scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= pos; j++) sum += (p[j] = std::exp(p[j] - mx));
        const float inv = float(1.0 / sum);
        float *o = out.f32() + row * out.cols + h * d.v;
        std::fill(o, o + d.v, 0.0f);
        for (int64_t j = 0; j <= pos; j++) axpy(p[j] * inv, kvd.f32() + j * kvd.cols + h * kvw + d.nope, o, d.v);
      }
    });
  }

  // Spec §3.9: W_UK folded into the query, W_UV applied after the weighted sum of latents.
  void attention_absorbed(int64_t layer, Tensor q, const Weight &kv_b, const MlaDims &d, const Batch &b,
                          const SeqSlice &s, Tensor out) {
    const int64_t n_ctx = s.n_past + s.n_new, qk = d.nope + d.rope, kvw = d.nope + d.v;
    // The sequence's cache entries as fp32: in place in an F32 pool, widened once into scratch from BF16.
    std::vector<const float *> ent(static_cast<size_t>(n_ctx));
    Tensor wide = kv_bf16() ? alloc(n_ctx, kv_.width) : Tensor{};
    for (int64_t j = 0; j < n_ctx; j++) {
      char *e = kv_slot(b, s, layer, j);
      if (kv_bf16()) {
        kv_load(e, wide.f32() + j * kv_.width, kv_.width);
        ent[size_t(j)] = wide.f32() + j * kv_.width;
      } else {
        ent[size_t(j)] = reinterpret_cast<const float *>(e);
      }
    }
    pool_.parallel_for(int64_t(s.n_new) * d.n_heads, 1, [&](int64_t a, int64_t bnd) {
      float *p = thread_scratch(size_t(n_ctx), 1);
      float *work = thread_scratch(size_t(3 * d.latent), 2);
      float *qlat = work, *olat = work + d.latent, *row = work + 2 * d.latent;
      for (int64_t w = a; w < bnd; w++) {
        const int64_t i = w / d.n_heads, h = w % d.n_heads, r = s.row0 + i, pos = s.n_past + i;
        const float *qh = q.f32() + r * q.cols + h * qk;
        std::fill(qlat, qlat + d.latent, 0.0f);
        for (int64_t k = 0; k < d.nope; k++) {  // q_lat = W_UK[h]^T q_nope
          kv_b.dequant_row(h * kvw + k, 0, d.latent, row);
          axpy(qh[k], row, qlat, d.latent);
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j <= pos; j++) {
          const float *e = ent[size_t(j)];
          p[j] = (dot(qlat, e, d.latent) + dot(qh + d.nope, e + d.latent, d.rope)) * d.softmax_scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= pos; j++) sum += (p[j] = std::exp(p[j] - mx));
        const float inv = float(1.0 / sum);
        std::fill(olat, olat + d.latent, 0.0f);
        for (int64_t j = 0; j <= pos; j++) axpy(p[j] * inv, ent[size_t(j)], olat, d.latent);
        float *o = out.f32() + r * out.cols + h * d.v;
        for (int64_t k = 0; k < d.v; k++) {  // o = W_UV[h] o_lat
          kv_b.dequant_row(h * kvw + d.nope + k, 0, d.latent, row);
          o[k] = dot(row, olat, d.latent);
        }
      }
    });
  }

  void moe_route(Tensor x, const Weight &gate, const Weight &bias, const RouterParams &p, Tensor ids,
                 Tensor weights) override {
    const auto timer_ = timed("moe_route", nullptr);
    const int64_t E = p.n_experts, T = x.rows;
    Tensor logits = alloc(T, E);
    multiply(x, gate, logits);  // fp32 router logits
    pool_.parallel_for(T, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> s(static_cast<size_t>(E)), u(static_cast<size_t>(E));
      for (int64_t t = t0; t < t1; t++) {
        route_one(logits.f32() + t * E, bias, p, s.data(), u.data(), ids.i32() + t * p.top_k,
                  weights.f32() + t * p.top_k);
      }
    });
  }

  // Spec §4 for one token. s: scores, u: selection scores (scratch of E floats each).
  static void route_one(const float *logit, const Weight &bias, const RouterParams &p, float *s, float *u,
                        int32_t *ids, float *w) {
    const int64_t E = p.n_experts;
    if (p.scoring == ScoringFunc::Sigmoid) {
      for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + std::exp(-logit[e]));
    } else {
      float mx = -INFINITY;
      for (int64_t e = 0; e < E; e++) mx = std::max(mx, logit[e]);
      double sum = 0.0;
      for (int64_t e = 0; e < E; e++) sum += (s[e] = std::exp(logit[e] - mx));
      for (int64_t e = 0; e < E; e++) s[e] = float(s[e] / sum);
    }
    for (int64_t e = 0; e < E; e++) u[e] = s[e] + (bias ? bias.at(e) : 0.0f);
    if (p.n_group > 1 && p.method != TopkMethod::Greedy) {
      const int64_t per = E / p.n_group;
      std::vector<std::pair<float, int64_t>> gs(size_t(p.n_group));
      for (int64_t g = 0; g < p.n_group; g++) {
        const float *ug = u + g * per;
        float score;
        if (p.method == TopkMethod::NoauxTc) {  // sum of the two largest biased scores
          float a = -INFINITY, b2 = -INFINITY;
          for (int64_t e = 0; e < per; e++) {
            if (ug[e] > a) {
              b2 = a;
              a = ug[e];
            } else if (ug[e] > b2) {
              b2 = ug[e];
            }
          }
          score = per >= 2 ? a + b2 : a;
        } else {  // group_limited_greedy: the group's best score
          score = *std::max_element(ug, ug + per);
        }
        gs[size_t(g)] = {score, g};
      }
      // Keep topk_group groups: highest score first, ties to the lower group index.
      std::stable_sort(gs.begin(), gs.end(), [](auto &a, auto &b) { return a.first > b.first; });
      for (int64_t r = p.topk_group; r < p.n_group; r++) {
        float *ug = u + gs[size_t(r)].second * per;
        std::fill(ug, ug + per, -INFINITY);
      }
    }
    // Top-k over u, ties to the lower expert index.
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; e++) order[size_t(e)] = int32_t(e);
    std::partial_sort(order.begin(), order.begin() + p.top_k, order.end(), [&](int32_t a, int32_t b) {
      return u[a] > u[b] || (u[a] == u[b] && a < b);
    });
    double sum = 0.0;
    for (int64_t k = 0; k < p.top_k; k++) {
      ids[k] = order[size_t(k)];
      w[k] = s[order[size_t(k)]];  // unbiased score
      sum += w[k];
    }
    for (int64_t k = 0; k < p.top_k; k++) {
      float v = w[k];
      if (p.norm_topk_prob) v = float(v / (sum + 1e-20));
      w[k] = v * p.routed_scaling_factor;
    }
  }

  // Tokens are grouped by expert; each expert's SwiGLU runs once over its tokens (weights read once), and a
  // token's output adds its experts in ascending expert order, independent of the batch.
  void moe_experts(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights,
                   Tensor out) override {
    const auto timer_ = timed("moe_experts", nullptr);
    const int64_t T = x.rows, K = ids.cols, H = x.cols;
    std::vector<std::vector<std::pair<int32_t, float>>> by_expert(experts.size());
    for (int64_t t = 0; t < T; t++)
      for (int64_t k = 0; k < K; k++) {
        int32_t e = ids.i32()[t * K + k];
        if (e < 0 || size_t(e) >= experts.size()) failf(DSRT_ERR_INTERNAL, "router chose expert ", e);
        by_expert[size_t(e)].push_back({int32_t(t), weights.f32()[t * K + k]});
      }
    std::fill(out.f32(), out.f32() + T * H, 0.0f);
    // FP8 activations follow the step's token count, as on the GPU, whatever rows each expert gets.
    const Weight *any = nullptr;
    for (const FfnWeights &f : experts)
      if (f.gate) any = &f.gate;
    const Tensor xin = any ? fp8_input(x, T, *any) : x;
    for (size_t e = 0; e < experts.size(); e++) {
      auto &toks = by_expert[e];
      if (toks.empty() || !experts[e].gate) continue;  // absent: another rank's expert (Mapping)
      const int64_t n = int64_t(toks.size()), inter = experts[e].gate.rows;
      Tensor xe = alloc(n, H), g = alloc(n, inter), u = alloc(n, inter), y = alloc(n, H);
      for (int64_t i = 0; i < n; i++)
        std::memcpy(xe.f32() + i * H, xin.f32() + int64_t(toks[size_t(i)].first) * H, size_t(H) * sizeof(float));
      multiply(xe, experts[e].gate, g);
      multiply(xe, experts[e].up, u);
      silu_mul(g, u, g);
      multiply(fp8_input(g, T, experts[e].down), experts[e].down, y);
      for (int64_t i = 0; i < n; i++)
        axpy(toks[size_t(i)].second, y.f32() + i * H, out.f32() + int64_t(toks[size_t(i)].first) * H, H);
    }
  }

  bool moe_takes_fp8(const std::vector<FfnWeights> &experts, int64_t rows, int64_t) const override {
    for (const FfnWeights &f : experts)  // (moe_experts asks any present expert's gate: they share dtype and shape)
      if (f.gate) return cpu::takes_fp8_activations(fp8_activations_, rows, f.gate);
    return false;
  }
  void quantize_fp8_rows(Tensor x, Tensor q, Tensor scales) override {
    check_fp8_rows(x, q, scales);
    cpu::quantize_rows_to_fp8(x.f32(), x.rows, x.cols, static_cast<uint8_t *>(q.data), scales.f32());
  }
  void dequantize_fp8_rows(Tensor q, Tensor scales, Tensor out) override {
    check_fp8_rows(out, q, scales);
    cpu::dequantize_fp8_rows(static_cast<const uint8_t *>(q.data), scales.f32(), out.rows, out.cols, out.f32());
  }

  void gather_rows(Tensor x, const std::vector<int32_t> &rows, Tensor out) override {
    const auto timer_ = timed("gather_rows", nullptr);
    for (size_t i = 0; i < rows.size(); i++)
      std::memcpy(out.f32() + int64_t(i) * out.cols, x.f32() + int64_t(rows[i]) * x.cols, size_t(x.cols) * sizeof(float));
  }

  void to_host(Tensor t, float *dst) override {
    std::memcpy(dst, t.data, size_t(t.rows * t.cols) * dtype_size(t.dtype));
  }
  void from_host(Tensor t, const void *src) override {
    std::memcpy(t.data, src, size_t(t.rows * t.cols) * dtype_size(t.dtype));
  }

 private:
  ThreadPool pool_;
  const bool fp8_activations_;
  KvCacheSpec kv_;
  std::vector<void *> pages_;  // each kv_.page_bytes(), allocated on first use
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions &opt) { return std::make_unique<CpuBackend>(opt); }

}  // namespace dsrt
