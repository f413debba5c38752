// Launch wrappers of dsrt's CUDA kernels. Plain pointers and sizes: nothing here knows about the model.
// Every wrapper enqueues on `stream` and returns at once; activations are fp32, weights are read in their
// checkpoint dtype (FP8 e4m3 with 128x128 block scales, BF16, F16, F32).
#pragma once
#include <cstdint>
#include <vector>

typedef struct CUstream_st *cudaStream_t;

namespace dsrt::kernels {

enum WeightDtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kFP8 = 3 };

// A matrix [rows, cols] in device memory; FP8 carries its block scales [ceil(rows/128), ceil(cols/128)].
struct DevMatrix {
  const void *data = nullptr;
  int32_t dtype = kF32;
  int64_t rows = 0, cols = 0;
  const float *scale = nullptr;
  int64_t scale_cols = 0;
};

// ---- elementwise.cu
void embed(const DevMatrix &table, const int32_t *ids, int64_t n, float *out, cudaStream_t s);
// out = x / sqrt(mean(x^2) + eps) * w per row of width n (out may alias x); w is a [n, 1] vector.
void rms_norm(const float *x, const DevMatrix &w, float eps, int64_t rows, int64_t n, int64_t x_stride,
              float *out, int64_t out_stride, cudaStream_t s);
void add(float *x, const float *y, int64_t n, cudaStream_t s);
// x += y, then out = rms_norm(x) * w (rows of width n, contiguous; out must not alias y).
void add_rms_norm(float *x, const float *y, const DevMatrix &w, float eps, int64_t rows, int64_t n, float *out,
                  cudaStream_t s);
void silu_mul(const float *gate, const float *up, float *out, int64_t n, cudaStream_t s);
// In-place interleaved RoPE on columns [h*head_dim + rope_off, + 2*n_freq) of each head, row r at positions[r].
void rope(float *x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_off,
          const float *inv_freq, int64_t n_freq, float attn_factor, const int32_t *positions, cudaStream_t s);
void gather_rows(const float *x, int64_t cols, const int32_t *rows, int64_t n, float *out, cudaStream_t s);
// out[rows[i]] += w[i] * y[i]
void scatter_add_rows(const float *y, int64_t cols, const int32_t *rows, const float *w, int64_t n, float *out,
                      cudaStream_t s);

// ---- linear.cu: out[t, n] = sum_k x[t, k] W[n, k] for t < m; x [m, K] and out [m, N] contiguous
// How the GEMV kernel cuts a matrix: the warps of a row group split each row's K into k_split slices (1, 2,
// 4, 8), and each warp streams rows_per_warp rows at once (1, 2, 4). 0 = chosen from the shape.
struct GemvSplit {
  int k_split = 0, rows_per_warp = 0;
};
GemvSplit gemv_split(const DevMatrix &w, int64_t m, GemvSplit want = {});
void linear(const float *x, int64_t m, const DevMatrix &w, float *out, cudaStream_t s, GemvSplit split = {});
// A SwiGLU's two projections in one pass over x: g = x Wg^T, u = x Wu^T, act = silu(g) * u (Wg and Wu of one
// shape and dtype). act may alias g (then g's raw values are not kept) but not u.
void linear_swiglu(const float *x, int64_t m, const DevMatrix &wg, const DevMatrix &wu, float *g, float *u, float *act,
                   cudaStream_t s, GemvSplit split = {});
// FP8 activations for the block-scaled GEMM: per row, per 128 channels, s = amax / 448 and xq = e4m3(x / s);
// xq [m, k] bytes, xs [k/128, ld_s] floats (M-major, ld_s >= m). k must be a multiple of 128.
void quantize_rows_fp8(const float *x, int64_t m, int64_t k, int64_t ld_s, uint8_t *xq, float *xs, cudaStream_t s);
// The same rows with their scales row-major, xs [m, k/128] (rows that travel between ranks, model/data_parallel.h),
// and back: out [m, k] = e4m3 xq x its 128-channel scale.
void quantize_rows_fp8_row_major(const float *x, int64_t m, int64_t k, uint8_t *xq, float *xs, cudaStream_t s);
void dequantize_rows_fp8(const uint8_t *xq, const float *xs, int64_t m, int64_t k, float *out, cudaStream_t s);
// BF16 activations for a BF16 GEMM: out[i] = bf16(x[i]), nearest even.
void round_to_bf16(const float *x, int64_t n, uint16_t *out, cudaStream_t s);
// out [rows, cols] fp32 from the first rows of in (row stride ld), fp32 or bf16.
void widen_rows(const void *in, bool bf16, int64_t rows, int64_t cols, int64_t ld, float *out, cudaStream_t s);

