// Host side of the GPU expert cache of one MoE layer (expert offload; the device side and the policies are
// kernels/expert_cache.cu): the cache's state in device memory, made once when a layer first runs with some
// of its routed experts in host memory and some on the device. The device copies of the experts the placement
// put on the GPU are the slots; the layer's expert table starts pointing at them and at the host-mapped bytes
// of the others, and the admit kernel rewrites it as experts come and go.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels.h"

namespace dsrt {

class ExpertCache {
 public:
  // table: the layer's device table [3E] (initial entries already there); host [3E]: every expert matrix's
  // host-mapped entry; slot_experts: the expert whose device copy is slot s (its table entries are the slot's
  // buffers). stats: the backend's device counters [kCacheStats].
  ExpertCache(int32_t n_experts, const std::vector<int32_t> &slot_experts, const std::vector<kernels::DevMatrix> &host,
              const std::vector<kernels::DevMatrix> &table_now, kernels::DevMatrix *table, kernels::ExpertCachePolicy policy,
              unsigned long long *stats, cudaStream_t stream);
  ~ExpertCache();
  ExpertCache(const ExpertCache &) = delete;
  ExpertCache &operator=(const ExpertCache &) = delete;

  const kernels::ExpertCacheView &view() const { return view_; }

 private:
  kernels::ExpertCacheView view_;
  void *state_ = nullptr;  // one allocation for every array of view_
};

// DSRT_EXPERT_CACHE: "lfu" (the default: LFU with decay), "lru", or "off" (no cache: the placement's experts
// stay where they are and the others are read in place every time). Throws DSRT_ERR_INVALID_ARGUMENT on
// anything else.
std::optional<kernels::ExpertCachePolicy> expert_cache_policy_from_env();

}  // namespace dsrt
