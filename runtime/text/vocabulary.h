// The text side of a checkpoint as generation sees it: its tokenizer (none when the directory has no tokenizer
// files), the ids that end generation and the ids never sampled. Made once per load (engine/load.h) and shared,
// read-only, by the API's model handle and every engine of the model. Nothing here knows the model: the
// config's vocab_size and EOS ids come in as values.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace dsrt {

// A tokenizer-only load has no embedding to check vocab_size against: the padding ids beyond what its
// files can hold (each id costs at least one byte of a tokenizer file) are capped by this.
constexpr int64_t kTokenizerOnlyPaddingMax = int64_t(1) << 20;

struct Vocabulary {
  std::string dir;                             // the model directory (named by the no-tokenizer error)
  std::shared_ptr<const Tokenizer> tokenizer;  // null when the directory has no tokenizer files
  // Ids that end generation: the config's EOS ids (those inside the vocabulary) and the tokenizer's
  // end-of-generation tokens, sorted, no repeats.
  std::vector<int32_t> eog_ids;
  // Ids in the vocabulary that no token uses (padding rows of the embedding): never sampled.
  std::vector<int32_t> unused_ids;

  // The tokenizer, or DSRT_ERR_UNSUPPORTED naming the directory when it has none.
  const Tokenizer &tok() const;

  // From a tokenizer (may be null) and the config's vocab_size and EOS ids. A tokenizer with more tokens
  // than vocab_size is DSRT_ERR_FORMAT naming the directory.
  static std::shared_ptr<const Vocabulary> make(const std::string &dir, std::shared_ptr<const Tokenizer> tokenizer,
                                                int64_t vocab_size, const std::vector<int64_t> &eos_ids);
  // Tokenizer::load(dir, vocab_size), then make.
  static std::shared_ptr<const Vocabulary> load(const std::string &dir, int64_t vocab_size,
                                                const std::vector<int64_t> &eos_ids);
};

// The tokenizer file Tokenizer::load reads in `dir` (its order: tokenizer.json, tiktoken.model,
// tokenizer.model), or "" when none is there.
std::string tokenizer_file(const std::string &dir);

// A tokenizer-only load (no shards): vocab_size may not exceed what the tokenizer file can define plus
// kTokenizerOnlyPaddingMax padding ids, or DSRT_ERR_FORMAT naming config_path. Nothing to check without a file.
void check_tokenizer_only_vocab_size(const std::string &dir, const std::string &config_path, int64_t vocab_size);

}  // namespace dsrt
