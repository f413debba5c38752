// Host side of the CUDA backend: device memory (weights uploaded in their checkpoint dtype on first use,
// a scratch arena, the paged latent KV pool), per-step batch metadata, and the launches of kernels/.
// Every op matches the CPU backend's contract (backend.h); tests/gpu compares them op by op. Launches go
// through a LaunchRecorder (launch_recorder.h): a step's launches between host syncs are replayed from a
// CUDA graph when the same segment ran before. Two pairs of ops are fused on the way: a residual add
// followed by the RMSNorm of its sum, and the gate and up projections followed by their SiLU-mul.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <unordered_map>

#include "backend/backend.h"
#include "core/log.h"
#include "core/memory.h"
#include "backend/cpu/host_bandwidth.h"
#include "backend/cpu/host_experts.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/expert_cache.h"
#include "backend/offload_cost.h"
#include "core/thread_pool.h"
#include "backend/cuda/fp8_gemm.h"
#include "backend/cuda/launch_recorder.h"
#include "backend/scratch_arena.h"
#include "core/status.h"
#include "engine/sampler.h"
#include "kernels.h"

namespace dsrt {
namespace {

namespace k = dsrt::kernels;


int32_t dev_dtype(DType t) {
  switch (t) {
    case DType::F8_E4M3: return k::kFP8;
    case DType::BF16: return k::kBF16;
    case DType::F16: return k::kF16;
    default: return k::kF32;
  }
}

// The model's copies of its weights on one GPU: uploaded once, under the mutex, by whichever backend first
// needs a weight; each backend keeps the handles it got (CudaBackend::by_id_) and reads those without locking.
class CudaWeights final : public DeviceWeights {
 public:
  explicit CudaWeights(int device) : device_(device) {}
  ~CudaWeights() override {
    cudaSetDevice(device_);
    for (auto &[id, m] : by_id_) {
      if (!in_host_.count(id)) cudaFree(const_cast<void *>(m.data));
      cudaFree(const_cast<float *>(m.scale));
    }
    for (auto &[key, m] : parts_) {
      cudaFree(const_cast<void *>(m.data));
      cudaFree(const_cast<float *>(m.scale));
    }
    for (auto [a, b] : registered_) cudaHostUnregister(reinterpret_cast<void *>(a));
    for (void *p : copied_) cudaFreeHost(p);
  }
  size_t bytes() const override {
    std::lock_guard lk(mu_);
    return bytes_;
  }
  mutable std::mutex mu_;
  std::map<int32_t, k::DevMatrix> by_id_;
  // Parts of tensors (a tensor-parallel rank's shard, model/shard.h), each a contiguous copy of its own: keyed
  // by the tensor's id and the part's first row, first column, rows and columns. Ranks sharing a GPU (tests)
  // share the parts they have in common.
  using PartKey = std::tuple<int32_t, int64_t, int64_t, int64_t, int64_t>;
  static PartKey part_key(const Weight &w) { return {w.id, w.row0, w.col0, w.rows, w.cols}; }
  static PartKey key(const Weight &w) { return w.is_whole() ? PartKey{w.id, -1, -1, -1, -1} : part_key(w); }
  std::map<PartKey, k::DevMatrix> parts_;
  bool has(const Weight &w) const { return w.is_whole() ? by_id_.count(w.id) > 0 : parts_.count(part_key(w)) > 0; }
  size_t bytes_ = 0;
  // Expert offload: the ids whose bytes stay in host memory only (by_id_ holds their device-visible address;
  // their block scales are on the device); host_ the device-visible host address of every mapped expert
  // matrix (with its device scales), including those also on the device (the GPU expert cache's slots may
  // give them up); the page ranges registered for that [first, last) and pinned copies of unaligned tensors.
  std::set<int32_t> in_host_;
  std::map<int32_t, k::DevMatrix> host_;
  std::vector<std::pair<uintptr_t, uintptr_t>> registered_;
  std::vector<void *> copied_;
  size_t host_bytes_ = 0, copied_bytes_ = 0;
  // The backend (CudaBackend::serial_) whose expert caches own the slots (the device copies of experts in
  // host_ too): one per model and device, for good (a slot holds whatever its owner left there); the model's
  // other engines read those experts from host memory.
  uint64_t cache_owner_ = 0;

 private:
  int device_;
};

class CudaBackend final : public ArenaBackend {
 public:
  explicit CudaBackend(const BackendOptions &opt)
      : ArenaBackend(
            Device::cuda(opt.device),
            [](size_t n) {
              void *p = nullptr;
              cuda_check(cudaMalloc(&p, n), "scratch arena");
              return p;
            },
            [](void *p) { cudaFree(p); }, size_t(256) << 20, 256),
        gemv_{opt.gemv_k_split, opt.gemv_rows_per_warp},
        experts_compute_(opt.experts_compute),
        n_threads_(opt.n_threads) {
    cuda_check(cudaSetDevice(opt.device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    rec_ = std::make_unique<LaunchRecorder>(stream_);
    const char *graphs = std::getenv("DSRT_CUDA_GRAPHS");
    rec_->set_graphs(opt.cuda_graphs && !(graphs && std::string(graphs) == "0"));
    cuda_check(cudaEventCreate(&step_ev_[0]), "cudaEventCreate");
    cuda_check(cudaEventCreate(&step_ev_[1]), "cudaEventCreate");
    if (opt.fp8_activations) gemm_ = std::make_unique<Fp8Gemm>(stream_);
    cuda_check(cudaDeviceGetAttribute(&n_sm_, cudaDevAttrMultiProcessorCount, opt.device), "SM count");
  }
  ~CudaBackend() override {
    cudaSetDevice(device().index);  // (the destroying thread may be bound to another rank's GPU)
    try {
      flush();
    } catch (...) {  // a failing launch at teardown: nothing left to report it to
    }
    cudaStreamSynchronize(stream_);
    rec_.reset();
    meta_.reset();
    cudaEventDestroy(step_ev_[0]);
    cudaEventDestroy(step_ev_[1]);
    for (auto &[_, m] : weights_) {
      cudaFree(const_cast<void *>(m.data));
      cudaFree(const_cast<float *>(m.scale));
    }
    expert_caches_.clear();
    cudaFree(cache_stats_);
    cudaFreeHost(cache_stats_host_);
    for (auto &[_, t] : expert_tables_) cudaFree(t.dev);
    for (auto &[a, b] : events_) {
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
    gemm_.reset();
    cudaFree(kv_.base);
    cudaFree(flash_ws_);
    cudaStreamDestroy(stream_);
  }
  const char *name() const override { return "cuda"; }
  DType default_kv_dtype() const override { return DType::BF16; }

  // A step's work is queued without host syncs; the next step (or a read to the host) waits for it, so the
  // scratch arena and the pinned staging buffer are reused only once the GPU is done with them.
  void begin_step() override {
    bind_device();
    sync();
    if (gemm_) gemm_->release();
    collect_op_times();
    if (step_started_) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, step_ev_[0], step_ev_[1]) == cudaSuccess) counters_.device_seconds += ms * 1e-3;
      cudaGetLastError();
      step_started_ = false;
    }
    if (cache_stats_host_) {
      counters_.expert_hits = cache_stats_host_[k::kCacheHits];
      counters_.expert_misses = cache_stats_host_[k::kCacheMisses];
      counters_.expert_bytes_copied = cache_stats_host_[k::kCacheCopiedBytes];
      counters_.expert_bytes_read_in_host = cache_stats_host_[k::kCacheHostReadBytes];
    }
    meta_->reset();
    flash_plans_.clear();
    ArenaBackend::begin_step();
  }
  BackendCounters counters() const override {
    BackendCounters c = counters_;
    c.graph_replays = rec_->stats().replays;
    c.graph_captures = rec_->stats().captures;
    c.eager_segments = rec_->stats().eager_segments;
    return c;
  }

  // ---- profiling
  void set_profiling(bool on) override {
    bind_device();
    sync();
    n_timed_ = 0;
    clear_op_times();
    profiling_ = on;
    rec_->set_deferred(!on);  // per-op events need each launch at once, between its two events
  }
  std::vector<OpTime> op_times() override {
    bind_device();
    sync();
    collect_op_times();
    return sorted_op_times();
  }

  // ---- memory

  size_t available_memory() const override {
    bind_device();
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    const size_t reserve = size_t(1) << 30;  // scratch arena growth, cuBLASLt workspace, CUDA's own needs
    return free_b > reserve ? free_b - reserve : 0;
  }