// ---- moe.cu: the routed experts of T tokens (K slots each: ids, weights [T, K]) on the device.
// Expert e's matrices are gate[e], up[e] [I, H] and down[e] [H, I] (device arrays, all of expert_dtype);
// h [T*K, I] is scratch; out [T, H] is overwritten. Reads each selected expert once per slot: decode sizes.
// K <= 32. An expert whose entries are default DevMatrix values (data == nullptr, 0 x 0) is absent (expert
// parallelism: another rank's): its slots contribute nothing and none of its memory is read (their h rows are
// left unwritten); so is a slot whose id lies outside [0, n_experts) (the ids a failed exchange left: garbage
// results, which the rank group discards, but no read outside the tables).
void moe_experts_gemv(const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
                      int64_t n_experts, const DevMatrix *gate, const DevMatrix *up, const DevMatrix *down, int32_t expert_dtype, float *h,
                      float *out, cudaStream_t s);

// ---- mla.cu: the paged latent cache holds [page][layer][64][width] values, width = latent + rope, in fp32
// (dtype kF32) or bf16 (kBF16: written rounded to nearest even, widened to fp32 on read; fp32 arithmetic).
struct KvCacheView {
  void *base = nullptr;
  int64_t n_layers = 0, width = 0;
  int32_t dtype = kF32;  // kF32 or kBF16
};
// Each row of kv [rows, width] (kv_a output) is normalised (first `latent` values, weight norm_w), its rope
// part rotated at positions[r], and written to cache slot slots[r] (= page * 64 + offset) of `layer`.
void mla_cache_write(const KvCacheView &kv, int64_t layer, const float *src, int64_t rows, int64_t latent,
                     const DevMatrix &norm_w, float eps, const float *inv_freq, int64_t n_freq, float attn_factor,
                     const int32_t *positions, const int32_t *slots, cudaStream_t s);
// Copies positions [0, n) of one sequence (page table `pages`) of `layer` into lat [n, latent] and pe [n, rope].
void mla_gather(const KvCacheView &kv, int64_t layer, const int32_t *pages, int64_t n, int64_t latent, float *lat,
                float *pe, cudaStream_t s);
// Absorbed decode attention (spec §3.9) for `rows` query rows of one sequence: row i sits at position
// n_past + i and sees keys 0..n_past+i. q [rows, nh*(dn+dr)], kv_b [nh*(dn+dv), dc], out [rows, nh*dv].
// scratch: mla_absorbed_scratch_floats(rows, nh, n_past + rows, width) floats, 256-byte aligned.
int64_t mla_absorbed_scratch_floats(int64_t rows, int64_t nh, int64_t n_ctx, int64_t width);
void mla_attention_absorbed(const KvCacheView &kv, int64_t layer, const int32_t *pages, const float *q,
                            int64_t q_stride, int64_t rows, int64_t n_past, const DevMatrix &kv_b, int64_t nh,
                            int64_t dn, int64_t dr, int64_t dv, float scale, float *scratch, float *out,
                            int64_t out_stride, cudaStream_t s);
// Naive attention (spec §3.8) over decompressed keys/values: kvd [n_ctx, nh*(dn+dv)] (kv_b applied to each
// cached latent), pe [n_ctx, dr]; same row/position convention as above.
void mla_attention_naive(const float *q, int64_t q_stride, int64_t rows, int64_t n_past, const float *kvd,
                         const float *pe, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, float *scratch,
                         float *out, int64_t out_stride, cudaStream_t s);

// ---- mla_absorb.cu: the two absorption products of the absorbed form (spec §3.9), over `rows` consecutive
// query rows: qcat [rows, nh, dc + dr] = (q_nope[r, h] W_UK[h], q_pe[r, h]), and out[r, h*dv + v] =
// W_UV[h][v, :] . olat[r, h] (olat [rows, nh, dc] contiguous), W_UK[h] = kv_b rows h*(dn+dv) .. + dn and W_UV[h]
// the dv rows after them, dc = kv_b.cols. Two rows or more run on tensor cores (BF16 mma with a two-term split
// of the fp32 activations: near-fp32 results) where the shape allows, else on the fp32 CUDA-core kernels.
void mla_q_absorb(const float *q, int64_t q_stride, int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn,
                  int64_t dr, int64_t dv, float *qcat, cudaStream_t s);
void mla_out_absorb(const float *olat, int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv,
                    float *out, int64_t out_stride, cudaStream_t s);
