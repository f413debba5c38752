// Scalar formats, config.json parsing, YaRN tables and the softmax scale (spec §1, §2.2, §3.6, §3.7).
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/dtype.h"
#include "core/sha256.h"
#include "core/status.h"
#include "model/config.h"

using namespace dsrt;

static std::string read(const std::string &p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}
static const std::string kV3 = std::string(DSRT_TEST_DATA) + "/deepseek-v3-config.json";

TEST_CASE("fp8 e4m3fn decoding matches the format definition") {
  CHECK(fp8_e4m3_to_f32(0x00) == 0.0f);
  CHECK(fp8_e4m3_to_f32(0x7e) == 448.0f);    // S.1111.110: max finite
  CHECK(fp8_e4m3_to_f32(0xfe) == -448.0f);
  CHECK(std::isnan(fp8_e4m3_to_f32(0x7f)));  // S.1111.111 is the only NaN
  CHECK(std::isnan(fp8_e4m3_to_f32(0xff)));
  CHECK(fp8_e4m3_to_f32(0x01) == std::ldexp(1.0f, -9));  // smallest subnormal: 1/8 * 2^-6
  CHECK(fp8_e4m3_to_f32(0x08) == std::ldexp(1.0f, -6));  // smallest normal
  CHECK(fp8_e4m3_to_f32(0x38) == 1.0f);                  // exponent 7 = bias
  for (int v = 0; v < 256; v++) {
    if ((v & 0x7f) == 0x7f) continue;
    float x = fp8_e4m3_to_f32(uint8_t(v));
    // Every finite code round-trips through the encoder (zero's sign kept).
    CHECK(f32_to_fp8_e4m3(x) == uint8_t(v));
  }
}

TEST_CASE("fp8 encoding rounds to nearest even and saturates") {
  CHECK(f32_to_fp8_e4m3(1000.0f) == 0x7e);
  CHECK(f32_to_fp8_e4m3(-1e30f) == 0xfe);
  // 1.0625 lies halfway between 1.0 (0x38, even) and 1.125 (0x39): ties go to the even code.
  CHECK(f32_to_fp8_e4m3(1.0625f) == 0x38);
  CHECK(f32_to_fp8_e4m3(1.1875f) == 0x3a);  // between 0x39 and 0x3a: even is 0x3a
  CHECK(f32_to_fp8_e4m3(1.07f) == 0x39);
  for (float x = -500.0f; x < 500.0f; x += 0.37f) {  // the chosen code is a nearest one
    float q = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x));
    float clamped = std::max(-448.0f, std::min(448.0f, x));
    for (int v = 0; v < 256; v++) {
      float y = fp8_e4m3_to_f32(uint8_t(v));
      if (!std::isnan(y)) CHECK(std::fabs(q - clamped) <= std::fabs(y - clamped));
    }
    if (std::fabs(x) > 50) x += 7.0f;  // sample the large range more sparsely
  }
}

