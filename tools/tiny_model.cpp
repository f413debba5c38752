#include "tiny_model.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <map>

#include "core/dtype.h"
#include "core/status.h"
#include "engine/sampler.h"
#include "safetensors_writer.h"
#include "tiny_tokenizer.h"

namespace dsrt::tools {

using ojson = nlohmann::ordered_json;

namespace {

ojson base_config() {
  ojson c;
  c["architectures"] = {"DeepseekV3ForCausalLM"};
  c["model_type"] = "deepseek_v3";
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["bos_token_id"] = 0;
  c["eos_token_id"] = 1;
  c["hidden_act"] = "silu";
  c["initializer_range"] = 0.02;
  c["tie_word_embeddings"] = false;
  c["torch_dtype"] = "bfloat16";
  c["use_cache"] = true;
  c["scoring_func"] = "sigmoid";
  c["topk_method"] = "noaux_tc";
  c["norm_topk_prob"] = true;
  c["moe_layer_freq"] = 1;
  c["aux_loss_alpha"] = 0.001;
  c["seq_aux"] = true;
  c["ep_size"] = 1;
  c["pretraining_tp"] = 1;
  return c;
}

ojson fp8_quant() {
  return {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
}

std::vector<TinyPreset> build_presets() {
  std::vector<TinyPreset> v;
  {  // Partial scale blocks everywhere (hidden 320 = 2.5 blocks, kv_a 192 rows, q_lora 192), YaRN, MTP.
    TinyPreset p{"partial-yarn", "dims not multiples of 128 (partial FP8 blocks), q_lora, 4 groups pick 2, YaRN x4", {}, true};
    ojson c = base_config();
    c["vocab_size"] = 1000;
    c["hidden_size"] = 320;
    c["intermediate_size"] = 400;
    c["moe_intermediate_size"] = 208;
    c["num_hidden_layers"] = 3;
    c["num_nextn_predict_layers"] = 1;
    c["num_attention_heads"] = 4;
    c["num_key_value_heads"] = 4;
    c["q_lora_rank"] = 192;
    c["kv_lora_rank"] = 160;
    c["qk_nope_head_dim"] = 48;
    c["qk_rope_head_dim"] = 32;
    c["v_head_dim"] = 40;
    c["n_routed_experts"] = 16;
    c["n_shared_experts"] = 1;
    c["num_experts_per_tok"] = 4;
    c["n_group"] = 4;
    c["topk_group"] = 2;
    c["routed_scaling_factor"] = 2.5;
    c["first_k_dense_replace"] = 1;
    c["rms_norm_eps"] = 1e-6;
    c["rope_theta"] = 10000.0;
    c["max_position_embeddings"] = 1024;
    c["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 256},
                         {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707}};
    c["quantization_config"] = fp8_quant();
    p.config = c;
    v.push_back(p);
  }
  {  // Moonlight-like: no q_lora (q_proj), one routing group, two shared experts, no rope scaling.
    TinyPreset p{"no-qlora", "q_proj instead of q_lora, a single routing group, two shared experts, plain RoPE", {}, true};
    ojson c = base_config();
    c["vocab_size"] = 512;
    c["hidden_size"] = 256;
    c["intermediate_size"] = 512;
    c["moe_intermediate_size"] = 128;
    c["num_hidden_layers"] = 3;
    c["num_nextn_predict_layers"] = 0;
    c["num_attention_heads"] = 4;
    c["num_key_value_heads"] = 4;
    c["q_lora_rank"] = nullptr;
    c["kv_lora_rank"] = 128;
    c["qk_nope_head_dim"] = 32;
    c["qk_rope_head_dim"] = 16;
    c["v_head_dim"] = 32;
    c["n_routed_experts"] = 8;
    c["n_shared_experts"] = 2;
    c["num_experts_per_tok"] = 2;
    c["n_group"] = 1;
    c["topk_group"] = 1;
    c["routed_scaling_factor"] = 2.446;
    c["first_k_dense_replace"] = 1;
    c["rms_norm_eps"] = 1e-5;
    c["rope_theta"] = 50000.0;
    c["max_position_embeddings"] = 2048;
    c["rope_scaling"] = nullptr;
    c["quantization_config"] = fp8_quant();
    p.config = c;
    v.push_back(p);
  }
  {  // DeepSeek-V3 proportions: 8 groups pick 4, top-8 of 32, two dense layers, YaRN factor 40 over 4096.
    TinyPreset p{"v3-mini", "DeepSeek-V3 proportions: 8 groups pick 4, top-8 of 32, 2 dense layers, YaRN x40, MTP", {}, true};
    ojson c = base_config();
    c["vocab_size"] = 2048;
    c["hidden_size"] = 512;
    c["intermediate_size"] = 1024;
    c["moe_intermediate_size"] = 128;
    c["num_hidden_layers"] = 4;
    c["num_nextn_predict_layers"] = 1;
    c["num_attention_heads"] = 8;
    c["num_key_value_heads"] = 8;
    c["q_lora_rank"] = 192;
    c["kv_lora_rank"] = 128;
    c["qk_nope_head_dim"] = 64;
    c["qk_rope_head_dim"] = 32;
    c["v_head_dim"] = 64;
    c["n_routed_experts"] = 32;
    c["n_shared_experts"] = 1;
    c["num_experts_per_tok"] = 8;
    c["n_group"] = 8;
    c["topk_group"] = 4;
    c["routed_scaling_factor"] = 2.5;
    c["first_k_dense_replace"] = 2;
    c["rms_norm_eps"] = 1e-6;
    c["rope_theta"] = 10000.0;
    c["max_position_embeddings"] = 163840;
    c["rope_scaling"] = {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096},
                         {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 1.0}, {"mscale_all_dim", 1.0}};
    c["quantization_config"] = fp8_quant();
    p.config = c;
    v.push_back(p);
  }
  {  // A plain BF16 checkpoint (as Moonlight and V2-Lite are published): no quantization_config, no scales.
    TinyPreset p{"bf16", "BF16 weights without quantization_config (V2-Lite/Moonlight style), YaRN with mscale 0.707", {}, false};
    ojson c = base_config();
    c["vocab_size"] = 768;
    c["hidden_size"] = 256;
    c["intermediate_size"] = 384;
    c["moe_intermediate_size"] = 96;
    c["num_hidden_layers"] = 2;
    c["num_nextn_predict_layers"] = 0;
    c["num_attention_heads"] = 2;
    c["num_key_value_heads"] = 2;
    c["q_lora_rank"] = nullptr;
    c["kv_lora_rank"] = 64;
    c["qk_nope_head_dim"] = 32;
    c["qk_rope_head_dim"] = 16;
    c["v_head_dim"] = 32;
    c["n_routed_experts"] = 8;
    c["n_shared_experts"] = 1;
    c["num_experts_per_tok"] = 3;
    c["n_group"] = 2;
    c["topk_group"] = 1;
    c["routed_scaling_factor"] = 1.5;
    c["first_k_dense_replace"] = 1;
    c["rms_norm_eps"] = 1e-6;
    c["rope_theta"] = 10000.0;
    c["max_position_embeddings"] = 4096;
    c["rope_scaling"] = {{"type", "yarn"}, {"factor", 16}, {"original_max_position_embeddings", 256},
                         {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707}};
    p.config = c;
    v.push_back(p);
  }
  {  // Benchmark: DeepSeek-V3's exact layer shapes, one dense and one MoE layer (about 16 GB).
    TinyPreset p{"v3-layers", "benchmark: DeepSeek-V3 layer shapes (hidden 7168, 128 heads, 256 experts), 1 dense + 1 MoE layer, ~16 GB",
                 {}, true};
    p.bulk = true;
    ojson c = base_config();
    c["vocab_size"] = 129280;
    c["hidden_size"] = 7168;
    c["intermediate_size"] = 18432;
    c["moe_intermediate_size"] = 2048;
    c["num_hidden_layers"] = 2;
    c["num_nextn_predict_layers"] = 0;
    c["num_attention_heads"] = 128;
    c["num_key_value_heads"] = 128;
    c["q_lora_rank"] = 1536;
    c["kv_lora_rank"] = 512;
    c["qk_nope_head_dim"] = 128;
    c["qk_rope_head_dim"] = 64;
    c["v_head_dim"] = 128;
    c["n_routed_experts"] = 256;
    c["n_shared_experts"] = 1;
    c["num_experts_per_tok"] = 8;
    c["n_group"] = 8;
    c["topk_group"] = 4;
    c["routed_scaling_factor"] = 2.5;
    c["first_k_dense_replace"] = 1;
    c["rms_norm_eps"] = 1e-6;
    c["rope_theta"] = 10000.0;
    c["max_position_embeddings"] = 163840;
    c["rope_scaling"] = {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096},
                         {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 1.0}, {"mscale_all_dim", 1.0}};
    c["quantization_config"] = fp8_quant();
    p.config = c;
    v.push_back(p);
  }
  {  // Benchmark: Moonlight-16B-A3B proportions (27 layers, 64 experts of 1408, top-6, no q_lora), in FP8.
    TinyPreset p{"moonlight-shape", "benchmark: Moonlight-16B-A3B shapes and depth in FP8, ~16 GB", {}, true};
    p.bulk = true;
    ojson c = base_config();
    c["vocab_size"] = 163840;
    c["hidden_size"] = 2048;
    c["intermediate_size"] = 11264;
    c["moe_intermediate_size"] = 1408;
    c["num_hidden_layers"] = 27;
    c["num_nextn_predict_layers"] = 0;
    c["num_attention_heads"] = 16;
    c["num_key_value_heads"] = 16;
    c["q_lora_rank"] = nullptr;
    c["kv_lora_rank"] = 512;
    c["qk_nope_head_dim"] = 128;
    c["qk_rope_head_dim"] = 64;
    c["v_head_dim"] = 128;
    c["n_routed_experts"] = 64;
    c["n_shared_experts"] = 2;
    c["num_experts_per_tok"] = 6;
    c["n_group"] = 1;
    c["topk_group"] = 1;
    c["routed_scaling_factor"] = 2.446;
    c["first_k_dense_replace"] = 1;
    c["rms_norm_eps"] = 1e-5;
    c["rope_theta"] = 50000.0;
    c["max_position_embeddings"] = 8192;
    c["rope_scaling"] = nullptr;
    c["quantization_config"] = fp8_quant();
    p.config = c;
    v.push_back(p);
  }
  return v;
}

// Fast fill for the benchmark presets (gigabytes): a table of 256 normal quantiles indexed by the bytes of
// a splitmix64 stream seeded from the tensor's name, instead of Box-Muller per element.
struct BulkFill {
  float quantile[256];
  BulkFill() {
    for (int i = 0; i < 256; i++) {  // inverse normal CDF by bisection (once per process)
      const double p = (i + 0.5) / 256.0;
      double lo = -6, hi = 6;
      for (int it = 0; it < 60; it++) {
        const double mid = 0.5 * (lo + hi);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
      }
      quantile[i] = float(0.5 * (lo + hi));
    }
  }
  template <class F>
  static void stream(const std::string &name, uint64_t seed, size_t n, F &&put) {
    uint64_t x = seed ^ 0x9e3779b97f4a7c15ull;
    for (char ch : name) x = (x ^ uint8_t(ch)) * 0x100000001b3ull;
    for (size_t i = 0; i < n; i += 8) {
      uint64_t z = (x += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      for (size_t j = i; j < std::min(n, i + 8); j++, z >>= 8) put(j, uint8_t(z));
    }
  }
};

struct Gen {
  Rng rng;
  bool have_spare = false;
  double spare = 0.0;
  explicit Gen(uint64_t seed) : rng(seed) {}
  double normal() {  // Box-Muller
    if (have_spare) {
      have_spare = false;
      return spare;
    }
    double u1 = std::max(rng.uniform(), 1e-300), u2 = rng.uniform();
    double r = std::sqrt(-2.0 * std::log(u1));
    spare = r * std::sin(2.0 * M_PI * u2);
    have_spare = true;
    return r * std::cos(2.0 * M_PI * u2);
  }
};

// --route-skew: an e_score_correction_bias that makes expert popularity Zipf-like.
//
// How the bias realises the law: the router picks each token's top-k experts by s_e + b_e (s_e the sigmoid or
// softmax score of the token, b_e the layer's correction bias; spec §4), while the gate weights that scale the
// experts' outputs use s_e alone. Raising b_e therefore raises the share of tokens whose top-k includes e without
// changing any output scale. The bias is fitted the way DeepSeek-V3 sets it in training (auxiliary-loss-free load
// balancing: b_e moves against the gap between expert e's load and its target), here toward a Zipf target
// instead of a uniform one: experts get popularity ranks by a random permutation (seeded per layer), rank r's
// target selection rate is zipf_selection_rates()[r], and on T random router inputs (N(0, I): the router reads
// the RMS-normalised hidden state, of unit RMS) the fixed-point iteration b_e += lr (log target_e - log load_e)
// runs a few hundred times with a decaying lr, with the real routing rule (groups, top-k, ties to the lower
// index). Selection rates on fresh inputs then follow the target (tests/test_cpu_fp8.cpp measures the decay).
namespace {

struct RouteRule {
  int64_t E, K, n_group, topk_group;
  bool softmax, noaux;  // scoring; noaux_tc (group score: sum of the top two) vs group_limited_greedy (max)
};

// The experts a token with scores s selects under biases b (ids: K entries). u: E floats of scratch.
void route_select(const RouteRule &r, const float *s, const std::vector<double> &b, float *u, std::vector<int32_t> &order,
                  int32_t *ids) {
  for (int64_t e = 0; e < r.E; e++) u[e] = s[e] + float(b[size_t(e)]);
  if (r.n_group > 1) {
    const int64_t per = r.E / r.n_group;
    std::vector<std::pair<float, int64_t>> gs(size_t(r.n_group));
    for (int64_t g = 0; g < r.n_group; g++) {
      const float *ug = u + g * per;
      float a = -INFINITY, b2 = -INFINITY;
      for (int64_t e = 0; e < per; e++) {
        if (ug[e] > a) {
          b2 = a;
          a = ug[e];
        } else if (ug[e] > b2) {
          b2 = ug[e];
        }
      }
      gs[size_t(g)] = {r.noaux ? (per >= 2 ? a + b2 : a) : a, g};
    }
    std::stable_sort(gs.begin(), gs.end(), [](auto &x, auto &y) { return x.first > y.first; });
    for (int64_t k = r.topk_group; k < r.n_group; k++) std::fill(u + gs[size_t(k)].second * per, u + (gs[size_t(k)].second + 1) * per, -INFINITY);
  }
  for (int64_t e = 0; e < r.E; e++) order[size_t(e)] = int32_t(e);
  std::partial_sort(order.begin(), order.begin() + r.K, order.end(),
                    [&](int32_t x, int32_t y) { return u[x] > u[y] || (u[x] == u[y] && x < y); });
  for (int64_t k = 0; k < r.K; k++) ids[k] = order[size_t(k)];
}

std::vector<float> zipf_bias(const ojson &c, const TensorData &gate, double S, uint64_t seed, int64_t layer,
                             const std::vector<float> &orig) {
  auto geti = [&](const char *k) { return c[k].is_null() ? int64_t(0) : c[k].get<int64_t>(); };
  RouteRule rule{geti("n_routed_experts"), geti("num_experts_per_tok"), std::max<int64_t>(1, geti("n_group")),
                 std::max<int64_t>(1, geti("topk_group")), c["scoring_func"] == "softmax",
                 c["topk_method"] != "group_limited_greedy"};
  if (c["topk_method"] == "greedy") rule.n_group = 1;
  const int64_t E = rule.E, H = geti("hidden_size");
  const int64_t T = E >= 128 ? 4096 : 8192;
  std::vector<float> g(static_cast<size_t>(E * H));
  for (size_t i = 0; i < g.size(); i++) {
    uint16_t v;
    std::memcpy(&v, &gate.bytes[2 * i], 2);
    g[i] = bf16_to_f32(v);
  }
  Gen gen(seed * 0x9e3779b97f4a7c15ull + uint64_t(layer) * 0x632be59bd9b4e019ull + 0x5eed);
  // Scores of T random router inputs.
  std::vector<float> sc(static_cast<size_t>(T * E)), x(static_cast<size_t>(H));
  for (int64_t t = 0; t < T; t++) {
    for (auto &v : x) v = float(gen.normal());
    float *st = sc.data() + t * E;
    for (int64_t e = 0; e < E; e++) {
      double d = 0;
      for (int64_t h = 0; h < H; h++) d += double(g[size_t(e * H + h)]) * double(x[size_t(h)]);
      st[e] = float(d);
    }
    if (rule.softmax) {
      const float mx = *std::max_element(st, st + E);
      double sum = 0;
      for (int64_t e = 0; e < E; e++) sum += (st[e] = std::exp(st[e] - mx));
      for (int64_t e = 0; e < E; e++) st[e] = float(st[e] / sum);
    } else {
      for (int64_t e = 0; e < E; e++) st[e] = 1.0f / (1.0f + std::exp(-st[e]));
    }
  }
  // Popularity ranks: a random permutation, so the hot experts fall in different groups.
  std::vector<int64_t> by_rank(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) by_rank[size_t(e)] = e;
  for (int64_t i = E - 1; i > 0; i--) std::swap(by_rank[size_t(i)], by_rank[size_t(gen.rng.next() % uint64_t(i + 1))]);
  const std::vector<double> q = zipf_selection_rates(E, rule.K, S);
  std::vector<double> target(static_cast<size_t>(E)), b(size_t(E), 0.0);
  for (int64_t r = 0; r < E; r++) target[size_t(by_rank[size_t(r)])] = q[size_t(r)];
  std::vector<float> u(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E)), ids(size_t(rule.K));
  std::vector<int64_t> count(static_cast<size_t>(E));
  constexpr int kIters = 300;
  for (int it = 0; it < kIters; it++) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t t = 0; t < T; t++) {
      route_select(rule, sc.data() + t * E, b, u.data(), order, ids.data());
      for (int32_t e : ids) count[size_t(e)]++;
    }
    const double lr = 0.02 + 0.2 * (1.0 - double(it) / kIters);
    for (int64_t e = 0; e < E; e++) {
      const double load = std::max(double(count[size_t(e)]), 0.25) / double(T);
      b[size_t(e)] += lr * (std::log(target[size_t(e)]) - std::log(load));
    }
  }
  // The same mean as the random biases (a common offset changes no selection).
  double mean_b = 0, mean_o = 0;
  for (int64_t e = 0; e < E; e++) mean_b += b[size_t(e)] / double(E), mean_o += double(orig[size_t(e)]) / double(E);
  std::vector<float> out(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) out[size_t(e)] = float(b[size_t(e)] - mean_b + mean_o);
  return out;
}

}  // namespace

