// Host side of the CUDA backend: device memory (weights uploaded in their checkpoint dtype on first use,
// a scratch arena, the paged latent KV pool), per-step batch metadata, and the launches of kernels/.
// Every op matches the CPU backend's contract (backend.h); tests/gpu compares them op by op.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>

#include "backend/backend.h"
#include "core/log.h"
#include "backend/cuda/fp8_gemm.h"
#include "backend/scratch_arena.h"
#include "core/status.h"
#include "kernels.h"

namespace dsrt {
namespace {

namespace k = dsrt::kernels;

void cuda_check(cudaError_t e, const char *what) {
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    failf(DSRT_ERR_OUT_OF_MEMORY, "CUDA: out of device memory (", what, ")");
  }
  if (e != cudaSuccess) failf(DSRT_ERR_INTERNAL, "CUDA: ", what, ": ", cudaGetErrorString(e));
}

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
    for (auto &[_, m] : by_id_) {
      cudaFree(const_cast<void *>(m.data));
      cudaFree(const_cast<float *>(m.scale));
    }
  }
  size_t bytes() const override {
    std::lock_guard lk(mu_);
    return bytes_;
  }
  mutable std::mutex mu_;
  std::map<int32_t, k::DevMatrix> by_id_;
  size_t bytes_ = 0;

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
            [](void *p) { cudaFree(p); }, size_t(256) << 20, 256) {
    cuda_check(cudaSetDevice(opt.device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    if (opt.fp8_activations) gemm_ = std::make_unique<Fp8Gemm>(stream_);
    cuda_check(cudaDeviceGetAttribute(&n_sm_, cudaDevAttrMultiProcessorCount, opt.device), "SM count");
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto &[_, m] : weights_) {
      cudaFree(const_cast<void *>(m.data));
      cudaFree(const_cast<float *>(m.scale));
    }
    for (auto &[_, t] : expert_tables_) cudaFree(t);
    for (auto &[a, b] : events_) {
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
    gemm_.reset();
    cudaFreeHost(staging_);
    cudaFree(kv_.base);
    cudaFree(plan_buf_);
    cudaFree(flash_ws_);
    cudaStreamDestroy(stream_);
  }
  const char *name() const override { return "cuda"; }
  DType default_kv_dtype() const override { return DType::BF16; }

  // A step's work is queued without host syncs; the next step (or a read to the host) waits for it, so the
  // scratch arena and the pinned staging buffer are reused only once the GPU is done with them.
  void begin_step() override {
    sync();
    if (gemm_) gemm_->release();
    collect_op_times();
    staged_ = 0;
    flash_plans_.clear();
    plan_used_ = 0;
    ArenaBackend::begin_step();
  }

  // ---- profiling
  void set_profiling(bool on) override {
    sync();
    n_timed_ = 0;
    clear_op_times();
    profiling_ = on;
  }
  std::vector<OpTime> op_times() override {
    sync();
    collect_op_times();
    return sorted_op_times();
  }

  // ---- memory

  size_t available_memory() const override {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    const size_t reserve = size_t(1) << 30;  // scratch arena growth, cuBLASLt workspace, CUDA's own needs
    return free_b > reserve ? free_b - reserve : 0;
  }

  void prepare_weights(DeviceWeightRegistry &registry, const std::vector<const Weight *> &weights) override {
    store_ = std::static_pointer_cast<CudaWeights>(
        registry.get_or_make(device(), [&] { return std::make_shared<CudaWeights>(device().index); }));
    size_t need = 0;
    for (const Weight *w : weights) {
      {
        std::lock_guard lk(store_->mu_);
        if (store_->by_id_.count(w->id)) continue;  // another engine of the model uploaded it
      }
      need += size_t(w->rows * w->cols) * dtype_size(w->dtype);
      if (w->dtype == DType::F8_E4M3)  // (+ at most 3 padding floats per 128 rows on the device: see upload)
        need += size_t(((w->rows + 127) / 128) * w->scale_cols) * sizeof(float);
    }
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    const size_t reserve = size_t(1) << 30;  // scratch, KV pool growth, cuBLASLt workspace
    if (need + reserve > free_b)
      failf(DSRT_ERR_OUT_OF_MEMORY, "the model's weights need ", need >> 20, " MiB of GPU memory (+1 GiB working room); ",
            free_b >> 20, " MiB of ", total_b >> 20, " MiB are free");
    for (const Weight *w : weights) dev(*w);
  }

  void kv_init(const KvCacheSpec &spec) override {
    if (spec.dtype != DType::F32 && spec.dtype != DType::BF16)
      failf(DSRT_ERR_UNSUPPORTED, "CUDA backend: latent KV cache in ", dtype_name(spec.dtype), " (F32 or BF16 only)");
    cudaFree(kv_.base);
    kv_ = {};
    spec_ = spec;
    const size_t bytes = size_t(spec.max_pages) * spec.page_bytes();
    void *p = nullptr;
    cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 256)), "latent KV pool");
    kv_ = {p, spec.n_layers, spec.width, dev_dtype(spec.dtype)};
  }
  void kv_copy_page(int32_t src, int32_t dst) override {
    const size_t pb = spec_.page_bytes();
    char *base = static_cast<char *>(kv_.base);
    cuda_check(cudaMemcpyAsync(base + size_t(dst) * pb, base + size_t(src) * pb, pb, cudaMemcpyDeviceToDevice, stream_),
               "kv_copy_page");
    sync();
  }
  // Session state in fp32 on the host: a BF16 pool's entries are widened (kv_read) or rounded to nearest even
  // (kv_write) on the host, through a staging vector of bf16 rows.
  void kv_read(const int32_t *pages, int64_t n, float *dst) override {
    const size_t w = size_t(spec_.width), es = dtype_size(spec_.dtype);
    std::vector<uint16_t> h(spec_.dtype == DType::BF16 ? size_t(n * spec_.n_layers) * w : 0);
    char *out = spec_.dtype == DType::BF16 ? reinterpret_cast<char *>(h.data()) : reinterpret_cast<char *>(dst);
    for (int64_t pos = 0; pos < n; pos++)
      for (int64_t l = 0; l < spec_.n_layers; l++, out += w * es)
        cuda_check(cudaMemcpyAsync(out, slot(pages, l, pos), w * es, cudaMemcpyDeviceToHost, stream_), "kv_read");
    sync();
    for (size_t i = 0; i < h.size(); i++) dst[i] = bf16_to_f32(h[i]);
  }
  void kv_write(const int32_t *pages, int64_t n, const float *src) override {
    const size_t w = size_t(spec_.width), es = dtype_size(spec_.dtype);
    std::vector<uint16_t> h(spec_.dtype == DType::BF16 ? size_t(n * spec_.n_layers) * w : 0);
    for (size_t i = 0; i < h.size(); i++) h[i] = f32_to_bf16(src[i]);
    const char *in = spec_.dtype == DType::BF16 ? reinterpret_cast<const char *>(h.data()) : reinterpret_cast<const char *>(src);
    for (int64_t pos = 0; pos < n; pos++)
      for (int64_t l = 0; l < spec_.n_layers; l++, in += w * es)
        cuda_check(cudaMemcpyAsync(slot(pages, l, pos), in, w * es, cudaMemcpyHostToDevice, stream_), "kv_write");
    sync();  // h lives until the copies are done
  }

  // ---- ops
  void embed(const Weight &table, const Batch &b, Tensor out) override {
    const auto timer_ = timed("embed", nullptr);
    k::embed(dev(table), upload_i32(b.tokens), b.n_tokens(), out.f32(), stream_);
  }
  void rms_norm(Tensor x, const Weight &w, float eps, Tensor out) override {
    const auto timer_ = timed("rms_norm", nullptr);
    k::rms_norm(x.f32(), dev(w), eps, x.rows, x.cols, x.cols, out.f32(), out.cols, stream_);
  }
  void linear(Tensor x, const Weight &w, Tensor out) override {
    const auto timer_ = timed("linear", &w);
    if (x.cols != w.cols || out.cols != w.rows || out.rows != x.rows)
      failf(DSRT_ERR_INTERNAL, "linear ", w.name(), ": shape mismatch");
    check_device(x, "linear");
    check_device(out, "linear");
    matmul(x.f32(), x.rows, dev(w), out.f32());
  }
  void add(Tensor x, Tensor y) override {
    const auto timer_ = timed("add", nullptr);
    k::add(x.f32(), y.f32(), x.rows * x.cols, stream_);
  }
  void silu_mul(Tensor gate, Tensor up, Tensor out) override {
    const auto timer_ = timed("silu_mul", nullptr);
    k::silu_mul(gate.f32(), up.f32(), out.f32(), gate.rows * gate.cols, stream_);
  }
  void rope(Tensor x, int64_t n_heads, int64_t head_dim, int64_t rope_off, const RopeTable &rt, const Batch &b) override {
    const auto timer_ = timed("rope", nullptr);
    k::rope(x.f32(), x.rows, x.cols, n_heads, head_dim, rope_off, upload_f32(rt.inv_freq), int64_t(rt.inv_freq.size()),
            rt.attn_factor, upload_i32(b.positions), stream_);
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
    k::mla_cache_write(kv_, layer, kv.f32(), kv.rows, kv_norm.rows, dev(kv_norm), eps, upload_f32(rt.inv_freq),
                       int64_t(rt.inv_freq.size()), rt.attn_factor, upload_i32(b.positions), upload_i32(slots), stream_);
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
        k::mla_attention_absorbed(kv_, layer, pages, qs, q.cols, s.n_new, s.n_past, dev(kv_b), d.n_heads, d.nope, d.rope,
                                  d.v, d.softmax_scale, scratch.f32(), os, out.cols, stream_);
      } else {  // decompress every cached latent through kv_b, then attend
        Tensor lat = alloc(n_ctx, d.latent), pe = alloc(n_ctx, d.rope), kvd = alloc(n_ctx, kv_b.rows);
        k::mla_gather(kv_, layer, pages, n_ctx, d.latent, lat.f32(), pe.f32(), stream_);
        matmul(lat.f32(), n_ctx, dev(kv_b), kvd.f32());
        k::mla_attention_naive(qs, q.cols, s.n_new, s.n_past, kvd.f32(), pe.f32(), d.n_heads, d.nope, d.rope, d.v,
                               d.softmax_scale, scratch.f32(), os, out.cols, stream_);
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
    {
      const auto timer_ = timed("mla_absorb_q", nullptr);
      k::mla_q_absorb(q.f32() + int64_t(r0) * q.cols, q.cols, rows, wkv, nh, d.nope, d.rope, d.v, qcat.f32(), stream_);
    }
    {
      const auto timer_ = timed("mla_attend", nullptr);
      k::mla_flash_attend(kv_, layer, plan.dev_pages, qcat.f32(), nh, d.latent, d.rope, d.softmax_scale, plan.items,
                          plan.block_items, plan.n_blocks, plan.combine, plan.n_combine, plan.n_slots, flash_ws_,
                          olat.f32(), stream_);
    }
    const auto timer_ = timed("mla_absorb_out", nullptr);
    if (covered == rows) {  // the sequences' rows are one range (the usual case): one launch
      k::mla_out_absorb(olat.f32(), rows, wkv, nh, d.nope, d.v, out.f32() + int64_t(r0) * out.cols, out.cols, stream_);
      return;
    }
    for (const SeqSlice &s : b.seqs)  // rows between them belong to another call's sequences: leave them
      k::mla_out_absorb(olat.f32() + int64_t(s.row0 - r0) * nh * d.latent, s.n_new, wkv, nh, d.nope, d.v,
                        out.f32() + int64_t(s.row0) * out.cols, out.cols, stream_);
  }

  // A step's flash attention plan (blocks, key splits, page table), made at the first layer and reused by the
  // others: the plan and the split workspace live in device buffers of their own (not the scratch arena, whose
  // layer temporaries are released after each layer).
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
  const FlashPlan &flash_plan(const Batch &b, int64_t nh, int64_t dc, int32_t r0) {
    auto same = [&](const FlashPlan &p) {
      return p.nh == nh && p.dc == dc && p.r0 == r0 && p.seqs.size() == b.seqs.size() &&
             std::memcmp(p.seqs.data(), b.seqs.data(), b.seqs.size() * sizeof(SeqSlice)) == 0 && p.pages == b.pages;
    };
    for (const FlashPlan &p : flash_plans_)
      if (same(p)) return p;
    std::vector<k::MlaSeq> seqs;
    for (const SeqSlice &s : b.seqs) seqs.push_back({s.row0 - r0, s.n_new, s.n_past, s.page0});
    const k::MlaFlashPlan kp = k::mla_flash_plan(seqs, nh, n_sm_);
    auto up256 = [](size_t n) { return (n + 255) / 256 * 256; };
    const size_t pb = up256(b.pages.size() * 4), ib = up256(kp.items.size() * sizeof(k::MlaWorkItem)),
                 bb = up256(kp.block_items.size() * 4), cb = up256(kp.combine.size() * sizeof(k::MlaCombineItem));
    if (plan_used_ + pb + ib + bb + cb > plan_cap_) {  // grow: the step's earlier plans point into the old buffer
      sync();
      flash_plans_.clear();
      cudaFree(plan_buf_);
      plan_buf_ = nullptr;
      plan_used_ = 0;
      plan_cap_ = 0;  // stays 0 if the allocation throws: the next step retries rather than using a null buffer
      const size_t cap = std::max(2 * (pb + ib + bb + cb), size_t(1) << 20);
      cuda_check(cudaMalloc(&plan_buf_, cap), "attention plan");
      plan_cap_ = cap;
    }
    const size_t ws = size_t(k::mla_flash_workspace_floats(kp.n_slots, dc)) * sizeof(float);
    if (ws > flash_ws_bytes_) {
      sync();  // earlier launches of this step may still read the workspace
      cudaFree(flash_ws_);
      flash_ws_ = nullptr;
      const size_t bytes = std::max(ws, 2 * flash_ws_bytes_);
      flash_ws_bytes_ = 0;  // as above
      cuda_check(cudaMalloc(&flash_ws_, bytes), "attention split workspace");
      flash_ws_bytes_ = bytes;
    }
    char *base = static_cast<char *>(plan_buf_) + plan_used_;
    stage_copy(base, b.pages.data(), b.pages.size() * 4);
    stage_copy(base + pb, kp.items.data(), kp.items.size() * sizeof(k::MlaWorkItem));
    stage_copy(base + pb + ib, kp.block_items.data(), kp.block_items.size() * 4);
    stage_copy(base + pb + ib + bb, kp.combine.data(), kp.combine.size() * sizeof(k::MlaCombineItem));
    plan_used_ += pb + ib + bb + cb;
    FlashPlan p;
    p.seqs = b.seqs;
    p.pages = b.pages;
    p.nh = nh;
    p.dc = dc;
    p.r0 = r0;
    p.n_blocks = int32_t(kp.block_items.size()) - 1;
    p.n_combine = int32_t(kp.combine.size());
    p.n_slots = kp.n_slots;
    p.dev_pages = reinterpret_cast<const int32_t *>(base);
    p.items = reinterpret_cast<const k::MlaWorkItem *>(base + pb);
    p.block_items = reinterpret_cast<const int32_t *>(base + pb + ib);
    p.combine = reinterpret_cast<const k::MlaCombineItem *>(base + pb + ib + bb);
    flash_plans_.push_back(std::move(p));
    return flash_plans_.back();
  }

  void moe_route(Tensor x, const Weight &gate, const Weight &bias, const RouterParams &p, Tensor ids,
                 Tensor weights) override {
    const auto timer_ = timed("moe_route", nullptr);
    Tensor logits = alloc(x.rows, p.n_experts);
    k::linear(x.f32(), x.rows, dev(gate), logits.f32(), stream_);
    k::RouteParams rp{int32_t(p.n_experts), int32_t(p.top_k), int32_t(p.n_group), int32_t(p.topk_group),
                      p.scoring == ScoringFunc::Sigmoid ? 1 : 0,
                      p.method == TopkMethod::NoauxTc ? 0 : p.method == TopkMethod::GroupLimitedGreedy ? 1 : 2,
                      p.norm_topk_prob ? 1 : 0, p.routed_scaling_factor};
    k::moe_route(logits.f32(), x.rows, bias ? dev(bias) : k::DevMatrix{}, rp, ids.i32(), weights.f32(), stream_);
  }
  // Reference expert path: the routing decisions come to the host, tokens are grouped by expert, each
  // expert's SwiGLU runs once over its tokens and is added in ascending expert order (as on the CPU).
  void moe_experts(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights, Tensor out) override {
    const auto timer_ = timed("moe_experts", nullptr);
    const int64_t T = x.rows, K = ids.cols, H = x.cols, I = experts.empty() ? 0 : experts[0].gate.rows;
    if (T * K <= kDeviceExpertSlots && H % 4 == 0 && I % 4 == 0) {
      const k::DevMatrix *tab = expert_table(experts);
      Tensor h = alloc(T * K, I), y = alloc(T * K, H);
      k::moe_experts_gemv(x.f32(), T, H, I, ids.i32(), weights.f32(), K, tab, tab + experts.size(),
                          tab + 2 * experts.size(), h.f32(), y.f32(), out.f32(), stream_);
      return;
    }
    std::vector<int32_t> hid(size_t(T * K));
    std::vector<float> hw(size_t(T * K));
    cuda_check(cudaMemcpyAsync(hid.data(), ids.data, hid.size() * 4, cudaMemcpyDeviceToHost, stream_), "moe ids");
    cuda_check(cudaMemcpyAsync(hw.data(), weights.data, hw.size() * 4, cudaMemcpyDeviceToHost, stream_), "moe weights");
    sync();
    std::vector<std::vector<std::pair<int32_t, float>>> by_expert(experts.size());
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < K; j++) {
        int32_t e = hid[size_t(t * K + j)];
        if (e < 0 || size_t(e) >= experts.size()) failf(DSRT_ERR_INTERNAL, "router chose expert ", e);
        by_expert[size_t(e)].push_back({int32_t(t), hw[size_t(t * K + j)]});
      }
    cuda_check(cudaMemsetAsync(out.data, 0, size_t(T * H) * sizeof(float), stream_), "moe out");
    for (size_t e = 0; e < experts.size(); e++) {
      auto &toks = by_expert[e];
      if (toks.empty()) continue;
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
      k::gather_rows(x.f32(), H, drows, n, xe.f32(), stream_);
      matmul(xe.f32(), n, dev(experts[e].gate), g.f32());
      matmul(xe.f32(), n, dev(experts[e].up), u.f32());
      k::silu_mul(g.f32(), u.f32(), g.f32(), n * inter, stream_);
      matmul(g.f32(), n, dev(experts[e].down), y.f32());
      k::scatter_add_rows(y.f32(), H, drows, dw, n, out.f32(), stream_);
    }
  }
  void gather_rows(Tensor x, const std::vector<int32_t> &rows, Tensor out) override {
    const auto timer_ = timed("gather_rows", nullptr);
    k::gather_rows(x.f32(), x.cols, upload_i32(rows), int64_t(rows.size()), out.f32(), stream_);
  }
  void to_host(Tensor t, float *dst) override {
    cuda_check(cudaMemcpyAsync(dst, t.data, size_t(t.rows * t.cols) * dtype_size(t.dtype), cudaMemcpyDeviceToHost, stream_),
               "to_host");
    sync();
  }

  void from_host(Tensor t, const void *src) override {
    cuda_check(cudaMemcpyAsync(t.data, src, size_t(t.rows * t.cols) * dtype_size(t.dtype), cudaMemcpyHostToDevice, stream_),
               "from_host");
    sync();
  }
  void sync() { cuda_check(cudaStreamSynchronize(stream_), "stream"); }

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
    if (!w.is_whole())
      failf(DSRT_ERR_UNSUPPORTED, "CUDA: ", w.name(), " is a part of a weight (a rank's shard); sharded weights on "
                                  "GPUs come with the several-GPU communicator");
    if (w.id >= 0 && store_) {
      if (size_t(w.id) < by_id_.size() && by_id_[size_t(w.id)].data) return by_id_[size_t(w.id)];
      std::lock_guard lk(store_->mu_);
      auto it = store_->by_id_.find(w.id);
      k::DevMatrix m = it != store_->by_id_.end() ? it->second : upload(w);
      if (it == store_->by_id_.end()) {
        store_->by_id_[w.id] = m;
        store_->bytes_ += weight_bytes(w);
      }
      if (by_id_.size() <= size_t(w.id)) by_id_.resize(size_t(w.id) + 1);
      return by_id_[size_t(w.id)] = m;
    }
    const WeightKey key{w.data, w.rows, w.cols, int(w.dtype)};
    auto it = weights_.find(key);
    if (it != weights_.end()) return it->second;
    return weights_[key] = upload(w);
  }
  static size_t weight_bytes(const Weight &w) {
    size_t b = size_t(w.rows * w.cols) * dtype_size(w.dtype);
    if (w.dtype == DType::F8_E4M3) b += size_t(((w.rows + 127) / 128) * w.scale_cols) * sizeof(float);  // (+ padding, below)
    return b;
  }
  // Its bytes as stored, plus FP8 block scales.
  k::DevMatrix upload(const Weight &w) {
    k::DevMatrix m;
    m.dtype = dev_dtype(w.dtype);
    m.rows = w.rows;
    m.cols = w.cols;
    const size_t bytes = size_t(w.rows * w.cols) * dtype_size(w.dtype);
    void *p = nullptr;
    cuda_check(cudaMalloc(&p, std::max<size_t>(bytes, 16)), "weights");
    // On our stream: a legacy-stream cudaMemcpy from pageable memory may return before its DMA lands, and
    // our non-blocking stream would not wait for it (found on the H100: the first lm_head GEMV read a
    // half-uploaded matrix).
    cuda_check(cudaMemcpyAsync(p, w.data, bytes, cudaMemcpyHostToDevice, stream_), "weight upload");
    m.data = p;
    if (w.dtype == DType::F8_E4M3) {
      // Rows of block scales padded to a multiple of 4: cuBLASLt reads BLK128x128 scales with that leading
      // dimension. Unpadded, every GEMM whose K has 1-3 (mod 4) blocks of 128 (K = 128, 256: the tiny
      // presets' hidden sizes) took the scales of the wrong output blocks (relative error 0.3-0.87 op by op
      // with FP8 activations) while K = 512, 1024, 2048, 7168 were exact. dsrt's own kernels read the
      // padded rows through scale_cols.
      const int64_t brows = (w.rows + 127) / 128, ld = (w.scale_cols + 3) / 4 * 4;
      const size_t sb = size_t(brows * ld) * sizeof(float);
      std::vector<float> padded(size_t(brows * ld), 0.0f);
      for (int64_t r = 0; r < brows; r++)
        std::memcpy(padded.data() + r * ld, w.scale + r * w.scale_cols, size_t(w.scale_cols) * sizeof(float));
      void *sp = nullptr;
      cuda_check(cudaMalloc(&sp, sb), "weight scales");
      cuda_check(cudaMemcpyAsync(sp, padded.data(), sb, cudaMemcpyHostToDevice, stream_), "scale upload");
      m.scale = static_cast<const float *>(sp);
      m.scale_cols = ld;
    }
    sync();
    return m;
  }

  // out [m, N] = x [m, K] W^T: cuBLASLt's block-scaled FP8 GEMM for many rows (FP8 activations), else the
  // fp32-activation GEMV kernels (decode, BF16 weights, shapes cuBLASLt refuses, fp8_activations off).
  void matmul(const float *x, int64_t m, const k::DevMatrix &w, float *out) {
    bool done = false;
    if (gemm_ && m >= kMinGemmRows && Fp8Gemm::eligible(w)) {
      const uint64_t mark = scratch_mark();
      const int64_t mp = Fp8Gemm::padded_rows(m);
      Tensor xq = alloc(1, (mp * w.cols + 3) / 4, DType::I32), xs = alloc(w.cols / 128, mp), tmp = alloc(mp, w.rows);
      done = gemm_->run(x, m, w, out, static_cast<uint8_t *>(xq.data), xs.f32(), tmp.data);
      scratch_release(mark);  // stream order keeps the scratch valid for the queued kernels
    }
    if (debug_)
      log(LogLevel::Debug, "dsrt: GEMM M=" + std::to_string(m) + " N=" + std::to_string(w.rows) + " K=" +
                               std::to_string(w.cols) + ": " +
                               (done ? "cuBLASLt FP8" : !gemm_ ? "GEMV (fp32 activations requested)" : "GEMV"));
    if (!done) k::linear(x, m, w, out, stream_);
  }

  // Small per-step metadata (token ids, positions, page tables, rope frequencies) goes through a pinned
  // staging buffer into the scratch arena: the host vector may die at once, and no sync is needed until the
  // buffer fills (then one sync lets it start over).
  const void *upload(const void *src, size_t bytes) {
    void *dst = alloc(1, std::max<int64_t>(1, int64_t((bytes + 3) / 4))).data;
    stage_copy(dst, src, bytes);
    return dst;
  }
  void stage_copy(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return;
    const size_t need = (bytes + 255) / 256 * 256;
    if (staged_ + need > staging_cap_) {
      sync();
      staged_ = 0;
      if (need > staging_cap_) {
        cudaFreeHost(staging_);
        staging_ = nullptr;
        const size_t cap = std::max(need, size_t(4) << 20);
        staging_cap_ = 0;  // stays 0 if the allocation throws: a later upload retries it
        cuda_check(cudaMallocHost(&staging_, cap), "pinned staging buffer");
        staging_cap_ = cap;
      }
    }
    char *p = static_cast<char *>(staging_) + staged_;
    std::memcpy(p, src, bytes);
    staged_ += need;
    cuda_check(cudaMemcpyAsync(dst, p, bytes, cudaMemcpyHostToDevice, stream_), "metadata upload");
  }
  const int32_t *upload_i32(const std::vector<int32_t> &v) {
    return static_cast<const int32_t *>(upload(v.data(), v.size() * 4));
  }
  const float *upload_f32(const std::vector<float> &v) { return static_cast<const float *>(upload(v.data(), v.size() * 4)); }

  // The device table [gate[E], up[E], down[E]] of a layer's routed experts (all uploaded on first use).
  const k::DevMatrix *expert_table(const std::vector<FfnWeights> &experts) {
    auto it = expert_tables_.find(&experts);
    if (it != expert_tables_.end()) return it->second;
    std::vector<k::DevMatrix> tab;
    for (auto part : {&FfnWeights::gate, &FfnWeights::up, &FfnWeights::down})
      for (const FfnWeights &f : experts) tab.push_back(dev(f.*part));
    k::DevMatrix *d = nullptr;
    cuda_check(cudaMalloc(&d, tab.size() * sizeof(k::DevMatrix)), "expert table");
    cuda_check(cudaMemcpyAsync(d, tab.data(), tab.size() * sizeof(k::DevMatrix), cudaMemcpyHostToDevice, stream_),
               "expert table");
    sync();
    expert_tables_[&experts] = d;
    return d;
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
  static constexpr int64_t kMinGemmRows = 32;  // below this the GEMV kernels read each weight once anyway
  std::unique_ptr<Fp8Gemm> gemm_;
  const bool debug_ = std::getenv("DSRT_DEBUG_GEMM") != nullptr;  // one stderr line per GEMM: which path  // token x slot pairs up to which experts run on the device

  cudaStream_t stream_ = nullptr;
  void *staging_ = nullptr;
  size_t staging_cap_ = 0, staged_ = 0;
  std::map<const void *, k::DevMatrix *> expert_tables_;
  bool profiling_ = false;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> events_;
  std::vector<std::string> labels_;
  size_t n_timed_ = 0;
  KvCacheSpec spec_;
  k::KvCacheView kv_;
  int n_sm_ = 1;
  std::vector<FlashPlan> flash_plans_;  // this step's attention plans (at most one per subset of sequences)
  void *plan_buf_ = nullptr;
  size_t plan_cap_ = 0, plan_used_ = 0;
  float *flash_ws_ = nullptr;  // partial outputs of split key ranges
  size_t flash_ws_bytes_ = 0;
  std::shared_ptr<CudaWeights> store_;  // the model's weights on this GPU
  std::vector<k::DevMatrix> by_id_;      // the handles this backend got from store_
  // Weights without an id (made outside a checkpoint: tests), keyed by host address and shape.
  using WeightKey = std::tuple<const void *, int64_t, int64_t, int>;
  std::map<WeightKey, k::DevMatrix> weights_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const BackendOptions &opt) { return std::make_unique<CudaBackend>(opt); }

}  // namespace dsrt