// Whether mla_q_absorb / mla_out_absorb take the tensor-core kernels for this shape (rows >= 2).
bool mla_q_absorb_tc(int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv);
bool mla_out_absorb_tc(int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv);

// ---- mla_flash.cu: the absorbed form's attention on tensor cores over a BF16 cache, for every sequence of a
// step in one launch (decode rows, MTP verification rows and prefill chunks alike): olat [q-rows, dc] from
// qcat [q-rows, dc + dr], a q-row being (batch row r, head h) at index r * nh + h. The launch's blocks and key
// splits are planned once per step (mla_flash_plan) and uploaded; every layer reuses them.
constexpr int kMlaFlashRows = 64;  // q-rows per block
constexpr int kMlaFlashTile = 32;  // keys per tile
struct MlaSeq {
  int32_t row0, n_new, n_past, page0;  // as SeqSlice; page0 indexes the step's page array
};
struct MlaWorkItem {  // one block: up to 64 q-rows of one sequence against key tiles [tile0, tile1) of 32
  int32_t qrow0, nq, qoff, n_past, n_kv, page0, tile0, tile1, slot;  // slot < 0: no split, writes olat
};
struct MlaCombineItem {  // the splits slot0 .. slot0 + n_splits - 1 of one block's q-rows
  int32_t qrow0, nq, slot0, n_splits;
};
struct MlaFlashPlan {
  std::vector<MlaWorkItem> items;     // in block order
  std::vector<int32_t> block_items;   // block b runs items [block_items[b], block_items[b + 1])
  std::vector<MlaCombineItem> combine;
  int32_t n_slots = 0;
};
bool mla_flash_supported(int64_t dc, int64_t dr);
// mla_flash_plan.cpp (no CUDA needed). n_sm: the GPU's multiprocessors; the step's key tiles are cut into one equal run per SM.
MlaFlashPlan mla_flash_plan(const std::vector<MlaSeq> &seqs, int64_t nh, int n_sm);
int64_t mla_flash_workspace_floats(int32_t n_slots, int64_t dc);
void mla_flash_attend(const KvCacheView &kv, int64_t layer, const int32_t *pages, const float *qcat, int64_t nh,
                      int64_t dc, int64_t dr, float scale, const MlaWorkItem *items, const int32_t *block_items,
                      int32_t n_blocks, const MlaCombineItem *combine, int32_t n_combine, int32_t n_slots, float *ws,
                      float *olat, cudaStream_t s);

// ---- moe.cu: DeepSeekMoE routing (spec §4) of `rows` tokens from fp32 router logits [rows, E].
struct RouteParams {
  int32_t n_experts, top_k, n_group, topk_group;
  int32_t sigmoid;       // 1: sigmoid scores, 0: softmax
  int32_t method;        // 0 noaux_tc (group score = top-2 sum), 1 group_limited_greedy (max), 2 greedy
  int32_t norm_topk_prob;
  float routed_scaling_factor;
};
void moe_route(const float *logits, int64_t rows, const DevMatrix &bias, const RouteParams &p, int32_t *ids,
               float *weights, cudaStream_t s);

// ---- gemm_fp8_mma.cu: block-scaled FP8 GEMMs on tensor cores (mma.sync m16n8k32 e4m3, spec §5.3) for decode
// batches and grouped MoE experts. Activations as quantize_rows_fp8 makes them (e4m3 per token per 128
// channels); weights FP8 with 128x128 block scales, K a multiple of 128; fp32 results.
// How a GEMM of m rows is cut: tile tokens per block (8, 16, 32, 64), token_tiles blocks of them, and K split
// into `splits` ranges of kb_per_split 128-wide blocks (splits > 1: partials summed in split order).
struct GemmFp8Plan {
  int tile = 8;
  int64_t token_tiles = 1;
  int splits = 1, kb_per_split = 1;
};
// k_split: 0 = chosen from the shape (split until ~2 blocks per SM), 1 = off, n = n ranges (at most K / 128).
GemmFp8Plan gemm_fp8_mma_plan(int64_t m, int64_t N, int64_t K, int k_split = 0);
// Floats of workspace gemm_fp8_mma needs for this shape and split (0 without a split).
int64_t gemm_fp8_mma_workspace_floats(int64_t m, int64_t N, int64_t K, int k_split = 0);
// out[t * ld_out + n] = sum_kb (xq[t, kb] . wq[n, kb]) * xs[kb * ld_s + t] * w.scale[(n / 128) * w.scale_cols + kb]
// for t < m, n < w.rows: xq [m, K] bytes (16-byte aligned rows), xs M-major [K / 128][ld_s] (quantize_rows_fp8's
// layout). The weight rows are the MMA's M side (swap-AB): each weight byte is read once per call for m <= 64.
void gemm_fp8_mma(const uint8_t *xq, const float *xs, int64_t ld_s, int64_t m, const DevMatrix &w, float *out,
                  int64_t ld_out, float *workspace, int k_split, cudaStream_t s);

