// The C ABI rules: versions, struct sizes and struct_size handling, NULLs, error text, load progress/cancel.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "helpers.h"

using namespace testing;

TEST_CASE("version calls") {
  CHECK(dsrt_api_version() == DSRT_API_VERSION);
  CHECK(dsrt_check_version(DSRT_API_VERSION) == DSRT_OK);
  CHECK(dsrt_check_version(DSRT_API_VERSION + 1) == DSRT_ERR_VERSION_MISMATCH);  // header minor newer
  CHECK(std::string(dsrt_last_error()).find("minor") != std::string::npos);
  CHECK(dsrt_check_version(DSRT_API_VERSION + (1u << 16)) == DSRT_ERR_VERSION_MISMATCH);
  CHECK(std::string(dsrt_version_string()).rfind("0.1.0", 0) == 0);
  CHECK(std::string(dsrt_status_string(DSRT_ERR_FORMAT)) == "DSRT_ERR_FORMAT");
  CHECK(std::string(dsrt_status_string(12345)) == "DSRT_ERR_UNKNOWN");
  char *json = nullptr;
  CHECK_OK(dsrt_system_info(&json));
  CHECK(std::string(json).find("cpu_threads") != std::string::npos);
  dsrt_free(json);
}

TEST_CASE("struct sizes and init functions") {
  CHECK(dsrt_struct_size(DSRT_STRUCT_MODEL_PARAMS) == sizeof(dsrt_model_params));
  CHECK(dsrt_struct_size(DSRT_STRUCT_MODEL_INFO) == sizeof(dsrt_model_info));
  CHECK(dsrt_struct_size(DSRT_STRUCT_ENGINE_PARAMS) == sizeof(dsrt_engine_params));
  CHECK(dsrt_struct_size(DSRT_STRUCT_ENGINE_STATS) == sizeof(dsrt_engine_stats));
  CHECK(dsrt_struct_size(DSRT_STRUCT_SESSION_PARAMS) == sizeof(dsrt_session_params));
  CHECK(dsrt_struct_size(DSRT_STRUCT_SAMPLING_PARAMS) == sizeof(dsrt_sampling_params));
  CHECK(dsrt_struct_size(DSRT_STRUCT_SESSION_STATS) == sizeof(dsrt_session_stats));
  CHECK(dsrt_struct_size(999) == 0);
  dsrt_model_params p;
  std::memset(&p, 0xab, sizeof p);
  dsrt_model_params_init(&p, sizeof p);
  CHECK(p.struct_size == sizeof p);
  CHECK(p.backend == DSRT_BACKEND_AUTO);
  CHECK(p.validate_scales == 1);
  CHECK(p.load_mtp == 1);
  CHECK(p.cancel == nullptr);
  // An older program's smaller struct: only its bytes are touched.
  unsigned char buf[64];
  std::memset(buf, 0xcd, sizeof buf);
  dsrt_engine_params_init(reinterpret_cast<dsrt_engine_params *>(buf), 8);
  CHECK(reinterpret_cast<dsrt_engine_params *>(buf)->struct_size == 8);
  CHECK(buf[8] == 0xcd);
}

