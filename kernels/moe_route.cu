// DeepSeekMoE routing (spec §4) per token: scores (sigmoid or softmax) in fp32, the correction bias for
// selection only, group-limited selection (top-2 sum or max per group), top-k with ties to the lower
// index, weights from the unbiased scores, normalised and scaled. One thread block per token; the
// selection runs in one thread (E <= a few hundred).
#include "common.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kMaxExperts = 1024;

__global__ void route_kernel(const float *logits, DevMatrix bias, RouteParams p, int32_t *ids, float *weights) {
  __shared__ float s[kMaxExperts], u[kMaxExperts];
  const int64_t t = blockIdx.x;
  const int E = p.n_experts;
  const float *l = logits + t * E;
  if (p.sigmoid) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) s[e] = 1.0f / (1.0f + expf(-l[e]));
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (!p.sigmoid) {
    float mx = -INFINITY, z = 0.0f;
    for (int e = 0; e < E; e++) mx = fmaxf(mx, l[e]);
    for (int e = 0; e < E; e++) z += (s[e] = expf(l[e] - mx));
    for (int e = 0; e < E; e++) s[e] /= z;
  }
  for (int e = 0; e < E; e++) u[e] = s[e] + (bias.data ? load_w(bias, e, 0) : 0.0f);
  if (p.n_group > 1 && p.method != 2) {
    const int per = E / p.n_group;
    float gs[64];
    bool keep[64];
    for (int g = 0; g < p.n_group; g++) {
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
    for (int r = 0; r < p.topk_group; r++) {  // best remaining group, ties to the lower index
      int best = -1;
      for (int g = 0; g < p.n_group; g++)
        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
      keep[best] = true;
    }
    for (int e = 0; e < E; e++)
      if (!keep[e / per]) u[e] = -INFINITY;
  }
  float sum = 0.0f;
  for (int k = 0; k < p.top_k; k++) {
    int best = -1;  // masked and already chosen experts hold -inf; ties go to the lower index
    for (int e = 0; e < E; e++)
      if (u[e] != -INFINITY && (best < 0 || u[e] > u[best])) best = e;
    ids[t * p.top_k + k] = best;
    weights[t * p.top_k + k] = s[best];  // the unbiased score
    sum += s[best];
    u[best] = -INFINITY;
  }
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
  route_kernel<<<unsigned(rows), 128, 0, s>>>(logits, bias, p, ids, weights);
  check_launch("moe_route");
}

}  // namespace dsrt::kernels
