// A byte-level BPE tokenizer trained on a small built-in corpus, written as tokenizer.json with
// DeepSeek-V3's pre-tokenizer, decoder and special tokens, and tokenizer_config.json with its chat template:
// tiny checkpoints can then be used end to end with text.
#pragma once
#include <cstdint>
#include <string>

namespace dsrt::tools {

// Writes tokenizer.json and tokenizer_config.json into dir for a model of `vocab_size` embedding rows.
void write_tiny_tokenizer(const std::string &dir, int64_t vocab_size);

}  // namespace dsrt::tools
