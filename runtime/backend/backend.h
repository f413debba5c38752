// The ops the forward pass needs, at kernel granularity (design.md §2). The CPU backend is the readable
// fp32 reference; a GPU backend implements the same ops and is checked against it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "model/placement.h"
#include "model/weights.h"

namespace dsrt {

// One row of a per-op time table: linear layers are named by weight ("self_attn.q_b_proj"), other ops by op.
struct OpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0;
};
// "model.layers.3.mlp.experts.17.up_proj.weight" -> "mlp.experts.up_proj": a layer-independent label.
std::string op_label_of_weight(const std::string &tensor_name);

// One sequence's share of a forward step. Its new tokens are batch rows row0 .. row0+n_new-1 at positions
// n_past .. n_past+n_new-1; the cache already holds positions 0 .. n_past-1. Its page table is
// Batch::pages[page0 .. page0+n_pages): page k holds positions 64k .. 64k+63.
struct SeqSlice {
  int32_t row0 = 0, n_new = 0, n_past = 0;
  int32_t page0 = 0, n_pages = 0;
};

// The batch of sequences one forward step processes (design.md §2, §5). Plain data: integers only, no
// pointers, so a leader rank can send it to followers that run the same forward in lockstep.
// Data-parallel attention: the rank whose pool holds engine page `page` when each rank's pool has rank_pages
// pages (0: every rank's pool holds every page: rank 0).
inline int32_t rank_of_page(int32_t page, int64_t rank_pages) { return rank_pages > 0 ? int32_t(page / rank_pages) : 0; }

struct Batch {
  std::vector<int32_t> tokens;     // [T]
  std::vector<int32_t> positions;  // [T]
  std::vector<SeqSlice> seqs;
  std::vector<int32_t> pages;      // every sequence's page table, back to back
  // Data-parallel attention (dist/mapping.h): > 0 when each rank keeps the cache of its own sequences in a
  // pool of this many pages; page g then lives on rank g / rank_pages as its page g % rank_pages, and every
  // page of a sequence on one rank. 0: every rank's pool holds every page.
  int32_t rank_pages = 0;
  int64_t n_tokens() const { return int64_t(tokens.size()); }
  int32_t rank_of(int32_t page) const { return rank_of_page(page, rank_pages); }
  const int32_t *pages_of(const SeqSlice &s) const { return pages.data() + s.page0; }
  // Appends a sequence with its page table; its rows are appended by the caller.
  void add_seq(int32_t n_new, int32_t n_past, const int32_t *page_ids, int32_t n_pages) {
    seqs.push_back({int32_t(tokens.size()), n_new, n_past, int32_t(pages.size()), n_pages});
    pages.insert(pages.end(), page_ids, page_ids + n_pages);
  }
  // The same step restricted to some of its sequences (rows keep their numbers).
  Batch with_seqs(const std::vector<SeqSlice> &keep) const {
    Batch b;
    b.tokens = tokens;
    b.positions = positions;
    b.pages = pages;
    b.rank_pages = rank_pages;
    b.seqs = keep;
    return b;
  }
};

constexpr int64_t kPageTokens = 64;

// The paged latent cache: per page, per cache layer (main layers, then MTP layers), 64 tokens x width
// values, width = kv_lora_rank + qk_rope_head_dim: c_kv after its norm, k_pe after RoPE. The values are
// stored in the pool's dtype (F32 or BF16, rounded to nearest even on write) and widened to fp32 on read.
struct KvCacheSpec {
  int64_t n_layers = 0;
  int64_t width = 0;
  int64_t max_pages = 0;
  DType dtype = DType::F32;
  // Bytes of one page (all cache layers).
  size_t page_bytes() const { return size_t(n_layers * kPageTokens * width) * dtype_size(dtype); }
  size_t pool_bytes() const { return size_t(max_pages) * page_bytes(); }
};

struct RopeTable {
  std::vector<float> inv_freq;  // qk_rope_head_dim / 2 frequencies (YaRN applied)
  float attn_factor = 1.0f;     // multiplies cos and sin
};

struct MlaDims {
  int64_t n_heads, nope, rope, v, latent;  // nh, dn, dr, dv, dc
  float softmax_scale;
};

enum class AttnForm { Naive, Absorbed };

struct RouterParams {
  int64_t n_experts, top_k, n_group, topk_group;
  ScoringFunc scoring;
  TopkMethod method;
  bool norm_topk_prob;
  float routed_scaling_factor;
};

// A device's copies of one model's weights, keyed by Weight::id (design.md §5). Owned by the model (through
// its registry) and shared by every engine and backend of the model on that device: two engines on one GPU
// hold one copy.
class DeviceWeights {
 public:
  virtual ~DeviceWeights() = default;
  virtual size_t bytes() const = 0;
};

