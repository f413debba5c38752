// The DeepSeek-V3 forward pass (spec §3-4), written once against the Backend interface.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "model/model.h"

namespace dsrt {

enum class AttentionPolicy { Auto, Naive, Absorbed };  // Auto: naive for chunks of > 1 token, absorbed for 1

// Runs the main model over a batch of sequences (their new tokens are written into the latent cache) and
// returns, on the host, the logits of the requested batch rows: [logit_rows.size(), vocab] row-major.
void forward(const Model &m, Backend &be, const Batch &batch, const std::vector<int32_t> &logit_rows,
             AttentionPolicy policy, float *logits_out);

}  // namespace dsrt
