// DeepSeekMoE on the device: the router, and the routed experts of decode-sized batches.
//
// ---- routing
// DeepSeekMoE routing (spec §4) per token: scores (sigmoid or softmax) in fp32, the correction bias for
// selection only, group-limited selection (top-2 sum or max per group), top-k with ties to the lower
// index, weights from the unbiased scores, normalised and scaled. One warp per token.
#include "gemv.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kMaxExperts = 1024;

// One warp per token: scores and masks in parallel, group scores a lane per group, top-k as K warp-wide
// argmax rounds (a single thread doing it all took ~100 us for 256 experts).
__global__ void __launch_bounds__(32) route_kernel(const float *logits, DevMatrix bias, RouteParams p, int32_t *ids,
                                                  float *weights) {
  __shared__ float s[kMaxExperts], u[kMaxExperts], gs[64];
  __shared__ bool keep[64];
  const int64_t t = blockIdx.x;
  const int E = p.n_experts, lane = threadIdx.x;
  const float *l = logits + t * E;
  if (p.sigmoid) {
    for (int e = lane; e < E; e += 32) s[e] = 1.0f / (1.0f + expf(-l[e]));
  } else {
    float mx = -INFINITY, z = 0.0f;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    for (int e = lane; e < E; e += 32) z += (s[e] = expf(l[e] - mx));
    z = warp_sum(z);
    for (int e = lane; e < E; e += 32) s[e] /= z;
  }
  for (int e = lane; e < E; e += 32) u[e] = s[e] + (bias.data ? load_w(bias, e, 0) : 0.0f);
  __syncwarp();
  if (p.n_group > 1 && p.method != 2) {
    const int per = E / p.n_group;
    for (int g = lane; g < p.n_group; g += 32) {
      float a = -INFINITY, b = -INFINITY;
      for (int e = g * per; e < (g + 1) * per; e++) {
        if (u[e] > a) {
          b = a;
          a = u[e];
        } else if (u[e] > b) {
          b = u[e];
        }
      }
      gs[g] = p.method == 0 && per >= 2 ? a + b : a;
      keep[g] = false;
    }
    __syncwarp();
    if (lane == 0)
      for (int r = 0; r < p.topk_group; r++) {  // best remaining group, ties to the lower index
        int best = -1;
        for (int g = 0; g < p.n_group; g++)
          if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
        keep[best] = true;
      }
    __syncwarp();
    for (int e = lane; e < E; e += 32)
      if (!keep[e / per]) u[e] = -INFINITY;
    __syncwarp();
  }
  float sum = 0.0f;
  for (int k = 0; k < p.top_k; k++) {
    int best = -1;  // masked and already chosen experts hold -inf; ties go to the lower index
    float bv = -INFINITY;
    for (int e = lane; e < E; e += 32)
      if (u[e] != -INFINITY && (best < 0 || u[e] > bv)) {
        best = e;
        bv = u[e];
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const int ob = __shfl_xor_sync(0xffffffffu, best, o);
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      if (ob >= 0 && (best < 0 || ov > bv || (ov == bv && ob < best))) {
        best = ob;
        bv = ov;
      }
    }
    __syncwarp();  // every lane's scan of u is done before lane 0 marks the winner (the shuffles order it too,
                   // but compute-sanitizer's racecheck only counts barriers)
    if (lane == 0) {
      ids[t * p.top_k + k] = best;
      weights[t * p.top_k + k] = s[best];  // the unbiased score
      u[best] = -INFINITY;
    }
    sum += s[best];
    __syncwarp();
  }
  if (lane == 0)
    for (int k = 0; k < p.top_k; k++) {
      float w = weights[t * p.top_k + k];
      if (p.norm_topk_prob) w = w / (sum + 1e-20f);
      weights[t * p.top_k + k] = w * p.routed_scaling_factor;
    }
}

}  // namespace

void moe_route(const float *logits, int64_t rows, const DevMatrix &bias, const RouteParams &p, int32_t *ids,
               float *weights, cudaStream_t s) {
  if (rows == 0) return;
  if (p.n_experts > kMaxExperts || p.n_group > 64) throw std::runtime_error("moe_route: too many experts or groups");
  route_kernel<<<unsigned(rows), 32, 0, s>>>(logits, bias, p, ids, weights);
  check_launch("moe_route");
}

}  // namespace dsrt::kernels