class Writer {
 public:
  Writer(Gen &g, bool fp8, bool bulk, uint64_t seed) : g_(g), fp8_(fp8), bulk_(bulk), seed_(seed) {}
  std::map<std::string, TensorData> tensors;

  // A linear weight [out, in] with std = gain / sqrt(in); FP8 + block scales when `quantise`.
  void linear(const std::string &name, int64_t out, int64_t in, double gain, bool quantise) {
    if (bulk_) return bulk_linear(name, out, in, gain / std::sqrt(double(in)), quantise && fp8_);
    std::vector<float> w(static_cast<size_t>(out * in));
    const double sd = gain / std::sqrt(double(in));
    for (auto &x : w) x = float(g_.normal() * sd);
    if (quantise && fp8_) {
      const int64_t sr = (out + 127) / 128, sc = (in + 127) / 128;
      std::vector<float> scale(static_cast<size_t>(sr * sc));
      for (int64_t br = 0; br < sr; br++)
        for (int64_t bc = 0; bc < sc; bc++) {
          float amax = 0.0f;
          for (int64_t r = br * 128; r < std::min(out, br * 128 + 128); r++)
            for (int64_t c = bc * 128; c < std::min(in, bc * 128 + 128); c++) amax = std::max(amax, std::fabs(w[size_t(r * in + c)]));
          scale[size_t(br * sc + bc)] = std::max(amax, 1e-12f) / kFp8E4m3Max;
        }
      TensorData q{name, DType::F8_E4M3, {out, in}, std::vector<uint8_t>(size_t(out * in))};
      for (int64_t r = 0; r < out; r++)
        for (int64_t c = 0; c < in; c++)
          q.bytes[size_t(r * in + c)] = f32_to_fp8_e4m3(w[size_t(r * in + c)] / scale[size_t((r / 128) * sc + c / 128)]);
      tensors[name] = std::move(q);
      put_f32(name + "_scale_inv", {sr, sc}, scale);
    } else {
      put_bf16(name, {out, in}, w);
    }
  }
  void norm(const std::string &name, int64_t n) {
    std::vector<float> w(static_cast<size_t>(n));
    for (auto &x : w) x = float(1.0 + 0.1 * g_.normal());
    put_bf16(name, {n}, w);
  }
  void table(const std::string &name, int64_t rows, int64_t cols, double sd) {
    if (bulk_) return bulk_linear(name, rows, cols, sd, false);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    for (auto &x : w) x = float(g_.normal() * sd);
    put_bf16(name, {rows, cols}, w);
  }
  void put_bf16(const std::string &name, std::vector<int64_t> shape, const std::vector<float> &v) {
    TensorData t{name, DType::BF16, std::move(shape), std::vector<uint8_t>(v.size() * 2)};
    for (size_t i = 0; i < v.size(); i++) {
      uint16_t b = f32_to_bf16(v[i]);
      std::memcpy(&t.bytes[2 * i], &b, 2);
    }
    tensors[name] = std::move(t);
  }
  void put_f32(const std::string &name, std::vector<int64_t> shape, const std::vector<float> &v) {
    TensorData t{name, DType::F32, std::move(shape), std::vector<uint8_t>(v.size() * 4)};
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
    tensors[name] = std::move(t);
  }
  Gen &gen() { return g_; }

