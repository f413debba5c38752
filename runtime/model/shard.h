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
  // Binds rank map.rank's views. Throws DSRT_ERR_INVALID_ARGUMENT when the mapping does not divide the model.
  static ModelShard bind(const Model &m, const Mapping &map);
};

}  // namespace dsrt
