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
// The preset with n hidden layers instead of its own (`dsrt make-tiny --layers`): the first
// first_k_dense_replace of them dense, the rest MoE, its MTP layers (if any) after the last; how benchmarks
// get a model of several MoE layers without a preset of their own. Throws DSRT_ERR_INVALID_ARGUMENT unless
// 1 <= n <= 4096 (config.json's limit).
TinyPreset with_layers(const TinyPreset &preset, int64_t n);

// Writes the checkpoint into dir (created if needed). Throws dsrt::Error on failure.
// route_skew S > 0: each MoE layer's e_score_correction_bias is fitted so that expert popularity follows a
// Zipf law of exponent S (tiny_model.cpp, zipf_bias, says how); 0 keeps the uniform-ish random biases (and
// the bytes every preset had before the option existed).
void make_tiny_model(const TinyPreset &preset, const std::string &dir, uint64_t seed, double route_skew = 0.0);

// The Zipf target of --route-skew: the probability that a token selects the expert of popularity rank r
// (0-based), q_r = min(1, c (r+1)^-S) with c such that sum_r q_r = top_k (an expert is picked at most once per
// token, so the hottest ranks saturate at 1 when S is large).
std::vector<double> zipf_selection_rates(int64_t n_experts, int64_t top_k, double S);

}  // namespace dsrt::tools
