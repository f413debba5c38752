// Linear layers out = x W^T with W read in its checkpoint dtype. This is the memory-bound decode shape:
// a warp streams a slice of 1, 2 or 4 weight rows once (gemv.cuh) and dots them with up to 8 token rows at
// a time; the warps of a row group split K (gemv_split picks the split per shape).
// Large-M prefill will move to cuBLASLt's block-scaled FP8 GEMM (spec §5.3); this kernel is the reference.
#include "gemv.cuh"
#include "mma.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kWarps = 8;

// A block of kWarps warps in kWarps / G row groups of G warps. Each group owns R consecutive rows (rows past
// the end repeat the last row and are not written); its G warps take one slice of K each (k_slice), and the
// slices' sums are added in slice order through shared memory, so the result does not depend on timing.
// Splitting K keeps every SM streaming when N is small (kv_a: 576 rows of 7168) and gives each warp a few
// kilobytes of a long row (o_proj: 16384) instead of all of it.
template <int MT, int R, int G>
__global__ void __launch_bounds__(kWarps * 32) linear_kernel(const float *__restrict__ x, DevMatrix w,
                                                            float *__restrict__ out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = warp % G;
  const int64_t n0 = (int64_t(blockIdx.x) * (kWarps / G) + warp / G) * R;
  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int t = 0; t < MT; t++) acc[r][t] = 0.0f;
  if (n0 < w.rows) {
    const DevMatrix *ws[R];
    int64_t ns[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
      ws[r] = &w;
      ns[r] = n0 + r < w.rows ? n0 + r : w.rows - 1;
    }
    int64_t lo, hi;
    k_slice(w, g, G, lo, hi);
    rows_dot<MT, R>(ws, ns, x, w.cols, lane, acc, lo, hi);
  }
  if constexpr (G == 1) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int t = 0; t < MT; t++) {
        const float v = warp_sum(acc[r][t]);
        if (lane == 0 && n0 + r < w.rows) out[t * w.rows + n0 + r] = v;
      }
  } else {
    __shared__ float part[kWarps][R * MT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int t = 0; t < MT; t++) {
        const float v = warp_sum(acc[r][t]);
        if (lane == 0) part[warp][r * MT + t] = v;
      }
    __syncthreads();
    if (g == 0 && lane < R * MT) {
      const int r = lane / MT, t = lane % MT;
      float v = 0.0f;
#pragma unroll
      for (int j = 0; j < G; j++) v += part[warp + j][lane];
      if (n0 + r < w.rows) out[t * w.rows + n0 + r] = v;
    }
  }
}

// linear_kernel for the gate and up rows of a SwiGLU together, with its epilogue: a warp reads NR rows of
// each (NR = 2 for up to two token rows: four rows per x chunk; 1 above), rows n0 .. n0 + NR - 1.
template <int MT, int G>
__global__ void __launch_bounds__(kWarps * 32) swiglu_kernel(const float *__restrict__ x, DevMatrix wg, DevMatrix wu,
                                                            float *g_out, float *__restrict__ u_out, float *act) {
  constexpr int NR = MT <= 2 ? 2 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = warp % G;
  const int64_t n0 = (int64_t(blockIdx.x) * (kWarps / G) + warp / G) * NR, N = wg.rows;
  float acc[2 * NR][MT];
#pragma unroll
  for (int r = 0; r < 2 * NR; r++)
#pragma unroll
    for (int t = 0; t < MT; t++) acc[r][t] = 0.0f;
  if (n0 < N) {
    const DevMatrix *ws[2 * NR];
    int64_t ns[2 * NR];
#pragma unroll
    for (int r = 0; r < NR; r++) {  // rows: gate n0.., then up n0..
      ws[r] = &wg;
      ws[NR + r] = &wu;
      ns[r] = ns[NR + r] = n0 + r < N ? n0 + r : N - 1;
    }
    int64_t lo, hi;
    k_slice(wg, g, G, lo, hi);
    rows_dot<MT, 2 * NR>(ws, ns, x, wg.cols, lane, acc, lo, hi);
  }
  __shared__ float part[kWarps][2 * NR * MT];
#pragma unroll
  for (int r = 0; r < 2 * NR; r++)
#pragma unroll
    for (int t = 0; t < MT; t++) {
      const float v = warp_sum(acc[r][t]);
      if (lane == 0) part[warp][r * MT + t] = v;
    }
  __syncthreads();
  if (g == 0 && lane < NR * MT) {
    const int r = lane / MT, t = lane % MT;
    const int64_t n = n0 + r;
    if (n >= N) return;
    float gv = 0.0f, uv = 0.0f;
#pragma unroll
    for (int j = 0; j < G; j++) {
      gv += part[warp + j][r * MT + t];
      uv += part[warp + j][(NR + r) * MT + t];
    }
    u_out[t * N + n] = uv;
    if (g_out != act) g_out[t * N + n] = gv;
    act[t * N + n] = gv / (1.0f + expf(-gv)) * uv;
  }
}

