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

// The columns [lo, hi) that slice g of G takes of a row of K: slices are whole 16-byte loads (16 FP8 or 8
// BF16 values; single values for other dtypes or ragged K), so a chunk never straddles two slices or an FP8
// scale block of 128.
__device__ __forceinline__ void k_slice(const DevMatrix &w, int g, int G, int64_t &lo, int64_t &hi) {
  const int64_t K = w.cols;
  const int64_t unit = w.dtype == kFP8 && K % 16 == 0 ? 16 : w.dtype == kBF16 && K % 8 == 0 ? 8 : 1;
  const int64_t per = (K / unit + G - 1) / G * unit;
  lo = min(K, int64_t(g) * per);
  hi = min(K, lo + per);
}

// acc[r][t] += W_r[n_r, lo:hi] . x[t * xs + lo:hi] for R weight rows (of matrices with the same shape and
// dtype) and MT activation rows, summed over this lane's share; the caller warp-reduces. Each x chunk is
// loaded once and used for all R rows: with one row per warp, fp32 x traffic (4 bytes per weight) capped the
// FP8 GEMV near 1.2 TB/s on an H100. x rows must be 16-byte aligned (xs % 4 == 0); lo from k_slice.
template <int MT, int R>
__device__ __forceinline__ void rows_dot(const DevMatrix *const (&w)[R], const int64_t (&n)[R], const float *x,
                                         int64_t xs, int lane, float (&acc)[R][MT], int64_t lo = 0,
                                         int64_t hi = -1) {
  const int64_t K = hi < 0 ? w[0]->cols : hi, KW = w[0]->cols;
  const int32_t dtype = w[0]->dtype;
  if (dtype == kFP8 && KW % 16 == 0) {
    const uint8_t *row[R];
    const float *srow[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
      row[r] = static_cast<const uint8_t *>(w[r]->data) + n[r] * KW;
      srow[r] = w[r]->scale + (n[r] / 128) * w[r]->scale_cols;
    }
    constexpr int U = R >= 4 ? 1 : 4 / R;  // 16-byte loads in flight per lane: R * U
    for (int64_t k0 = lo + int64_t(lane) * 16; k0 < K; k0 += 32 * 16 * U) {
      uint4 raw[R][U];
#pragma unroll
      for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++) {
          const int64_t k = k0 + u * 32 * 16;
          raw[r][u] = k < K ? __ldg(reinterpret_cast<const uint4 *>(row[r] + k)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t k = k0 + u * 32 * 16;
        if (k >= K) break;
        float wv[R][16], sc[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
          fp8x16_to_f32(raw[r][u], wv[r]);
          sc[r] = srow[r][k / 128];
        }
#pragma unroll
        for (int t = 0; t < MT; t++) {
          const float4 *xv = reinterpret_cast<const float4 *>(x + t * xs + k);
          float xr[16];
#pragma unroll
          for (int q = 0; q < 4; q++) {
            const float4 v = xv[q];
            xr[4 * q] = v.x;
            xr[4 * q + 1] = v.y;
            xr[4 * q + 2] = v.z;
            xr[4 * q + 3] = v.w;
          }
#pragma unroll
          for (int r = 0; r < R; r++) {
            float part = 0.0f;
#pragma unroll
            for (int q = 0; q < 4; q++)
              part += wv[r][4 * q] * xr[4 * q] + wv[r][4 * q + 1] * xr[4 * q + 1] + wv[r][4 * q + 2] * xr[4 * q + 2] +
                      wv[r][4 * q + 3] * xr[4 * q + 3];
            acc[r][t] += part * sc[r];
          }
        }
      }
    }
  } else if (dtype == kBF16 && KW % 8 == 0) {
    const uint16_t *row[R];
#pragma unroll
    for (int r = 0; r < R; r++) row[r] = static_cast<const uint16_t *>(w[r]->data) + n[r] * KW;
    constexpr int U = R >= 4 ? 1 : 4 / R;
    for (int64_t k0 = lo + int64_t(lane) * 8; k0 < K; k0 += 32 * 8 * U) {
      uint4 raw[R][U];
#pragma unroll
      for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++) {
          const int64_t k = k0 + u * 32 * 8;
          raw[r][u] = k < K ? __ldg(reinterpret_cast<const uint4 *>(row[r] + k)) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int64_t k = k0 + u * 32 * 8;
        if (k >= K) break;
#pragma unroll
        for (int t = 0; t < MT; t++) {
          const float4 *xv = reinterpret_cast<const float4 *>(x + t * xs + k);
          const float4 a = xv[0], c = xv[1];
#pragma unroll
          for (int r = 0; r < R; r++) {
            const uint16_t *b = reinterpret_cast<const uint16_t *>(&raw[r][u]);
            acc[r][t] += bf16_bits_to_f32(b[0]) * a.x + bf16_bits_to_f32(b[1]) * a.y + bf16_bits_to_f32(b[2]) * a.z +
                         bf16_bits_to_f32(b[3]) * a.w + bf16_bits_to_f32(b[4]) * c.x + bf16_bits_to_f32(b[5]) * c.y +
                         bf16_bits_to_f32(b[6]) * c.z + bf16_bits_to_f32(b[7]) * c.w;
          }
        }
      }
    }
  } else {  // any shape and dtype, one element at a time
    for (int64_t k = lo + lane; k < K; k += 32)
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float wv = load_w(*w[r], n[r], k);
#pragma unroll
        for (int t = 0; t < MT; t++) acc[r][t] += wv * x[t * xs + k];
      }
  }
}

// One row: rows_dot with R = 1.
template <int MT>
__device__ __forceinline__ void row_dot(const DevMatrix &w, int64_t n, const float *x, int64_t xs, int lane, float *acc) {
  const DevMatrix *ws[1] = {&w};
  const int64_t ns[1] = {n};
  float a[1][MT];
#pragma unroll
  for (int t = 0; t < MT; t++) a[0][t] = 0.0f;
  rows_dot<MT, 1>(ws, ns, x, xs, lane, a);
#pragma unroll
  for (int t = 0; t < MT; t++) acc[t] += a[0][t];
}

}  // namespace dsrt::kernels