 private:
  // Normal(0, sd) values from the quantile table: FP8 with one scale per block (quantiles x 64 fit e4m3),
  // or BF16.
  void bulk_linear(const std::string &name, int64_t out, int64_t in, double sd, bool fp8) {
    static const BulkFill fill;
    const size_t n = size_t(out * in);
    if (fp8) {
      uint8_t lut[256];
      for (int i = 0; i < 256; i++) lut[i] = f32_to_fp8_e4m3(fill.quantile[i] * 64.0f);
      TensorData q{name, DType::F8_E4M3, {out, in}, std::vector<uint8_t>(n)};
      BulkFill::stream(name, seed_, n, [&](size_t i, uint8_t b) { q.bytes[i] = lut[b]; });
      tensors[name] = std::move(q);
      const int64_t sr = (out + 127) / 128, sc = (in + 127) / 128;
      put_f32(name + "_scale_inv", {sr, sc}, std::vector<float>(static_cast<size_t>(sr * sc), float(sd / 64.0)));
    } else {
      uint16_t lut[256];
      for (int i = 0; i < 256; i++) lut[i] = f32_to_bf16(float(fill.quantile[i] * sd));
      TensorData t{name, DType::BF16, {out, in}, std::vector<uint8_t>(n * 2)};
      BulkFill::stream(name, seed_, n, [&](size_t i, uint8_t b) { std::memcpy(&t.bytes[2 * i], &lut[b], 2); });
      tensors[name] = std::move(t);
    }
  }