template <int MT>
void launch_swiglu(const float *x, const DevMatrix &wg, const DevMatrix &wu, float *g, float *u, float *act,
                   GemvSplit split, cudaStream_t s) {
  constexpr int NR = MT <= 2 ? 2 : 1;                                // a warp's rows of gate (and of up)
  const int G = gemv_split(wg, MT, {split.k_split, NR}).k_split;
  const int64_t per_block = int64_t(kWarps / G) * NR;
  const unsigned grid = unsigned((wg.rows + per_block - 1) / per_block);
  switch (G) {
    case 8: swiglu_kernel<MT, 8><<<grid, kWarps * 32, 0, s>>>(x, wg, wu, g, u, act); break;
    case 4: swiglu_kernel<MT, 4><<<grid, kWarps * 32, 0, s>>>(x, wg, wu, g, u, act); break;
    case 2: swiglu_kernel<MT, 2><<<grid, kWarps * 32, 0, s>>>(x, wg, wu, g, u, act); break;
    default: swiglu_kernel<MT, 1><<<grid, kWarps * 32, 0, s>>>(x, wg, wu, g, u, act); break;
  }
}

template <int MT, int R, int G>
void launch_rg(const float *x, const DevMatrix &w, float *out, cudaStream_t s) {
  const int64_t per_block = int64_t(kWarps / G) * R;
  linear_kernel<MT, R, G><<<unsigned((w.rows + per_block - 1) / per_block), kWarps * 32, 0, s>>>(x, w, out);
}
template <int MT, int R>
void launch_r(const float *x, const DevMatrix &w, float *out, int g, cudaStream_t s) {
  switch (g) {
    case 8: return launch_rg<MT, R, 8>(x, w, out, s);
    case 4: return launch_rg<MT, R, 4>(x, w, out, s);
    case 2: return launch_rg<MT, R, 2>(x, w, out, s);
    default: return launch_rg<MT, R, 1>(x, w, out, s);
  }
}

template <int MT>
void launch(const float *x, const DevMatrix &w, float *out, GemvSplit split, cudaStream_t s) {
  const GemvSplit c = gemv_split(w, MT, split);
  if constexpr (MT <= 2)
    if (c.rows_per_warp == 4) return launch_r<MT, 4>(x, w, out, c.k_split, s);
  if (c.rows_per_warp >= 2) return launch_r<MT, 2>(x, w, out, c.k_split, s);
  launch_r<MT, 1>(x, w, out, c.k_split, s);
}

// One warp per 128-channel group of a row: e4m3 values x / s with s = amax / 448 (DeepSeek's act_quant),
// scales written M-major [K/128][M].
__global__ void quantize_rows_kernel(const float *__restrict__ x, int64_t m, int64_t k, int64_t ld_s, int64_t row_s,
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
  if (lane == 0) xs[g * ld_s + r * row_s] = s;
}

// out [r, c] = e4m3 xq [r, c] x xs [r, c / 128] (row-major scales)
__global__ void dequantize_rows_kernel(const uint8_t *__restrict__ xq, const float *__restrict__ xs, int64_t m, int64_t k,
                                       float *__restrict__ out) {
  const int64_t n = m * k;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = fp8_to_f32(xq[i]) * xs[(i / k) * (k / 128) + (i % k) / 128];
}

// out = x rounded to bf16, nearest even (as the CPU's f32_to_bf16)
__global__ void round_bf16_kernel(const float *__restrict__ x, int64_t n, uint16_t *__restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
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

constexpr int64_t kMaxGridY = 65535;

namespace {
// Scale of row r, group g at xs[g * ld_s + r * row_s]; rows are grid.y, at most 65,535 a launch.
void launch_quantize_rows(const float *x, int64_t m, int64_t k, int64_t ld_s, int64_t row_s, uint8_t *xq, float *xs,
                          cudaStream_t s) {
  if (m == 0) return;
  if (k % 128) throw std::runtime_error("quantize_rows_fp8: K must be a multiple of 128");
  for (int64_t r0 = 0; r0 < m; r0 += kMaxGridY) {
    const int64_t n = std::min(m - r0, kMaxGridY);
    quantize_rows_kernel<<<dim3(unsigned((k / 128 + 7) / 8), unsigned(n)), 256, 0, s>>>(x + r0 * k, n, k, ld_s, row_s,
                                                                                         xq + r0 * k, xs + r0 * row_s);
  }
  check_launch("quantize_rows_fp8");
}
}  // namespace

void quantize_rows_fp8(const float *x, int64_t m, int64_t k, int64_t ld_s, uint8_t *xq, float *xs, cudaStream_t s) {
  launch_quantize_rows(x, m, k, ld_s, 1, xq, xs, s);
}

void quantize_rows_fp8_row_major(const float *x, int64_t m, int64_t k, uint8_t *xq, float *xs, cudaStream_t s) {
  launch_quantize_rows(x, m, k, 1, k / 128, xq, xs, s);
}

void dequantize_rows_fp8(const uint8_t *xq, const float *xs, int64_t m, int64_t k, float *out, cudaStream_t s) {
  const int64_t n = m * k;
  if (n == 0) return;
  if (k % 128) throw std::runtime_error("dequantize_rows_fp8: K must be a multiple of 128");
  dequantize_rows_kernel<<<std::min<unsigned>(grid_for(n, 256), 65535u), 256, 0, s>>>(xq, xs, m, k, out);
  check_launch("dequantize_rows_fp8");
}

void round_to_bf16(const float *x, int64_t n, uint16_t *out, cudaStream_t s) {
  if (n == 0) return;
  round_bf16_kernel<<<std::min<unsigned>(grid_for(n, 256), 65535u), 256, 0, s>>>(x, n, out);
  check_launch("round_to_bf16");
}

void widen_rows(const void *in, bool bf16, int64_t rows, int64_t cols, int64_t ld, float *out, cudaStream_t s) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  widen_rows_kernel<<<std::min<unsigned>(grid_for(n, 256), 65535u), 256, 0, s>>>(in, bf16, rows, cols, ld, out);
  check_launch("widen_rows");
}

