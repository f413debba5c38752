#include "backend/cuda/expert_cache.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "core/status.h"

namespace dsrt {

namespace k = dsrt::kernels;

namespace {

size_t up8(size_t n) { return (n + 7) / 8 * 8; }

}  // namespace

ExpertCache::ExpertCache(int32_t n_experts, const std::vector<int32_t> &slot_experts, const std::vector<k::DevMatrix> &host,
                         const std::vector<k::DevMatrix> &table_now, k::DevMatrix *table, k::ExpertCachePolicy policy,
                         unsigned long long *stats, cudaStream_t stream) {
  const size_t E = size_t(n_experts), S = slot_experts.size();
  // The initial state on the host, laid out as on the device, then one copy.
  std::vector<int32_t> slot_of(E, -1);
  std::vector<void *> slot_data(3 * S);
  for (size_t s = 0; s < S; s++) {
    slot_of[size_t(slot_experts[s])] = int32_t(s);
    for (size_t p = 0; p < 3; p++) slot_data[s * 3 + p] = const_cast<void *>(table_now[p * E + size_t(slot_experts[s])].data);
  }
  const size_t o_slot_of = 0, o_expert_in = up8(o_slot_of + E * 4), o_stamp = up8(o_expert_in + S * 4),
               o_freq = up8(o_stamp + S * 4), o_clock = up8(o_freq + E * 4), o_copies = up8(o_clock + 4),
               o_host = up8(o_copies + (1 + 2 * E) * 4), o_slots = up8(o_host + 3 * E * sizeof(k::DevMatrix)),
               bytes = o_slots + 3 * S * sizeof(void *);
  std::vector<char> init(bytes, 0);
  std::memcpy(init.data() + o_slot_of, slot_of.data(), E * 4);
  std::memcpy(init.data() + o_expert_in, slot_experts.data(), S * 4);
  std::memcpy(init.data() + o_host, host.data(), 3 * E * sizeof(k::DevMatrix));
  std::memcpy(init.data() + o_slots, slot_data.data(), 3 * S * sizeof(void *));
  cuda_check(cudaMalloc(&state_, bytes), "expert cache state");
  cuda_check(cudaMemcpyAsync(state_, init.data(), bytes, cudaMemcpyHostToDevice, stream), "expert cache state");
  cuda_check(cudaStreamSynchronize(stream), "expert cache state");
  char *b = static_cast<char *>(state_);
  view_.n_experts = n_experts;
  view_.n_slots = int32_t(S);
  view_.policy = policy;
  const k::DevMatrix &first = host[0];
  view_.matrix_bytes = first.rows * first.cols * (first.dtype == k::kFP8 ? 1 : first.dtype == k::kF32 ? 4 : 2);
  view_.slot_of = reinterpret_cast<int32_t *>(b + o_slot_of);
  view_.expert_in = reinterpret_cast<int32_t *>(b + o_expert_in);
  view_.stamp = reinterpret_cast<uint32_t *>(b + o_stamp);
  view_.freq = reinterpret_cast<float *>(b + o_freq);
  view_.clock = reinterpret_cast<uint32_t *>(b + o_clock);
  view_.copies = reinterpret_cast<int32_t *>(b + o_copies);
  view_.host = reinterpret_cast<const k::DevMatrix *>(b + o_host);
  view_.slot_data = reinterpret_cast<void *const *>(b + o_slots);
  view_.table = table;
  view_.stats = stats;
}

ExpertCache::~ExpertCache() { cudaFree(state_); }

std::optional<k::ExpertCachePolicy> expert_cache_policy_from_env() {
  const char *v = std::getenv("DSRT_EXPERT_CACHE");
  const std::string p = v ? v : "lfu";
  if (p == "lfu") return k::kExpertCacheLfu;
  if (p == "lru") return k::kExpertCacheLru;
  if (p == "off") return std::nullopt;
  failf(DSRT_ERR_INVALID_ARGUMENT, "DSRT_EXPERT_CACHE=", p, ": expected lfu, lru or off");
}

}  // namespace dsrt
