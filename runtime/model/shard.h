// A rank's share of the model (design.md §5): views of the weights it computes with, bound once from the
// Mapping. The forward reads only this; with one rank it is the whole model.
#pragma once
#include <vector>

#include "dist/mapping.h"
#include "model/model.h"

namespace dsrt {

struct ModelShard {
  const Model *model = nullptr;  // config, RoPE table, router parameters
  Mapping map;
  Weight embed, norm;            // whole (replicated)
  Weight head;                   // vocabulary rows `vocab` of lm_head
  Range vocab;
  std::vector<LayerWeights> layers, mtp;  // this rank's heads, FFN columns and experts; absent experts are
                                          // other ranks'
  MlaDims mla;                   // n_heads: this rank's heads
  Range experts;                 // routed experts this rank computes

  const ModelConfig &cfg() const { return model->cfg; }
  // Every weight this rank computes with (its parts, and the whole tensors it replicates), the MTP layer's
  // only with `mtp`: what a device backend uploads for this rank, and nothing else. Pointers into this shard.
  std::vector<const Weight *> weights(bool mtp) const;
  // Empty when every FP8 part of this shard starts on a 128 x 128 scale block (a device copy of the part is
  // then a tensor of its own: pack_weight); else the first part that does not, and where it is cut.
  std::string fp8_block_cut() const;
  // Binds rank map.rank's views. Throws DSRT_ERR_INVALID_ARGUMENT when the mapping does not divide the model.
  static ModelShard bind(const Model &m, const Mapping &map);
};

}  // namespace dsrt