  Gen &g_;
  bool fp8_, bulk_;
  uint64_t seed_;
};

int64_t geti(const ojson &c, const char *k) { return c[k].is_null() ? 0 : c[k].get<int64_t>(); }

void write_layer(Writer &w, const ojson &c, int64_t L, bool mtp, double route_skew, uint64_t seed) {
  const int64_t H = geti(c, "hidden_size"), nh = geti(c, "num_attention_heads"), qlr = geti(c, "q_lora_rank");
  const int64_t dn = geti(c, "qk_nope_head_dim"), dr = geti(c, "qk_rope_head_dim"), dv = geti(c, "v_head_dim");
  const int64_t dc = geti(c, "kv_lora_rank"), E = geti(c, "n_routed_experts");
  const std::string p = "model.layers." + std::to_string(L) + ".";
  w.norm(p + "input_layernorm.weight", H);
  w.norm(p + "post_attention_layernorm.weight", H);
  const std::string a = p + "self_attn.";
  if (qlr > 0) {
    w.linear(a + "q_a_proj.weight", qlr, H, 1.0, true);
    w.norm(a + "q_a_layernorm.weight", qlr);
    w.linear(a + "q_b_proj.weight", nh * (dn + dr), qlr, 1.0, true);
  } else {
    w.linear(a + "q_proj.weight", nh * (dn + dr), H, 1.0, true);
  }
  w.linear(a + "kv_a_proj_with_mqa.weight", dc + dr, H, 1.0, true);
  w.norm(a + "kv_a_layernorm.weight", dc);
  w.linear(a + "kv_b_proj.weight", nh * (dn + dv), dc, 1.0, true);
  w.linear(a + "o_proj.weight", H, nh * dv, 0.5, true);
  const std::string m = p + "mlp.";
  auto ffn = [&](const std::string &q, int64_t inter, double down_gain) {
    w.linear(q + "gate_proj.weight", inter, H, 1.0, true);
    w.linear(q + "up_proj.weight", inter, H, 1.0, true);
    w.linear(q + "down_proj.weight", H, inter, down_gain, true);
  };
  const bool moe = E > 0 && L >= geti(c, "first_k_dense_replace") && L % geti(c, "moe_layer_freq") == 0;
  if (moe) {
    const int64_t mi = geti(c, "moe_intermediate_size");
    w.linear(m + "gate.weight", E, H, 2.0, false);  // BF16 router
    std::vector<float> bias(static_cast<size_t>(E));
    // Positive biases of unequal size, like the released checkpoints' (about +2 there): they move selections.
    for (auto &b : bias) b = float(0.5 + 0.5 * w.gen().rng.uniform());
    if (route_skew > 0) bias = zipf_bias(c, w.tensors.at(m + "gate.weight"), route_skew, seed, L, bias);
    w.put_f32(m + "gate.e_score_correction_bias", {E}, bias);
    for (int64_t e = 0; e < E; e++) ffn(m + "experts." + std::to_string(e) + ".", mi, 0.5);
    if (geti(c, "n_shared_experts") > 0) ffn(m + "shared_experts.", mi * geti(c, "n_shared_experts"), 0.5);
  } else {
    ffn(m, geti(c, "intermediate_size"), 0.5);
  }
  if (mtp) {
    const int64_t V = geti(c, "vocab_size");
    w.table(p + "embed_tokens.weight", V, H, 1.0);
    w.norm(p + "enorm.weight", H);
    w.norm(p + "hnorm.weight", H);
    w.linear(p + "eh_proj.weight", H, 2 * H, 1.0, false);
    w.norm(p + "shared_head.norm.weight", H);
    w.table(p + "shared_head.head.weight", V, H, 4.0 / std::sqrt(double(H)));
  }
}

