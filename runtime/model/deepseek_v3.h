// The DeepSeek-V3 forward pass (spec §3-4, §6), written once against the Backend interface and run by every
// rank of a Mapping on its ModelShard; the communication a parallel layer needs is one named line each.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "model/shard.h"

namespace dsrt {

enum class AttentionPolicy { Auto, Naive, Absorbed };  // Auto: naive for chunks of > 2 tokens, else absorbed

// Runs the main model over a batch of sequences (their new tokens are written into the latent cache) and
// returns, on the host, the logits of the requested batch rows: [logit_rows.size(), vocab] row-major
// (logits_out may be null on ranks that do not need them). Starts a backend step. hidden_out (optional):
// every row's final-normed hidden state [T, hidden], a scratch tensor valid until the next step begins (the
// MTP module's input). logits_tensor_out (optional): the logits [logit_rows.size(), vocab] where the backend
// computed them (scratch, valid until the next step begins), for sampling there (Backend::sample_rows); with
// it, logits_out may be null and nothing is copied to the host.
void forward(const ModelShard &m, Backend &be, Communicator &comm, const Batch &batch,
             const std::vector<int32_t> &logit_rows, AttentionPolicy policy, float *logits_out,
             Tensor *hidden_out = nullptr, Tensor *logits_tensor_out = nullptr);

// The first MTP module over a batch of pairs: row t is position p_t (batch.positions) with hidden[t] = the
// main model's final-normed hidden state at p_t and batch.tokens[t] = the token at p_t + 1. Writes the MTP
// cache layer at those positions; logits of the requested rows predict the token at p_t + 2. Runs inside
// the caller's backend step (call begin_step() first when there is no step to share).
// normed_out (optional): the logit rows' states after the head norm [logit_rows, hidden], scratch: what a
// chained draft feeds back as the next `hidden`.
void mtp_forward(const ModelShard &m, Backend &be, Communicator &comm, const Batch &batch, Tensor hidden,
                 const std::vector<int32_t> &logit_rows, AttentionPolicy policy, float *logits_out,
                 Tensor *normed_out = nullptr);

// One rank, the whole model (tests and tools that drive a backend directly).
void forward(const Model &m, Backend &be, const Batch &batch, const std::vector<int32_t> &logit_rows,
             AttentionPolicy policy, float *logits_out, Tensor *hidden_out = nullptr);
void mtp_forward(const Model &m, Backend &be, const Batch &batch, Tensor hidden, const std::vector<int32_t> &logit_rows,
                 AttentionPolicy policy, float *logits_out, Tensor *normed_out = nullptr);

}  // namespace dsrt
