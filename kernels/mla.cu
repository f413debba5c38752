// Multi-head latent attention over the paged latent cache: writing new latents (norm + RoPE), gathering a
// sequence's latents, the absorbed decode form (spec §3.9) and the naive form over decompressed keys
// (spec §3.8). One block per (query row, head); softmax in fp32 over a scratch row of scores.
#include "common.cuh"

namespace dsrt::kernels {

namespace {

constexpr int64_t kPage = 64;

__device__ __forceinline__ float *slot_ptr(const KvCacheView &kv, int64_t layer, int64_t slot) {
  const int64_t page = slot / kPage, off = slot % kPage;
  return kv.base + ((page * kv.n_layers + layer) * kPage + off) * kv.width;
}

__global__ void cache_write_kernel(KvCacheView kv, int64_t layer, const float *src, int64_t latent, DevMatrix norm_w,
                                   float eps, const float *inv_freq, int64_t nf, float attn, const int32_t *pos,
                                   const int32_t *slots) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const float *x = src + r * kv.width;
  float *dst = slot_ptr(kv, layer, slots[r]);
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < latent; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(latent) + eps);
  for (int64_t i = threadIdx.x; i < latent; i += blockDim.x) dst[i] = x[i] * inv * load_w(norm_w, i, 0);
  for (int64_t i = threadIdx.x; i < nf; i += blockDim.x) {
    const float angle = float(pos[r]) * inv_freq[i];
    float sn, cs;
    sincosf(angle, &sn, &cs);
    cs *= attn;
    sn *= attn;
    const float x0 = x[latent + 2 * i], x1 = x[latent + 2 * i + 1];
    dst[latent + 2 * i] = x0 * cs - x1 * sn;
    dst[latent + 2 * i + 1] = x0 * sn + x1 * cs;
  }
}

__global__ void gather_kernel(KvCacheView kv, int64_t layer, const int32_t *pages, int64_t latent, float *lat,
                              float *pe) {
  const int64_t j = blockIdx.x;
  const float *e = slot_ptr(kv, layer, int64_t(pages[j / kPage]) * kPage + j % kPage);
  const int64_t rope = kv.width - latent;
  for (int64_t i = threadIdx.x; i < kv.width; i += blockDim.x) {
    if (i < latent)
      lat[j * latent + i] = e[i];
    else
      pe[j * rope + i - latent] = e[i];
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

// Block per (row, head). Dynamic shared memory: q_lat [dc] + o_lat [dc] + q_pe [dr].
__global__ void absorbed_kernel(KvCacheView kv, int64_t layer, const int32_t *pages, const float *q, int64_t qs,
                                int64_t n_past, DevMatrix kv_b, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                                float scale, float *scratch, int64_t n_ctx_max, float *out, int64_t os) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  const int64_t dc = kv.width - dr, i = blockIdx.x / nh, h = blockIdx.x % nh, pos = n_past + i, n = pos + 1;
  float *qlat = sm, *olat = sm + dc, *qpe = sm + 2 * dc;
  const float *qh = q + i * qs + h * (dn + dr);
  const int64_t kvw = dn + dv;
  for (int64_t c = threadIdx.x; c < dc; c += blockDim.x) {  // q_lat = W_UK[h]^T q_nope
    float acc = 0.0f;
    for (int64_t d = 0; d < dn; d++) acc += qh[d] * load_w(kv_b, h * kvw + d, c);
    qlat[c] = acc;
  }
  for (int64_t k = threadIdx.x; k < dr; k += blockDim.x) qpe[k] = qh[dn + k];
  __syncthreads();
  float *p = scratch + blockIdx.x * n_ctx_max;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int64_t j = warp; j < n; j += nw) {  // a warp per key
    const float *e = slot_ptr(kv, layer, int64_t(pages[j / kPage]) * kPage + j % kPage);
    float s = 0.0f;
    for (int64_t c = lane; c < dc; c += 32) s += qlat[c] * e[c];
    for (int64_t c = lane; c < dr; c += 32) s += qpe[c] * e[dc + c];
    s = warp_sum(s);
    if (lane == 0) p[j] = s * scale;
  }
  __syncthreads();
  softmax_inplace(p, n, red);
  for (int64_t c = threadIdx.x; c < dc; c += blockDim.x) {  // o_lat = sum_j p_j c_kv[j]
    float acc = 0.0f;
    for (int64_t j = 0; j < n; j++) acc += p[j] * slot_ptr(kv, layer, int64_t(pages[j / kPage]) * kPage + j % kPage)[c];
    olat[c] = acc;
  }
  __syncthreads();
  for (int64_t v = warp; v < dv; v += nw) {  // o = W_UV[h] o_lat, a warp per output
    float acc = 0.0f;
    for (int64_t c = lane; c < dc; c += 32) acc += load_w(kv_b, h * kvw + dn + v, c) * olat[c];
    acc = warp_sum(acc);
    if (lane == 0) out[i * os + h * dv + v] = acc;
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

void mla_cache_write(const KvCacheView &kv, int64_t layer, const float *src, int64_t rows, int64_t latent,
                     const DevMatrix &norm_w, float eps, const float *inv_freq, int64_t nf, float attn,
                     const int32_t *positions, const int32_t *slots, cudaStream_t s) {
  if (rows == 0) return;
  cache_write_kernel<<<unsigned(rows), 256, 0, s>>>(kv, layer, src, latent, norm_w, eps, inv_freq, nf, attn, positions, slots);
  check_launch("mla_cache_write");
}

void mla_gather(const KvCacheView &kv, int64_t layer, const int32_t *pages, int64_t n, int64_t latent, float *lat,
                float *pe, cudaStream_t s) {
  if (n == 0) return;
  gather_kernel<<<unsigned(n), 256, 0, s>>>(kv, layer, pages, latent, lat, pe);
  check_launch("mla_gather");
}

void mla_attention_absorbed(const KvCacheView &kv, int64_t layer, const int32_t *pages, const float *q, int64_t qs,
                            int64_t rows, int64_t n_past, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dr,
                            int64_t dv, float scale, float *scratch, float *out, int64_t os, cudaStream_t s) {
  if (rows == 0) return;
  const int64_t dc = kv.width - dr;
  const size_t smem = size_t(2 * dc + dr) * sizeof(float);
  absorbed_kernel<<<unsigned(rows * nh), 128, smem, s>>>(kv, layer, pages, q, qs, n_past, kv_b, nh, dn, dr, dv, scale,
                                                        scratch, n_past + rows, out, os);
  check_launch("mla_attention_absorbed");
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
