// Absorbed multi-head latent attention (spec §3.9) on tensor cores over the paged BF16 latent cache, for any
// number of query rows per sequence: decode (one row), MTP verification (2-5 rows) and prefill chunks (a chunk
// attends to its cached prefix and, causally, to itself). Flash-style: a block holds 64 query rows - a query
// row is one (token, head) pair, so all heads of a token share each key tile and a page is read once per 64
// heads, not once per head - and streams the keys through shared memory 32 tokens at a time with an online
// softmax; no score matrix exists in memory. When a batch is too small to fill the GPU, a block's keys are
// split across blocks and mla_flash_combine merges the partial results by their log-sum-exp. The split is
// planned once per step on the host (mla_flash_plan) and read from device memory by every layer's launch.
//
// Arithmetic: mma.sync m16n8k16 on bf16 operands with fp32 accumulation; the softmax is fp32 (base 2, the
// scale folded into the exponent). The keys are the cache's own bf16 values. The query is split into two
// bf16 terms, q = q_hi + q_lo (q_lo = bf16(q - q_hi)), and its scores are q_hi . k + q_lo . k: a query
// rounded once to bf16 moved scores by up to 2^-9 of |q| |k|, which on the tiny presets flipped a MoE routing
// choice downstream (logits 14% off at one row in 80, emulated on the CPU); with the split, the scores are
// those of the fp32 query to ~2^-17. The probabilities P go to bf16 for the P . c_kv product (in [0, 1]: the
// same emulation moved logits by at most 6e-4). The second term costs half as many tensor FLOPs again.
//
// Block: 8 warps. Warp w owns query rows 16*(w%4) .. +15. For the scores it takes tokens 16*(w/4) .. +15 of
// the tile (the two warps of a row group exchange their row maxima through shared memory); for the output it
// takes latent columns (w/4)*dc/2 .. +dc/2, so each warp's accumulator is 16 x dc/2 fp32 (128 registers for
// V3) and the probabilities of the whole tile go through shared memory as bf16.
#include <algorithm>
#include <atomic>
#include <cmath>

#include "mma.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kBM = kMlaFlashRows;  // query rows per block
constexpr int kBN = kMlaFlashTile;  // key tokens per tile
constexpr int kThreads = 256;
constexpr int kMaxSplits = 1024;  // segments of one q-block: at most one per block, blocks <= SMs <= this

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}

template <int DC, int DR>
struct FlashShape {
  static constexpr int W = DC + DR;
  static constexpr int LDS = W + 8;     // padded rows: ldmatrix's 8 row addresses fall in distinct banks
  static constexpr int LDP = kBN + 8;
  static constexpr int NT_O = DC / 16;  // 8-column output tiles per warp (its half of dc)
  static constexpr size_t smem_bytes =
      size_t(2 * kBM * LDS + 2 * kBN * LDS + kBM * LDP) * 2 + size_t(4 * kBM) * sizeof(float);
  static_assert(W % 16 == 0 && DC % 32 == 0, "tile shapes");
};