  void prepare_weights(DeviceWeightRegistry &registry, const std::vector<const Weight *> &weights,
                       const std::vector<const Weight *> &host_weights) override {
    bind_device();
    store_ = std::static_pointer_cast<CudaWeights>(
        registry.get_or_make(device(), [&] { return std::make_shared<CudaWeights>(device().index); }));
    size_t need = 0;
    std::set<CudaWeights::PartKey> counted;  // (a tensor listed twice, such as tied embeddings, is one copy)
    for (const Weight *w : weights) {
      {
        std::lock_guard lk(store_->mu_);
        if (store_->has(*w)) continue;  // another engine of the model (or a rank on this GPU) uploaded it
      }
      if (counted.insert(CudaWeights::key(*w)).second) need += weight_bytes(*w);
    }
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    const size_t reserve = size_t(1) << 30;  // scratch, KV pool growth, cuBLASLt workspace
    if (need + reserve > free_b)
      failf(DSRT_ERR_OUT_OF_MEMORY, "the model's weights need ", need >> 20, " MiB of GPU memory (+1 GiB working room); ",
            free_b >> 20, " MiB are free of ", total_b >> 20, " MiB");
    for (const Weight *w : weights) dev(*w);
    map_host_weights(host_weights);
  }
  void kv_init(const KvCacheSpec &spec) override {
    bind_device();
    if (spec.dtype != DType::F32 && spec.dtype != DType::BF16)
      failf(DSRT_ERR_UNSUPPORTED, "CUDA backend: latent KV cache in ", dtype_name(spec.dtype), " (F32 or BF16 only)");
    sync();
    rec_->clear_graphs();  // they point into the old pool
    cudaFree(kv_.base);
    kv_ = {};
    spec_ = spec;
    const size_t bytes = size_t(spec.max_pages) * spec.page_bytes();
    void *p = nullptr;
    cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 256)), "latent KV pool");
    kv_ = {p, spec.n_layers, spec.width, dev_dtype(spec.dtype)};
  }
  void kv_copy_page(int32_t src, int32_t dst) override {
    bind_device();
    const size_t pb = spec_.page_bytes();
    char *base = static_cast<char *>(kv_.base);
    flush();
    cuda_check(cudaMemcpyAsync(base + size_t(dst) * pb, base + size_t(src) * pb, pb, cudaMemcpyDeviceToDevice, stream_),
               "kv_copy_page");
    sync();
  }
  // Session state in fp32 on the host: a BF16 pool's entries are widened (kv_read) or rounded to nearest even
  // (kv_write) on the host, through a staging vector of bf16 rows.
  void kv_read(const int32_t *pages, int64_t n, float *dst) override {
    bind_device();
    const size_t w = size_t(spec_.width), es = dtype_size(spec_.dtype);
    std::vector<uint16_t> h(spec_.dtype == DType::BF16 ? size_t(n * spec_.n_layers) * w : 0);
    char *out = spec_.dtype == DType::BF16 ? reinterpret_cast<char *>(h.data()) : reinterpret_cast<char *>(dst);
    flush();
    for (int64_t pos = 0; pos < n; pos++)
      for (int64_t l = 0; l < spec_.n_layers; l++, out += w * es)
        cuda_check(cudaMemcpyAsync(out, slot(pages, l, pos), w * es, cudaMemcpyDeviceToHost, stream_), "kv_read");
    sync();
    for (size_t i = 0; i < h.size(); i++) dst[i] = bf16_to_f32(h[i]);
  }
  void kv_write(const int32_t *pages, int64_t n, const float *src) override {
    bind_device();
    const size_t w = size_t(spec_.width), es = dtype_size(spec_.dtype);
    std::vector<uint16_t> h(spec_.dtype == DType::BF16 ? size_t(n * spec_.n_layers) * w : 0);
    for (size_t i = 0; i < h.size(); i++) h[i] = f32_to_bf16(src[i]);
    const char *in = spec_.dtype == DType::BF16 ? reinterpret_cast<const char *>(h.data()) : reinterpret_cast<const char *>(src);
    flush();
    for (int64_t pos = 0; pos < n; pos++)
      for (int64_t l = 0; l < spec_.n_layers; l++, in += w * es)
        cuda_check(cudaMemcpyAsync(slot(pages, l, pos), in, w * es, cudaMemcpyHostToDevice, stream_), "kv_write");
    sync();  // h lives until the copies are done
  }

  // ---- ops
  void embed(const Weight &table, const Batch &b, Tensor out) override {
    const auto timer_ = timed("embed", nullptr);
    go([](cudaStream_t s, k::DevMatrix t, const int32_t *ids, int64_t n, float *o) { k::embed(t, ids, n, o, s); },
       dev(table), upload_i32(b.tokens), b.n_tokens(), out.f32());
  }
  void rms_norm(Tensor x, const Weight &w, float eps, Tensor out) override {
    const k::DevMatrix dw = dev(w);
    if (held_add_.x == x.f32() && held_add_.n == x.rows * x.cols) {  // h += y; xn = norm(h): one pass
      const HeldAdd a = held_add_;
      held_add_ = {};
      const auto timer_ = timed("add_rms_norm", nullptr);
      go([](cudaStream_t s, float *x, const float *y, k::DevMatrix w, float eps, int64_t rows, int64_t n, float *o) {
        k::add_rms_norm(x, y, w, eps, rows, n, o, s);
      }, a.x, a.y, dw, eps, x.rows, x.cols, out.f32());
      return;
    }
    const auto timer_ = timed("rms_norm", nullptr);
    go([](cudaStream_t s, const float *x, k::DevMatrix w, float eps, int64_t rows, int64_t n, float *o, int64_t os) {
      k::rms_norm(x, w, eps, rows, n, n, o, os, s);
    }, x.f32(), dw, eps, x.rows, x.cols, out.f32(), out.cols);
  }
  void linear(Tensor x, const Weight &w, Tensor out) override {
    const auto timer_ = timed("linear", &w);
    if (x.cols != w.cols || out.cols != w.rows || out.rows != x.rows)
      failf(DSRT_ERR_INTERNAL, "linear ", w.name(), ": shape mismatch");
    check_device(x, "linear");
    check_device(out, "linear");
    const k::DevMatrix dw = dev(w);
    // A BF16 weight (the lm_head) with many rows: BF16 activations on tensor cores, as the CPU rounds them
    // under FP8 precision (cpu_backend.cpp, gemm_input).
    if (gemm_ && x.rows >= kFp8ActivationMinRows && dw.dtype == k::kBF16 && !in_host(dw) && gemm_->available()) {
      flush();  // cuBLASLt enqueues on the stream itself: what was recorded goes first
      Tensor xb = alloc(1, (x.rows * x.cols + 1) / 2, DType::I32);
      if (gemm_->run_bf16(x.f32(), x.rows, dw, out.f32(), static_cast<uint16_t *>(xb.data))) return;
    }
    // Held for a following silu_mul of this and the previous linear (the gate and up projections of a
    // SwiGLU), which then run as one kernel.
    if (!profiling_ && rec_->deferred() && !gemm_path(x.rows, dw)) {
      const HeldLinear l{x.f32(), x.rows, dw, out.f32()};
      const bool pairs = n_held_lin_ == 1 && held_lin_[0].x == l.x && held_lin_[0].m == l.m &&
                         held_lin_[0].w.rows == dw.rows && held_lin_[0].w.cols == dw.cols && held_lin_[0].w.dtype == dw.dtype;
      if (held_add_.x || (n_held_lin_ > 0 && !pairs)) release_held();
      held_lin_[n_held_lin_++] = l;
      return;
    }
    matmul(x.f32(), x.rows, dw, out.f32());
  }
  void add(Tensor x, Tensor y) override {
    if (profiling_ || !rec_->deferred()) {
      const auto timer_ = timed("add", nullptr);
      go([](cudaStream_t s, float *x, const float *y, int64_t n) { k::add(x, y, n, s); }, x.f32(), y.f32(), x.rows * x.cols);
      return;
    }
    release_held();
    held_add_ = {x.f32(), y.f32(), x.rows * x.cols};  // launched with the next op, or fused into a following rms_norm
  }
  void silu_mul(Tensor gate, Tensor up, Tensor out) override {
    const int64_t n = gate.rows * gate.cols;
    if (n_held_lin_ == 2 && held_lin_[0].out == gate.f32() && held_lin_[1].out == up.f32() &&
        held_lin_[0].m * held_lin_[0].w.rows == n && held_lin_[1].m * held_lin_[1].w.rows == n) {
      const HeldLinear g = held_lin_[0], u = held_lin_[1];
      n_held_lin_ = 0;
      release_held();
      go([](cudaStream_t s, const float *x, int64_t m, k::DevMatrix wg, k::DevMatrix wu, float *go_, float *uo, float *o,
            k::GemvSplit sp) { k::linear_swiglu(x, m, wg, wu, go_, uo, o, s, sp); },
         g.x, g.m, g.w, u.w, g.out, u.out, out.f32(), gemv_);
      return;
    }
    const auto timer_ = timed("silu_mul", nullptr);
    go([](cudaStream_t s, const float *g, const float *u, float *o, int64_t n) { k::silu_mul(g, u, o, n, s); },
       gate.f32(), up.f32(), out.f32(), n);
  }
  void rope(Tensor x, int64_t n_heads, int64_t head_dim, int64_t rope_off, const RopeTable &rt, const Batch &b) override {
    const auto timer_ = timed("rope", nullptr);
    go([](cudaStream_t s, float *x, int64_t rows, int64_t cols, int64_t nh, int64_t hd, int64_t off, const float *f,
          int64_t nf, float attn, const int32_t *pos) { k::rope(x, rows, cols, nh, hd, off, f, nf, attn, pos, s); },
       x.f32(), x.rows, x.cols, n_heads, head_dim, rope_off, upload_f32(rt.inv_freq), int64_t(rt.inv_freq.size()),
       rt.attn_factor, upload_i32(b.positions));
  }
  void mla_cache_write(int64_t layer, Tensor kv, const Weight &kv_norm, float eps, const RopeTable &rt,
                       const Batch &b) override {
    const auto timer_ = timed("mla_cache_write", nullptr);
    std::vector<int32_t> slots(size_t(b.n_tokens()));
    for (const SeqSlice &s : b.seqs)
      for (int32_t i = 0; i < s.n_new; i++) {
        const int64_t pos = s.n_past + i;
        if (pos / kPageTokens >= s.n_pages) failf(DSRT_ERR_INTERNAL, "position ", pos, " beyond the page table");
        slots[size_t(s.row0 + i)] = int32_t(b.pages_of(s)[pos / kPageTokens] * kPageTokens + pos % kPageTokens);
      }
    go([](cudaStream_t s, k::KvCacheView kv, int64_t layer, const float *src, int64_t rows, int64_t latent,
          k::DevMatrix nw, float eps, const float *f, int64_t nf, float attn, const int32_t *pos, const int32_t *slots) {
      k::mla_cache_write(kv, layer, src, rows, latent, nw, eps, f, nf, attn, pos, slots, s);
    }, kv_, layer, kv.f32(), kv.rows, kv_norm.rows, dev(kv_norm), eps, upload_f32(rt.inv_freq),
       int64_t(rt.inv_freq.size()), rt.attn_factor, upload_i32(b.positions), upload_i32(slots));
  }
  void mla_attention(int64_t layer, Tensor q, const Weight &kv_b, const MlaDims &d, const Batch &b, AttnForm form,
                     Tensor out) override {
    if (kv_.dtype == k::kBF16 && k::mla_flash_supported(d.latent, d.rope)) return mla_flash(layer, q, kv_b, d, b, out);
    const auto timer_ = timed("mla_attention", nullptr);
    for (const SeqSlice &s : b.seqs) {
      const int64_t n_ctx = s.n_past + s.n_new;
      const int32_t *pages = upload_i32(std::vector<int32_t>(b.pages_of(s), b.pages_of(s) + s.n_pages));
      Tensor scratch = form == AttnForm::Absorbed
                           ? alloc(1, k::mla_absorbed_scratch_floats(s.n_new, d.n_heads, n_ctx, kv_.width))
                           : alloc(int64_t(s.n_new) * d.n_heads, n_ctx);
      const float *qs = q.f32() + int64_t(s.row0) * q.cols;
      float *os = out.f32() + int64_t(s.row0) * out.cols;
      if (form == AttnForm::Absorbed) {
        go([](cudaStream_t st, k::KvCacheView kv, int64_t layer, const int32_t *pages, const float *q, int64_t qs,
              int64_t rows, int64_t n_past, k::DevMatrix wkv, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale,
              float *scratch, float *o, int64_t os) {
          k::mla_attention_absorbed(kv, layer, pages, q, qs, rows, n_past, wkv, nh, dn, dr, dv, scale, scratch, o, os, st);
        }, kv_, layer, pages, qs, q.cols, int64_t(s.n_new), int64_t(s.n_past), dev(kv_b), d.n_heads, d.nope, d.rope, d.v,
           d.softmax_scale, scratch.f32(), os, out.cols);
      } else {  // decompress every cached latent through kv_b, then attend
        Tensor lat = alloc(n_ctx, d.latent), pe = alloc(n_ctx, d.rope), kvd = alloc(n_ctx, kv_b.rows);
        go([](cudaStream_t st, k::KvCacheView kv, int64_t layer, const int32_t *pages, int64_t n, int64_t latent,
              float *lat, float *pe) { k::mla_gather(kv, layer, pages, n, latent, lat, pe, st); },
           kv_, layer, pages, n_ctx, d.latent, lat.f32(), pe.f32());
        matmul(lat.f32(), n_ctx, dev(kv_b), kvd.f32());
        go([](cudaStream_t st, const float *q, int64_t qs, int64_t rows, int64_t n_past, const float *kvd, const float *pe,
              int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, float *scratch, float *o, int64_t os) {
          k::mla_attention_naive(q, qs, rows, n_past, kvd, pe, nh, dn, dr, dv, scale, scratch, o, os, st);
        }, qs, q.cols, int64_t(s.n_new), int64_t(s.n_past), static_cast<const float *>(kvd.f32()),
           static_cast<const float *>(pe.f32()), d.n_heads, d.nope, d.rope, d.v, d.softmax_scale, scratch.f32(), os,
           out.cols);
      }
    }
  }
  // The BF16 cache's attention for both forms (equal in exact arithmetic, spec §3.9): the absorbed form on
  // tensor cores, every sequence of the step in one launch per layer (kernels/mla_flash.cu). The naive form's
  // decompressed keys would cost [n_ctx, nh * (dn + dv)] per prefill chunk and a score row per query; the
  // absorbed kernel needs neither. The F32 pool keeps the fp32 kernels (the exact reference path).
  void mla_flash(int64_t layer, Tensor q, const Weight &kv_b, const MlaDims &d, const Batch &b, Tensor out) {
    if (b.seqs.empty()) return;
    int32_t r0 = b.seqs[0].row0, r1 = 0, covered = 0;
    for (const SeqSlice &s : b.seqs) {
      r0 = std::min(r0, s.row0);
      r1 = std::max(r1, s.row0 + s.n_new);
      covered += s.n_new;
    }
    const int64_t nh = d.n_heads, W = kv_.width, rows = r1 - r0;
    const FlashPlan &plan = flash_plan(b, nh, d.latent, r0);
    const k::DevMatrix wkv = dev(kv_b);
    Tensor qcat = alloc(rows * nh, W), olat = alloc(rows * nh, d.latent);
    auto out_absorb = [](cudaStream_t st, const float *olat, int64_t rows, k::DevMatrix wkv, int64_t nh, int64_t dn,
                         int64_t dv, float *o, int64_t os) { k::mla_out_absorb(olat, rows, wkv, nh, dn, dv, o, os, st); };
    {
      const auto timer_ = timed("mla_absorb_q", nullptr);
      go([](cudaStream_t st, const float *q, int64_t qs, int64_t rows, k::DevMatrix wkv, int64_t nh, int64_t dn,
            int64_t dr, int64_t dv, float *qcat) { k::mla_q_absorb(q, qs, rows, wkv, nh, dn, dr, dv, qcat, st); },
         static_cast<const float *>(q.f32() + int64_t(r0) * q.cols), q.cols, rows, wkv, nh, d.nope, d.rope, d.v,
         qcat.f32());
    }
    {
      const auto timer_ = timed("mla_attend", nullptr);
      go([](cudaStream_t st, k::KvCacheView kv, int64_t layer, const int32_t *pages, const float *qcat, int64_t nh,
            int64_t dc, int64_t dr, float scale, const k::MlaWorkItem *items, const int32_t *block_items, int32_t n_blocks,
            const k::MlaCombineItem *combine, int32_t n_combine, int32_t n_slots, float *ws, float *olat) {
        k::mla_flash_attend(kv, layer, pages, qcat, nh, dc, dr, scale, items, block_items, n_blocks, combine, n_combine,
                            n_slots, ws, olat, st);
      }, kv_, layer, plan.dev_pages, static_cast<const float *>(qcat.f32()), nh, d.latent, d.rope, d.softmax_scale,
         plan.items, plan.block_items, plan.n_blocks, plan.combine, plan.n_combine, plan.n_slots, flash_ws_, olat.f32());
    }
    const auto timer_ = timed("mla_absorb_out", nullptr);
    if (covered == rows) {  // the sequences' rows are one range (the usual case): one launch
      go(out_absorb, static_cast<const float *>(olat.f32()), rows, wkv, nh, d.nope, d.v, out.f32() + int64_t(r0) * out.cols,
         out.cols);
      return;
    }
    for (const SeqSlice &s : b.seqs)  // rows between them belong to another call's sequences: leave them
      go(out_absorb, static_cast<const float *>(olat.f32() + int64_t(s.row0 - r0) * nh * d.latent), int64_t(s.n_new), wkv,
         nh, d.nope, d.v, out.f32() + int64_t(s.row0) * out.cols, out.cols);
  }

  // A step's flash attention plan (blocks, key splits, page table), made at the first layer and reused by the
  // others; it lives in the step's metadata (MetaStaging), which outlives the layers' scratch. Its arrays
  // are padded to power-of-two capacities and the launch always has one block per SM (blocks past the plan's
  // find no items; padded combine items have no rows), so that a decode step's launch arguments stay the same
  // while its context grows and its graph keeps being replayed.
  struct FlashPlan {
    std::vector<SeqSlice> seqs;
    std::vector<int32_t> pages;  // the batch's page tables: two batches of one step (the MTP layer's catch-up
                                 // and the main forward) may have equal slices over different pages
    int64_t nh = 0, dc = 0;
    int32_t r0 = 0, n_blocks = 0, n_combine = 0, n_slots = 0;
    const int32_t *dev_pages = nullptr, *block_items = nullptr;
    const k::MlaWorkItem *items = nullptr;
    const k::MlaCombineItem *combine = nullptr;
  };
  static size_t pow2_at_least(size_t n, size_t lo) {
    size_t c = lo;
    while (c < n) c *= 2;
    return c;
  }
  const FlashPlan &flash_plan(const Batch &b, int64_t nh, int64_t dc, int32_t r0) {
    auto same = [&](const FlashPlan &p) {
      return p.nh == nh && p.dc == dc && p.r0 == r0 && p.seqs.size() == b.seqs.size() &&
             std::memcmp(p.seqs.data(), b.seqs.data(), b.seqs.size() * sizeof(SeqSlice)) == 0 && p.pages == b.pages;
    };
    for (const FlashPlan &p : flash_plans_)
      if (same(p)) return p;
    std::vector<k::MlaSeq> seqs;
    for (const SeqSlice &s : b.seqs) seqs.push_back({s.row0 - r0, s.n_new, s.n_past, s.page0});
    k::MlaFlashPlan kp = k::mla_flash_plan(seqs, nh, n_sm_);
    const int32_t n_items = int32_t(kp.items.size());
    kp.block_items.resize(size_t(std::max<int64_t>(int64_t(kp.block_items.size()), n_sm_ + 1)), n_items);
    kp.combine.resize(pow2_at_least(kp.combine.size(), 4), k::MlaCombineItem{0, 0, 0, 0});
    kp.items.resize(pow2_at_least(kp.items.size(), 64), k::MlaWorkItem{});
    const int32_t n_slots = int32_t(pow2_at_least(size_t(kp.n_slots), 16));
    std::vector<int32_t> pages = b.pages;
    pages.resize(pow2_at_least(pages.size(), 64), 0);
    const size_t ws = size_t(k::mla_flash_workspace_floats(n_slots, dc)) * sizeof(float);
    if (ws > flash_ws_bytes_) {
      sync();  // earlier launches of this step may still read the workspace
      rec_->clear_graphs();  // and graphs point into it
      cudaFree(flash_ws_);
      flash_ws_ = nullptr;
      const size_t bytes = std::max(ws, 2 * flash_ws_bytes_);
      flash_ws_bytes_ = 0;  // stays 0 if the allocation throws: the next plan retries
      cuda_check(cudaMalloc(&flash_ws_, bytes), "attention split workspace");
      flash_ws_bytes_ = bytes;
    }
    FlashPlan p;
    p.seqs = b.seqs;
    p.pages = b.pages;
    p.nh = nh;
    p.dc = dc;
    p.r0 = r0;
    p.n_blocks = int32_t(kp.block_items.size()) - 1;
    p.n_combine = int32_t(kp.combine.size());
    p.n_slots = n_slots;
    p.dev_pages = static_cast<const int32_t *>(meta_->put(pages.data(), pages.size() * 4));
    p.items = static_cast<const k::MlaWorkItem *>(meta_->put(kp.items.data(), kp.items.size() * sizeof(k::MlaWorkItem)));
    p.block_items = static_cast<const int32_t *>(meta_->put(kp.block_items.data(), kp.block_items.size() * 4));
    p.combine = static_cast<const k::MlaCombineItem *>(
        meta_->put(kp.combine.data(), kp.combine.size() * sizeof(k::MlaCombineItem)));
    flash_plans_.push_back(std::move(p));
    return flash_plans_.back();
  }

  void moe_route(Tensor x, const Weight &gate, const Weight &bias, const RouterParams &p, Tensor ids,
                 Tensor weights) override {
    const auto timer_ = timed("moe_route", nullptr);
    Tensor logits = alloc(x.rows, p.n_experts);
    go([](cudaStream_t s, const float *x, int64_t m, k::DevMatrix w, float *o, k::GemvSplit sp) { k::linear(x, m, w, o, s, sp); },
       static_cast<const float *>(x.f32()), x.rows, dev(gate), logits.f32(), gemv_);
    k::RouteParams rp{int32_t(p.n_experts), int32_t(p.top_k), int32_t(p.n_group), int32_t(p.topk_group),
                      p.scoring == ScoringFunc::Sigmoid ? 1 : 0,
                      p.method == TopkMethod::NoauxTc ? 0 : p.method == TopkMethod::GroupLimitedGreedy ? 1 : 2,
                      p.norm_topk_prob ? 1 : 0, p.routed_scaling_factor};
    go([](cudaStream_t s, const float *l, int64_t rows, k::DevMatrix bias, k::RouteParams rp, int32_t *ids, float *w) {
      k::moe_route(l, rows, bias, rp, ids, w, s);
    }, static_cast<const float *>(logits.f32()), x.rows, bias ? dev(bias) : k::DevMatrix{}, rp, ids.i32(), weights.f32());
  }
  // Reference expert path: the routing decisions come to the host, tokens are grouped by expert, each
  // expert's SwiGLU runs once over its tokens and is added in ascending expert order (as on the CPU).
  void moe_experts(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights, Tensor out) override {
    const auto timer_ = timed("moe_experts", nullptr);
    if (experts_compute_ != ExpertCompute::Gpu && all_experts_here(experts) && expert_table(experts).offloaded)
      return moe_split_with_cpu(x, experts, ids, weights, out);
    moe_on_gpu(x, experts, ids, weights, out);
  }
  // Expert offload with the CPU (--experts-on-cpu, --cold-experts-on-cpu): the routing decisions and the
  // activations come to the host; the cost model (backend/offload_cost.h) sends each expert the step needs to
  // the GPU (a cache hit, or a copy over PCIe) or to the CPU (HostExperts, read in place from the mapped
  // checkpoint); the GPU runs its pairs (the CPU's get weight 0 and an expert the GPU runs anyway) while the
  // CPU runs its own, and the CPU's sum is added on the GPU. A host sync per such layer: this path is bound by
  // PCIe and DRAM, not by launches.
  void moe_split_with_cpu(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights, Tensor out) {
    const int64_t T = x.rows, K = ids.cols, H = x.cols, E = int64_t(experts.size());
    const ExpertCache *cache = expert_cache(experts);
    std::vector<int32_t> slot_of(size_t(E), -1);
    std::vector<float> hx(size_t(T * H));
    counters_.moe_host_calls++;
    const HostRouting routing = routing_to_host(ids, weights, [&] {
      to_host_async(hx.data(), x.data, hx.size() * 4, "moe activations");
      if (cache) to_host_async(slot_of.data(), cache->view().slot_of, slot_of.size() * 4, "expert cache slots");
    });
    const std::vector<int32_t> &hid = routing.ids;
    const std::vector<float> &hw = routing.weights;
    // The plan: one need per expert the step routes to.
    std::vector<int64_t> rows(size_t(E), 0);
    for (int32_t e : hid) {
      if (e < 0 || e >= E) failf(DSRT_ERR_INTERNAL, "router chose expert ", e);
      rows[size_t(e)]++;
    }
    std::vector<offload::ExpertNeed> needs;
    std::vector<int32_t> need_expert;
    for (int64_t e = 0; e < E; e++) {
      if (!rows[size_t(e)]) continue;
      const FfnWeights &f = experts[size_t(e)];
      offload::ExpertNeed n;
      n.bytes = HostExperts::weight_bytes(f);
      n.rows = rows[size_t(e)];
      n.macs_per_row = f.gate.rows * f.gate.cols + f.up.rows * f.up.cols + f.down.rows * f.down.cols;
      n.cached = cache ? slot_of[size_t(e)] >= 0 : !store_->in_host_.count(f.gate.id);
      needs.push_back(n);
      need_expert.push_back(int32_t(e));
    }
    const offload::Plan plan = offload::plan_experts(
        needs, offload_rates(), experts_compute_ == ExpertCompute::AllOnCpu ? offload::CpuMode::All : offload::CpuMode::Auto);
    std::vector<uint8_t> on_cpu(size_t(E), 0);
    std::vector<int32_t> on_gpu;  // the experts the GPU runs anyway, hits first
    for (int pass = 0; pass < 2; pass++)
      for (size_t i = 0; i < needs.size(); i++)
        if (plan.place[i] != offload::Place::Cpu && (plan.place[i] == offload::Place::Hit) == (pass == 0))
          on_gpu.push_back(need_expert[i]);
    for (size_t i = 0; i < needs.size(); i++)
      if (plan.place[i] == offload::Place::Cpu) on_cpu[size_t(need_expert[i])] = 1;
    // The GPU's pairs: the CPU's pairs of a token point at experts the GPU runs anyway that the token does not
    // route to (weight 0), each at most once per token: the expert kernels take a token's experts as distinct.
    // A token with too few such experts sends the whole layer to the CPU.
    std::vector<int32_t> gid = hid;
    std::vector<float> gw = hw;
    bool gpu_part = !on_gpu.empty();
    for (int64_t t = 0; t < T && gpu_part; t++) {
      int32_t *row = gid.data() + t * K;
      size_t next = 0;
      for (int64_t j = 0; j < K && gpu_part; j++) {
        if (!on_cpu[size_t(row[j])]) continue;
        while (next < on_gpu.size() && std::find(row, row + K, on_gpu[next]) != row + K) next++;
        if (next == on_gpu.size()) gpu_part = false;
        else row[j] = on_gpu[next++], gw[size_t(t * K + j)] = 0.0f;
      }
    }
    if (!gpu_part)
      for (int32_t e : hid) on_cpu[size_t(e)] = 1;
    counters_.experts_on_cpu += uint64_t(std::count(on_cpu.begin(), on_cpu.end(), uint8_t(1)));
    if (gpu_part) {
      Tensor dids = alloc(T, K, DType::I32), dw = alloc(T, K);
      go(copy_launch, dids.data, static_cast<const void *>(upload_i32(gid)), gid.size() * 4);
      go(copy_launch, dw.data, static_cast<const void *>(upload_f32(gw)), gw.size() * 4);
      moe_on_gpu(x, experts, dids, dw, out);
    } else {
      go([](cudaStream_t s, void *o, size_t n) { cuda_check(cudaMemsetAsync(o, 0, n, s), "moe out"); }, out.data,
         size_t(T * H) * sizeof(float));
    }
    flush();  // the GPU's share runs while the CPU computes its own
    if (!host_experts_) host_experts_ = std::make_unique<HostExperts>(n_threads_);
    std::vector<float> y(size_t(T * H));
    const auto t0 = std::chrono::steady_clock::now();
    host_experts_->run(hx.data(), T, H, hid.data(), hw.data(), K, experts, on_cpu.data(), gemm_ != nullptr, y.data());
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (host_experts_->last_weight_bytes() > 0 && dt > 0 && T == 1)  // the decode rate, for the cost model
      cpu_expert_rate_ = 0.8 * cpu_expert_rate_ + 0.2 * double(host_experts_->last_weight_bytes()) / dt;
    counters_.expert_bytes_cpu += uint64_t(host_experts_->last_weight_bytes());
    Tensor dy = alloc(T, H);
    go(copy_launch, dy.data, static_cast<const void *>(upload_f32(y)), y.size() * 4);
    go([](cudaStream_t s, float *o, const float *y, int64_t n) { k::add(o, y, n, s); }, out.f32(),
       static_cast<const float *>(dy.f32()), T * H);
  }
  // The routing decisions on the host, with whatever else the caller's `more` queues (to_host_async), after
  // one sync: the host paths of the MoE (the reference path, the CPU split) start here.
  struct HostRouting {
    std::vector<int32_t> ids;
    std::vector<float> weights;
  };
  template <class More>
  HostRouting routing_to_host(Tensor ids, Tensor weights, More &&more) {
    HostRouting r{std::vector<int32_t>(size_t(ids.rows * ids.cols)), std::vector<float>(size_t(weights.rows * weights.cols))};
    flush();
    to_host_async(r.ids.data(), ids.data, r.ids.size() * 4, "moe ids");
    to_host_async(r.weights.data(), weights.data, r.weights.size() * 4, "moe weights");
    more();
    sync();
    return r;
  }
  void to_host_async(void *dst, const void *src, size_t n, const char *what) {
    cuda_check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream_), what);
  }
  static constexpr auto copy_launch = [](cudaStream_t s, void *dst, const void *src, size_t n) {
    cuda_check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s), "moe staging");
  };
  // The cost model's rates: PCIe measured once; the CPU's expert rate starts at 60% of the host's measured
  // DRAM read rate and follows the batch-1 runs it sees.
  offload::Rates offload_rates() {
    if (pcie_rate_ <= 0) {
      // DSRT_OFFLOAD_PCIE_GBS: the host->device rate the cost model assumes instead of the measured one (a
      // shared or throttled link; tests make copies dear with it to send experts to the CPU).
      const char *forced = std::getenv("DSRT_OFFLOAD_PCIE_GBS");
      pcie_rate_ = forced && std::atof(forced) > 0 ? std::atof(forced) * 1e9 : host_to_device_bandwidth(device().index);
      ThreadPool pool(n_threads_);
      cpu_expert_rate_ = 0.6 * host_read_bandwidth(pool);
      if (!host_experts_) host_experts_ = std::make_unique<HostExperts>(n_threads_);
      cpu_flops_ = host_experts_->measure_flops();
      log(LogLevel::Info, "dsrt: expert offload with the CPU: host->device " + std::to_string(int(pcie_rate_ / 1e9)) +
                              " GB/s, CPU experts ~" + std::to_string(int(cpu_expert_rate_ / 1e9)) + " GB/s, " +
                              std::to_string(int(cpu_flops_ / 1e9)) + " GFLOP/s");
    }
    offload::Rates r;
    r.pcie = pcie_rate_;
    r.cpu_bytes = cpu_expert_rate_;
    r.cpu_flops = cpu_flops_;
    r.cpu_overhead = 50e-6;
    return r;
  }
  // False on an expert-parallel rank: the experts other ranks hold are absent here (no weights).
  static bool all_experts_here(const std::vector<FfnWeights> &experts) {
    return std::all_of(experts.begin(), experts.end(), [](const FfnWeights &f) { return bool(f.gate); });
  }
  // The first expert present here (its shape and dtype stand for the layer's), or null.
  static const FfnWeights *first_expert_here(const std::vector<FfnWeights> &experts) {
    for (const FfnWeights &f : experts)
      if (f.gate) return &f;
    return nullptr;
  }
  // Expert parallelism: the experts other ranks hold are absent here (no weights) and have null entries in the
  // layer's device table; the device paths (GEMV, grouped) skip their pairs on the device, so an expert-parallel
  // rank's layer runs like a full one, without a host sync. The reference path below (shapes and dtypes the
  // device kernels do not take) brings the routing to the host.
  void moe_on_gpu(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights, Tensor out) {
    const int64_t T = x.rows, K = ids.cols, H = x.cols;
    const FfnWeights *first = first_expert_here(experts);
    if (!first) {  // (no expert on this rank: a zero contribution)
      go([](cudaStream_t s, void *o, size_t n) { cuda_check(cudaMemsetAsync(o, 0, n, s), "moe out"); }, out.data,
         size_t(T * H) * sizeof(float));
      return;
    }
    const int64_t I = first->gate.rows;
    const bool all_here = all_experts_here(experts);
    const bool grouped = grouped_moe(experts, T, H, I, K),
               gemv = !grouped && T * K <= kDeviceExpertSlots && H % 4 == 0 && I % 4 == 0 && K <= 32;
    const k::DevMatrix *tab = expert_table(experts).dev;
    if (const ExpertCache *c = all_here ? expert_cache(experts) : nullptr)  // (the GEMV path reads an expert once per token using it)
      go([](cudaStream_t s, const k::ExpertCacheView *v, const int32_t *ids, int64_t n, bool per_pair, int n_sm) {
        k::expert_cache_admit(*v, ids, n, per_pair, n_sm, s);
      }, &c->view(), static_cast<const int32_t *>(ids.i32()), T * K, !grouped, n_sm_);
    if (grouped) {
      counters_.moe_grouped_calls++;
      return moe_grouped(x, experts, ids, weights, out);
    }
    if (gemv) {
      counters_.moe_gemv_calls++;
      Tensor h = alloc(T * K, I);
      go([](cudaStream_t s, const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
            int64_t E, const k::DevMatrix *g, const k::DevMatrix *u, const k::DevMatrix *d, int32_t dt, float *h, float *o) {
        k::moe_experts_gemv(x, T, H, I, ids, w, K, E, g, u, d, dt, h, o, s);
      }, static_cast<const float *>(x.f32()), T, H, I, static_cast<const int32_t *>(ids.i32()),
         static_cast<const float *>(weights.f32()), K, int64_t(experts.size()), tab, tab + experts.size(), tab + 2 * experts.size(),
         dev_dtype(first->gate.dtype), h.f32(), out.f32());
      return;
    }
    counters_.moe_host_calls++;
    std::vector<k::DevMatrix> now(3 * experts.size());  // the table as the expert cache left it
    const HostRouting routing = routing_to_host(ids, weights, [&] {
      to_host_async(now.data(), tab, now.size() * sizeof(k::DevMatrix), "moe expert table");
    });
    const std::vector<int32_t> &hid = routing.ids;
    const std::vector<float> &hw = routing.weights;
    std::vector<std::vector<std::pair<int32_t, float>>> by_expert(experts.size());
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < K; j++) {
        int32_t e = hid[size_t(t * K + j)];
        if (e < 0 || size_t(e) >= experts.size()) failf(DSRT_ERR_INTERNAL, "router chose expert ", e);
        auto &v = by_expert[size_t(e)];
        // A token twice at one expert (moe_split_with_cpu points the CPU's pairs at a GPU expert, weight 0): one
        // row with the weights summed, since scatter_add_rows must not see a row twice (its adds would race).
        if (!v.empty() && v.back().first == int32_t(t)) v.back().second += hw[size_t(t * K + j)];
        else v.push_back({int32_t(t), hw[size_t(t * K + j)]});
      }
    go([](cudaStream_t s, void *o, size_t n) { cuda_check(cudaMemsetAsync(o, 0, n, s), "moe out"); }, out.data,
       size_t(T * H) * sizeof(float));
    for (size_t e = 0; e < experts.size(); e++) {
      auto &toks = by_expert[e];
      if (toks.empty() || !experts[e].gate) continue;  // (absent: another rank's expert, its rows summed there)
      const int64_t n = int64_t(toks.size()), inter = experts[e].gate.rows;
      std::vector<int32_t> rows;
      std::vector<float> w;
      for (auto &[t, wt] : toks) {
        rows.push_back(t);
        w.push_back(wt);
      }
      const int32_t *drows = upload_i32(rows);
      const float *dw = upload_f32(w);
      Tensor xe = alloc(n, H), g = alloc(n, inter), u = alloc(n, inter), y = alloc(n, H);
      go(gather_launch, static_cast<const float *>(x.f32()), H, drows, n, xe.f32());
      const size_t E = experts.size();
      matmul(xe.f32(), n, now[e], g.f32());
      matmul(xe.f32(), n, now[E + e], u.f32());
      go([](cudaStream_t s, const float *g, const float *u, float *o, int64_t n) { k::silu_mul(g, u, o, n, s); },
         static_cast<const float *>(g.f32()), static_cast<const float *>(u.f32()), g.f32(), n * inter);
      matmul(g.f32(), n, now[2 * E + e], y.f32());
      go([](cudaStream_t s, const float *y, int64_t cols, const int32_t *rows, const float *w, int64_t n, float *o) {
        k::scatter_add_rows(y, cols, rows, w, n, o, s);
      }, static_cast<const float *>(y.f32()), H, drows, dw, n, out.f32());
    }
  }
  // Routed rows in FP8 (model/data_parallel.h): the grouped FP8 path takes them as they are quantised here.
  bool moe_takes_fp8(const std::vector<FfnWeights> &experts, int64_t rows, int64_t top_k) const override {
    const FfnWeights *first = first_expert_here(experts);
    return first && experts_compute_ == ExpertCompute::Gpu &&
           grouped_moe(experts, rows, first->gate.cols, first->gate.rows, top_k);
  }
  void quantize_fp8_rows(Tensor x, Tensor q, Tensor scales) override {
    const auto timer_ = timed("quantize_fp8_rows", nullptr);
    check_fp8_rows(x, q, scales);
    go([](cudaStream_t s, const float *x, int64_t m, int64_t k, uint8_t *q, float *xs) {
      k::quantize_rows_fp8_row_major(x, m, k, q, xs, s);
    }, static_cast<const float *>(x.f32()), x.rows, x.cols, static_cast<uint8_t *>(q.data), scales.f32());
  }
  void dequantize_fp8_rows(Tensor q, Tensor scales, Tensor out) override {
    const auto timer_ = timed("dequantize_fp8_rows", nullptr);
    check_fp8_rows(out, q, scales);
    go([](cudaStream_t s, const uint8_t *q, const float *xs, int64_t m, int64_t k, float *o) {
      k::dequantize_rows_fp8(q, xs, m, k, o, s);
    }, static_cast<const uint8_t *>(q.data), static_cast<const float *>(scales.f32()), out.rows, out.cols, out.f32());
  }

  void gather_rows(Tensor x, const std::vector<int32_t> &rows, Tensor out) override {
    const auto timer_ = timed("gather_rows", nullptr);
    go(gather_launch, static_cast<const float *>(x.f32()), x.cols, upload_i32(rows), int64_t(rows.size()), out.f32());
  }
  static constexpr auto gather_launch = [](cudaStream_t s, const float *x, int64_t cols, const int32_t *rows, int64_t n,
                                          float *o) { k::gather_rows(x, cols, rows, n, o, s); };
  void to_host(Tensor t, float *dst) override {
    bind_device();
    flush();
    cuda_check(cudaMemcpyAsync(dst, t.data, size_t(t.rows * t.cols) * dtype_size(t.dtype), cudaMemcpyDeviceToHost, stream_),
               "to_host");
    if (step_started_) cudaEventRecord(step_ev_[1], stream_);  // the step's GPU time includes bringing results back
    sync();
  }

  // ---- sampling (kernels/sampling.cu): every request's row in one launch, at the end of the step's last
  // segment (so a decode step's graph includes it); only the ids and flags come back. The host prepares per row
  // the few ids bias and penalties touch, and the ban list as it is (hundreds of unused ids for V3: shared by
  // rows with the same list, never looked up per id on the host). Rows the kernel flags
  // (non-finite logits, nothing left to sample) and rows whose bias names an id outside the vocabulary go
  // through the CPU sampler on their row copied back: the same error (or token) as the host path.
  bool samples_on_device() const override { return true; }
  std::vector<SampleResult> sample_rows(Tensor logits, const std::vector<SampleRequest> &req) override {
    bind_device();
    std::vector<SampleResult> out(req.size());
    if (req.empty()) return out;
    const int64_t V = logits.cols;
    const int32_t n = int32_t(req.size());
    static const std::vector<int32_t> none;
    std::vector<k::SampleRowParams> rows(req.size());  // (value-initialised: the uploaded bytes hold no garbage)
    std::vector<k::SampleAdjust> adj;
    std::vector<float> bias;
    std::vector<int32_t> bans;
    std::vector<std::pair<int32_t, int32_t>> ban_lists;  // (start, length) in bans of each distinct list
    std::vector<char> on_host(req.size(), 0);
    for (size_t i = 0; i < req.size(); i++) {
      const SampleRequest &r = req[i];
      const SamplingParams &p = *r.params;
      if (r.row < 0 || r.row >= logits.rows) failf(DSRT_ERR_INTERNAL, "sample_rows: row ", r.row, " of ", logits.rows);
      SamplingAdjustments a = sampling_adjustments(V, p, r.history, r.n_history, none);  // bias and penalties
      on_host[i] = !a.valid;
      const std::vector<int32_t> &ban = r.banned ? *r.banned : none;
      if (!a.ids.empty() && !ban.empty()) {  // a touched id that is also banned: -inf whatever bias did (as the sampler)
        std::unordered_map<int32_t, size_t> at;
        for (size_t j = 0; j < a.ids.size(); j++) at[a.ids[j].id] = j;
        for (int32_t id : ban)
          if (auto it = at.find(id); it != at.end()) a.ids[it->second].banned = 1;
      }
      int32_t ban0 = -1;
      for (auto [s0, len] : ban_lists)
        if (size_t(len) == ban.size() && std::equal(ban.begin(), ban.end(), bans.begin() + s0)) ban0 = s0;
      if (ban0 < 0) {
        ban0 = int32_t(bans.size());
        ban_lists.push_back({ban0, int32_t(ban.size())});
        bans.insert(bans.end(), ban.begin(), ban.end());
      }
      k::SampleRowParams &rp = rows[i];
      rp.row = r.row;
      rp.temperature = p.temperature;
      rp.top_k = p.top_k;
      rp.top_p = p.top_p;
      rp.min_p = p.min_p;
      rp.repetition_penalty = p.repetition_penalty;
      rp.presence_penalty = p.presence_penalty;
      rp.frequency_penalty = p.frequency_penalty;
      rp.adj0 = int32_t(adj.size());
      rp.n_adj = int32_t(a.ids.size());
      rp.ban0 = ban0;
      rp.n_ban = int32_t(ban.size());
      rp.u = r.u;
      for (const SamplingAdjust &t : a.ids) adj.push_back({t.id, t.count, t.banned, int32_t(bias.size()) + t.bias0, t.n_bias});
      bias.insert(bias.end(), a.bias.begin(), a.bias.end());
    }
    {
      const auto timer_ = timed("sample_rows", nullptr);
      const int64_t ws_floats = (k::sample_workspace_bytes(n, V) + 3) / 4;
      Tensor ws = alloc(1, ws_floats), res = alloc(2, n, DType::I32);
      // One parameter block (kernels.h): rows, adjustments, bias terms, ban ids.
      const size_t rows_b = rows.size() * sizeof(k::SampleRowParams), adj_b = adj.size() * sizeof(k::SampleAdjust),
                   bias_b = bias.size() * sizeof(float), bans_b = bans.size() * sizeof(int32_t);
      for (auto &rp : rows) {
        rp.bias_at = int32_t(rows_b + adj_b);
        rp.bans_at = int32_t(rows_b + adj_b + bias_b);
      }
      // (padded to a power of two: the segment's metadata copy, whose size is a launch argument, then stays the
      // same while the number of touched ids moves, and a decode step's graph keeps being replayed)
      std::vector<char> block(pow2_at_least(rows_b + adj_b + bias_b + bans_b, 1024), 0);
      std::memcpy(block.data(), rows.data(), rows_b);
      if (adj_b) std::memcpy(block.data() + rows_b, adj.data(), adj_b);
      if (bias_b) std::memcpy(block.data() + rows_b + adj_b, bias.data(), bias_b);
      if (bans_b) std::memcpy(block.data() + rows_b + adj_b + bias_b, bans.data(), bans_b);
      const void *params = meta_->put(block.data(), block.size());
      go([](cudaStream_t s, const float *l, int64_t V, const void *params, int32_t n, void *ws, int32_t *tok, int32_t *flags) {
        k::sample_rows(l, V, params, n, ws, tok, flags, s);
      }, static_cast<const float *>(logits.f32()), V, params, n, ws.data, res.i32(), res.i32() + n);
      std::vector<int32_t> host(size_t(2 * n));
      flush();
      cuda_check(cudaMemcpyAsync(host.data(), res.data, host.size() * 4, cudaMemcpyDeviceToHost, stream_), "sampled ids");
      if (step_started_) cudaEventRecord(step_ev_[1], stream_);
      sync();
      for (size_t i = 0; i < req.size(); i++) {
        out[i].token = host[i];
        if (host[size_t(n) + i]) on_host[i] = 1;
      }
    }
    HostVec<float> row;
    for (size_t i = 0; i < req.size(); i++) {
      if (!on_host[i]) continue;
      const SampleRequest &r = req[i];
      row.resize(size_t(V));
      to_host(logits.rows_view(r.row, 1), row.data());
      out[i] = {};
      try {
        out[i].token = sample_token_with(row.data(), V, *r.params, r.history, r.n_history, r.banned ? *r.banned : none, r.u);
      } catch (const Error &e) {
        out[i].status = e.code();
        out[i].error = e.what();
      }
    }
    return out;
  }

  void from_host(Tensor t, const void *src) override {
    bind_device();
    flush();
    cuda_check(cudaMemcpyAsync(t.data, src, size_t(t.rows * t.cols) * dtype_size(t.dtype), cudaMemcpyHostToDevice, stream_),
               "from_host");
    sync();
  }
  // Runs what was recorded (held ops, metadata copies, launches) and waits for the GPU.
  void flush() {
    release_held();
    meta_->flush_copies(*rec_);
    const bool work = rec_->deferred() && rec_->pending() > 0;
    if (work) note_gpu_start();
    rec_->flush();
    if (work && cache_stats_)  // read at the next begin_step, after its sync
      cudaMemcpyAsync(cache_stats_host_, cache_stats_, k::kCacheStats * sizeof(unsigned long long), cudaMemcpyDeviceToHost,
                      stream_);
    if (work) cudaEventRecord(step_ev_[1], stream_);  // (not at the next step's sync: the host's time between
                                                      // steps is not the GPU's)
  }
  void sync() {
    flush();
    cuda_check(cudaStreamSynchronize(stream_), "stream");
  }
  void *native_stream() override {
    bind_device();
    flush();
    return stream_;
  }
  // The CUDA runtime's current device is per host thread, and one thread may drive the backends of several
  // GPUs (in-process ranks: the step thread sets up every rank's cache between steps). Every entry that
  // allocates, copies or starts a step binds the calling thread to this backend's device; the ops of a step
  // run on the thread that called begin_step().
  void bind_device() const { cuda_check(cudaSetDevice(device().index), "cudaSetDevice"); }

 private:
  // The cache entry of position pos in `layer` (width values in the pool's dtype).
  char *slot(const int32_t *pages, int64_t layer, int64_t pos) {
    return static_cast<char *>(kv_.base) +
           size_t(((int64_t(pages[pos / kPageTokens]) * spec_.n_layers + layer) * kPageTokens + pos % kPageTokens) *
                  spec_.width) *
               dtype_size(spec_.dtype);
  }

  // A weight's device copy: the model's (store_, by Weight::id), or for weights made outside a checkpoint
  // (tests) this backend's own, made on first use.
  k::DevMatrix dev(const Weight &w) {
    if (w.id >= 0 && store_) {
      // The model's copy on this device (uploaded by whichever backend needs it first), remembered here.
      auto shared = [&](auto &store_map, const auto &key) {
        std::lock_guard lk(store_->mu_);
        auto it = store_map.find(key);
        if (it == store_map.end()) {
          it = store_map.emplace(key, upload(w)).first;
          store_->bytes_ += weight_bytes(w);
        }
        return it->second;
      };
      if (!w.is_whole()) {  // a tensor-parallel rank's part of a tensor
        const CudaWeights::PartKey key = CudaWeights::part_key(w);
        if (auto mine = parts_.find(key); mine != parts_.end()) return mine->second;
        return parts_[key] = shared(store_->parts_, key);
      }
      if (size_t(w.id) < by_id_.size() && by_id_[size_t(w.id)].data) return by_id_[size_t(w.id)];
      if (by_id_.size() <= size_t(w.id)) by_id_.resize(size_t(w.id) + 1);
      return by_id_[size_t(w.id)] = shared(store_->by_id_, w.id);
    }
    const WeightKey key{w.data, w.rows, w.cols, int(w.dtype), w.row0, w.col0};
    auto it = weights_.find(key);
    if (it != weights_.end()) return it->second;
    return weights_[key] = upload(w);
  }
  // Bytes of w's copy as the checkpoint stores them, block scales included (a part's scales are its own
  // blocks: pack_weight); the device pads each scale row to a multiple of 4 floats besides (upload).
  static size_t weight_bytes(const Weight &w) {
    size_t b = size_t(w.rows * w.cols) * dtype_size(w.dtype);
    const int64_t scale_cols = w.is_whole() ? w.scale_cols : (w.cols + 127) / 128;
    if (w.dtype == DType::F8_E4M3) b += size_t(((w.rows + 127) / 128) * scale_cols) * sizeof(float);
    return b;
  }
  // Expert offload: weights left in host memory are pinned where they lie (the mapped shards: one copy in host
  // memory, never a dequantised one) and registered read-only with the GPU, whose kernels then read them in
  // place over PCIe through the same pointers as device weights (an expert table entry is an address, so a
  // decode step stays one CUDA graph). Page ranges of neighbouring weights are merged and registered once.
  // Weights of `ws` that were also uploaded (the GPU expert cache's initial contents) keep their device copy
  // and get a host address besides.
  void map_host_weights(const std::vector<const Weight *> &ws) {
    std::lock_guard lk(store_->mu_);
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // page ranges of the weights not mapped yet
    const uintptr_t page = 4096;
    // The kernels load weights 16 bytes at a time: a tensor the checkpoint stores at an address that is not
    // 16-byte aligned (safetensors aligns its data to 8 bytes only) is copied once into pinned memory instead.
    auto aligned = [](const Weight *w) { return reinterpret_cast<uintptr_t>(w->data) % 16 == 0; };
    for (const Weight *w : ws)
      if (!store_->host_.count(w->id) && aligned(w)) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(w->data), b = a + size_t(w->rows * w->cols) * dtype_size(w->dtype);
        ranges.push_back({a / page * page, (b + page - 1) / page * page});
      }
    for (auto [a, b] : unregistered(ranges)) {
      void *p = reinterpret_cast<void *>(a);
      const cudaError_t e = cudaHostRegister(p, b - a, cudaHostRegisterMapped | cudaHostRegisterReadOnly | cudaHostRegisterPortable);
      if (e != cudaSuccess) {
        cudaGetLastError();
        failf(DSRT_ERR_OUT_OF_MEMORY, "expert offload: cannot pin ", (b - a) >> 20, " MiB of host memory holding routed experts (",
              cudaGetErrorString(e), "); give the GPU a larger budget (dsrt_model_params.device_memory, --gpu-memory)");
      }
      store_->registered_.push_back({a, b});
    }
    for (const Weight *w : ws) {
      auto known = store_->host_.find(w->id);
      if (known != store_->host_.end()) {
        host_data_.insert(known->second.data);
        continue;
      }
      void *host = static_cast<void *>(const_cast<uint8_t *>(w->data)), *d = nullptr;
      const size_t bytes = size_t(w->rows * w->cols) * dtype_size(w->dtype);
      if (!aligned(w)) {
        cuda_check(cudaHostAlloc(&host, std::max<size_t>(bytes, 16), cudaHostAllocMapped | cudaHostAllocPortable),
                   "expert offload: pinned host memory for an unaligned tensor");
        std::memcpy(host, w->data, bytes);
        store_->copied_.push_back(host);
        store_->copied_bytes_ += bytes;
      }
      cuda_check(cudaHostGetDevicePointer(&d, host, 0), "expert offload: device address of host weights");
      auto on_device = store_->by_id_.find(w->id);
      k::DevMatrix m;
      if (on_device != store_->by_id_.end()) {  // a cache slot's first expert: its scales are uploaded already
        m = on_device->second;
        m.data = d;
      } else {
        m = upload(*w, d);
        store_->by_id_[w->id] = m;
        store_->in_host_.insert(w->id);
        store_->host_bytes_ += bytes;
      }
      store_->host_[w->id] = m;
      host_data_.insert(m.data);
    }
    if (!ws.empty())
      log(LogLevel::Info, "dsrt: expert offload: " + std::to_string(store_->host_bytes_ >> 20) + " MiB of routed experts read "
                          "from host memory (" + std::to_string(store_->copied_bytes_ >> 20) +
                          " MiB of them copied to pinned memory: tensors not 16-byte aligned in the checkpoint)");
  }
  // The parts of `ranges` (page ranges, any order, may overlap) not registered yet, merged: another engine
  // of the model may have registered pages these share.
  std::vector<std::pair<uintptr_t, uintptr_t>> unregistered(std::vector<std::pair<uintptr_t, uintptr_t>> ranges) const {
    std::sort(ranges.begin(), ranges.end());
    std::vector<std::pair<uintptr_t, uintptr_t>> merged, out;
    for (auto r : ranges)
      if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
      else merged.push_back(r);
    auto done = store_->registered_;
    std::sort(done.begin(), done.end());
    for (auto [a, b] : merged) {
      for (auto [ra, rb] : done) {
        if (rb <= a || ra >= b) continue;
        if (ra > a) out.push_back({a, ra});
        a = std::max(a, rb);
        if (a >= b) break;
      }
      if (a < b) out.push_back({a, b});
    }
    return out;
  }
  bool in_host(const k::DevMatrix &m) const { return host_data_.count(m.data) > 0; }

  // Its bytes as stored, plus FP8 block scales; in_host: the device address of its bytes left in host memory
  // (expert offload), then only the scales are uploaded.
  k::DevMatrix upload(const Weight &w, const void *in_host = nullptr) {
    k::DevMatrix m;
    m.dtype = dev_dtype(w.dtype);
    m.rows = w.rows;
    m.cols = w.cols;
    flush();  // recorded launches first: the copies below go straight to the stream
    // A part of a tensor is gathered on the host first into a contiguous matrix with its own scale blocks (it
    // lives until the sync below).
    const PackedWeight packed = w.is_whole() || in_host ? PackedWeight{} : pack_weight(w);
    const uint8_t *bytes_src = w.is_whole() ? w.data : packed.data.data();
    const float *scale_src = w.is_whole() ? w.scale : packed.scale.data();
    const int64_t scale_cols = w.is_whole() ? w.scale_cols : packed.scale_cols;
    if (in_host) {
      if (!w.is_whole()) fail(DSRT_ERR_INTERNAL, "expert offload maps whole tensors only");
      m.data = in_host;
    } else {
      const size_t bytes = size_t(w.rows * w.cols) * dtype_size(w.dtype);
      void *p = nullptr;
      cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 16)), "weights");
      // On our stream: a legacy-stream cudaMemcpy from pageable memory may return before its DMA lands, and
      // our non-blocking stream would not wait for it (found on the H100: the first lm_head GEMV read a
      // half-uploaded matrix).
      cuda_check(cudaMemcpyAsync(p, bytes_src, bytes, cudaMemcpyHostToDevice, stream_), "weight upload");
      m.data = p;
    }
    if (w.dtype == DType::F8_E4M3) {
      // Rows of block scales padded to a multiple of 4: cuBLASLt reads BLK128x128 scales with that leading
      // dimension. Unpadded, every GEMM whose K has 1-3 (mod 4) blocks of 128 (K = 128, 256: the tiny
      // presets' hidden sizes) took the scales of the wrong output blocks (relative error 0.3-0.87 op by op
      // with FP8 activations) while K = 512, 1024, 2048, 7168 were exact. dsrt's own kernels read the
      // padded rows through scale_cols.
      const int64_t brows = (w.rows + 127) / 128, ld = (scale_cols + 3) / 4 * 4;
      const size_t sb = size_t(brows * ld) * sizeof(float);
      std::vector<float> padded(size_t(brows * ld), 0.0f);
      for (int64_t r = 0; r < brows; r++)
        std::memcpy(padded.data() + r * ld, scale_src + r * scale_cols, size_t(scale_cols) * sizeof(float));
      void *sp = nullptr;
      cuda_check(cudaMalloc(&sp, sb), "weight scales");
      cuda_check(cudaMemcpyAsync(sp, padded.data(), sb, cudaMemcpyHostToDevice, stream_), "scale upload");
      m.scale = static_cast<const float *>(sp);
      m.scale_cols = ld;
    }
    sync();
    return m;
  }

  // out [m, N] = x [m, K] W^T. With FP8 activations (fp8_activations; FP8 weight, K % 128 == 0) and at least
  // kFp8ActivationMinRows rows, x is quantised per token per 128 channels and the product is block-scaled FP8:
  // cuBLASLt from kCublasMinRows rows (prefill; its tiles win there), dsrt's swap-AB tensor-core kernel below
  // that (kernels/gemm_fp8_mma.cu: reads each weight byte once per step, where cuBLASLt streamed weights at
  // 0.2-2.3 TB/s) and wherever cuBLASLt is missing or refuses. Otherwise the fp32-activation GEMV kernels.
  bool gemm_path(int64_t m, const k::DevMatrix &w) const {
    return gemm_ && m >= kFp8ActivationMinRows && w.dtype == k::kFP8 && w.cols % 128 == 0;
  }
  void matmul(const float *x, int64_t m, const k::DevMatrix &w, float *out) {
    const char *how = nullptr;
    if (gemm_path(m, w) && m >= kCublasMinRows && gemm_->available() && Fp8Gemm::eligible(w) && !in_host(w)) {
      // (not for weights in host memory: cuBLASLt's Hopper kernels load tiles with the TMA, for device memory)
      flush();  // cuBLASLt enqueues on the stream itself: what was recorded goes first
      const uint64_t mark = scratch_mark();
      const int64_t mp = Fp8Gemm::padded_rows(m);
      Tensor xq = alloc(1, (mp * w.cols + 3) / 4, DType::I32), xs = alloc(w.cols / 128, mp), tmp = alloc(mp, w.rows);
      if (gemm_->run(x, m, w, out, static_cast<uint8_t *>(xq.data), xs.f32(), tmp.data)) how = "cuBLASLt FP8";
      scratch_release(mark);  // stream order keeps the scratch valid for the queued kernels
    }
    if (!how && gemm_path(m, w)) {  // the scratch stays until the step ends: the launches are only recorded
      const int64_t K = w.cols, ws_floats = k::gemm_fp8_mma_workspace_floats(m, w.rows, K);
      Tensor xq = alloc(1, (m * K + 3) / 4, DType::I32), xs = alloc(K / 128, m);
      float *ws = ws_floats > 0 ? alloc(1, ws_floats).f32() : nullptr;
      uint8_t *q = static_cast<uint8_t *>(xq.data);
      go([](cudaStream_t s, const float *x, int64_t m, int64_t K, uint8_t *q, float *xs) {
        k::quantize_rows_fp8(x, m, K, m, q, xs, s);
      }, x, m, K, q, xs.f32());
      go([](cudaStream_t s, const uint8_t *q, const float *xs, int64_t m, k::DevMatrix w, float *o, float *ws) {
        k::gemm_fp8_mma(q, xs, m, m, w, o, w.rows, ws, 0, s);
      }, static_cast<const uint8_t *>(q), static_cast<const float *>(xs.f32()), m, w, out, ws);
      how = "FP8 tensor-core kernel (swap-AB)";
    }
    if (debug_)
      log(LogLevel::Debug, "dsrt: GEMM M=" + std::to_string(m) + " N=" + std::to_string(w.rows) + " K=" +
                               std::to_string(w.cols) + ": " +
                               (how ? how : !gemm_ ? "GEMV (fp32 activations requested)" : "GEMV"));
    if (!how)
      go([](cudaStream_t s, const float *x, int64_t m, k::DevMatrix w, float *o, k::GemvSplit sp) { k::linear(x, m, w, o, s, sp); },
         x, m, w, out, gemv_);
  }

  // The grouped FP8 expert path (kernels/gemm_fp8_mma.cu) takes a MoE layer when FP8 activations are on, the
  // batch has at least kFp8ActivationMinRows tokens and every expert present is FP8 of one shape with H, I
  // multiples of 128 (absent experts, another rank's, are skipped on the device). Tokens go in chunks of
  // kMoeChunkTokens so the per-pair output rows (T * K * H floats) stay small.
  bool grouped_moe(const std::vector<FfnWeights> &experts, int64_t T, int64_t H, int64_t I, int64_t K) const {
    if (!gemm_ || T < kFp8ActivationMinRows || !first_expert_here(experts) ||
        !k::moe_grouped_supported(H, I, K, int64_t(experts.size())))
      return false;
    for (const FfnWeights &f : experts)
      if (f.gate && (!f.up || !f.down || f.gate.dtype != DType::F8_E4M3 || f.up.dtype != DType::F8_E4M3 ||
                     f.down.dtype != DType::F8_E4M3 || f.gate.rows != I || f.gate.cols != H || f.up.rows != I ||
                     f.up.cols != H || f.down.rows != H || f.down.cols != I))
        return false;
    return true;
  }
  void moe_grouped(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights, Tensor out) {
    const int64_t T = x.rows, K = ids.cols, H = x.cols, I = first_expert_here(experts)->gate.rows, E = int64_t(experts.size());
    const k::DevMatrix *tab = expert_tables_.at(&experts).dev;
    const int64_t chunk = std::min(T, kMoeChunkTokens), last = T - (T - 1) / chunk * chunk;
    const int64_t bytes = std::max(k::moe_grouped_layout(chunk, K, E, H, I).bytes, k::moe_grouped_layout(last, K, E, H, I).bytes);
    Tensor scratch = alloc(1, (bytes + 3) / 4, DType::I32);
    if (!all_experts_here(experts)) {  // expert parallelism: the pairs of absent experts become -1, which the
      Tensor kept = alloc(T, K, DType::I32);  // grouped kernels drop (no tile, nothing in the combine)
      go([](cudaStream_t s, const int32_t *ids, int64_t n, const k::DevMatrix *g, int64_t E, int32_t *o) {
        k::moe_drop_absent_ids(ids, n, g, E, o, s);
      }, static_cast<const int32_t *>(ids.i32()), T * K, tab, E, kept.i32());
      ids = kept;
    }
    for (int64_t t0 = 0; t0 < T; t0 += chunk)  // (chunks run one after another in stream order: one scratch)
      go([](cudaStream_t s, const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w,
            int64_t K, int64_t E, const k::DevMatrix *g, const k::DevMatrix *u, const k::DevMatrix *d, void *sc, float *o) {
        k::moe_experts_grouped(x, T, H, I, ids, w, K, E, g, u, d, sc, o, s);
      }, static_cast<const float *>(x.f32() + t0 * H), std::min(chunk, T - t0), H, I,
         static_cast<const int32_t *>(ids.i32() + t0 * K), static_cast<const float *>(weights.f32() + t0 * K), K, E, tab,
         tab + E, tab + 2 * E, scratch.data, out.f32() + t0 * H);
  }

  // Launches go through the recorder; held ops (an add or gate/up projections waiting to be fused with the
  // next op) are launched first.
  template <class F, class... A>
  void go(F f, A... args) {
    release_held();
    launch_now(f, args...);
  }
  template <class F, class... A>
  void launch_now(F f, A... args) {
    if (!rec_->deferred()) {  // at once: the metadata it reads must be on the device first
      note_gpu_start();
      meta_->flush_copies(*rec_);
    }
    rec_->launch(f, args...);
  }
  void note_gpu_start() {
    if (step_started_) return;
    step_started_ = true;
    cudaEventRecord(step_ev_[0], stream_);
  }
  void release_held() {
    if (held_add_.x) {
      const HeldAdd a = held_add_;
      held_add_ = {};
      launch_now([](cudaStream_t s, float *x, const float *y, int64_t n) { k::add(x, y, n, s); }, a.x, a.y, a.n);
    }
    for (int i = 0; i < n_held_lin_; i++) {
      const HeldLinear &l = held_lin_[i];
      launch_now([](cudaStream_t s, const float *x, int64_t m, k::DevMatrix w, float *o, k::GemvSplit sp) {
        k::linear(x, m, w, o, s, sp);
      }, l.x, l.m, l.w, l.out, gemv_);
    }
    n_held_lin_ = 0;
  }

  // Small per-step metadata (token ids, positions, page tables, rope frequencies): into the step's
  // MetaStaging, copied at the start of the segment that reads it (the host vector may die at once).
  const int32_t *upload_i32(const std::vector<int32_t> &v) {
    return static_cast<const int32_t *>(meta_->put(v.data(), v.size() * 4));
  }
  const float *upload_f32(const std::vector<float> &v) { return static_cast<const float *>(meta_->put(v.data(), v.size() * 4)); }

  // The device table [gate[E], up[E], down[E]] of a layer's routed experts (all uploaded on first use; an absent
  // expert, another rank's, has null entries), and whether some of them live in host memory (expert offload).
  // Offloaded, the table is the GPU expert cache's (expert_cache.h), whose slots are the device copies; a backend
  // other than the cache's owner reads every expert of such a layer from host memory instead (the owner's slots
  // change under it). A layer with absent experts has no expert cache (it reads offloaded experts in place).
  struct ExpertTable {
    k::DevMatrix *dev = nullptr;
    bool offloaded = false;
  };
  const ExpertTable &expert_table(const std::vector<FfnWeights> &experts) {
    auto it = expert_tables_.find(&experts);
    if (it != expert_tables_.end()) return it->second;
    const size_t E = experts.size();
    std::vector<k::DevMatrix> tab, host;
    std::vector<int32_t> slot_experts;
    bool offloaded = false, all_mapped = true;
    for (auto part : {&FfnWeights::gate, &FfnWeights::up, &FfnWeights::down})
      for (const FfnWeights &f : experts) {
        if (!f.gate) {  // absent (expert parallelism: another rank's): a null entry the expert kernels skip, and
          tab.emplace_back();  // no expert cache for the layer
          all_mapped = false;
          continue;
        }
        tab.push_back(dev(f.*part));
        const int32_t id = (f.*part).id;
        if (!store_ || id < 0 || !(f.*part).is_whole()) {  // (host mappings are of whole tensors: expert offload)
          all_mapped = false;
          continue;
        }
        std::lock_guard lk(store_->mu_);
        auto h = store_->host_.find(id);
        if (h == store_->host_.end()) all_mapped = false;
        else host.push_back(h->second);
        if (store_->in_host_.count(id)) offloaded = true;
      }
    const std::optional<k::ExpertCachePolicy> wanted = offloaded && all_mapped ? expert_cache_policy_from_env() : std::nullopt;
    bool cached = wanted.has_value();
    if (cached) {
      std::lock_guard lk(store_->mu_);
      if (!store_->cache_owner_) store_->cache_owner_ = serial_;
      if (store_->cache_owner_ != serial_) {
        tab = host;
        cached = false;
      }
    }
    if (cached)
      for (size_t e = 0; e < E; e++)
        if (tab[e].data != host[e].data) slot_experts.push_back(int32_t(e));
    k::DevMatrix *d = nullptr;
    cuda_check(cudaMalloc(&d, tab.size() * sizeof(k::DevMatrix)), "expert table");
    flush();
    cuda_check(cudaMemcpyAsync(d, tab.data(), tab.size() * sizeof(k::DevMatrix), cudaMemcpyHostToDevice, stream_),
               "expert table");
    sync();
    expert_tables_[&experts] = ExpertTable{d, offloaded};
    if (cached) {  // (with no slots too: it counts the misses read in place)
      if (!cache_stats_) {
        cuda_check(cudaMalloc(&cache_stats_, k::kCacheStats * sizeof(unsigned long long)), "expert cache counters");
        cuda_check(cudaMemsetAsync(cache_stats_, 0, k::kCacheStats * sizeof(unsigned long long), stream_), "expert cache counters");
        cuda_check(cudaHostAlloc(reinterpret_cast<void **>(&cache_stats_host_), k::kCacheStats * sizeof(unsigned long long),
                                 cudaHostAllocDefault), "expert cache counters");
        std::fill(cache_stats_host_, cache_stats_host_ + k::kCacheStats, 0ull);
      }
      expert_caches_[&experts] = std::make_unique<ExpertCache>(int32_t(E), slot_experts, host, tab, d, *wanted,
                                                                cache_stats_, stream_);
    }
    return expert_tables_.at(&experts);
  }
  // The layer's expert cache, if it has one (after expert_table).
  const ExpertCache *expert_cache(const std::vector<FfnWeights> &experts) const {
    auto it = expert_caches_.find(&experts);
    return it == expert_caches_.end() ? nullptr : it->second.get();
  }

  // Op timing with CUDA events (only while profiling): a pair per op call, read back at the next step.
  struct Timed {
    CudaBackend *b;
    size_t i;
    ~Timed() {
      if (b) cudaEventRecord(b->events_[i].second, b->stream_);
    }
  };
  Timed timed(const char *op, const Weight *w) {
    if (!profiling_) return {nullptr, 0};
    if (n_timed_ == events_.size()) {
      std::pair<cudaEvent_t, cudaEvent_t> e;
      cuda_check(cudaEventCreate(&e.first), "cudaEventCreate");
      cuda_check(cudaEventCreate(&e.second), "cudaEventCreate");
      events_.push_back(e);
      labels_.emplace_back();
    }
    labels_[n_timed_] = w ? op_label_of_weight(w->name()) : op;
    cudaEventRecord(events_[n_timed_].first, stream_);
    return {this, n_timed_++};
  }
  void collect_op_times() {  // after a sync
    for (size_t i = 0; i < n_timed_; i++) {
      float ms = 0;
      cudaEventElapsedTime(&ms, events_[i].first, events_[i].second);
      add_op_time(labels_[i], ms);
    }
    n_timed_ = 0;
  }

  static constexpr int64_t kDeviceExpertSlots = 256;
  static constexpr int64_t kCublasMinRows = 256;  // FP8 GEMMs of fewer rows run on dsrt's swap-AB kernel
  static constexpr int64_t kMoeChunkTokens = 512;  // grouped MoE: y rows of 512 * 8 pairs * 7168 floats = 117 MB
  std::unique_ptr<Fp8Gemm> gemm_;
  const bool debug_ = std::getenv("DSRT_DEBUG_GEMM") != nullptr;  // one stderr line per GEMM: which path  // token x slot pairs up to which experts run on the device

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<LaunchRecorder> rec_;
  std::unique_ptr<MetaStaging> meta_ = std::make_unique<MetaStaging>();
  const k::GemvSplit gemv_;
  // Ops held for fusion (never both at once): an add, and one or two linears of the same input.
  struct HeldAdd {
    float *x = nullptr;
    const float *y = nullptr;
    int64_t n = 0;
  };
  struct HeldLinear {
    const float *x = nullptr;
    int64_t m = 0;
    k::DevMatrix w;
    float *out = nullptr;
  };
  HeldAdd held_add_;
  HeldLinear held_lin_[2];
  int n_held_lin_ = 0;
  // GPU time of the current step: events at its first launch and after its last; summed at the next step.
  cudaEvent_t step_ev_[2] = {nullptr, nullptr};
  bool step_started_ = false;
  BackendCounters counters_;
  std::map<const void *, ExpertTable> expert_tables_;
  const uint64_t serial_ = next_serial();
  static uint64_t next_serial() {
    static std::atomic<uint64_t> n{0};
    return ++n;
  }
  std::map<const void *, std::unique_ptr<ExpertCache>> expert_caches_;
  // Expert offload with the CPU: where host-resident experts are computed, the CPU kernel, measured rates.
  const ExpertCompute experts_compute_;
  const int n_threads_;
  std::unique_ptr<HostExperts> host_experts_;
  double pcie_rate_ = 0, cpu_expert_rate_ = 0, cpu_flops_ = 0;  // per MoE layer with expert offload
  unsigned long long *cache_stats_ = nullptr, *cache_stats_host_ = nullptr;  // [kCacheStats] on the device; its
                                                                             // copy after each step (pinned)
  bool profiling_ = false;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> events_;
  std::vector<std::string> labels_;
  size_t n_timed_ = 0;
  KvCacheSpec spec_;
  k::KvCacheView kv_;
  int n_sm_ = 1;
  std::vector<FlashPlan> flash_plans_;  // this step's attention plans (at most one per subset of sequences)
  float *flash_ws_ = nullptr;  // partial outputs of split key ranges
  size_t flash_ws_bytes_ = 0;
  std::shared_ptr<CudaWeights> store_;  // the model's weights on this GPU
  std::vector<k::DevMatrix> by_id_;      // the handles this backend got from store_
  std::map<CudaWeights::PartKey, k::DevMatrix> parts_;  // likewise for parts of tensors
  std::set<const void *> host_data_;     // addresses of weights read from host memory (expert offload)
  // Weights without an id (made outside a checkpoint: tests), keyed by host address and shape.
  using WeightKey = std::tuple<const void *, int64_t, int64_t, int, int64_t, int64_t>;
  std::map<WeightKey, k::DevMatrix> weights_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const BackendOptions &opt) { return std::make_unique<CudaBackend>(opt); }

}  // namespace dsrt