// Grouped routed experts with FP8 activations, entirely on the device (no host sync, graph-capturable): x [T, H]
// is quantised per 128 channels; the T * K (token, slot) pairs are sorted by expert into tiles of `tile` rows;
// gate+up for every tile of every expert in one launch (SwiGLU and h's quantisation in its epilogue), down in
// one launch (one fp32 row per pair), then out[t] = sum over t's pairs in ascending expert id of w * y. Expert
// tables as moe_experts_gemv's (device arrays of E DevMatrix, all FP8: gate/up [I, H], down [H, I]). A pair whose
// id is outside [0, E) (-1: moe_drop_absent_ids) is dropped: it takes no tile row and adds nothing to its token.
// The scratch holds, at these byte offsets (each 256-byte aligned): xq [T, H] bytes, xs [H/128][T] floats,
// sorted [T*K] pair ids (t * K + k) in expert order, tiles [max_tiles] of {expert, first sorted position,
// rows, 0} int32 quadruples, n_tiles (one int32), hq [T*K, I] e4m3 bytes and hs [T*K, I/128] floats by sorted
// position, y [T*K, H] floats by pair id.
struct MoeGroupedLayout {
  int tile = 8;
  int64_t max_tiles = 0;
  int64_t xq = 0, xs = 0, sorted = 0, tiles = 0, n_tiles = 0, hq = 0, hs = 0, y = 0, bytes = 0;
};
MoeGroupedLayout moe_grouped_layout(int64_t T, int64_t K, int64_t E, int64_t H, int64_t I);
// H and I multiples of 128, 1 <= K <= 32, 1 <= E <= 1024.
bool moe_grouped_supported(int64_t H, int64_t I, int64_t K, int64_t E);
void moe_experts_grouped(const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
                         int64_t E, const DevMatrix *gate, const DevMatrix *up, const DevMatrix *down, void *scratch,
                         float *out, cudaStream_t s);
// (moe.cu) Expert parallelism on the grouped path: out[i] = ids[i], or -1 where the expert is outside [0, E) or
// its table entry (the gate table) has data == nullptr (absent: another rank's). Given the result,
// moe_experts_grouped sorts no pair of an absent expert into a tile, reads none of its memory and leaves the pair
// out of the combine (the other pairs' order and arithmetic are those of a full table).
void moe_drop_absent_ids(const int32_t *ids, int64_t n, const DevMatrix *table, int64_t E, int32_t *out, cudaStream_t s);

// ---- gemm_bf16_mma.cu: the swap-AB family's BF16 member (mma.sync m16n8k16 bf16, fp32 accumulation) for decode
// batches on a BF16 weight, the lm_head's: out[t * ld_out + n] = sum_k xb[t, k] w[n, k] for t < m, n < w.rows;
// xb [m, K] bf16 bits as round_to_bf16 makes them, rows 16-byte aligned (K % 8 == 0, and a 16-byte aligned base,
// as w.data's). Each weight byte is read once per call for m <= 128 (one token tile of up to 128 per block);
// 128 < m <= 256 runs two token tiles side by side, the second mostly from L2.
constexpr int64_t kGemmBf16MmaMaxRows = 256;
bool gemm_bf16_mma_supported(int64_t m, int64_t N, int64_t K);  // 1 <= m <= 256, K % 8 == 0, N < 2^23
int gemm_bf16_mma_tile(int64_t m);                               // tokens per block: 8, 16, 32, 64 or 128
// Whether N's 128-row blocks occupy at least half the GPU's SMs, enough to stream the weight at close to the
// full rate (the kernel does not split K: a small N leaves SMs idle, where cuBLASLt would split).
bool gemm_bf16_mma_fills_gpu(int64_t N);
void gemm_bf16_mma(const uint16_t *xb, int64_t m, const DevMatrix &w, float *out, int64_t ld_out, cudaStream_t s);