class DeviceWeightRegistry {
 public:
  // The store of `device`, made by `make` the first time (thread-safe).
  std::shared_ptr<DeviceWeights> get_or_make(Device device, const std::function<std::shared_ptr<DeviceWeights>()> &make);
  // Bytes held on each device so far.
  std::vector<std::pair<Device, size_t>> usage() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<Device, std::shared_ptr<DeviceWeights>>> stores_;
};

// What a backend counts over its life (dsrt_engine_stats, dsrt bench).
struct BackendCounters {
  double device_seconds = 0;  // GPU time of the steps (first launch to last result copied back); 0 on the CPU
  uint64_t graph_replays = 0, graph_captures = 0, eager_segments = 0;  // CUDA: how step segments were launched
  // Expert offload's GPU expert cache (CUDA), over all MoE layers and calls: routed experts a call needed that
  // were in a device slot (hits) or not (misses), bytes copied into slots over PCIe, and bytes the expert
  // kernels read in place from host memory (misses not admitted; estimated from the kernels' access pattern).
  uint64_t expert_hits = 0, expert_misses = 0, expert_bytes_copied = 0, expert_bytes_read_in_host = 0;
  // Expert offload with the CPU: routed experts computed on the CPU (per layer and step) and their weight bytes.
  uint64_t experts_on_cpu = 0, expert_bytes_cpu = 0;
  // CUDA: moe_experts calls by the path that ran them: the device GEMV kernels, the grouped FP8 kernels (both
  // without a host sync, also on an expert-parallel rank), and the paths that bring the routing to the host
  // (a sync each: the reference path, the split with the CPU; the split's GPU share counts once more).
  uint64_t moe_gemv_calls = 0, moe_grouped_calls = 0, moe_host_calls = 0;
};

struct SamplingParams;  // engine/sampler.h

// One row of Backend::sample_rows: a row of the logits tensor, the sampler's settings for it, and the draw.
// The pointers must stay valid during the call.
struct SampleRequest {
  int32_t row = 0;                                // row of the logits tensor
  const SamplingParams *params = nullptr;
  const int32_t *history = nullptr;               // the sequence so far (penalties read its last penalty_window ids)
  size_t n_history = 0;
  const std::vector<int32_t> *banned = nullptr;   // ids never sampled (may be null)
  double u = 0;                                   // Rng::uniform() drawn for this row (ignored when greedy)
};
// What sample_token_with (engine/sampler.h) returns for the row, or the status and text it throws.
struct SampleResult {
  int32_t token = -1;
  int32_t status = 0;  // dsrt_status: DSRT_OK, or the sampler's error
  std::string error;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char *name() const = 0;

  // Scratch tensors live until the next begin_step(), or until scratch_release() of a mark taken before them.
  virtual void begin_step() = 0;
  virtual Tensor alloc(int64_t rows, int64_t cols, DType dtype = DType::F32) = 0;
  virtual uint64_t scratch_mark() = 0;
  virtual void scratch_release(uint64_t mark) = 0;
  virtual void kv_init(const KvCacheSpec &spec) = 0;
  // The latent cache dtype this backend is meant to run with (design.md §5): BF16 on a GPU, F32 on the CPU
  // reference. kv_init accepts F32 and BF16 on every backend.
  virtual DType default_kv_dtype() const = 0;
  // The weights the forward will read, given once at engine creation: a GPU backend uploads `weights` now, so
  // that too little device memory is a clear DSRT_ERR_OUT_OF_MEMORY at load rather than a failure
  // mid-generation, and maps `host_weights` (routed experts the placement left in host memory: expert
  // offload) for its kernels to read in place; those also in `weights` are uploaded and mapped (a GPU backend's
  // expert cache starts with them in its slots and may evict them). Both go into the model's store for this backend's device
  // (shared with the model's other engines). The CPU reads every weight in place and ignores both.
  virtual void prepare_weights(DeviceWeightRegistry &store, const std::vector<const Weight *> &weights,
                               const std::vector<const Weight *> &host_weights) {
    (void)store;
    (void)weights;
    (void)host_weights;
  }
  virtual Device device() const = 0;
  // Bytes of memory this backend could still allocate (device memory on a GPU, available RAM on the CPU);
  // sizes the KV pool from a fraction. 0 when unknown. The CPU backend subtracts what other live CPU KV
  // pools of the process may still allocate, so several engines do not each claim the same free memory.
  virtual size_t available_memory() const = 0;
  // Copies one page's contents (all layers) to another page: used when a session forks or keeps a prefix.
  virtual void kv_copy_page(int32_t src, int32_t dst) = 0;
  // Cache contents of positions [0, n) of a sequence, all cache layers, as fp32 [n][n_layers][width]
  // (session state save/restore).
  virtual void kv_read(const int32_t *pages, int64_t n, float *dst) = 0;
  virtual void kv_write(const int32_t *pages, int64_t n, const float *src) = 0;

