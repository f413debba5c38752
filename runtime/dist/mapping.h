// Mapping: how a model is split over ranks (TensorRT-LLM's Mapping, vLLM's parallel state), as one value.
//
// world = tp * ep ranks; rank = ep_rank * tp + tp_rank. Attention, the dense FFNs, the shared experts and
// the head are tensor-parallel over the tp ranks of one expert group (heads, intermediate columns and
// vocabulary rows split; replicated across expert groups). Routed experts are split over the ep groups
// (expert group g owns experts [g*E/ep, (g+1)*E/ep)) and each owned expert's intermediate dimension over
// the group's tp ranks. Every rank holds every token's hidden state, so "dispatch" is each rank picking its
// own experts' rows, and "combine" is one all-reduce over the world.
//
// Data-parallel attention (dp_attention, tp 1, ep = world): every rank holds the attention, dense FFNs,
// shared experts, embedding and head whole, and runs them on its own sequences only, whose latent cache it
// alone keeps (the KV pool is W ranks' pools: MLA's latent is not split by heads, so tensor-parallel
// attention keeps a copy of every sequence's cache on every rank). Routed experts stay split over the
// ranks; a MoE layer sends each token's row to the ranks owning its routed experts and back (all-to-all-v
// of only the routed rows). For large batches: a batch-1 step has one rank working.
#pragma once
#include <cstdint>
#include <string>

namespace dsrt {

struct ModelConfig;

// [begin, end) of a split dimension.
struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool contains(int64_t i) const { return i >= begin && i < end; }
};

struct Mapping {
  int world = 1, rank = 0, tp = 1, ep = 1;
  bool dp_attention = false;

  int tp_rank() const { return rank % tp; }
  int ep_rank() const { return rank / tp; }
  bool single() const { return world == 1; }

  // Part `part` of `n` items split into `parts` near-equal contiguous pieces (the first n % parts get one more).
  static Range split(int64_t n, int parts, int part);
  Range heads(int64_t n_heads) const { return split(n_heads, tp, tp_rank()); }
  Range columns(int64_t n) const { return split(n, tp, tp_rank()); }  // intermediate / vocabulary slices
  Range experts(int64_t n_experts) const { return split(n_experts, ep, ep_rank()); }

  // Whether this rank runs attention on its own sequences only (dp_attention with several ranks).
  bool attention_data_parallel() const { return dp_attention && world > 1; }
  // The rank owning routed expert e of n.
  int expert_owner(int64_t e, int64_t n_experts) const;

  // tp and ep >= 1, tp * ep == world, 0 <= rank < world, dp_attention only with tp 1. Throws DSRT_ERR_INVALID_ARGUMENT naming the numbers.
  void validate() const;
  // The model can be split this way: tp divides the attention heads, ep the routed experts.
  // Throws DSRT_ERR_INVALID_ARGUMENT naming the numbers.
  void check_divides(const ModelConfig &cfg) const;
  std::string str() const;  // "rank 1 of 4 (tp 2 x ep 2: tp rank 1, ep rank 0)"
};

}  // namespace dsrt
