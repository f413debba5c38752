// Random DeepSeek-V3-architecture checkpoints in the exact published layout, for tests and benchmarks:
// config.json (+ quantization_config), generation_config.json, two safetensors shards + index, FP8 e4m3
// weights with 128x128 block scales where the real checkpoint has them, BF16 norms/embeddings/router/head,
// fp32 e_score_correction_bias, and an MTP layer with its own embedding and head copies.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsrt::tools {

struct TinyPreset {
  std::string name;
  std::string description;
  nlohmann::ordered_json config;  // config.json as written
  bool fp8 = true;
  bool bulk = false;  // benchmark-sized: weights from a fast quantile-table fill instead of Box-Muller
};

const std::vector<TinyPreset> &tiny_presets();
const TinyPreset *find_tiny_preset(const std::string &name);

// Writes the checkpoint into dir (created if needed). Throws dsrt::Error on failure.
void make_tiny_model(const TinyPreset &preset, const std::string &dir, uint64_t seed);

}  // namespace dsrt::tools