  // out[t] = table[tokens[t]]
  virtual void embed(const Weight &table, const Batch &b, Tensor out) = 0;
  // out = x / sqrt(mean(x^2) + eps) * w, per row (out may alias x)
  virtual void rms_norm(Tensor x, const Weight &w, float eps, Tensor out) = 0;
  // out = x W^T, W [out, in] FP8 (block scales) / BF16 / F16 / F32
  virtual void linear(Tensor x, const Weight &w, Tensor out) = 0;
  // x += y
  virtual void add(Tensor x, Tensor y) = 0;
  // out = silu(gate) * up
  virtual void silu_mul(Tensor gate, Tensor up, Tensor out) = 0;
  // Interleaved RoPE in place on columns [h*head_dim + rope_off, + rope_dim) of each of n_heads heads.
  virtual void rope(Tensor x, int64_t n_heads, int64_t head_dim, int64_t rope_off, const RopeTable &rt,
                    const Batch &b) = 0;
  // kv [T, dc+dr] (kv_a output): normalises c_kv, rotates k_pe and writes both into cache layer `layer`.
  virtual void mla_cache_write(int64_t layer, Tensor kv, const Weight &kv_norm, float eps, const RopeTable &rt,
                               const Batch &b) = 0;
  // q [T, nh*(dn+dr)] with RoPE applied; attends causally over cache layer `layer` (which already holds the
  // step's tokens); out [T, nh*dv], rows of sequences outside b.seqs untouched. kv_b [nh*(dn+dv), dc] supplies
  // W_UK / W_UV. The form is the arithmetic asked for; the two are equal in exact arithmetic (spec §3.9), and a
  // backend may compute either with the other: CUDA runs both as its tensor-core absorbed kernel over a BF16
  // cache (the naive form's decompressed keys grow with the context).
  virtual void mla_attention(int64_t layer, Tensor q, const Weight &kv_b, const MlaDims &d, const Batch &b,
                             AttnForm form, Tensor out) = 0;
  // Router (spec §4): ids [T, K] (I32) and weights [T, K].
  virtual void moe_route(Tensor x, const Weight &gate, const Weight &bias, const RouterParams &p, Tensor ids,
                         Tensor weights) = 0;
  // out = sum_k weights[t,k] * Expert_{ids[t,k]}(x[t])
  virtual void moe_experts(Tensor x, const std::vector<FfnWeights> &experts, Tensor ids, Tensor weights,
                           Tensor out) = 0;
  // Routed rows that travel to the ranks owning their experts (model/data_parallel.h) in the format the expert
  // GEMMs take under FP8 activations: whether moe_experts over `rows` tokens with these experts (top_k per token)
  // quantises its input to FP8 per token per 128 channels (BackendOptions::fp8_activations); if so rows may
  // arrive quantised. quantize_fp8_rows: q [n, H] (F8_E4M3) and scales [n, H / 128] (F32, row-major) as that
  // quantisation makes them (e4m3(x / s), s = amax / 448 of each 128 channels); dequantize_fp8_rows: out = q * s.
  virtual bool moe_takes_fp8(const std::vector<FfnWeights> &experts, int64_t rows, int64_t top_k) const {
    (void)experts, (void)rows, (void)top_k;
    return false;
  }
  virtual void quantize_fp8_rows(Tensor x, Tensor q, Tensor scales);
  virtual void dequantize_fp8_rows(Tensor q, Tensor scales, Tensor out);
  // Their arguments' shapes: x [n, H] (H % 128 == 0), q [n, H] F8_E4M3, scales [n, H / 128]; else DSRT_ERR_INTERNAL.
  static void check_fp8_rows(const Tensor &x, const Tensor &q, const Tensor &scales);
  // out[i] = x[rows[i]]
  virtual void gather_rows(Tensor x, const std::vector<int32_t> &rows, Tensor out) = 0;
  virtual void to_host(Tensor t, float *dst) = 0;