TEST_CASE("struct_size smaller and larger than the library's") {
  Model m(tiny("no-qlora"));
  // Smaller: fields past struct_size take their defaults.
  dsrt_engine_params small;
  dsrt_engine_params_init(&small, sizeof small);
  small.struct_size = offsetof(dsrt_engine_params, max_batch_tokens);
  small.max_batch_tokens = -5;  // beyond struct_size: ignored
  dsrt_engine *e = nullptr;
  CHECK_OK(dsrt_engine_create(m.m, &small, &e));
  dsrt_engine_free(e);
  // Larger with zeros past the known fields: accepted (a newer header, default-valued new fields).
  struct Bigger {
    dsrt_engine_params p;
    int64_t future[2];
  } big{};
  dsrt_engine_params_init(&big.p, sizeof big.p);
  big.p.struct_size = sizeof big;
  CHECK_OK(dsrt_engine_create(m.m, &big.p, &e));
  dsrt_engine_free(e);
  // Larger with a non-zero unknown field: the library cannot honour it.
  big.future[1] = 1;
  CHECK(dsrt_engine_create(m.m, &big.p, &e) == DSRT_ERR_UNSUPPORTED);
  CHECK(e == nullptr);
  CHECK(std::string(dsrt_last_error()).find("does not know") != std::string::npos);
  small.struct_size = 0;
  CHECK(dsrt_engine_create(m.m, &small, &e) == DSRT_ERR_INVALID_ARGUMENT);
  // Output structs: struct_size must be set.
  dsrt_model_info info{};
  CHECK(dsrt_model_info_get(m.m, &info) == DSRT_ERR_INVALID_ARGUMENT);
  info.struct_size = sizeof info;
  CHECK_OK(dsrt_model_info_get(m.m, &info));
  CHECK(info.n_vocab == 512);
  CHECK(info.n_layers == 3);
  CHECK(info.weights_format == DSRT_WEIGHTS_FP8);
  CHECK(info.backend == DSRT_BACKEND_CPU);
  CHECK(info.n_params > 0);
  dsrt_model_info half{};
  half.struct_size = offsetof(dsrt_model_info, n_layers);
  CHECK_OK(dsrt_model_info_get(m.m, &half));
  CHECK(half.n_embd == 256);
  CHECK(half.n_layers == 0);  // not written
}

