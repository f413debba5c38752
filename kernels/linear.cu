// Linear layers out = x W^T with W read in its checkpoint dtype. This is the memory-bound decode shape:
// one warp per output row streams the row once with 16-byte loads and dots it with up to 8 token rows at
// a time, FP8 block scales applied per 16-element chunk (a chunk never crosses a 128-column block).
// Large-M prefill will move to cuBLASLt's block-scaled FP8 GEMM (spec §5.3); this kernel is the reference.
#include "common.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kWarps = 8;

template <int MT>
__global__ void __launch_bounds__(kWarps * 32) linear_kernel(const float *__restrict__ x, DevMatrix w,
                                                            float *__restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= w.rows) return;
  const int64_t K = w.cols, N = w.rows;
  float acc[MT];
#pragma unroll
  for (int t = 0; t < MT; t++) acc[t] = 0.0f;

  if (w.dtype == kFP8 && K % 16 == 0) {
    const uint8_t *row = static_cast<const uint8_t *>(w.data) + n * K;
    const float *srow = w.scale + (n / 128) * w.scale_cols;
    for (int64_t k = int64_t(lane) * 16; k < K; k += 32 * 16) {
      const uint4 raw = *reinterpret_cast<const uint4 *>(row + k);
      const uint8_t *b = reinterpret_cast<const uint8_t *>(&raw);
      float wv[16];
#pragma unroll
      for (int j = 0; j < 16; j++) wv[j] = fp8_to_f32(b[j]);
      const float sc = srow[k / 128];
#pragma unroll
      for (int t = 0; t < MT; t++) {
        const float4 *xv = reinterpret_cast<const float4 *>(x + t * K + k);
        float part = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; q++) {
          const float4 v = xv[q];
          part += wv[4 * q] * v.x + wv[4 * q + 1] * v.y + wv[4 * q + 2] * v.z + wv[4 * q + 3] * v.w;
        }
        acc[t] += part * sc;
      }
    }
  } else if (w.dtype == kBF16 && K % 8 == 0) {
    const uint16_t *row = static_cast<const uint16_t *>(w.data) + n * K;
    for (int64_t k = int64_t(lane) * 8; k < K; k += 32 * 8) {
      const uint4 raw = *reinterpret_cast<const uint4 *>(row + k);
      const uint16_t *b = reinterpret_cast<const uint16_t *>(&raw);
      float wv[8];
#pragma unroll
      for (int j = 0; j < 8; j++) wv[j] = bf16_bits_to_f32(b[j]);
#pragma unroll
      for (int t = 0; t < MT; t++) {
        const float4 *xv = reinterpret_cast<const float4 *>(x + t * K + k);
        const float4 a = xv[0], c = xv[1];
        acc[t] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * c.x + wv[5] * c.y + wv[6] * c.z +
                  wv[7] * c.w;
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wv = load_w(w, n, k);
#pragma unroll
      for (int t = 0; t < MT; t++) acc[t] += wv * x[t * K + k];
    }
  }
#pragma unroll
  for (int t = 0; t < MT; t++) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) out[t * N + n] = v;
  }
}

template <int MT>
void launch(const float *x, const DevMatrix &w, float *out, cudaStream_t s) {
  linear_kernel<MT><<<unsigned((w.rows + kWarps - 1) / kWarps), kWarps * 32, 0, s>>>(x, w, out);
}

}  // namespace

void linear(const float *x, int64_t m, const DevMatrix &w, float *out, cudaStream_t s) {
  const int64_t K = w.cols, N = w.rows;
  int64_t t = 0;
  for (; t + 8 <= m; t += 8) launch<8>(x + t * K, w, out + t * N, s);
  if (m - t >= 4) {
    launch<4>(x + t * K, w, out + t * N, s);
    t += 4;
  }
  if (m - t >= 2) {
    launch<2>(x + t * K, w, out + t * N, s);
    t += 2;
  }
  if (m - t >= 1) launch<1>(x + t * K, w, out + t * N, s);
  check_launch("linear");
}

}  // namespace dsrt::kernels