// The cut, from sweeps of every cut over V3's decode shapes on an H200 (dsrt bench --ops --sweep, docs/perf.md):
// with the weight loads prefetched, four FP8 rows per warp won on every shape (each x chunk, 4 bytes per
// FP8 weight, is read once for all of them), two for BF16 (half the arithmetic per byte); then the fewest
// K slices that give ~12 warps per SM (long per-warp streams beat more, shorter ones).
GemvSplit gemv_split(const DevMatrix &w, int64_t mt, GemvSplit want) {
  GemvSplit c = want;
  if (c.rows_per_warp <= 0) c.rows_per_warp = w.dtype == kFP8 && mt <= 2 ? 4 : 2;
  if (c.k_split <= 0) {
    const int64_t groups = (w.rows + c.rows_per_warp - 1) / c.rows_per_warp, want_warps = 12 * int64_t(sm_count());
    c.k_split = 1;
    while (c.k_split < kWarps && groups * c.k_split < want_warps && w.cols / (2 * c.k_split) >= 128) c.k_split *= 2;
  }
  if (c.k_split != 1 && c.k_split != 2 && c.k_split != 4 && c.k_split != 8)
    throw std::runtime_error("gemv_split: K split must be 1, 2, 4 or 8");
  if (c.rows_per_warp != 1 && c.rows_per_warp != 2 && c.rows_per_warp != 4)
    throw std::runtime_error("gemv_split: rows per warp must be 1, 2 or 4");
  if (c.rows_per_warp == 4 && mt > 2) c.rows_per_warp = 2;
  return c;
}

void linear(const float *x, int64_t m, const DevMatrix &w, float *out, cudaStream_t s, GemvSplit split) {
  const int64_t K = w.cols, N = w.rows;
  int64_t t = 0;
  for (; t + 8 <= m; t += 8) launch<8>(x + t * K, w, out + t * N, split, s);
  if (m - t >= 4) {
    launch<4>(x + t * K, w, out + t * N, split, s);
    t += 4;
  }
  if (m - t >= 2) {
    launch<2>(x + t * K, w, out + t * N, split, s);
    t += 2;
  }
  if (m - t >= 1) launch<1>(x + t * K, w, out + t * N, split, s);
  check_launch("linear");
}

void linear_swiglu(const float *x, int64_t m, const DevMatrix &wg, const DevMatrix &wu, float *g, float *u, float *act,
                   cudaStream_t s, GemvSplit split) {
  if (wg.rows != wu.rows || wg.cols != wu.cols || wg.dtype != wu.dtype)
    throw std::runtime_error("linear_swiglu: gate and up differ in shape or dtype");
  const int64_t K = wg.cols, N = wg.rows;
  int64_t t = 0;
  for (; t + 8 <= m; t += 8) launch_swiglu<8>(x + t * K, wg, wu, g + t * N, u + t * N, act + t * N, split, s);
  if (m - t >= 4) {
    launch_swiglu<4>(x + t * K, wg, wu, g + t * N, u + t * N, act + t * N, split, s);
    t += 4;
  }
  if (m - t >= 2) {
    launch_swiglu<2>(x + t * K, wg, wu, g + t * N, u + t * N, act + t * N, split, s);
    t += 2;
  }
  if (m - t >= 1) launch_swiglu<1>(x + t * K, wg, wu, g + t * N, u + t * N, act + t * N, split, s);
  check_launch("linear_swiglu");
}

}  // namespace dsrt::kernels