TEST_CASE("NULL handles and pointers are errors with a message, frees of NULL are no-ops") {
  dsrt_model *m = nullptr;
  CHECK(dsrt_model_load(nullptr, nullptr, &m) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(std::strlen(dsrt_last_error()) > 0);
  CHECK(dsrt_model_load("/nonexistent", nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_engine_create(nullptr, nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_create(nullptr, nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_append_tokens(nullptr, nullptr, 0) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_eval(nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_sample(nullptr, nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_logits(nullptr, nullptr, nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_engine_step(nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_engine_stats_get(nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_model_info_get(nullptr, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_cancel_create(nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_system_info(nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  dsrt_model_free(nullptr);
  dsrt_engine_free(nullptr);
  dsrt_session_free(nullptr);
  dsrt_cancel_free(nullptr);
  dsrt_cancel_trigger(nullptr);
  dsrt_free(nullptr);
  CHECK(dsrt_cancel_is_triggered(nullptr) == 0);
  // A successful call clears the error text.
  CHECK_OK(dsrt_check_version(DSRT_API_VERSION));
  CHECK(std::string(dsrt_last_error()).empty());
}

TEST_CASE("the error text is per thread") {
  dsrt_model *m = nullptr;
  CHECK(dsrt_model_load("/nonexistent-dir", nullptr, &m) == DSRT_ERR_IO);
  std::string other;
  std::thread([&] { other = dsrt_last_error(); }).join();
  CHECK(other.empty());
  CHECK(std::string(dsrt_last_error()).find("/nonexistent-dir") != std::string::npos);
}

TEST_CASE("load progress reports each stage, and a progress callback or cancel token aborts the load") {
  struct Seen {
    int stages[3] = {0, 0, 0};
    int stop_at_stage = -1;
  } seen;
  auto cb = [](int32_t stage, uint64_t done, uint64_t total, void *user) -> int32_t {
    auto *s = static_cast<Seen *>(user);
    if (stage >= 0 && stage < 3) s->stages[stage]++;
    CHECK(done <= total);
    return stage == s->stop_at_stage ? 1 : 0;
  };
  dsrt_model_params p;
  dsrt_model_params_init(&p, sizeof p);
  p.progress_fn = cb;
  p.progress_user_data = &seen;
  dsrt_model *m = nullptr;
  CHECK_OK(dsrt_model_load(tiny("no-qlora").c_str(), &p, &m));
  CHECK(seen.stages[0] == 1);
  CHECK(seen.stages[1] == 2);  // two shards
  CHECK(seen.stages[2] > 50);  // per tensor bound
  dsrt_model_free(m);
  m = nullptr;
  seen.stop_at_stage = 1;
  CHECK(dsrt_model_load(tiny("no-qlora").c_str(), &p, &m) == DSRT_ERR_CANCELLED);
  CHECK(m == nullptr);
  dsrt_cancel *c;
  CHECK_OK(dsrt_cancel_create(&c));
  dsrt_cancel_trigger(c);
  CHECK(dsrt_cancel_is_triggered(c) == 1);
  dsrt_model_params q;
  dsrt_model_params_init(&q, sizeof q);
  q.cancel = c;
  CHECK(dsrt_model_load(tiny("no-qlora").c_str(), &q, &m) == DSRT_ERR_CANCELLED);
  CHECK(std::string(dsrt_last_error()).find("cancelled") != std::string::npos);
  dsrt_cancel_free(c);
}

TEST_CASE("handles co-own their parents: a session outlives the caller's engine and model references") {
  dsrt_model *m = nullptr;
  dsrt_engine *e = nullptr;
  dsrt_session *s = nullptr;
  CHECK_OK(dsrt_model_load(tiny("no-qlora").c_str(), nullptr, &m));
  CHECK_OK(dsrt_engine_create(m, nullptr, &e));
  CHECK_OK(dsrt_session_create(e, nullptr, &s));
  dsrt_engine_free(e);
  dsrt_model_free(m);
  const int32_t t[] = {0, 1, 2};
  CHECK_OK(dsrt_session_append_tokens(s, t, 3));
  CHECK_OK(dsrt_session_eval(s, nullptr));
  int32_t tok;
  CHECK_OK(dsrt_session_sample(s, nullptr, &tok));
  dsrt_session_free(s);
}

TEST_CASE("the CUDA backend request is a clear status in a build or machine without it") {
  dsrt_model_params p;
  dsrt_model_params_init(&p, sizeof p);
  p.backend = DSRT_BACKEND_CUDA;
  dsrt_model *m = nullptr;
  CHECK(dsrt_model_load(tiny("no-qlora").c_str(), &p, &m) == DSRT_ERR_NO_DEVICE);
  CHECK(std::strlen(dsrt_last_error()) > 0);
  p.backend = 77;
  CHECK(dsrt_model_load(tiny("no-qlora").c_str(), &p, &m) == DSRT_ERR_INVALID_ARGUMENT);
}

TEST_CASE("per-op profiling names every op of a step and clears when toggled") {
  testing::Model m(tiny("partial-yarn"));
  testing::Engine e(m);
  testing::Session s(e);
  CHECK_OK(dsrt_engine_set_profiling(e.e, 1));
  s.append(prompt_tokens(m.vocab(), 10));
  s.eval();
  char *json = nullptr;
  CHECK_OK(dsrt_engine_profile_json(e.e, &json));
  REQUIRE(json != nullptr);
  const nlohmann::json j = nlohmann::json::parse(json);
  dsrt_free(json);
  std::map<std::string, int64_t> calls;
  double prev = 1e300;
  for (const auto &row : j) {
    calls[row["op"].get<std::string>()] = row["calls"].get<int64_t>();
    CHECK(row["ms"].get<double>() >= 0.0);
    CHECK(row["ms"].get<double>() <= prev);  // longest first
    prev = row["ms"].get<double>();
  }
  CHECK(calls["self_attn.q_a_proj"] == 3);  // one per layer, named without the layer number
  CHECK(calls["lm_head"] == 1);
  CHECK(calls["mla_attention"] == 3);
  CHECK(calls["moe_experts"] == 2);  // layers 1 and 2 (layer 0 is dense)
  CHECK(calls["mlp.gate_proj"] == 1);                 // the dense layer
  CHECK(calls["mlp.shared_experts.gate_proj"] == 2);  // the MoE layers' shared expert
  CHECK_OK(dsrt_engine_set_profiling(e.e, 0));
  CHECK_OK(dsrt_engine_profile_json(e.e, &json));
  CHECK(std::string(json) == "[]");
  dsrt_free(json);
  CHECK(dsrt_engine_set_profiling(nullptr, 1) == DSRT_ERR_INVALID_ARGUMENT);
}

TEST_CASE("the KV pool can be sized as a share of the backend's free memory") {
  testing::Model m(tiny("partial-yarn"));
  dsrt_engine_params p;
  dsrt_engine_params_init(&p, sizeof p);
  CHECK(p.kv_memory_fraction == 0.0f);
  p.kv_memory_fraction = 1e-4f;  // a few MB of this machine's available RAM: a handful of pages
  dsrt_engine *e = nullptr;
  CHECK_OK(dsrt_engine_create(m.m, &p, &e));
  dsrt_engine_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_engine_stats_get(e, &st));
  CHECK(st.kv_pages_total >= 1);
  CHECK(st.kv_pages_total < 100000);
  dsrt_session *s = nullptr;
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);
  CHECK_OK(dsrt_session_create(e, &sp, &s));
  const auto t = prompt_tokens(m.vocab(), 10);
  CHECK_OK(dsrt_session_append_tokens(s, t.data(), t.size()));
  CHECK_OK(dsrt_session_eval(s, nullptr));
  dsrt_session_free(s);
  dsrt_engine_free(e);
  p.kv_memory_fraction = 1e-12f;  // less than one page: a clear out-of-memory status
  CHECK(dsrt_engine_create(m.m, &p, &e) == DSRT_ERR_OUT_OF_MEMORY);
  CHECK(std::string(dsrt_last_error()).find("KV page") != std::string::npos);
  p.kv_memory_fraction = 1.5f;
  CHECK(dsrt_engine_create(m.m, &p, &e) == DSRT_ERR_INVALID_ARGUMENT);
}

namespace {
// Log-softmax of one logits row, in double.
std::vector<double> log_softmax(const float *x, size_t n) {
  double mx = -INFINITY;
  for (size_t i = 0; i < n; i++) mx = std::max(mx, double(x[i]));
  double sum = 0;
  for (size_t i = 0; i < n; i++) sum += std::exp(double(x[i]) - mx);
  std::vector<double> out(n);
  for (size_t i = 0; i < n; i++) out[i] = double(x[i]) - mx - std::log(sum);
  return out;
}
}  // namespace

TEST_CASE("dsrt_session_token_logprobs: log-softmax of the raw logits the token was sampled from") {
  Model m(tiny("no-qlora"));
  dsrt_engine *e = nullptr;
  CHECK_OK(dsrt_engine_create(m.m, nullptr, &e));
  dsrt_session *s = nullptr;
  CHECK_OK(dsrt_session_create(e, nullptr, &s));
  const int32_t prompt[] = {1, 5, 9, 14, 3};
  CHECK_OK(dsrt_session_append_tokens(s, prompt, 5));
  int32_t tok = -1;
  float lp = 0;
  CHECK(dsrt_session_token_logprobs(s, &tok, &lp, nullptr, nullptr, 0, nullptr) == DSRT_ERR_BAD_STATE);  // nothing sampled
  {  // keeping is off by default: a sample keeps nothing
    CHECK_OK(dsrt_session_eval(s, nullptr));
    int32_t t = -1;
    CHECK_OK(dsrt_session_sample(s, nullptr, &t));
    CHECK(dsrt_session_token_logprobs(s, &tok, &lp, nullptr, nullptr, 0, nullptr) == DSRT_ERR_BAD_STATE);
  }
  CHECK_OK(dsrt_session_keep_logprobs(s, 1));
  const int kSteps = 6, kTop = 5;
  // Reference: greedy decoding by hand (eval, logits, sample), each step checked against dsrt_session_logits.
  std::vector<int32_t> ref_tokens;
  std::vector<float> ref_lp;
  for (int i = 0; i < kSteps; i++) {
    CHECK_OK(dsrt_session_eval(s, nullptr));
    const float *logits = nullptr;
    size_t rows = 0, V = 0;
    CHECK_OK(dsrt_session_logits(s, &logits, &rows, &V));
    const std::vector<double> ls = log_softmax(logits + (rows - 1) * V, V);
    int32_t t = -1;
    CHECK_OK(dsrt_session_sample(s, nullptr, &t));
    int32_t top_t[kTop];
    float top_l[kTop];
    size_t n_top = 0;
    CHECK_OK(dsrt_session_token_logprobs(s, &tok, &lp, top_t, top_l, kTop, &n_top));
    CHECK(tok == t);
    REQUIRE(n_top == size_t(kTop));
    CHECK(lp == doctest::Approx(ls[size_t(t)]).epsilon(1e-5));
    CHECK(top_t[0] == t);  // greedy: the sampled token is the most likely one
    CHECK(lp == top_l[0]);
    for (int k = 0; k < kTop; k++) {
      CHECK(top_l[k] == doctest::Approx(ls[size_t(top_t[k])]).epsilon(1e-5));
      if (k) CHECK(top_l[k] <= top_l[k - 1]);
    }
    // The top list is the row's best: no token outside it is more likely than its last.
    size_t better = 0;
    for (size_t v = 0; v < V; v++) better += ls[v] > double(top_l[kTop - 1]) + 1e-6;
    CHECK(better < size_t(kTop));
    ref_tokens.push_back(t);
    ref_lp.push_back(lp);
    CHECK_OK(dsrt_session_append_tokens(s, &t, 1));
  }
  // A generation turn on a fresh session (penalties and a high temperature do not change the figures, which
  // are of the raw logits; greedy here so the tokens match) gives the same logprobs event by event.
  dsrt_session *g = nullptr;
  CHECK_OK(dsrt_session_create(e, nullptr, &g));
  CHECK_OK(dsrt_session_keep_logprobs(g, 1));
  CHECK_OK(dsrt_session_append_tokens(g, prompt, 5));
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, m.m);
  p.max_new_tokens = kSteps;
  p.temperature = 0;
  p.ignore_eos = 1;
  p.repetition_penalty = 1.0f;
  CHECK_OK(dsrt_session_start(g, &p));
  for (int i = 0;; i++) {
    dsrt_event ev;
    ev.struct_size = sizeof ev;
    CHECK_OK(dsrt_session_next(g, &ev));
    if (ev.type == DSRT_EVENT_DONE) {
      CHECK(i == kSteps);
      break;
    }
    REQUIRE(i < kSteps);
    size_t n_top = 99;
    CHECK_OK(dsrt_session_token_logprobs(g, &tok, &lp, nullptr, nullptr, 0, &n_top));
    CHECK(n_top == 0);
    CHECK(tok == ev.token);
    CHECK(tok == ref_tokens[size_t(i)]);
    CHECK(lp == doctest::Approx(ref_lp[size_t(i)]).epsilon(1e-4));
  }
  // Arguments: a top buffer missing with cap > 0; a cap above the vocabulary gives the whole vocabulary.
  CHECK(dsrt_session_token_logprobs(g, nullptr, nullptr, nullptr, nullptr, 3, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_token_logprobs(nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr) == DSRT_ERR_INVALID_ARGUMENT);
  const size_t V = size_t(m.vocab());
  std::vector<int32_t> all_t(V + 10);
  std::vector<float> all_l(V + 10);
  size_t n_all = 0;
  CHECK_OK(dsrt_session_token_logprobs(g, nullptr, nullptr, all_t.data(), all_l.data(), all_t.size(), &n_all));
  CHECK(n_all == V);
  double total = 0;
  for (size_t i = 0; i < n_all; i++) total += std::exp(double(all_l[i]));
  CHECK(total == doctest::Approx(1.0).epsilon(1e-4));
  dsrt_session_free(g);
  dsrt_session_free(s);
  dsrt_engine_free(e);
}