TEST_CASE("bf16 and f16 conversions") {
  CHECK(bf16_to_f32(f32_to_bf16(1.0f)) == 1.0f);
  CHECK(f32_to_bf16(1.00390625f) == 0x3f80);  // halfway: to even
  CHECK(f32_to_bf16(1.01171875f) == 0x3f82);  // 1 + 3/256: halfway between 0x3f81 and 0x3f82, to even
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  for (float x : {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.9604645e-08f, 0.333251953125f})
    CHECK(f16_to_f32(f32_to_f16(x)) == x);
  CHECK(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
}

TEST_CASE("sha256 known answers") {
  Sha256 a;
  CHECK(a.hex_digest() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  Sha256 b;
  b.update("abc", 3);
  CHECK(b.hex_digest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 c;
  std::string m(1000000, 'a');
  c.update(m.data(), 333);
  c.update(m.data() + 333, m.size() - 333);
  CHECK(c.hex_digest() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("the real DeepSeek-V3 config parses with every field") {
  ModelConfig c = parse_model_config(read(kV3), kV3);
  CHECK(c.vocab_size == 129280);
  CHECK(c.hidden_size == 7168);
  CHECK(c.num_hidden_layers == 61);
  CHECK(c.q_lora_rank == 1536);
  CHECK(c.kv_lora_rank == 512);
  CHECK(c.kv_cache_width() == 576);
  CHECK(c.n_routed_experts == 256);
  CHECK(c.num_experts_per_tok == 8);
  CHECK(c.n_group == 8);
  CHECK(c.topk_group == 4);
  CHECK(c.topk_method == TopkMethod::NoauxTc);
  CHECK(c.scoring_func == ScoringFunc::Sigmoid);
  CHECK(c.norm_topk_prob);
  CHECK(c.routed_scaling_factor == doctest::Approx(2.5));
  CHECK(c.first_k_dense_replace == 3);
  CHECK(c.num_nextn_predict_layers == 1);
  CHECK(c.rms_norm_eps == doctest::Approx(1e-6));
  CHECK(c.fp8);
  CHECK(c.rope.yarn);
  CHECK(c.rope.factor == 40.0f);
  CHECK(c.rope.original_max_position == 4096);
  CHECK(!c.is_moe_layer(2));
  CHECK(c.is_moe_layer(3));
}

TEST_CASE("YaRN frequencies and softmax scale equal the spec's check values") {
  ModelConfig c = parse_model_config(read(kV3), kV3);
  std::vector<float> f = c.rope_inv_freq();
  REQUIRE(f.size() == 32);
  CHECK(f[0] == doctest::Approx(1.0).epsilon(1e-7));
  CHECK(f[1] == doctest::Approx(0.74989421).epsilon(1e-6));
  CHECK(f[10] == doctest::Approx(0.05623413).epsilon(1e-6));
  CHECK(f[22] == doctest::Approx(1.7783e-4).epsilon(1e-3));
  CHECK(f[23] == doctest::Approx(3.3338e-5).epsilon(1e-3));
  CHECK(f[31] == doctest::Approx(3.3338035e-6).epsilon(1e-6));
  // Between lo = 10 and hi = 23 the blend is linear in i: f_16 from its definition.
  double f0_16 = std::pow(10000.0, -32.0 / 64.0), ramp = 6.0 / 13.0;
  CHECK(f[16] == doctest::Approx(f0_16 * (1 - ramp) + f0_16 / 40 * ramp).epsilon(1e-6));
  CHECK(c.softmax_scale() == doctest::Approx(0.13523378).epsilon(1e-6));
  CHECK(c.rope_attention_factor() == 1.0f);  // mscale == mscale_all_dim: cos/sin not scaled

  // V2-Lite's mscale 0.707 (spec §3.7): scale 0.11472139.
  nlohmann::json j = nlohmann::json::parse(read(kV3));
  j["rope_scaling"]["mscale"] = 0.707;
  j["rope_scaling"]["mscale_all_dim"] = 0.707;
  CHECK(parse_model_config(j.dump(), "v2lite").softmax_scale() == doctest::Approx(0.11472139).epsilon(1e-6));
  // Kimi-K2 (beta 1/1, theta 50000, factor 32): ramp from lo 19 to hi 20.
  j["rope_theta"] = 50000;
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 32}, {"original_max_position_embeddings", 4096},
                       {"beta_fast", 1}, {"beta_slow", 1}, {"mscale", 1.0}, {"mscale_all_dim", 1.0}};
  std::vector<float> k = parse_model_config(j.dump(), "k2").rope_inv_freq();
  CHECK(k[19] == doctest::Approx(std::pow(50000.0, -38.0 / 64.0)).epsilon(1e-6));
  CHECK(k[20] == doctest::Approx(std::pow(50000.0, -40.0 / 64.0) / 32).epsilon(1e-6));
  // No rope_scaling: plain RoPE, plain 192^-0.5.
  j["rope_scaling"] = nullptr;
  ModelConfig plain = parse_model_config(j.dump(), "plain");
  CHECK(!plain.rope.yarn);
  CHECK(plain.softmax_scale() == doctest::Approx(1.0 / std::sqrt(192.0)));
  // Newer transformers spell it rope_parameters with rope_type and rope_theta inside.
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 10000.0}, {"factor", 40.0},
                          {"original_max_position_embeddings", 4096}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                          {"mscale", 1.0}, {"mscale_all_dim", 1.0}};
  CHECK(parse_model_config(j.dump(), "v5").softmax_scale() == doctest::Approx(0.13523378).epsilon(1e-6));
}

TEST_CASE("config errors name the field") {
  nlohmann::json base = nlohmann::json::parse(read(kV3));
  auto expect = [&](nlohmann::json j, const std::string &needle, dsrt_status code = DSRT_ERR_FORMAT) {
    try {
      parse_model_config(j.dump(), "cfg.json");
      FAIL("accepted: " << needle);
    } catch (const Error &e) {
      INFO(e.what());
      CHECK(e.code() == code);
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
      CHECK(std::string(e.what()).find("cfg.json") != std::string::npos);
    }
  };
  for (const char *field : {"hidden_size", "vocab_size", "num_hidden_layers", "kv_lora_rank", "q_lora_rank",
                            "qk_rope_head_dim", "rms_norm_eps", "num_experts_per_tok", "routed_scaling_factor"}) {
    nlohmann::json j = base;
    j.erase(field);
    expect(j, field);
  }
  nlohmann::json j = base;
  j["vocab_size"] = 0;
  expect(j, "vocab_size");
  j = base;
  j["vocab_size"] = int64_t(1) << 31;
  expect(j, "vocab_size");
  j = base;
  j["num_experts_per_tok"] = 300;
  expect(j, "num_experts_per_tok");
  j = base;
  j["n_group"] = 7;
  expect(j, "n_group");
  j = base;
  j["kv_lora_rank"] = 0;
  expect(j, "kv_lora_rank");
  j = base;
  j["hidden_size"] = "7168";
  expect(j, "hidden_size");
  j = base;
  j["rope_scaling"]["type"] = "dynamic";
  expect(j, "dynamic", DSRT_ERR_UNSUPPORTED);
  expect(nlohmann::json::array(), "top level");
  try {
    parse_model_config("{not json", "cfg.json");
    FAIL("accepted bad JSON");
  } catch (const Error &e) {
    CHECK(e.code() == DSRT_ERR_FORMAT);
  }
}