void write_text(const std::string &path, const std::string &text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  if (!f) failf(DSRT_ERR_IO, path, ": write failed");
}

}  // namespace

const std::vector<TinyPreset> &tiny_presets() {
  static const std::vector<TinyPreset> v = build_presets();
  return v;
}

const TinyPreset *find_tiny_preset(const std::string &name) {
  for (auto &p : tiny_presets())
    if (p.name == name) return &p;
  return nullptr;
}

TinyPreset with_layers(const TinyPreset &preset, int64_t n) {
  if (n < 1 || n > 4096) failf(DSRT_ERR_INVALID_ARGUMENT, "layers ", n, " is not in [1, 4096]");
  TinyPreset p = preset;
  p.config["num_hidden_layers"] = n;
  return p;
}

std::vector<double> zipf_selection_rates(int64_t n_experts, int64_t top_k, double S) {
  std::vector<double> q(static_cast<size_t>(n_experts));
  auto fill_c = [&](double c) {
    double sum = 0;
    for (int64_t r = 0; r < n_experts; r++) sum += (q[size_t(r)] = std::min(1.0, c * std::pow(double(r + 1), -S)));
    return sum;
  };
  double lo = 0, hi = 1;
  while (fill_c(hi) < double(top_k)) hi *= 2;
  for (int i = 0; i < 100; i++) {
    const double mid = 0.5 * (lo + hi);
    (fill_c(mid) < double(top_k) ? lo : hi) = mid;
  }
  fill_c(hi);
  return q;
}

