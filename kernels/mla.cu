// Multi-head latent attention over the paged latent cache: writing new latents (norm + RoPE), gathering a
// sequence's latents, the absorbed decode form (spec §3.9) and the naive form over decompressed keys
// (spec §3.8). One block per (query row, head); softmax in fp32 over a scratch row of scores.
// The cache element type T is the pool's (float or __nv_bfloat16): every value is computed in fp32, rounded
// once to nearest even when stored (as the CPU backend's f32_to_bf16 does) and widened to fp32 when read.
#include "common.cuh"

namespace dsrt::kernels {

namespace {

constexpr int64_t kPage = 64;

__device__ __forceinline__ float kv_load(float v) { return v; }
__device__ __forceinline__ float kv_load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void kv_store(float *d, float v) { *d = v; }
__device__ __forceinline__ void kv_store(__nv_bfloat16 *d, float v) { *d = __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T *slot_ptr(const KvCacheView &kv, int64_t layer, int64_t slot) {
  const int64_t page = slot / kPage, off = slot % kPage;
  return static_cast<T *>(kv.base) + ((page * kv.n_layers + layer) * kPage + off) * kv.width;
}

template <typename T>
__global__ void cache_write_kernel(KvCacheView kv, int64_t layer, const float *src, int64_t latent, DevMatrix norm_w,
                                   float eps, const float *inv_freq, int64_t nf, float attn, const int32_t *pos,
                                   const int32_t *slots) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const float *x = src + r * kv.width;
  T *dst = slot_ptr<T>(kv, layer, slots[r]);
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < latent; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(latent) + eps);
  for (int64_t i = threadIdx.x; i < latent; i += blockDim.x) kv_store(dst + i, x[i] * inv * load_w(norm_w, i, 0));
  for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) {
    const float angle = float(pos[r]) * inv_freq[i];
    float sn, cs;
    sincosf(angle, &sn, &cs);
    cs *= attn;
    sn *= attn;
    const float x0 = x[latent + 2 * i], x1 = x[latent + 2 * i + 1];
    kv_store(dst + latent + 2 * i, x0 * cs - x1 * sn);
    kv_store(dst + latent + 2 * i + 1, x0 * sn + x1 * cs);
  }
}

template <typename T>
__global__ void gather_kernel(KvCacheView kv, int64_t layer, const int32_t *pages, int64_t latent, float *lat,
                              float *pe) {
  const int64_t j = blockIdx.x;
  const T *e = slot_ptr<T>(kv, layer, int64_t(pages[j / kPage]) * kPage + j % kPage);
  const int64_t rope = kv.width - latent;
  for (int64_t i = threadIdx.x; i < kv.width; i += blockDim.x) {
    if (i < latent)
      lat[j * latent + i] = kv_load(e[i]);
    else
      pe[j * rope + i - latent] = kv_load(e[i]);
  }
}

// Softmax of p[0..n) in place (fp32), returns nothing; all threads of the block take part.
__device__ void softmax_inplace(float *p, int64_t n, float *red) {
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, p[j]);
  mx = block_max(mx, red);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  sum = block_sum(sum, red);
  const float inv = 1.0f / sum;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) p[j] *= inv;
  __syncthreads();
}

// ---- absorbed form, in three kernels so that each has thousands of warps in flight (one block per
// (row, head) doing all three phases left most SMs with four latency-bound warps).

// Per (row, head): scores of qcat against every cached latent (c_kv . q_lat + k_pe . q_pe), softmax, and
// o_lat = sum_j p_j c_kv[j] into olat [rows, nh, dc]. Row i sits at position n_past + i. Keys are walked
// page by page from a page table staged in shared memory, so consecutive keys' loads are independent (a
// page lookup per key made every load wait on the one before).
template <typename T>
__global__ void __launch_bounds__(256) attend_latent_kernel(KvCacheView kv, int64_t layer, const int32_t *pages,
                                                           const float *qcat, int64_t n_past, int64_t nh, int64_t dc,
                                                           float scale, float *scratch, int64_t n_ctx_max, float *olat) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  const int64_t W = kv.width, i = blockIdx.x / nh, n = n_past + i + 1, n_pages = (n + kPage - 1) / kPage;
  float *qs = sm;
  const T **base = reinterpret_cast<const T **>(sm + (W + 1) / 2 * 2);  // 8-byte aligned
  for (int64_t k = threadIdx.x; k < W; k += blockDim.x) qs[k] = qcat[blockIdx.x * W + k];
  for (int64_t g = threadIdx.x; g < n_pages; g += blockDim.x) base[g] = slot_ptr<T>(kv, layer, int64_t(pages[g]) * kPage);
  __syncthreads();
  float *p = scratch + blockIdx.x * n_ctx_max;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int64_t j = warp; j < n; j += nw) {  // a warp per key
    const T *e = base[j / kPage] + (j % kPage) * W;
    float s = 0.0f;
    for (int64_t c = lane; c < W; c += 32) s += qs[c] * kv_load(e[c]);
    s = warp_sum(s);
    if (lane == 0) p[j] = s * scale;
  }
  __syncthreads();
  softmax_inplace(p, n, red);
  for (int64_t c = threadIdx.x; c < dc; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t g = 0; g < n_pages; g++) {
      const T *e = base[g] + c;
      const float *pg = p + g * kPage;
      const int64_t m = min(kPage, n - g * kPage);
#pragma unroll 8
      for (int64_t j = 0; j < m; j++) acc += pg[j] * kv_load(e[j * W]);
    }
    olat[blockIdx.x * dc + c] = acc;
  }
}