template <int DC, int DR>
__global__ void __launch_bounds__(kThreads, 1)
    flash_kernel(KvCacheView kv, int64_t layer, const int32_t *pages, const float *qcat, int nh, float scale_log2,
                 const MlaWorkItem *items, const int32_t *block_items, float *ws_o, float *ws_ml, float *olat) {
  using S = FlashShape<DC, DR>;
  constexpr int W = S::W, LDS = S::LDS, LDP = S::LDP, NT_O = S::NT_O;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16 *Qs = reinterpret_cast<__nv_bfloat16 *>(smem);  // q_hi
  __nv_bfloat16 *Ql = Qs + kBM * LDS;                            // q_lo
  __nv_bfloat16 *Ks = Ql + kBM * LDS;
  __nv_bfloat16 *Ps = Ks + 2 * kBN * LDS;
  float *red_max = reinterpret_cast<float *>(Ps + kBM * LDP);  // [2][kBM]: each token half's row maxima
  float *red_sum = red_max + 2 * kBM;                           // [2][kBM]: each token half's row sums

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, rg = warp & 3, half = warp >> 2;
  const int g = lane >> 2, t4 = lane & 3;
  const int row0 = rg * 16 + g, row1 = row0 + 8;
  const __nv_bfloat16 *cache = static_cast<const __nv_bfloat16 *>(kv.base);
  for (int w = block_items[blockIdx.x]; w < block_items[blockIdx.x + 1]; w++) {
  const MlaWorkItem it = items[w];
  __syncthreads();  // the previous segment's readers of Q, P and the row statistics are done
  // Keys a query row sees: row r of the block is token (qoff + r) / nh of the sequence's new tokens, at
  // position n_past + that; it attends to positions 0 .. its own.
  auto key_limit = [&](int r) {
    if (r >= it.nq) return 0;
    return min(it.n_kv, it.n_past + (it.qoff + r) / nh + 1);
  };
  const int lim0 = key_limit(row0), lim1 = key_limit(row1);

  auto load_tile = [&](int tile, int buf) {
    const int tok0 = tile * kBN;
    const int64_t page = pages[it.page0 + tok0 / 64];
    const __nv_bfloat16 *src = cache + ((page * kv.n_layers + layer) * 64 + tok0 % 64) * W;
    __nv_bfloat16 *dst = Ks + buf * kBN * LDS;
    constexpr int CH = W / 8;
    for (int c = tid; c < kBN * CH; c += kThreads) {
      const int r = c / CH, k = c % CH;
      cp_async16(dst + r * LDS + k * 8, src + int64_t(r) * W + k * 8, tok0 + r < it.n_kv);
    }
  };

  load_tile(it.tile0, 0);
  cp_async_commit();
  for (int c = tid; c < kBM * (W / 4); c += kThreads) {  // the block's query rows, fp32 -> bf16 hi + lo
    const int r = c / (W / 4), k = (c % (W / 4)) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < it.nq) v = *reinterpret_cast<const float4 *>(qcat + (int64_t(it.qrow0) + r) * W + k);
    const __nv_bfloat162 h01 = __floats2bfloat162_rn(v.x, v.y), h23 = __floats2bfloat162_rn(v.z, v.w);
    const float2 f01 = __bfloat1622float2(h01), f23 = __bfloat1622float2(h23);
    uint2 hi, lo;
    hi.x = *reinterpret_cast<const uint32_t *>(&h01);
    hi.y = *reinterpret_cast<const uint32_t *>(&h23);
    lo.x = pack_bf16(v.x - f01.x, v.y - f01.y);
    lo.y = pack_bf16(v.z - f23.x, v.w - f23.y);
    *reinterpret_cast<uint2 *>(Qs + r * LDS + k) = hi;
    *reinterpret_cast<uint2 *>(Ql + r * LDS + k) = lo;
  }

  float o[NT_O][4];
#pragma unroll
  for (int n = 0; n < NT_O; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2 units) and this half's sum

  for (int tile = it.tile0; tile < it.tile1; tile++) {
    const int buf = (tile - it.tile0) & 1;
    cp_async_wait_all();
    __syncthreads();  // the tile has landed; every warp is done with the previous tile's buffer, P and maxima
    if (tile + 1 < it.tile1) load_tile(tile + 1, buf ^ 1);
    cp_async_commit();
    const __nv_bfloat16 *Kb = Ks + buf * kBN * LDS;

    // scores of the warp's 16 rows against its 16 tokens of the tile
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 4
    for (int kk = 0; kk < W / 16; kk++) {
      uint32_t a[4], al[4], b[4];
      const int qo = (rg * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8;
      ldmatrix_x4(a, Qs + qo);
      ldmatrix_x4(al, Ql + qo);
      ldmatrix_x4(b, Kb + (half * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8);
      mma_bf16(s[0], a, b[0], b[1]);
      mma_bf16(s[1], a, b[2], b[3]);
      mma_bf16(s[0], al, b[0], b[1]);
      mma_bf16(s[1], al, b[2], b[3]);
    }
    const int tok_base = tile * kBN + half * 16 + 2 * t4;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int j = tok_base + n * 8 + (e & 1);
        const bool ok = j < (e < 2 ? lim0 : lim1);
        s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
        if (e < 2)
          mx0 = fmaxf(mx0, s[n][e]);
        else
          mx1 = fmaxf(mx1, s[n][e]);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    if (t4 == 0) {
      red_max[half * kBM + row0] = mx0;
      red_max[half * kBM + row1] = mx1;
    }
    __syncthreads();
    const float mn0 = fmaxf(m0, fmaxf(red_max[row0], red_max[kBM + row0]));
    const float mn1 = fmaxf(m1, fmaxf(red_max[row1], red_max[kBM + row1]));
    // A row that has seen no key yet keeps max -inf: its factor exp2(-inf) is 0 (its accumulators are zero
    // anyway) and every probability exp2(-inf - 0) is 0; no NaN from -inf - -inf.
    const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
    const float al0 = exp2f(m0 - base0), al1 = exp2f(m1 - base1);
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < 2; n++) {
      const float p0 = exp2f(s[n][0] - base0), p1 = exp2f(s[n][1] - base0);
      const float p2 = exp2f(s[n][2] - base1), p3 = exp2f(s[n][3] - base1);
      sum0 += p0 + p1;
      sum1 += p2 + p3;
      const int col = half * 16 + n * 8 + 2 * t4;
      *reinterpret_cast<uint32_t *>(Ps + row0 * LDP + col) = pack_bf16(p0, p1);
      *reinterpret_cast<uint32_t *>(Ps + row1 * LDP + col) = pack_bf16(p2, p3);
    }
    l0 = l0 * al0 + sum0;
    l1 = l1 * al1 + sum1;
#pragma unroll
    for (int n = 0; n < NT_O; n++) {
      o[n][0] *= al0;
      o[n][1] *= al0;
      o[n][2] *= al1;
      o[n][3] *= al1;
    }
    __syncthreads();  // P of both token halves is in shared memory

    // o += P (16 x 32) . c_kv (32 x dc/2): the latent part of the key rows is the value
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ks++) {
      uint32_t a[4];
      ldmatrix_x4(a, Ps + (rg * 16 + (lane & 15)) * LDP + ks * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < NT_O / 2; np++) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, Kb + (ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + half * (DC / 2) + np * 16 +
                                 (lane >> 4) * 8);
        mma_bf16(o[2 * np], a, b[0], b[1]);
        mma_bf16(o[2 * np + 1], a, b[2], b[3]);
      }
    }
  }

  // row sums: over the quad, then the two token halves
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (t4 == 0) {
    red_sum[half * kBM + row0] = l0;
    red_sum[half * kBM + row1] = l1;
  }
  __syncthreads();
  const float L0 = red_sum[row0] + red_sum[kBM + row0], L1 = red_sum[row1] + red_sum[kBM + row1];
  const int col0 = half * (DC / 2) + 2 * t4;
  if (it.slot < 0) {  // the whole key range: normalise and write the result
    const float i0 = L0 > 0.f ? 1.f / L0 : 0.f, i1 = L1 > 0.f ? 1.f / L1 : 0.f;
#pragma unroll
    for (int n = 0; n < NT_O; n++) {
      if (row0 < it.nq)
        *reinterpret_cast<float2 *>(olat + (int64_t(it.qrow0) + row0) * DC + col0 + n * 8) =
            make_float2(o[n][0] * i0, o[n][1] * i0);
      if (row1 < it.nq)
        *reinterpret_cast<float2 *>(olat + (int64_t(it.qrow0) + row1) * DC + col0 + n * 8) =
            make_float2(o[n][2] * i1, o[n][3] * i1);
    }
  } else {  // one split of the keys: unnormalised output, row max and sum for the combine
    float *wo = ws_o + int64_t(it.slot) * kBM * DC;
#pragma unroll
    for (int n = 0; n < NT_O; n++) {
      *reinterpret_cast<float2 *>(wo + row0 * DC + col0 + n * 8) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2 *>(wo + row1 * DC + col0 + n * 8) = make_float2(o[n][2], o[n][3]);
    }
    if (half == 0 && t4 == 0) {
      float *ml = ws_ml + int64_t(it.slot) * kBM * 2;
      ml[row0 * 2] = m0;
      ml[row0 * 2 + 1] = L0;
      ml[row1 * 2] = m1;
      ml[row1 * 2 + 1] = L1;
    }
  }
  }  // segments
}

