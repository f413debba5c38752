// DeepSeekMoE on the device: the router, and the routed experts of decode-sized batches.
//
// ---- routing
// DeepSeekMoE routing (spec §4) per token: scores (sigmoid or softmax) in fp32, the correction bias for
// selection only, group-limited selection (top-2 sum or max per group), top-k with ties to the lower
// index, weights from the unbiased scores, normalised and scaled. One warp per token.
#include <algorithm>

#include "gemv.cuh"
#include "mma.cuh"

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
// reference adds them in, by the down kernel itself.
// Expert parallelism: an expert another rank holds has a null table entry (a default DevMatrix: data == nullptr,
// 0 x 0). Its slots do no work and read none of its memory: the gate/up blocks of such a slot exit at once (its h
// row stays unwritten); in the down kernel the entry's 0 columns make an empty K range, so rows_dot reads neither
// weights nor h (no branch added to the loop: one cost 39 registers); the combine leaves the slot out (nothing
// added, not a product with 0).

namespace dsrt::kernels {

namespace {

constexpr int kWarps = 8;
constexpr int kMaxTopK = 32;

// h[s, r] = silu(gate_e[r] . x[t]) * (up_e[r] . x[t]) for slot s = (t, k), e = ids[s]; grid
// (ceil(I / (2 * kWarps / G)), T*K). A warp reads two rows of gate and the same two of up in one pass over
// x (four rows per x chunk); a row group of G warps splits K as linear.cu does.
template <int G>
__global__ void __launch_bounds__(kWarps * 32) gate_up_kernel(const float *__restrict__ x, int64_t H, int64_t I,
                                                             const int32_t *__restrict__ ids, int64_t K, int64_t E,
                                                             const DevMatrix *__restrict__ gate,
                                                             const DevMatrix *__restrict__ up, float *__restrict__ h) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = warp % G;
  const int64_t r = (int64_t(blockIdx.x) * (kWarps / G) + warp / G) * 2, s = blockIdx.y;
  const int32_t e = ids[s];
  if (e < 0 || e >= E || gate[e].data == nullptr) return;  // absent (another rank's expert): the whole block, before any barrier
  float acc[4][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
  if (r < I) {
    const int64_t r1 = r + 1 < I ? r + 1 : r;
    const DevMatrix *ws[4] = {&gate[e], &gate[e], &up[e], &up[e]};
    const int64_t ns[4] = {r, r1, r, r1};
    int64_t lo, hi;
    k_slice(gate[e], g, G, lo, hi);
    rows_dot<1, 4>(ws, ns, x + (s / K) * H, H, lane, acc, lo, hi);
  }
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; j++) v[j] = warp_sum(acc[j][0]);
  if constexpr (G > 1) {
    __shared__ float part[kWarps][4];
    if (lane == 0)
#pragma unroll
      for (int j = 0; j < 4; j++) part[warp][j] = v[j];
    __syncthreads();
    if (g != 0) return;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      v[j] = 0.0f;
      for (int q = 0; q < G; q++) v[j] += part[warp + q][j];
    }
  }
  if (lane == 0 && r < I) {
    h[s * I + r] = v[0] / (1.0f + expf(-v[0])) * v[2];
    if (r + 1 < I) h[s * I + r + 1] = v[1] / (1.0f + expf(-v[1])) * v[3];
  }
}

