#include "engine/load.h"

#include "core/status.h"

namespace dsrt {

LoadedModel load_model(const std::string &dir, const LoadOptions &opt) {
  std::shared_ptr<Model> m = Model::begin_load(dir, opt);
  if (!opt.config_only) {
    // Shapes before the tokenizer: its per-id tables are sized by vocab_size, which must first agree with
    // the embedding table that the shards actually hold (a vocab_size of 1e8 cost 3.67 GB before the
    // shape check rejected it).
    m->load_weights(opt);
  } else {
    check_tokenizer_only_vocab_size(dir, dir + "/config.json", m->cfg.vocab_size);
  }
  report_load_progress(opt, 3, 0, 2);
  std::shared_ptr<const Vocabulary> vocab = Vocabulary::load(dir, m->cfg.vocab_size, m->cfg.eos_token_ids);
  report_load_progress(opt, 3, 1, 2);
  load_generation_defaults(dir, m->gen_defaults);
  report_load_progress(opt, 3, 2, 2);
  if (opt.config_only && !vocab->tokenizer)
    failf(DSRT_ERR_IO, dir, ": a tokenizer-only load needs tokenizer.json, tiktoken.model or tokenizer.model");
  m->finish_load(opt);
  return {std::move(m), std::move(vocab)};
}

}  // namespace dsrt
