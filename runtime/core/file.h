// Reading a checkpoint's small files (config, index, tokenizer, generation config) without trusting them:
// only regular files (symlinks to regular files are fine: Hugging Face caches are made of them), never
// blocking on a FIFO or device, never more bytes than the caller's cap, never echoing contents in messages.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace dsrt {

// Size caps per file kind. Published checkpoints are far below each (DeepSeek-V3: config.json 1.7 KB,
// index 8.9 MB for 91k tensors, tokenizer.json 7.8 MB, generation_config.json < 1 KB).
constexpr uint64_t kConfigFileMax = uint64_t(1) << 20;             // config.json
constexpr uint64_t kGenerationConfigFileMax = uint64_t(1) << 20;   // generation_config.json
constexpr uint64_t kIndexFileMax = uint64_t(256) << 20;            // model.safetensors.index.json
constexpr uint64_t kTokenizerFileMax = uint64_t(512) << 20;        // tokenizer.json, tiktoken.model, tokenizer_config.json
constexpr uint64_t kShardHeaderMax = uint64_t(100) << 20;          // the JSON header of one safetensors shard

// True when path is (or links to) a regular file, false when nothing is there. DSRT_ERR_IO when something
// else is (a FIFO, device, socket or directory where a file belongs): refused, not taken for absent.
bool file_exists(const std::string &path);

// The whole file. DSRT_ERR_IO if it cannot be opened or is not a regular file; DSRT_ERR_FORMAT if it holds
// more than max_bytes.
std::string read_text_file(const std::string &path, uint64_t max_bytes = kTokenizerFileMax);

// Parses a JSON file read as above; DSRT_ERR_FORMAT naming the file and the byte offset if it is not JSON
// (or, with want_object, not a JSON object).
nlohmann::json read_json_file(const std::string &path, uint64_t max_bytes = kTokenizerFileMax, bool want_object = true);

// Where a JSON text stops being JSON, for messages that must not quote the text (nlohmann's own messages
// quote the last token read, which would echo a secret file a symlink points at).


}  // namespace dsrt
