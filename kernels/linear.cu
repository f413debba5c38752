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