// One query row of a q-block cut into segments: out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s. The
// weights first (a thread per segment), then a thread per 4 columns sums the segments' partial rows, with
// independent loads in flight (a thread walking the segments one load at a time took 150 us at 64 segments).
__global__ void __launch_bounds__(128) combine_kernel(const MlaCombineItem *items, const float *ws_o,
                                                      const float *ws_ml, int dc, float *olat) {
  __shared__ float wgt[kMaxSplits];
  __shared__ float red[32];
  const MlaCombineItem c = items[blockIdx.x];
  const int r = blockIdx.y;
  if (r >= c.nq) return;
  const float *ml = ws_ml + (int64_t(c.slot0) * kBM + r) * 2;  // segment s: ml[s * kBM * 2]
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < c.n_splits; s += blockDim.x) mx = fmaxf(mx, ml[int64_t(s) * kBM * 2]);
  const float M = block_max(mx, red);
  float sum = 0.f;
  for (int s = threadIdx.x; s < c.n_splits; s += blockDim.x) {
    const float m = ml[int64_t(s) * kBM * 2];
    const float w = m == -INFINITY ? 0.f : exp2f(m - M);
    wgt[s] = w;
    sum += w * ml[int64_t(s) * kBM * 2 + 1];
  }
  const float L = block_sum(sum, red);  // its barriers also publish wgt
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const float *o = ws_o + (int64_t(c.slot0) * kBM + r) * dc;  // segment s: o[s * kBM * dc]
  for (int c4 = threadIdx.x * 4; c4 < dc; c4 += blockDim.x * 4) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < c.n_splits; s++) {
      const float w = wgt[s];
      const float4 v = *reinterpret_cast<const float4 *>(o + int64_t(s) * kBM * dc + c4);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    *reinterpret_cast<float4 *>(olat + (int64_t(c.qrow0) + r) * dc + c4) =
        make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  }
}

