#include "dist/mapping.h"
#include <algorithm>

#include "core/status.h"
#include "model/config.h"

namespace dsrt {

Range Mapping::split(int64_t n, int parts, int part) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = part * base + std::min<int64_t>(part, extra);
  return {begin, begin + base + (part < extra ? 1 : 0)};
}

void Mapping::validate() const {
  if (tp < 1 || ep < 1) failf(DSRT_ERR_INVALID_ARGUMENT, "tensor-parallel size ", tp, " and expert-parallel size ", ep, " must be >= 1");
  if (int64_t(tp) * ep != world)
    failf(DSRT_ERR_INVALID_ARGUMENT, "tp ", tp, " x ep ", ep, " = ", int64_t(tp) * ep, " ranks, but the world has ", world);
  if (rank < 0 || rank >= world) failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", rank, " is outside a world of ", world);
  if (dp_attention && tp != 1)
    failf(DSRT_ERR_INVALID_ARGUMENT, "data-parallel attention splits the ranks by sequences and the experts over all of "
          "them (tp 1, ep = world), not tp ", tp);
}

int Mapping::expert_owner(int64_t e, int64_t n_experts) const {
  // The inverse of experts(): the first n % ep groups own one expert more.
  const int64_t base = n_experts / ep, extra = n_experts % ep;
  const int64_t big = extra * (base + 1);
  const int64_t group = e < big ? e / (base + 1) : extra + (e - big) / base;
  return int(group) * tp;
}

void Mapping::check_divides(const ModelConfig &c) const {
  validate();
  if (c.num_attention_heads % tp != 0)
    failf(DSRT_ERR_INVALID_ARGUMENT, "tensor-parallel size ", tp, " does not divide the model's ", c.num_attention_heads,
          " attention heads");
  if (c.n_routed_experts > 0 && c.n_routed_experts % ep != 0)
    failf(DSRT_ERR_INVALID_ARGUMENT, "expert-parallel size ", ep, " does not divide the model's ", c.n_routed_experts,
          " routed experts");
  if (c.n_routed_experts == 0 && ep > 1)
    failf(DSRT_ERR_INVALID_ARGUMENT, "expert-parallel size ", ep, " on a model without routed experts");
  if (tp > c.intermediate_size || (c.n_routed_experts > 0 && tp > c.moe_intermediate_size) || tp > c.vocab_size)
    failf(DSRT_ERR_INVALID_ARGUMENT, "tensor-parallel size ", tp, " is larger than an FFN or the vocabulary");
}

std::string Mapping::str() const {
  return "rank " + std::to_string(rank) + " of " + std::to_string(world) + " (tp " + std::to_string(tp) + " x ep " +
         std::to_string(ep) + (dp_attention ? ", data-parallel attention" : "") + ": tp rank " + std::to_string(tp_rank()) +
         ", ep rank " + std::to_string(ep_rank()) + ")";
}

}  // namespace dsrt