__global__ void naive_kernel(const float *q, int64_t qs, int64_t n_past, const float *kvd, const float *pe, int64_t nh,
                             int64_t dn, int64_t dr, int64_t dv, float scale, float *scratch, int64_t n_ctx_max,
                             float *out, int64_t os) {
  __shared__ float red[32];
  const int64_t i = blockIdx.x / nh, h = blockIdx.x % nh, pos = n_past + i, n = pos + 1, kvw = dn + dv;
  const float *qh = q + i * qs + h * (dn + dr);
  float *p = scratch + blockIdx.x * n_ctx_max;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int64_t j = warp; j < n; j += nw) {
    const float *k = kvd + j * nh * kvw + h * kvw;
    float s = 0.0f;
    for (int64_t c = lane; c < dn; c += 32) s += qh[c] * k[c];
    for (int64_t c = lane; c < dr; c += 32) s += qh[dn + c] * pe[j * dr + c];
    s = warp_sum(s);
    if (lane == 0) p[j] = s * scale;
  }
  __syncthreads();
  softmax_inplace(p, n, red);
  for (int64_t v = threadIdx.x; v < dv; v += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < n; j++) acc += p[j] * kvd[j * nh * kvw + h * kvw + dn + v];
    out[i * os + h * dv + v] = acc;
  }
}

}  // namespace

namespace {
void check_kv_dtype(const KvCacheView &kv, const char *what) {
  if (kv.dtype != kF32 && kv.dtype != kBF16)
    throw std::runtime_error(std::string(what) + ": latent cache dtype " + std::to_string(kv.dtype) + " (fp32 or bf16 only)");
}
}  // namespace

void mla_cache_write(const KvCacheView &kv, int64_t layer, const float *src, int64_t rows, int64_t latent,
                     const DevMatrix &norm_w, float eps, const float *inv_freq, int64_t nf, float attn,
                     const int32_t *positions, const int32_t *slots, cudaStream_t s) {
  if (rows == 0) return;
  check_kv_dtype(kv, "mla_cache_write");
  if (kv.dtype == kBF16)
    cache_write_kernel<__nv_bfloat16><<<unsigned(rows), 256, 0, s>>>(kv, layer, src, latent, norm_w, eps, inv_freq, nf,
                                                                     attn, positions, slots);
  else
    cache_write_kernel<float><<<unsigned(rows), 256, 0, s>>>(kv, layer, src, latent, norm_w, eps, inv_freq, nf, attn,
                                                             positions, slots);
  check_launch("mla_cache_write");
}

void mla_gather(const KvCacheView &kv, int64_t layer, const int32_t *pages, int64_t n, int64_t latent, float *lat,
                float *pe, cudaStream_t s) {
  if (n == 0) return;
  check_kv_dtype(kv, "mla_gather");
  if (kv.dtype == kBF16)
    gather_kernel<__nv_bfloat16><<<unsigned(n), 256, 0, s>>>(kv, layer, pages, latent, lat, pe);
  else
    gather_kernel<float><<<unsigned(n), 256, 0, s>>>(kv, layer, pages, latent, lat, pe);
  check_launch("mla_gather");
}

void mla_attention_absorbed(const KvCacheView &kv, int64_t layer, const int32_t *pages, const float *q, int64_t qs,
                            int64_t rows, int64_t n_past, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dr,
                            int64_t dv, float scale, float *scratch, float *out, int64_t os, cudaStream_t s) {
  if (rows == 0) return;
  check_kv_dtype(kv, "mla_attention_absorbed");
  const int64_t dc = kv.width - dr, n_ctx = n_past + rows;
  auto up64 = [](int64_t n) { return (n + 63) / 64 * 64; };  // each part 256-byte aligned (float4 loads)
  float *p = scratch, *qcat = p + up64(rows * nh * n_ctx), *olat = qcat + up64(rows * nh * kv.width);
  mla_q_absorb(q, qs, rows, kv_b, nh, dn, dr, dv, qcat, s);
  const size_t smem = size_t((kv.width + 1) / 2 * 2) * sizeof(float) + size_t((n_ctx + kPage - 1) / kPage) * sizeof(void *);
  if (smem > 200 * 1024) throw std::runtime_error("mla_attention_absorbed: context too long for one block's page table");
  auto attend = [&](auto kernel) {
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    kernel<<<unsigned(rows * nh), 256, smem, s>>>(kv, layer, pages, qcat, n_past, nh, dc, scale, p, n_ctx, olat);
  };
  if (kv.dtype == kBF16)
    attend(attend_latent_kernel<__nv_bfloat16>);
  else
    attend(attend_latent_kernel<float>);
  check_launch("mla attend_latent");
  mla_out_absorb(olat, rows, kv_b, nh, dn, dv, out, os, s);
}

int64_t mla_absorbed_scratch_floats(int64_t rows, int64_t nh, int64_t n_ctx, int64_t width) {
  return rows * nh * (n_ctx + 2 * width) + 3 * 64;
}

void mla_attention_naive(const float *q, int64_t qs, int64_t rows, int64_t n_past, const float *kvd, const float *pe,
                         int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, float *scratch, float *out,
                         int64_t os, cudaStream_t s) {
  if (rows == 0) return;
  naive_kernel<<<unsigned(rows * nh), 128, 0, s>>>(q, qs, n_past, kvd, pe, nh, dn, dr, dv, scale, scratch,
                                                  n_past + rows, out, os);
  check_launch("mla_attention_naive");
}

}  // namespace dsrt::kernels