  // Sampling (issue 10): every request's row of logits [R, vocab] (this backend's tensor, e.g. the forward's
  // logits left where they were computed) sampled as sample_token_with(row, ..., u) does, one result per request;
  // a row's failure is its result's status and text (the other rows are still sampled). Only the token ids
  // come back. Default (CPU, any backend without a kernel): the rows to the host and the CPU sampler on each.
  virtual std::vector<SampleResult> sample_rows(Tensor logits, const std::vector<SampleRequest> &rows);
  // Whether sample_rows runs where the logits are (then the engine brings back only the rows that someone reads
  // as logits); false: the default above, and the engine keeps copying logits to the host.
  virtual bool samples_on_device() const { return false; }
  // Copies t.rows * t.cols elements of host memory into t (inputs of op tests; tokens are uploaded by ops).
  virtual void from_host(Tensor t, const void *src) = 0;

  // Per-op time accounting (dsrt bench): CUDA events on a GPU, the wall clock on the CPU. Turning it on
  // clears the record; op_times() waits for queued work and lists ops by total time, longest first.
  virtual void set_profiling(bool on) = 0;
  virtual std::vector<OpTime> op_times() = 0;
  virtual BackendCounters counters() const { return {}; }
  // For a device communicator (dist/nccl_communicator.h) that queues its collectives behind this backend's
  // ops: queues everything the backend has recorded or held so far and returns the stream it queues on (a
  // cudaStream_t), with the calling thread bound to the backend's device. Work queued there next runs after
  // the backend's earlier ops and before its later ones. Null: the backend has no stream (the CPU).
  virtual void *native_stream() { return nullptr; }
};

// GEMMs of at least this many rows quantise activations to FP8 (when BackendOptions::fp8_activations is on):
// the linears of a step with that many token rows, and the routed experts of a step with that many tokens
// (whatever each expert receives). Fewer rows read each weight once on the GEMV path anyway.
constexpr int64_t kFp8ActivationMinRows = 8;

struct BackendOptions {
  int n_threads = 0;  // CPU threads, 0 = all
  int device = 0;     // CUDA device index
  // GEMMs of at least kFp8ActivationMinRows rows with FP8 weights quantise their activations to FP8 (per token
  // per 128 channels, e4m3, scale amax / 448): CUDA runs them on tensor cores; the CPU rounds the activations
  // the same way and multiplies in fp32, the reference for the GPU's FP8 path. false: fp32 activations
  // everywhere (the CPU reference's numbers).
  bool fp8_activations = false;
  // CUDA: replay repeated step segments from CUDA graphs (DSRT_CUDA_GRAPHS=0 turns them off too).
  bool cuda_graphs = true;
  // CUDA: force the GEMV kernel's cut of every matrix (K slices per row: 1/2/4/8; rows per warp: 1/2/4);
  // 0 = chosen per shape. For `dsrt bench --ops` sweeps.
  int gemv_k_split = 0, gemv_rows_per_warp = 0;
  // CUDA with expert offload: where routed experts in host memory are computed (model/placement.h).
  ExpertCompute experts_compute = ExpertCompute::Gpu;
};

enum class BackendKind { Cpu, Cuda };

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions &opt);
// DSRT_ERR_NO_DEVICE (with the reason) when this build has no CUDA or the machine no usable GPU.
std::unique_ptr<Backend> make_backend(BackendKind kind, const BackendOptions &opt);
// Usable CUDA devices (0 without CUDA support or a driver); `why` says why there are none.
int cuda_devices(std::string *why);
// Bytes of memory free on a device now (host: available RAM); 0 when unknown.
uint64_t device_free_memory(Device d);
// Device memory bandwidth in bytes (read + written) per second, measured with a 1 GiB device-to-device copy
// (0 without CUDA): the denominator of the GPU rooflines.
double device_copy_bandwidth(int device);
// Host-to-device copy rate in bytes per second from pinned memory (PCIe or C2C; 0 without CUDA): the
// denominator of the expert offload roofline.
double host_to_device_bandwidth(int device);
// The block-scaled FP8 GEMM's rate on an m x n x k problem (activation quantisation included), in TFLOP/s;
// 0 when cuBLASLt or the GPU is missing: the denominator of the prefill roofline.
double fp8_gemm_tflops(int device, int64_t m, int64_t n, int64_t k);
// "cuBLASLt <version>" when the block-scaled FP8 GEMM library loads, else why not.
// The CUDA backend runs a BF16 linear (the lm_head) of 2..this many rows on dsrt's swap-AB kernel, cuBLASLt's
// GEMM above (measured on an H200, lm_head: 454 / 488 us at 8 / 32 rows against cuBLASLt's ~1,260 us at 32;
// 1,116 / 2,207 us at 128 / 256 against cuBLASLt's ~870 at 128 and 674 at 300: at 128 rows one block per SM
// stops streaming).
constexpr int64_t kCudaBf16SwapAbMaxRows = 64;
std::string cublaslt_status();

}  // namespace dsrt
