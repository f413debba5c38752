#include "model/config.h"

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/file.h"
#include "core/json.h"
#include "core/status.h"

namespace dsrt {
namespace {

using json = nlohmann::json;

struct Reader {
  const json &j;
  const std::string &src;

  [[noreturn]] void bad(const std::string &key, const std::string &why) const {
    failf(DSRT_ERR_FORMAT, src, ": field \"", key, "\" ", why);
  }
  const json *find(const std::string &key) const {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  }
  int64_t int_req(const std::string &key) const {
    const json *v = find(key);
    if (!v) bad(key, "is missing");
    return as_int(key, *v);
  }
  int64_t int_opt(const std::string &key, int64_t def) const {
    const json *v = find(key);
    return (!v || v->is_null()) ? def : as_int(key, *v);
  }
  int64_t as_int(const std::string &key, const json &v) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {  // re-saved configs sometimes write 4096.0
      double d = v.get<double>();
      if (d == std::floor(d) && std::fabs(d) < 9e15) return int64_t(d);
    }
    bad(key, "must be an integer");
  }
  double num_req(const std::string &key) const {
    const json *v = find(key);
    if (!v) bad(key, "is missing");
    if (!v->is_number()) bad(key, "must be a number");
    return v->get<double>();
  }
  double num_opt(const std::string &key, double def) const {
    const json *v = find(key);
    if (!v || v->is_null()) return def;
    if (!v->is_number()) bad(key, "must be a number");
    return v->get<double>();
  }
  bool bool_opt(const std::string &key, bool def) const {
    const json *v = find(key);
    if (!v || v->is_null()) return def;
    if (!v->is_boolean()) bad(key, "must be true or false");
    return v->get<bool>();
  }
  std::string str_opt(const std::string &key, const std::string &def) const {
    const json *v = find(key);
    if (!v || v->is_null()) return def;
    if (!v->is_string()) bad(key, "must be a string");
    return v->get<std::string>();
  }
};

double yarn_m(double s, double k) { return s <= 1.0 ? 1.0 : 0.1 * k * std::log(s) + 1.0; }

// A number as config.json would write it (1e-06, not 0.000001), for messages.
std::string num_str(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

}  // namespace

float ModelConfig::softmax_scale() const {
  double scale = 1.0 / std::sqrt(double(qk_head_dim()));
  if (rope.yarn && rope.mscale_all_dim != 0.0f) {
    double m = yarn_m(rope.factor, rope.mscale_all_dim);
    scale *= m * m;
  }
  return float(scale);
}

float ModelConfig::rope_attention_factor() const {
  if (!rope.yarn) return 1.0f;
  // DeepSeek's YaRN: m(s, mscale) / m(s, mscale_all_dim), mscale defaulting to 1 and mscale_all_dim to 0.
  double num = yarn_m(rope.factor, rope.has_mscale ? rope.mscale : 1.0);
  double den = yarn_m(rope.factor, rope.has_mscale_all_dim ? rope.mscale_all_dim : 0.0);
  return float(num / den);
}

std::vector<float> ModelConfig::rope_inv_freq() const {
  const int64_t dim = qk_rope_head_dim, half = dim / 2;
  std::vector<float> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; i++) f[size_t(i)] = float(std::pow(double(rope.theta), -2.0 * double(i) / double(dim)));
  if (!rope.yarn) return f;
  const double two_pi = 2.0 * M_PI, ln_theta = std::log(double(rope.theta));
  auto cd = [&](double rotations) {
    return double(dim) * std::log(double(rope.original_max_position) / (rotations * two_pi)) / (2.0 * ln_theta);
  };
  double lo = std::max(std::floor(cd(rope.beta_fast)), 0.0);
  double hi = std::min(std::ceil(cd(rope.beta_slow)), double(dim - 1));
  if (lo == hi) hi += 0.001;
  for (int64_t i = 0; i < half; i++) {
    double ramp = std::clamp((double(i) - lo) / (hi - lo), 0.0, 1.0);
    double f0 = f[size_t(i)];
    f[size_t(i)] = float(f0 * (1.0 - ramp) + (f0 / rope.factor) * ramp);
  }
  return f;
}