// out[t, n] = sum over the token's K slots, ascending expert id (the CPU reference's order), of
// w[s] * (down_e[n] . h[s]); grid (ceil(H / (4 * kWarps / G)), T). A warp reads four consecutive rows of one
// expert's down matrix per slot, so each chunk of the slot's h row serves four rows; a row group of G warps
// splits I. The K products of a row meet in shared memory: no scratch rows, no combine pass.
template <int G>
__global__ void __launch_bounds__(kWarps * 32) down_combine_kernel(const float *__restrict__ h, int64_t H, int64_t I,
                                                                  const int32_t *__restrict__ ids,
                                                                  const float *__restrict__ w, int64_t K, int64_t E,
                                                                  const DevMatrix *__restrict__ down,
                                                                  float *__restrict__ out) {
  __shared__ float part[kWarps][4][kMaxTopK];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = warp % G;
  const int64_t n0 = (int64_t(blockIdx.x) * (kWarps / G) + warp / G) * 4, t = blockIdx.y;
  const int32_t *it = ids + t * K;
  for (int64_t k = 0; k < K; k++) {
    float acc[4][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
    const int32_t e = it[k];
    if (n0 < H && e >= 0 && e < E) {  // (an absent expert's entry has 0 columns: an empty K slice, nothing read, a zero partial)
      const DevMatrix &d = down[e];
      const DevMatrix *ws[4] = {&d, &d, &d, &d};
      int64_t ns[4];
#pragma unroll
      for (int j = 0; j < 4; j++) ns[j] = n0 + j < H ? n0 + j : H - 1;
      int64_t lo, hi;
      k_slice(d, g, G, lo, hi);
      rows_dot<1, 4>(ws, ns, h + (t * K + k) * I, I, lane, acc, lo, hi);
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float v = warp_sum(acc[j][0]);
      if (lane == 0) part[warp][j][k] = v;
    }
  }
  if constexpr (G > 1)
    __syncthreads();
  else
    __syncwarp();
  if (g != 0 || lane >= 4 || n0 + lane >= H) return;
  const int j = lane;  // lanes 0-3: one output row each
  float sum = 0.0f;
  int32_t last = -1;
  for (int64_t q = 0; q < K; q++) {  // K <= a few dozen: pick the next larger id each time
    int64_t best = -1;
    for (int64_t i = 0; i < K; i++)
      if (it[i] > last && (best < 0 || it[i] < it[best])) best = i;
    if (best < 0) break;
    last = it[best];
    if (last >= E || down[last].data == nullptr) continue;  // absent: nothing added (not a product with 0)
    float v = 0.0f;
    for (int p = 0; p < G; p++) v += part[warp + p][j][best];
    sum += w[t * K + best] * v;
  }
  out[t * H + n0 + j] = sum;
}

// out[i] = ids[i], or -1 where the expert is outside [0, E) or its table entry is null (another rank's).
__global__ void drop_absent_kernel(const int32_t *__restrict__ ids, int64_t n, const DevMatrix *__restrict__ table,
                                   int64_t E, int32_t *__restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    out[i] = e >= 0 && e < E && table[e].data != nullptr ? e : -1;
  }
}

// The K split of a row group: as linear.cu's gemv_split, the fewest slices that give ~12 warps per SM.
int expert_split(int64_t groups, int64_t cols) {
  const int sms = sm_count();
  int G = 1;
  while (G < kWarps && groups * G < 12 * int64_t(sms) && cols / (2 * G) >= 128) G *= 2;
  return G;
}

}  // namespace

void moe_experts_gemv(const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
                      int64_t n_experts, const DevMatrix *gate, const DevMatrix *up, const DevMatrix *down, int32_t expert_dtype, float *h,
                      float *out, cudaStream_t s) {
  if (T == 0) return;
  if (H % 4 || I % 4) throw std::runtime_error("moe_experts_gemv: hidden and intermediate sizes must be multiples of 4");
  if (K > kMaxTopK) throw std::runtime_error("moe_experts_gemv: more than 32 experts per token");
  (void)expert_dtype;
  const unsigned slots = unsigned(T * K);
  {
    const int G = expert_split((I + 1) / 2 * int64_t(slots), H);
    const dim3 grid(unsigned((I + 2 * (kWarps / G) - 1) / (2 * (kWarps / G))), slots);
    switch (G) {
      case 8: gate_up_kernel<8><<<grid, kWarps * 32, 0, s>>>(x, H, I, ids, K, n_experts, gate, up, h); break;
      case 4: gate_up_kernel<4><<<grid, kWarps * 32, 0, s>>>(x, H, I, ids, K, n_experts, gate, up, h); break;
      case 2: gate_up_kernel<2><<<grid, kWarps * 32, 0, s>>>(x, H, I, ids, K, n_experts, gate, up, h); break;
      default: gate_up_kernel<1><<<grid, kWarps * 32, 0, s>>>(x, H, I, ids, K, n_experts, gate, up, h); break;
    }
    check_launch("moe gate_up");
  }
  const int G = expert_split((H + 3) / 4 * T, I);
  const dim3 grid(unsigned((H + 4 * (kWarps / G) - 1) / (4 * (kWarps / G))), unsigned(T));
  switch (G) {
    case 8: down_combine_kernel<8><<<grid, kWarps * 32, 0, s>>>(h, H, I, ids, w, K, n_experts, down, out); break;
    case 4: down_combine_kernel<4><<<grid, kWarps * 32, 0, s>>>(h, H, I, ids, w, K, n_experts, down, out); break;
    case 2: down_combine_kernel<2><<<grid, kWarps * 32, 0, s>>>(h, H, I, ids, w, K, n_experts, down, out); break;
    default: down_combine_kernel<1><<<grid, kWarps * 32, 0, s>>>(h, H, I, ids, w, K, n_experts, down, out); break;
  }
  check_launch("moe down");
}

void moe_drop_absent_ids(const int32_t *ids, int64_t n, const DevMatrix *table, int64_t E, int32_t *out, cudaStream_t s) {
  if (n == 0) return;
  drop_absent_kernel<<<unsigned(std::min<int64_t>((n + 255) / 256, 1024)), 256, 0, s>>>(ids, n, table, E, out);
  check_launch("moe drop absent ids");
}

}  // namespace dsrt::kernels