// ---- routed experts for decode-sized batches
// Entirely on the device: the routing ids never come to the host, so a decode step has no sync here and can
// be captured in a graph. Each (token, slot) reads its expert's gate/up rows and then its down rows once
// (gemv.cuh); the K expert outputs of a token are combined in ascending expert order, the order the CPU
// reference adds them in.

namespace dsrt::kernels {

namespace {

constexpr int kWarps = 8;

// h[s, r] = silu(gate_e[r] . x[t]) * (up_e[r] . x[t]) for slot s = (t, k), e = ids[s]; grid (ceil(I/8), T*K)
__global__ void __launch_bounds__(kWarps * 32) gate_up_kernel(const float *__restrict__ x, int64_t H, int64_t I,
                                                             const int32_t *__restrict__ ids, int64_t K,
                                                             const DevMatrix *__restrict__ gate,
                                                             const DevMatrix *__restrict__ up, float *__restrict__ h) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5), s = blockIdx.y;
  if (r >= I) return;
  const int32_t e = ids[s];
  const float *xt = x + (s / K) * H;
  const DevMatrix *ws[2] = {&gate[e], &up[e]};  // one pass over x for both rows
  const int64_t ns[2] = {r, r};
  float acc[2][1] = {{0.0f}, {0.0f}};
  rows_dot<1, 2>(ws, ns, xt, H, lane, acc);
  const float g = warp_sum(acc[0][0]), u = warp_sum(acc[1][0]);
  if (lane == 0) h[s * I + r] = g / (1.0f + expf(-g)) * u;
}

// y[s, n] = down_e[n] . h[s]; grid (ceil(H/8), T*K)
__global__ void __launch_bounds__(kWarps * 32) down_kernel(const float *__restrict__ h, int64_t H, int64_t I,
                                                          const int32_t *__restrict__ ids,
                                                          const DevMatrix *__restrict__ down, float *__restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5), s = blockIdx.y;
  if (n >= H) return;
  float acc = 0.0f;
  row_dot<1>(down[ids[s]], n, h + s * I, I, lane, &acc);
  acc = warp_sum(acc);
  if (lane == 0) y[s * H + n] = acc;
}

// out[t, n] = sum over the token's slots, ascending expert id, of w[s] * y[s, n]
__global__ void combine_kernel(const float *__restrict__ y, int64_t H, const int32_t *__restrict__ ids,
                               const float *__restrict__ w, int64_t K, float *__restrict__ out) {
  const int64_t t = blockIdx.y;
  const int32_t *it = ids + t * K;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < H; n += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    int32_t last = -1;
    for (int64_t j = 0; j < K; j++) {  // K <= a few dozen: pick the next larger id each time
      int64_t best = -1;
      for (int64_t i = 0; i < K; i++)
        if (it[i] > last && (best < 0 || it[i] < it[best])) best = i;
      if (best < 0) break;
      last = it[best];
      acc += w[t * K + best] * y[(t * K + best) * H + n];
    }
    out[t * H + n] = acc;
  }
}

}  // namespace

void moe_experts_gemv(const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
                      const DevMatrix *gate, const DevMatrix *up, const DevMatrix *down, float *h, float *y,
                      float *out, cudaStream_t s) {
  if (T == 0) return;
  if (H % 4 || I % 4) throw std::runtime_error("moe_experts_gemv: hidden and intermediate sizes must be multiples of 4");
  const unsigned slots = unsigned(T * K);
  gate_up_kernel<<<dim3(unsigned((I + kWarps - 1) / kWarps), slots), kWarps * 32, 0, s>>>(x, H, I, ids, K, gate, up, h);
  check_launch("moe gate_up");
  down_kernel<<<dim3(unsigned((H + kWarps - 1) / kWarps), slots), kWarps * 32, 0, s>>>(h, H, I, ids, down, y);
  check_launch("moe down");
  combine_kernel<<<dim3(unsigned((H + 255) / 256), unsigned(T)), 256, 0, s>>>(y, H, ids, w, K, out);
  check_launch("moe combine");
}

}  // namespace dsrt::kernels
