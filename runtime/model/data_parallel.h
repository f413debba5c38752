// Data-parallel attention (dist/mapping.h): the host-side plans a rank follows in a step. Each rank runs its
// own sequences (those whose pages live in its pool) from embedding to head; only the routed experts need
// other ranks, and only for the rows routed to them. Plain index arithmetic, planned once per step (the
// rank's rows) or per MoE layer (where its rows go), so that it is testable without a forward.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "dist/mapping.h"

namespace dsrt {

// A rank's part of a step.
struct RankBatch {
  Batch batch;                     // its sequences: rows numbered from 0, page ids local to its pool
  std::vector<int32_t> logit_rows;  // rows of `batch` whose logits it computes, in the step's logit-row order
  // Per rank, how many of the step's logit rows it computes; the step's logits gathered rank after rank (rank
  // 0, then 1, ...) hold logit row i at gathered[i]: the step's logit rows grouped by rank.
  std::vector<int64_t> logit_counts;
  std::vector<int32_t> logit_order;  // i -> row of the gathered logits holding the step's logit row i
};
// Throws DSRT_ERR_INTERNAL when a sequence's pages span ranks or lie past the world's pools (b.rank_pages > 0).
RankBatch rank_batch(const Batch &b, const std::vector<int32_t> &logit_rows, int rank, int world);

// Rank 0: the step's logit rows [n, V] in the step's order, gathered from every rank's `mine` (its rows
// r.logit_rows); the other ranks send theirs and get an empty tensor.
Tensor gather_logit_rows(Backend &be, Communicator &comm, const RankBatch &r, Tensor mine);

// Where a MoE layer sends this rank's rows: to each rank owning at least one of the row's routed experts, once
// (that rank sums its experts' weighted outputs; the row's other experts are skipped there).
struct ExpertDispatch {
  std::vector<int32_t> send_rows;     // rows of x, grouped by destination rank (ranks ascending, rows ascending)
  std::vector<int64_t> send_counts;   // per rank
  // The returned partial sums arrive in send_rows' order; one zero row is appended after them. combine[j][t]:
  // the row holding token t's j-th partial sum, or the zero row (a token reaches 1 to min(K, world) ranks).
  std::vector<std::vector<int32_t>> combine;
};
// ids: [T, K] routed expert ids of this rank's rows (host copy).
ExpertDispatch plan_dispatch(const int32_t *ids, int64_t T, int64_t K, int64_t n_experts, const Mapping &m);

// A MoE layer's routed rows on their way (all-to-all-v over the world, every rank in the same order; a rank
// without rows this step takes part with none): the rows this rank received to run through its experts, with
// their routing, and the plan to add up the partial sums when they come back.
struct RoutedRows {
  ExpertDispatch plan;
  std::vector<int64_t> from;  // rows each rank sent here
  Tensor x, ids, weights;     // the received rows [n, H], their expert ids [n, K] (I32) and weights [n, K]
  bool fp8 = false;           // the rows travelled as FP8 (x holds them dequantised)
};
// Sends this rank's rows x [T, H] to the ranks owning their routed experts (ids, weights: the router's output;
// experts: the layer's, other ranks' null). Brings the routing to the host to plan, and every rank's row counts
// from an all-gather (host syncs per MoE layer, as DeepEP's normal kernels wait for their counts), then the
// all-to-alls of the rows, ids and weights. The rows travel in FP8 (e4m3 with a scale per 128 channels, as
// Backend::quantize_fp8_rows makes them: ~3.9x fewer bytes) where every receiving rank's expert GEMMs take FP8
// activations for the rows it gets (Backend::moe_takes_fp8), since they round them so anyway; else in fp32.
RoutedRows dispatch_routed_rows(Backend &be, Communicator &comm, const Mapping &m, Tensor x, Tensor ids, Tensor weights,
                                const std::vector<FfnWeights> &experts);
// The partial sums [received rows, H] back to the rows' ranks, where each row's are added up: [T, H].
Tensor combine_routed_rows(Backend &be, Communicator &comm, const RoutedRows &r, Tensor partial, int64_t T);

}  // namespace dsrt