void make_tiny_model(const TinyPreset &preset, const std::string &dir, uint64_t seed, double route_skew) {
  if (!(route_skew >= 0) || route_skew > 8) failf(DSRT_ERR_INVALID_ARGUMENT, "route skew ", route_skew, " is not in [0, 8]");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) failf(DSRT_ERR_IO, dir, ": cannot create directory (", ec.message(), ")");
  const ojson &c = preset.config;
  Gen g(seed);
  Writer w(g, preset.fp8, preset.bulk, seed);
  const int64_t V = geti(c, "vocab_size"), H = geti(c, "hidden_size"), L = geti(c, "num_hidden_layers");
  w.table("model.embed_tokens.weight", V, H, 1.0);
  for (int64_t l = 0; l < L; l++) write_layer(w, c, l, false, route_skew, seed);
  for (int64_t j = 0; j < geti(c, "num_nextn_predict_layers"); j++) write_layer(w, c, L + j, true, route_skew, seed);
  w.norm("model.norm.weight", H);
  w.table("lm_head.weight", V, H, 4.0 / std::sqrt(double(H)));

  // Two shards, split irregularly as the published ones are: the first half of the layers with the embedding
  // and lm_head in shard 1; the final norm, the later layers and the MTP layer in shard 2.
  const std::string names[2] = {"model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors"};
  std::vector<const TensorData *> shard[2];
  ojson index;
  uint64_t total = 0;
  for (auto &[name, t] : w.tensors) {
    int s = 1;
    if (name == "model.embed_tokens.weight" || name == "lm_head.weight") s = 0;
    if (name.rfind("model.layers.", 0) == 0 && std::stoll(name.substr(13)) < L / 2) s = 0;
    shard[s].push_back(&t);
    index["weight_map"][name] = names[s];
    total += t.bytes.size();
  }
  index["metadata"] = {{"total_size", total}};
  for (int s = 0; s < 2; s++) write_safetensors(dir + "/" + names[s], shard[s]);
  write_text(dir + "/model.safetensors.index.json", index.dump(2));
  write_text(dir + "/config.json", c.dump(2));
  ojson gen = {{"_from_model_config", true}, {"bos_token_id", c["bos_token_id"]}, {"eos_token_id", c["eos_token_id"]},
               {"do_sample", true}, {"temperature", 0.6}, {"top_p", 0.95}};
  write_text(dir + "/generation_config.json", gen.dump(2));
  write_tiny_tokenizer(dir, V);
}

}  // namespace dsrt::tools
