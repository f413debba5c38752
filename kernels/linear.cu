// Linear layers out = x W^T with W read in its checkpoint dtype. This is the memory-bound decode shape:
// one warp per output row streams the row once (gemv.cuh) and dots it with up to 8 token rows at a time.
// Large-M prefill will move to cuBLASLt's block-scaled FP8 GEMM (spec §5.3); this kernel is the reference.
#include "gemv.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kWarps = 8;

template <int MT>
__global__ void __launch_bounds__(kWarps * 32) linear_kernel(const float *__restrict__ x, DevMatrix w,
                                                            float *__restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= w.rows) return;
  float acc[MT];
#pragma unroll
  for (int t = 0; t < MT; t++) acc[t] = 0.0f;
  row_dot<MT>(w, n, x, w.cols, lane, acc);
#pragma unroll
  for (int t = 0; t < MT; t++) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) out[t * w.rows + n] = v;
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
