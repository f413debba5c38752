// Linear layers out = x W^T with W read in its checkpoint dtype. This is the memory-bound decode shape:
// a warp streams 1, 2 or 4 weight rows once (gemv.cuh) and dots them with up to 8 token rows at a time.
// Large-M prefill will move to cuBLASLt's block-scaled FP8 GEMM (spec §5.3); this kernel is the reference.
#include "gemv.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kWarps = 8;

// A warp per R consecutive rows (rows past the end repeat the last row and are not written).
template <int MT, int R>
__global__ void __launch_bounds__(kWarps * 32) linear_kernel(const float *__restrict__ x, DevMatrix w,
                                                            float *__restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * R;
  if (n0 >= w.rows) return;
  const DevMatrix *ws[R];
  int64_t ns[R];
  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; r++) {
    ws[r] = &w;
    ns[r] = n0 + r < w.rows ? n0 + r : w.rows - 1;
#pragma unroll
    for (int t = 0; t < MT; t++) acc[r][t] = 0.0f;
  }
  rows_dot<MT, R>(ws, ns, x, w.cols, lane, acc);
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int t = 0; t < MT; t++) {
      const float v = warp_sum(acc[r][t]);
      if (lane == 0 && n0 + r < w.rows) out[t * w.rows + n0 + r] = v;
    }
}

int sm_count() {
  static const int n = [] {
    int dev = 0, v = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    return v > 0 ? v : 132;
  }();
  return n;
}

template <int MT, int R>
void launch_r(const float *x, const DevMatrix &w, float *out, cudaStream_t s) {
  const int64_t per_block = int64_t(kWarps) * R;
  linear_kernel<MT, R><<<unsigned((w.rows + per_block - 1) / per_block), kWarps * 32, 0, s>>>(x, w, out);
}

// More rows per warp reuse each x chunk more, fewer keep enough warps in flight: the largest R that still
// gives two blocks per SM.
template <int MT>
void launch(const float *x, const DevMatrix &w, float *out, cudaStream_t s) {
  const int64_t want = 2 * int64_t(sm_count()) * kWarps;
  if constexpr (MT <= 2)
    if (w.rows >= want * 4) return launch_r<MT, 4>(x, w, out, s);
  if (w.rows >= want * 2) return launch_r<MT, 2>(x, w, out, s);
  launch_r<MT, 1>(x, w, out, s);
}

// One warp per 128-channel group of a row: e4m3 values x / s with s = amax / 448 (DeepSeek's act_quant),
// scales written M-major [K/128][M].
__global__ void quantize_rows_kernel(const float *__restrict__ x, int64_t m, int64_t k, int64_t ld_s,
                                     uint8_t *__restrict__ xq, float *__restrict__ xs) {
  const int lane = threadIdx.x & 31;
  const int64_t groups = k / 128, g = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5), r = blockIdx.y;
  if (g >= groups) return;
  const float4 v = reinterpret_cast<const float4 *>(x + r * k + g * 128)[lane];
  float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
  amax = warp_max(amax);
  const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
  const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v.x / s, v.y / s), __NV_SATFINITE, __NV_E4M3);
  const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v.z / s, v.w / s), __NV_SATFINITE, __NV_E4M3);
  reinterpret_cast<uint32_t *>(xq + r * k + g * 128)[lane] = uint32_t(lo) | uint32_t(hi) << 16;
  if (lane == 0) xs[g * ld_s + r] = s;
}

// out [r, c] = in [r * ld + c], in fp32 or bf16
__global__ void widen_rows_kernel(const void *in, bool bf16, int64_t rows, int64_t cols, int64_t ld, float *out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t src = (i / cols) * ld + i % cols;
    out[i] = bf16 ? bf16_bits_to_f32(static_cast<const uint16_t *>(in)[src]) : static_cast<const float *>(in)[src];
  }
}

}  // namespace

void quantize_rows_fp8(const float *x, int64_t m, int64_t k, int64_t ld_s, uint8_t *xq, float *xs, cudaStream_t s) {
  if (m == 0) return;
  if (k % 128) throw std::runtime_error("quantize_rows_fp8: K must be a multiple of 128");
  quantize_rows_kernel<<<dim3(unsigned((k / 128 + 7) / 8), unsigned(m)), 256, 0, s>>>(x, m, k, ld_s, xq, xs);
  check_launch("quantize_rows_fp8");
}

void widen_rows(const void *in, bool bf16, int64_t rows, int64_t cols, int64_t ld, float *out, cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  widen_rows_kernel<<<std::min<unsigned>(grid_for(n, 256), 65535u), 256, 0, s>>>(in, bf16, rows, cols, ld, out);
  check_launch("widen_rows");
}

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