ModelConfig parse_model_config(const std::string &text, const std::string &src) {
  const json root = parse_json_sorted(text, src.c_str(), DSRT_ERR_FORMAT);
  if (!root.is_object()) failf(DSRT_ERR_FORMAT, src, ": top level is not an object");
  ModelConfig c;
  const json *top = &root;
  // Multimodal wrappers nest the language model's config.
  if (auto it = root.find("text_config"); it != root.end() && it->is_object()) {
    top = &*it;
    c.tensor_prefix = "language_model.";
  }
  Reader r{*top, src};
  c.model_type = r.str_opt("model_type", "deepseek_v3");
  c.vocab_size = r.int_req("vocab_size");
  c.hidden_size = r.int_req("hidden_size");
  c.intermediate_size = r.int_req("intermediate_size");
  c.num_hidden_layers = r.int_req("num_hidden_layers");
  c.num_attention_heads = r.int_req("num_attention_heads");
  if (!r.find("q_lora_rank")) r.bad("q_lora_rank", "is missing (write null for no query compression)");
  c.q_lora_rank = r.int_opt("q_lora_rank", 0);
  c.kv_lora_rank = r.int_req("kv_lora_rank");
  c.qk_nope_head_dim = r.int_req("qk_nope_head_dim");
  c.qk_rope_head_dim = r.int_req("qk_rope_head_dim");
  c.v_head_dim = r.int_req("v_head_dim");
  c.rms_norm_eps = float(r.num_req("rms_norm_eps"));
  c.max_position_embeddings = r.int_req("max_position_embeddings");
  c.tie_word_embeddings = r.bool_opt("tie_word_embeddings", false);
  c.num_nextn_predict_layers = r.int_opt("num_nextn_predict_layers", 0);
  c.bos_token_id = r.int_opt("bos_token_id", -1);
  if (const json *e = r.find("eos_token_id"); e && e->is_array()) {
    for (auto &v : *e) c.eos_token_ids.push_back(r.as_int("eos_token_id", v));
    c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids[0];
  } else {
    c.eos_token_id = r.int_opt("eos_token_id", -1);
    if (c.eos_token_id >= 0) c.eos_token_ids.push_back(c.eos_token_id);
  }
  if (std::string act = r.str_opt("hidden_act", "silu"); act != "silu")
    failf(DSRT_ERR_UNSUPPORTED, src, ": hidden_act \"", act, "\" (only silu)");
  if (r.bool_opt("attention_bias", false)) failf(DSRT_ERR_UNSUPPORTED, src, ": attention_bias true");

  // MoE.
  c.n_routed_experts = r.int_opt("n_routed_experts", 0);
  if (c.n_routed_experts > 0) {
    c.moe_intermediate_size = r.int_req("moe_intermediate_size");
    c.num_experts_per_tok = r.int_req("num_experts_per_tok");
    c.n_shared_experts = r.int_opt("n_shared_experts", 0);
    c.first_k_dense_replace = r.int_opt("first_k_dense_replace", 0);
    c.moe_layer_freq = r.int_opt("moe_layer_freq", 1);
    c.routed_scaling_factor = float(r.num_req("routed_scaling_factor"));
    c.n_group = r.int_opt("n_group", 1);
    c.topk_group = r.int_opt("topk_group", 1);
    bool v2 = c.model_type == "deepseek_v2";
    std::string sf = r.str_opt("scoring_func", v2 ? "softmax" : "sigmoid");
    if (sf == "sigmoid")
      c.scoring_func = ScoringFunc::Sigmoid;
    else if (sf == "softmax")
      c.scoring_func = ScoringFunc::Softmax;
    else
      r.bad("scoring_func", "must be \"sigmoid\" or \"softmax\", not \"" + sf + "\"");
    std::string tm = r.str_opt("topk_method", v2 ? "greedy" : "noaux_tc");
    if (tm == "noaux_tc")
      c.topk_method = TopkMethod::NoauxTc;
    else if (tm == "group_limited_greedy")
      c.topk_method = TopkMethod::GroupLimitedGreedy;
    else if (tm == "greedy")
      c.topk_method = TopkMethod::Greedy;
    else
      r.bad("topk_method", "must be noaux_tc, group_limited_greedy or greedy, not \"" + tm + "\"");
    c.norm_topk_prob = r.bool_opt("norm_topk_prob", !v2);
  }

  // RoPE: rope_theta at the top or inside rope_parameters; YaRN in rope_scaling or rope_parameters.
  const json *rp = r.find("rope_parameters");
  if (rp && !rp->is_object() && !rp->is_null()) r.bad("rope_parameters", "must be an object");
  const json *rs = r.find("rope_scaling");
  if (rs && !rs->is_object() && !rs->is_null()) r.bad("rope_scaling", "must be an object or null");
  if (rs && rs->is_null()) rs = nullptr;
  if (rp && rp->is_null()) rp = nullptr;
  c.rope.theta = float(r.num_opt("rope_theta", rp ? Reader{*rp, src}.num_opt("rope_theta", 10000.0) : 10000.0));
  const json *yarn_obj = rs ? rs : rp;
  if (yarn_obj) {
    Reader y{*yarn_obj, src};
    std::string type = y.str_opt("type", y.str_opt("rope_type", "default"));
    if (type == "yarn") {
      c.rope.yarn = true;
      c.rope.factor = float(y.num_req("factor"));
      c.rope.original_max_position = y.int_req("original_max_position_embeddings");
      c.rope.beta_fast = float(y.num_opt("beta_fast", 32.0));
      c.rope.beta_slow = float(y.num_opt("beta_slow", 1.0));
      c.rope.has_mscale = y.find("mscale") && !y.find("mscale")->is_null();
      c.rope.has_mscale_all_dim = y.find("mscale_all_dim") && !y.find("mscale_all_dim")->is_null();
      c.rope.mscale = float(y.num_opt("mscale", 1.0));
      c.rope.mscale_all_dim = float(y.num_opt("mscale_all_dim", 0.0));
      // The ranges YaRN's formulas need (spec §3.6-3.7): outside them every logit became NaN with DSRT_OK.
      // The correction dims take log(L0 / (2 pi beta)): beta > 0; the ramp runs from beta_fast's dim up to
      // beta_slow's: beta_fast >= beta_slow (Kimi-K2 ships 1 and 1, a one-dim ramp). m(s, k) = 0.1 k ln s + 1
      // divides and scales: it must stay > 0.
      const RopeConfig &ro = c.rope;
      auto value = [](double v) { return ", is " + num_str(v); };
      if (!std::isfinite(ro.factor) || !(ro.factor > 0.0f)) y.bad("rope_scaling.factor", "must be finite and > 0" + value(ro.factor));
      if (ro.original_max_position <= 0 || ro.original_max_position > (int64_t(1) << 32))
        y.bad("rope_scaling.original_max_position_embeddings", "must be in 1..2^32" + value(double(ro.original_max_position)));
      if (!std::isfinite(ro.beta_slow) || !(ro.beta_slow > 0.0f))
        y.bad("rope_scaling.beta_slow", "must be finite and > 0" + value(ro.beta_slow));
      if (!std::isfinite(ro.beta_fast) || !(ro.beta_fast >= ro.beta_slow))
        y.bad("rope_scaling.beta_fast", "must be finite and >= beta_slow (" + num_str(ro.beta_slow) + ")" + value(ro.beta_fast));
      if (!std::isfinite(ro.mscale) || !(yarn_m(ro.factor, ro.mscale) > 0.0))
        y.bad("rope_scaling.mscale", "must be finite with 0.1 * mscale * ln(factor) + 1 > 0" + value(ro.mscale));
      if (!std::isfinite(ro.mscale_all_dim) || !(yarn_m(ro.factor, ro.mscale_all_dim) > 0.0))
        y.bad("rope_scaling.mscale_all_dim", "must be finite with 0.1 * mscale_all_dim * ln(factor) + 1 > 0" +
                                                 value(ro.mscale_all_dim));
    } else if (type != "default") {
      failf(DSRT_ERR_UNSUPPORTED, src, ": rope type \"", type, "\" (only yarn or none)");
    }
  }

  // Quantization.
  if (const json *q = r.find("quantization_config"); q && q->is_object()) {
    Reader qr{*q, src};
    std::string method = qr.str_opt("quant_method", "");
    if (method != "fp8") failf(DSRT_ERR_UNSUPPORTED, src, ": quantization_config.quant_method \"", method, "\" (only fp8)");
    std::string fmt = qr.str_opt("fmt", "e4m3");
    if (fmt != "e4m3") failf(DSRT_ERR_UNSUPPORTED, src, ": quantization_config.fmt \"", fmt, "\" (only e4m3)");
    c.fp8 = true;
    if (const json *bs = qr.find("weight_block_size")) {
      if (!bs->is_array() || bs->size() != 2) qr.bad("quantization_config.weight_block_size", "must be [128, 128]");
      c.weight_block_size[0] = qr.as_int("weight_block_size", (*bs)[0]);
      c.weight_block_size[1] = qr.as_int("weight_block_size", (*bs)[1]);
      if (c.weight_block_size[0] != 128 || c.weight_block_size[1] != 128)
        failf(DSRT_ERR_UNSUPPORTED, src, ": weight_block_size [", c.weight_block_size[0], ", ",
              c.weight_block_size[1], "] (only [128, 128])");
    }
    c.scale_ue8m0 = qr.str_opt("scale_fmt", "") == "ue8m0";
  }

  // Consistency: every value the forward relies on.
  auto positive = [&](const char *key, int64_t v, int64_t max) {
    if (v <= 0 || v > max) r.bad(key, "must be in 1.." + std::to_string(max) + ", is " + std::to_string(v));
  };
  positive("vocab_size", c.vocab_size, int64_t(1) << 30);
  positive("hidden_size", c.hidden_size, 1 << 20);
  positive("intermediate_size", c.intermediate_size, 1 << 22);
  positive("num_hidden_layers", c.num_hidden_layers, 4096);
  positive("num_attention_heads", c.num_attention_heads, 4096);
  positive("kv_lora_rank", c.kv_lora_rank, 1 << 16);
  positive("qk_nope_head_dim", c.qk_nope_head_dim, 1 << 12);
  positive("qk_rope_head_dim", c.qk_rope_head_dim, 1 << 12);
  positive("v_head_dim", c.v_head_dim, 1 << 12);
  positive("max_position_embeddings", c.max_position_embeddings, int64_t(1) << 32);
  if (c.qk_rope_head_dim % 2) r.bad("qk_rope_head_dim", "must be even");
  if (c.q_lora_rank < 0 || c.q_lora_rank > (1 << 20)) r.bad("q_lora_rank", "out of range");
  if (!(c.rms_norm_eps > 0.0f) || c.rms_norm_eps > 1.0f) r.bad("rms_norm_eps", "must be in (0, 1], is " + num_str(c.rms_norm_eps));
  if (!std::isfinite(c.rope.theta) || !(c.rope.theta > 1.0f))
    r.bad("rope_theta", "must be finite and > 1, is " + num_str(c.rope.theta));
  for (auto [key, id] : {std::pair{"bos_token_id", c.bos_token_id}, std::pair{"eos_token_id", c.eos_token_id}})
    if (id < -1 || id >= c.vocab_size)
      r.bad(key, "must be a token id below vocab_size (" + std::to_string(c.vocab_size) + "), is " + std::to_string(id));
  for (int64_t e : c.eos_token_ids)
    if (e < 0 || e >= c.vocab_size)
      r.bad("eos_token_id", "lists " + std::to_string(e) + ", not a token id below vocab_size (" + std::to_string(c.vocab_size) + ")");
  if (c.num_nextn_predict_layers < 0 || c.num_nextn_predict_layers > 16) r.bad("num_nextn_predict_layers", "out of range");
  if (c.n_routed_experts < 0 || c.n_routed_experts > (1 << 16)) r.bad("n_routed_experts", "out of range");
  if (c.n_routed_experts > 0) {
    positive("moe_intermediate_size", c.moe_intermediate_size, 1 << 22);
    positive("num_experts_per_tok", c.num_experts_per_tok, c.n_routed_experts);
    positive("moe_layer_freq", c.moe_layer_freq, 4096);
    positive("n_group", c.n_group, c.n_routed_experts);
    if (c.n_routed_experts % c.n_group) r.bad("n_group", "must divide n_routed_experts");
    positive("topk_group", c.topk_group, c.n_group);
    if (c.n_shared_experts < 0 || c.n_shared_experts > 64) r.bad("n_shared_experts", "out of range");
    if (c.first_k_dense_replace < 0) r.bad("first_k_dense_replace", "must be >= 0");
    if (c.num_experts_per_tok > (c.n_routed_experts / c.n_group) * c.topk_group)
      r.bad("num_experts_per_tok", "exceeds the experts of topk_group groups");
    if (!std::isfinite(c.routed_scaling_factor) || !(c.routed_scaling_factor > 0.0f))
      r.bad("routed_scaling_factor", "must be finite and > 0, is " + num_str(c.routed_scaling_factor));

  }
  return c;
}

}  // namespace dsrt
