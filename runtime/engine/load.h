// Loading a checkpoint for the API: the model (model/: config, weights, placement) and its text side
// (text/vocabulary.h: tokenizer, end-of-generation and unused ids), in one pass through the load stages.
// This is where the two meet, so that model/ never depends on text/.
#pragma once
#include <memory>
#include <string>

#include "model/model.h"
#include "text/vocabulary.h"

namespace dsrt {

struct LoadedModel {
  std::shared_ptr<Model> model;
  std::shared_ptr<const Vocabulary> vocab;  // never null; its tokenizer is null when the directory has none
};

// Stages (LoadOptions::progress): 0 config.json, 1 shards, 2 validate, 3 text files (tokenizer, then
// generation_config.json). Shapes come before the tokenizer: its per-id tables are sized by vocab_size,
// which must first agree with the embedding table that the shards hold. With opt.config_only (the API's
// tokenizer_only) no shards are read, vocab_size is bounded by the tokenizer file's size, and a directory
// without tokenizer files is DSRT_ERR_IO.
LoadedModel load_model(const std::string &dir, const LoadOptions &opt);

}  // namespace dsrt
