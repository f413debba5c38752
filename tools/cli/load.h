// Loading a model and creating its engine from the shared options, with the progress display.
#pragma once
#include "options.h"

namespace dsrt::cli {

struct Loaded {
  dsrt_model *model = nullptr;
  dsrt_engine *engine = nullptr;
  Loaded() = default;
  Loaded(const Loaded &) = delete;
  Loaded &operator=(const Loaded &) = delete;
  ~Loaded() {
    dsrt_engine_free(engine);
    dsrt_model_free(model);
  }
};

// Loads the model (progress on a terminal) and creates an engine of `max_tokens` KV capacity (0: the default).
// dist: rank 0 of ranks in several processes (dsrt_engine_create_dist); null: dsrt_engine_create.
void load(const ModelOptions &mo, const EngineOptions &eo, Loaded &l, int max_tokens, dsrt_cancel *cancel = nullptr,
          const dsrt_dist_params *dist = nullptr);
// config.json and the tokenizer only.
void load_tokenizer_only(const std::string &dir, Loaded &l);

}  // namespace dsrt::cli
