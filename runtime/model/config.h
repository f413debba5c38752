// config.json of a DeepSeek-V3-family checkpoint (spec §1), parsed and checked.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsrt {

enum class ScoringFunc { Sigmoid, Softmax };
enum class TopkMethod { NoauxTc, GroupLimitedGreedy, Greedy };

struct RopeConfig {
  float theta = 10000.0f;
  bool yarn = false;
  float factor = 1.0f;                 // s
  int64_t original_max_position = 0;   // L0
  float beta_fast = 32.0f, beta_slow = 1.0f;
  float mscale = 1.0f, mscale_all_dim = 0.0f;
  bool has_mscale = false, has_mscale_all_dim = false;
};

struct ModelConfig {
  std::string model_type;       // deepseek_v3, deepseek_v2, kimi_k2, ...
  std::string tensor_prefix;    // "" or e.g. "language_model." for multimodal wrappers
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t moe_intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = 0;      // 0 = no query compression (q_proj)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int64_t n_routed_experts = 0;  // 0 = no MoE layers
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1, topk_group = 1;
  float routed_scaling_factor = 1.0f;
  ScoringFunc scoring_func = ScoringFunc::Sigmoid;
  TopkMethod topk_method = TopkMethod::Greedy;
  bool norm_topk_prob = false;
  float rms_norm_eps = 1e-6f;
  int64_t max_position_embeddings = 0;
  RopeConfig rope;
  int64_t num_nextn_predict_layers = 0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1, eos_token_id = -1;
  std::vector<int64_t> eos_token_ids;   // all ids listed (eos_token_id may be a list)
  bool fp8 = false;                     // quantization_config fp8 e4m3
  int64_t weight_block_size[2] = {128, 128};
  bool scale_ue8m0 = false;

  // Derived.
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int64_t kv_cache_width() const { return kv_lora_rank + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  bool has_router_bias() const { return topk_method == TopkMethod::NoauxTc; }
  // YaRN-corrected softmax scale (spec §3.7) and the cos/sin factor (spec §3.6).
  float softmax_scale() const;
  float rope_attention_factor() const;
  // The 32 (= qk_rope_head_dim/2) rotation frequencies of spec §3.6.
  std::vector<float> rope_inv_freq() const;
};

// Parses config.json text; `source` names the file in messages. Throws dsrt::Error(DSRT_ERR_FORMAT) naming
// the field when one is missing, has the wrong type or an inconsistent value.
ModelConfig parse_model_config(const std::string &json_text, const std::string &source);

}  // namespace dsrt
