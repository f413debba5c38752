// One warp's dot products of a weight row with MT activation rows: the inner loop of every decode-shaped
// matrix product (linear.cu, the fused MoE experts). The row is streamed once with 16-byte loads, four
// loads in flight per lane (a lone load per lane leaves HBM idle); FP8 pairs are converted by the hardware
// cvt (e4m3x2 -> f16x2), and the block scale is applied per 16-element chunk (a chunk never crosses a
// 128-column block because 16 divides 128).
#pragma once
#include "common.cuh"

namespace dsrt::kernels {

__device__ __forceinline__ void fp8x16_to_f32(const uint4 &raw, float *out) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(words[q] & 0xffff), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(words[q] >> 16), __NV_E4M3);
    const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
    out[4 * q] = a.x;
    out[4 * q + 1] = a.y;
    out[4 * q + 2] = b.x;
    out[4 * q + 3] = b.y;
  }
}

template <int MT>
__device__ __forceinline__ void dot_chunk(const float *w16, const float *x, int64_t xs, int64_t k, float sc,
                                          float *acc) {
#pragma unroll
  for (int t = 0; t < MT; t++) {
    const float4 *xv = reinterpret_cast<const float4 *>(x + t * xs + k);
    float part = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const float4 v = xv[q];
      part += w16[4 * q] * v.x + w16[4 * q + 1] * v.y + w16[4 * q + 2] * v.z + w16[4 * q + 3] * v.w;
    }
    acc[t] += part * sc;
  }
}

// acc[t] += W[n, :] . x[t * xs + :] for t < MT, summed over this lane's share; the caller warp-reduces.
// x rows must be 16-byte aligned (xs % 4 == 0).
template <int MT>
__device__ __forceinline__ void row_dot(const DevMatrix &w, int64_t n, const float *x, int64_t xs, int lane,
                                        float *acc) {
  const int64_t K = w.cols;
  constexpr int U = 4;  // loads in flight per lane
  if (w.dtype == kFP8 && K % 16 == 0) {
    const uint8_t *row = static_cast<const uint8_t *>(w.data) + n * K;
    const float *srow = w.scale + (n / 128) * w.scale_cols;
    for (int64_t k0 = int64_t(lane) * 16; k0 < K; k0 += 32 * 16 * U) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t k = k0 + u * 32 * 16;
        raw[u] = k < K ? __ldg(reinterpret_cast<const uint4 *>(row + k)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t k = k0 + u * 32 * 16;
        if (k < K) {
          float wv[16];
          fp8x16_to_f32(raw[u], wv);
          dot_chunk<MT>(wv, x, xs, k, srow[k / 128], acc);
        }
      }
    }
  } else if (w.dtype == kBF16 && K % 8 == 0) {
    const uint16_t *row = static_cast<const uint16_t *>(w.data) + n * K;
    for (int64_t k0 = int64_t(lane) * 8; k0 < K; k0 += 32 * 8 * U) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t k = k0 + u * 32 * 8;
        raw[u] = k < K ? __ldg(reinterpret_cast<const uint4 *>(row + k)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t k = k0 + u * 32 * 8;
        if (k < K) {
          const uint16_t *b = reinterpret_cast<const uint16_t *>(&raw[u]);
#pragma unroll
          for (int t = 0; t < MT; t++) {
            const float4 *xv = reinterpret_cast<const float4 *>(x + t * xs + k);
            const float4 a = xv[0], c = xv[1];
            acc[t] += bf16_bits_to_f32(b[0]) * a.x + bf16_bits_to_f32(b[1]) * a.y + bf16_bits_to_f32(b[2]) * a.z +
                      bf16_bits_to_f32(b[3]) * a.w + bf16_bits_to_f32(b[4]) * c.x + bf16_bits_to_f32(b[5]) * c.y +
                      bf16_bits_to_f32(b[6]) * c.z + bf16_bits_to_f32(b[7]) * c.w;
          }
        }
      }
    }
  } else {  // any shape and dtype, one element at a time
    for (int64_t k = lane; k < K; k += 32) {
      const float wv = load_w(w, n, k);
#pragma unroll
      for (int t = 0; t < MT; t++) acc[t] += wv * x[t * xs + k];
    }
  }
}

}  // namespace dsrt::kernels