template <int DC, int DR>
void launch_flash(const KvCacheView &kv, int64_t layer, const int32_t *pages, const float *qcat, int64_t nh,
                  float scale, const MlaWorkItem *items, const int32_t *block_items, int n_blocks, float *ws_o,
                  float *ws_ml, float *olat, cudaStream_t s) {
  using Sh = FlashShape<DC, DR>;
  auto kernel = flash_kernel<DC, DR>;
  static std::atomic<uint64_t> opted_in{0};  // devices whose attribute is set (it is per device)
  int dev = 0;
  cudaGetDevice(&dev);
  if (!(opted_in.load() >> dev & 1)) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Sh::smem_bytes));
    if (e != cudaSuccess) throw std::runtime_error(std::string("mla_flash: shared memory: ") + cudaGetErrorString(e));
    opted_in.fetch_or(uint64_t(1) << dev);
  }
  kernel<<<unsigned(n_blocks), kThreads, Sh::smem_bytes, s>>>(kv, layer, pages, qcat, int(nh), scale * 1.4426950408889634f,
                                                              items, block_items, ws_o, ws_ml, olat);
}

}  // namespace

bool mla_flash_supported(int64_t dc, int64_t dr) {
  return (dc == 512 && dr == 64) || (dc == 160 && dr == 32) || (dc == 128 && dr == 16) || (dc == 128 && dr == 32) ||
         (dc == 64 && dr == 16);
}

int64_t mla_flash_workspace_floats(int32_t n_slots, int64_t dc) { return int64_t(n_slots) * kBM * (dc + 2) + 64; }

void mla_flash_attend(const KvCacheView &kv, int64_t layer, const int32_t *pages, const float *qcat, int64_t nh,
                      int64_t dc, int64_t dr, float scale, const MlaWorkItem *items, const int32_t *block_items,
                      int32_t n_blocks, const MlaCombineItem *combine, int32_t n_combine, int32_t n_slots, float *ws,
                      float *olat, cudaStream_t s) {
  if (n_blocks == 0) return;
  if (kv.dtype != kBF16) throw std::runtime_error("mla_flash_attend: needs a BF16 latent cache");
  if (kv.width != dc + dr) throw std::runtime_error("mla_flash_attend: cache width is not kv_lora_rank + rope");
  float *ws_o = ws, *ws_ml = ws + int64_t(n_slots) * kBM * dc;
  if (dc == 512 && dr == 64)
    launch_flash<512, 64>(kv, layer, pages, qcat, nh, scale, items, block_items, n_blocks, ws_o, ws_ml, olat, s);
  else if (dc == 160 && dr == 32)
    launch_flash<160, 32>(kv, layer, pages, qcat, nh, scale, items, block_items, n_blocks, ws_o, ws_ml, olat, s);
  else if (dc == 128 && dr == 16)
    launch_flash<128, 16>(kv, layer, pages, qcat, nh, scale, items, block_items, n_blocks, ws_o, ws_ml, olat, s);
  else if (dc == 128 && dr == 32)
    launch_flash<128, 32>(kv, layer, pages, qcat, nh, scale, items, block_items, n_blocks, ws_o, ws_ml, olat, s);
  else if (dc == 64 && dr == 16)
    launch_flash<64, 16>(kv, layer, pages, qcat, nh, scale, items, block_items, n_blocks, ws_o, ws_ml, olat, s);
  else
    throw std::runtime_error("mla_flash_attend: no kernel for kv_lora_rank " + std::to_string(dc) + ", rope " +
                             std::to_string(dr));
  check_launch("mla_flash");
  if (n_combine > 0) {
    combine_kernel<<<dim3(unsigned(n_combine), kBM), 128, 0, s>>>(combine, ws_o, ws_ml, int(dc), olat);  // dc % 4 == 0
    check_launch("mla_flash combine");
  }
}

}  // namespace dsrt::kernels
