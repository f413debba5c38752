// Elementwise and row-wise kernels: embedding gather, RMSNorm, add, SiLU-mul, RoPE, row gather/scatter.
#include "common.cuh"

namespace dsrt::kernels {

// Decode-sized ops have one or a few rows: the grid spans the columns too (grid y) (a block per row walking 7168
// columns one load at a time after another took ~30 us).
__global__ void embed_kernel(DevMatrix table, const int32_t *ids, int64_t n, float *out) {
  const int64_t r = blockIdx.x, H = table.cols, id = ids[r], c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c < H) out[r * H + c] = load_w(table, id, c);
}
void embed(const DevMatrix &table, const int32_t *ids, int64_t n, float *out, cudaStream_t s) {
  if (n == 0) return;
  embed_kernel<<<dim3(unsigned(n), grid_for(table.cols, 256)), 256, 0, s>>>(table, ids, n, out);
  check_launch("embed");
}

__global__ void rms_norm_kernel(const float *x, DevMatrix w, float eps, int64_t n, int64_t xs, float *out, int64_t os) {
  __shared__ float red[32];
  const float *xr = x + blockIdx.x * xs;
  float *yr = out + blockIdx.x * os;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(n) + eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * load_w(w, i, 0);
}
void rms_norm(const float *x, const DevMatrix &w, float eps, int64_t rows, int64_t n, int64_t xs, float *out, int64_t os,
              cudaStream_t s) {
  if (rows == 0) return;
  // Few rows (decode): a wide block per row, or a single SM walks the row with little parallelism.
  rms_norm_kernel<<<unsigned(rows), rows < 64 ? 1024 : 256, 0, s>>>(x, w, eps, n, xs, out, os);
  check_launch("rms_norm");
}

// x += y, then out = x / sqrt(mean(x^2) + eps) * w: the residual add and the next block's pre-norm in one
// pass (each row's sum is kept in registers between the two).
__global__ void add_rms_norm_kernel(float *x, const float *y, DevMatrix w, float eps, int64_t n, float *out) {
  __shared__ float red[32];
  constexpr int kPer = 8;  // values per thread held in registers (n <= 8 * blockDim.x), else re-read
  float *xr = x + blockIdx.x * n;
  const float *yr = y + blockIdx.x * n;
  float *yo = out + blockIdx.x * n;
  float v[kPer];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kPer; j++) {
    const int64_t i = threadIdx.x + int64_t(j) * blockDim.x;
    v[j] = 0.0f;
    if (i < n) {
      v[j] = xr[i] + yr[i];
      xr[i] = v[j];
      ss += v[j] * v[j];
    }
  }
  for (int64_t i = threadIdx.x + int64_t(kPer) * blockDim.x; i < n; i += blockDim.x) {
    const float t = xr[i] + yr[i];
    xr[i] = t;
    ss += t * t;
  }
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(n) + eps);
#pragma unroll
  for (int j = 0; j < kPer; j++) {
    const int64_t i = threadIdx.x + int64_t(j) * blockDim.x;
    if (i < n) yo[i] = v[j] * inv * load_w(w, i, 0);
  }
  for (int64_t i = threadIdx.x + int64_t(kPer) * blockDim.x; i < n; i += blockDim.x) yo[i] = xr[i] * inv * load_w(w, i, 0);
}
void add_rms_norm(float *x, const float *y, const DevMatrix &w, float eps, int64_t rows, int64_t n, float *out,
                  cudaStream_t s) {
  if (rows == 0) return;
  add_rms_norm_kernel<<<unsigned(rows), rows < 64 ? 1024 : 256, 0, s>>>(x, y, w, eps, n, out);
  check_launch("add_rms_norm");
}

__global__ void add_kernel(float *x, const float *y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) x[i] += y[i];
}
void add(float *x, const float *y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_kernel<<<std::min<unsigned>(grid_for(n, 256), 65535u), 256, 0, s>>>(x, y, n);
  check_launch("add");
}

__global__ void silu_mul_kernel(const float *g, const float *u, float *o, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = g[i];
    o[i] = v / (1.0f + expf(-v)) * u[i];
  }
}
void silu_mul(const float *gate, const float *up, float *out, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  silu_mul_kernel<<<std::min<unsigned>(grid_for(n, 256), 65535u), 256, 0, s>>>(gate, up, out, n);
  check_launch("silu_mul");
}

// The rotation of one pair, with the angle formed in fp32 as the references do.
__device__ __forceinline__ void rotate(float *v, int64_t i, float pos, const float *inv_freq, float attn) {
  const float angle = pos * inv_freq[i];
  float sn, cs;
  sincosf(angle, &sn, &cs);
  cs *= attn;
  sn *= attn;
  const float x0 = v[2 * i], x1 = v[2 * i + 1];
  v[2 * i] = x0 * cs - x1 * sn;
  v[2 * i + 1] = x0 * sn + x1 * cs;
}

__global__ void rope_kernel(float *x, int64_t rs, int64_t nh, int64_t hd, int64_t off, const float *inv_freq,
                            int64_t nf, float attn, const int32_t *pos) {
  const int64_t r = blockIdx.x, k = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;  // a thread per (head, pair)
  if (k >= nh * nf) return;
  const int64_t h = k / nf, i = k % nf;
  rotate(x + r * rs + h * hd + off, i, float(pos[r]), inv_freq, attn);
}
void rope(float *x, int64_t rows, int64_t rs, int64_t nh, int64_t hd, int64_t off, const float *inv_freq, int64_t nf,
          float attn, const int32_t *positions, cudaStream_t s) {
  if (rows == 0) return;
  rope_kernel<<<dim3(unsigned(rows), grid_for(nh * nf, 128)), 128, 0, s>>>(x, rs, nh, hd, off, inv_freq, nf, attn, positions);
  check_launch("rope");
}

__global__ void gather_rows_kernel(const float *x, int64_t cols, const int32_t *rows, float *out) {
  const int64_t r = blockIdx.x, src = rows[r], c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c < cols) out[r * cols + c] = x[src * cols + c];
}
void gather_rows(const float *x, int64_t cols, const int32_t *rows, int64_t n, float *out, cudaStream_t s) {
  if (n == 0) return;
  gather_rows_kernel<<<dim3(unsigned(n), grid_for(cols, 256)), 256, 0, s>>>(x, cols, rows, out);
  check_launch("gather_rows");
}

// One block per source row; rows[] may repeat only across separate launches (callers add one expert at a time).
__global__ void scatter_add_kernel(const float *y, int64_t cols, const int32_t *rows, const float *w, float *out) {
  const int64_t r = blockIdx.x, dst = rows[r];
  const float wr = w[r];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[dst * cols + c] += wr * y[r * cols + c];
}
void scatter_add_rows(const float *y, int64_t cols, const int32_t *rows, const float *w, int64_t n, float *out,
                      cudaStream_t s) {
  if (n == 0) return;
  scatter_add_kernel<<<unsigned(n), 256, 0, s>>>(y, cols, rows, w, out);
  check_launch("scatter_add_rows");
}

}  // namespace dsrt::kernels