// ---- expert_cache.cu: expert offload's GPU cache of a MoE layer (policies in the file's header). The state
// arrays live in device memory and persist across calls; table [3E] is what the expert kernels read.
enum ExpertCachePolicy : int32_t { kExpertCacheLru = 0, kExpertCacheLfu = 1 };
enum ExpertCacheStat : int32_t { kCacheHits = 0, kCacheMisses, kCacheCopiedBytes, kCacheHostReadBytes, kCacheStats };
struct ExpertCacheView {
  int32_t n_experts = 0, n_slots = 0;
  int32_t policy = kExpertCacheLfu;
  float decay = 0.9f;                // LFU: use counts x decay per call
  int64_t matrix_bytes = 0;          // bytes of each of an expert's three matrices (one shape, one dtype)
  int32_t *slot_of = nullptr;        // [E] the slot holding expert e, or -1
  int32_t *expert_in = nullptr;      // [S] the expert in slot s, or -1
  uint32_t *stamp = nullptr;         // [S] the call that last used slot s
  float *freq = nullptr;             // [E] decayed rows routed to expert e
  uint32_t *clock = nullptr;         // [1] calls so far
  int32_t *copies = nullptr;         // [1 + 2E] this call's admissions: count, then (expert, slot) pairs
  DevMatrix *table = nullptr;        // [3E] gate[E], up[E], down[E]: a slot's bytes, or the host-mapped ones
  const DevMatrix *host = nullptr;   // [3E] the experts' host-mapped bytes (and device block scales)
  void *const *slot_data = nullptr;  // [3S] the slots' device buffers (gate, up, down)
  unsigned long long *stats = nullptr;  // [kCacheStats] totals: unique experts hit / missed per call, bytes
                                        // copied into slots, bytes the kernels read in place (estimated)
};
// After the router, before the expert kernels: ids [n_ids] are this call's (token, slot) expert ids;
// reads_per_pair: the expert kernel reads an expert once per pair (GEMV path) rather than once per call.
void expert_cache_admit(const ExpertCacheView &c, const int32_t *ids, int64_t n_ids, bool reads_per_pair, int n_sm,
                        cudaStream_t s);

// ---- sampling.cu: one token per row of a batch of logits rows, every row in one launch: engine/sampler.cpp's
// sampler on the device (logit bias, repetition/presence/frequency penalties, bans, temperature, top-k, top-p,
// min-p, then the draw with a uniform u the host drew from the session's stream). Greedy rows take the first id
// of the largest adjusted logit. Sampled rows: candidates by logit (ties: the lower id) selected by radix select
// (top-k by count, top-p by probability mass), probabilities in double, and the kept ids walked in ascending id
// order with a prefix sum: the CPU sampler's distribution and draw up to the order of double-precision sums
// (a token differs only when u falls within rounding of a boundary between two ids).
// Per touched id (bias, penalty window; each id once): v = logit; v += bias[bias0 + j] in order; count > 0:
// v = v > 0 ? v / rep : v * rep, v -= presence + frequency * count; banned (a touched id also in the bans):
// v = -inf. Then every id of the row's ban list (ids outside [0, vocab) ignored) is -inf.
struct SampleAdjust {
  int32_t id, count, banned, bias0, n_bias;
};
struct SampleRowParams {  // 64 bytes, no padding (it is uploaded as bytes)
  int32_t row;            // logits row
  float temperature;      // <= 0: greedy
  int32_t top_k;          // 0: off
  float top_p, min_p;     // 1 / 0: off
  float repetition_penalty, presence_penalty, frequency_penalty;
  int32_t adj0, n_adj;    // this row's entries of the adjustment array
  int32_t ban0, n_ban;    // this row's ids of the ban array (rows may share them)
  int32_t bias_at;        // byte offsets from the start of the parameter block of the bias terms (floats) and
  int32_t bans_at;        // of the ban ids (int32), every row alike
  double u;               // the draw, in [0, 1)
};
// The parameter block of one launch, one upload: SampleRowParams [n_rows], then the SampleAdjust entries, then
// the bias terms at rows[0].bias_at and the ban ids at rows[0].bans_at. One pointer, so a decode step's launch arguments do not change
// with the number of touched ids (its graph keeps being replayed).
// Device scratch sample_rows needs for n_rows rows of vocab logits (8-byte aligned).
int64_t sample_workspace_bytes(int64_t n_rows, int64_t vocab);
// logits [*, vocab] fp32 (rows[r].row picks the row); tokens[r] = the token, flags[r] = 0; or flags[r] = 1 and
// tokens[r] = -1 where the CPU sampler fails (a NaN or +inf logit, bias or penalties that make one, nothing left
// finite): the host re-runs the CPU sampler on that row for its error.
void sample_rows(const float *logits, int64_t vocab, const void *params, int32_t n_rows, void *workspace,
                 int32_t *tokens, int32_t *flags, cudaStream_t s);

}  // namespace dsrt::kernels
