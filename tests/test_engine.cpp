// Engine behaviour on tiny models: both attention forms agree, prefill + decode == full recompute at every
// position across page boundaries, a batch of sequences == each alone, chunked prefill, truncate, limits,
// cancel, sampling.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <thread>

#include "helpers.h"

using namespace testing;

namespace {

std::vector<float> full_logits(Model &m, const std::vector<int32_t> &toks, int32_t attention, int32_t max_batch = 512) {
  Engine e(m, attention, max_batch);
  Session s(e, true);
  s.append(toks);
  s.eval();
  size_t rows;
  auto l = s.logits(&rows);
  REQUIRE(rows == toks.size());
  return l;
}

double max_row_rel(const std::vector<float> &a, const std::vector<float> &b, size_t V) {
  double worst = 0;
  for (size_t r = 0; r < a.size() / V; r++) worst = std::max(worst, rel_l2(a.data() + r * V, b.data() + r * V, V));
  return worst;
}

}  // namespace

TEST_CASE("absorbed and naive attention give the same logits on every preset") {
  for (const std::string &p : preset_names()) {
    CAPTURE(p);
    Model m(tiny(p));
    auto toks = prompt_tokens(m.vocab(), 70);
    auto naive = full_logits(m, toks, DSRT_ATTENTION_NAIVE);
    auto absorbed = full_logits(m, toks, DSRT_ATTENTION_ABSORBED);
    CHECK(max_row_rel(naive, absorbed, size_t(m.vocab())) < 1e-5);
  }
}

TEST_CASE("prefill then decode equals full recompute at every position, across page boundaries") {
  for (const std::string &p : {std::string("partial-yarn"), std::string("v3-mini")}) {
    CAPTURE(p);
    Model m(tiny(p));
    const size_t V = size_t(m.vocab());
    auto toks = prompt_tokens(m.vocab(), 140);  // pages 0, 1 and 2
    auto full = full_logits(m, toks, DSRT_ATTENTION_NAIVE);
    Engine e(m);
    Session s(e);
    s.append({toks.begin(), toks.begin() + 10});  // a prefill chunk, then one token per step
    s.eval();
    double worst = rel_l2(s.logits().data(), full.data() + 9 * V, V);
    for (size_t i = 10; i < toks.size(); i++) {
      s.append({toks[i]});
      s.eval();
      worst = std::max(worst, rel_l2(s.logits().data(), full.data() + i * V, V));
    }
    CHECK(worst < 1e-5);
    // Chunked prefill (chunks of 50 against the cache of earlier chunks) gives every position's logits too.
    auto chunked = full_logits(m, toks, DSRT_ATTENTION_AUTO, 50);
    CHECK(max_row_rel(chunked, full, V) < 1e-5);
  }
}

TEST_CASE("a batch of three sequences equals each run alone") {
  Model m(tiny("v3-mini"));
  const size_t V = size_t(m.vocab());
  std::vector<std::vector<int32_t>> prompts = {prompt_tokens(m.vocab(), 37), prompt_tokens(m.vocab(), 90),
                                               {0, 3, 1, 4, 1, 5, 9, 2, 6}};
  std::vector<std::vector<int32_t>> alone(3);
  for (int k = 0; k < 3; k++) {
    Engine e(m);
    Session s(e);
    s.append(prompts[size_t(k)]);
    for (int i = 0; i < 6; i++) {
      s.eval();
      alone[size_t(k)].push_back(s.greedy());
      s.append({alone[size_t(k)].back()});
    }
  }
  Engine e(m);
  Session s0(e), s1(e), s2(e);
  Session *ss[3] = {&s0, &s1, &s2};
  std::vector<std::vector<int32_t>> together(3);
  std::vector<std::vector<float>> last_logits(3);
  for (int k = 0; k < 3; k++) ss[k]->append(prompts[size_t(k)]);
  for (int i = 0; i < 6; i++) {
    int32_t n = 0;
    CHECK_OK(dsrt_engine_step(e.e, &n));  // one step runs all three sessions' pending tokens
    CHECK(n == int32_t(i == 0 ? 37 + 90 + 9 : 3));
    for (int k = 0; k < 3; k++) {
      together[size_t(k)].push_back(ss[k]->greedy());
      ss[k]->append({together[size_t(k)].back()});
    }
  }
  CHECK(together == alone);
  dsrt_engine_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_engine_stats_get(e.e, &st));
  CHECK(st.max_batch_seqs == 3);
  CHECK(st.n_steps == 6);
  CHECK(st.n_sessions == 3);
  (void)V;
}

TEST_CASE("sessions on several threads are batched and still equal each run alone") {
  Model m(tiny("partial-yarn"));
  std::vector<std::vector<int32_t>> alone(4), threaded(4);
  auto run = [&](Engine &e, int k, std::vector<int32_t> &out) {
    Session s(e);
    s.append(prompt_tokens(m.vocab(), 20 + 7 * k));
    for (int i = 0; i < 8; i++) {
      s.eval();
      out.push_back(s.greedy());
      s.append({out.back()});
    }
  };
  for (int k = 0; k < 4; k++) {
    Engine e(m);
    run(e, k, alone[size_t(k)]);
  }
  Engine e(m);
  std::vector<std::thread> th;
  for (int k = 0; k < 4; k++) th.emplace_back([&, k] { run(e, k, threaded[size_t(k)]); });
  for (auto &t : th) t.join();
  CHECK(threaded == alone);
}

TEST_CASE("truncate and reset keep the cache consistent") {
  Model m(tiny("no-qlora"));
  const size_t V = size_t(m.vocab());
  auto toks = prompt_tokens(m.vocab(), 100);
  Engine e(m);
  Session s(e), ref(e);
  s.append(toks);
  s.eval();
  CHECK_OK(dsrt_session_truncate(s.s, 60));  // back across a page boundary
  dsrt_session_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_session_stats_get(s.s, &st));
  CHECK(st.n_tokens == 60);
  CHECK(st.n_pages == 1);
  int32_t t;
  CHECK(dsrt_session_sample(s.s, nullptr, &t) == DSRT_ERR_BAD_STATE);  // logits went with the truncation
  CHECK(std::string(dsrt_last_error()).find("no logits") != std::string::npos);
  std::vector<int32_t> other = {5, 6, 7, 8, 9};
  s.append(other);
  s.eval();
  std::vector<int32_t> expect(toks.begin(), toks.begin() + 60);
  expect.insert(expect.end(), other.begin(), other.end());
  ref.append(expect);
  ref.eval();
  CHECK(rel_l2(s.logits().data(), ref.logits().data(), V) < 1e-6);
  CHECK(dsrt_session_truncate(s.s, 1000) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK_OK(dsrt_session_reset(s.s));
  CHECK_OK(dsrt_session_stats_get(s.s, &st));
  CHECK(st.n_tokens == 0);
  CHECK(st.n_pages == 0);
  const int32_t *hist;
  size_t n;
  CHECK_OK(dsrt_session_tokens(ref.s, &hist, &n));
  CHECK(std::vector<int32_t>(hist, hist + n) == expect);
}

TEST_CASE("context and KV pool limits are clear errors, and the engine stays usable") {
  Model m(tiny("no-qlora"));
  Engine e(m, DSRT_ATTENTION_AUTO, 512, 128);  // two pages in all
  Session a(e, false, 0, 100);
  std::vector<int32_t> t(101, 3);
  CHECK(dsrt_session_append_tokens(a.s, t.data(), t.size()) == DSRT_ERR_CONTEXT_FULL);
  CHECK(std::string(dsrt_last_error()).find("context") != std::string::npos);
  a.append(std::vector<int32_t>(100, 3));
  a.eval();  // takes both pages
  Session b(e);
  b.append({1, 2, 3});
  CHECK(dsrt_session_eval(b.s, nullptr) == DSRT_ERR_CONTEXT_FULL);
  CHECK(std::string(dsrt_last_error()).find("KV pool") != std::string::npos);
  CHECK_OK(dsrt_session_reset(a.s));  // pages return to the pool
  b.append({1, 2, 3});
  b.eval();
  CHECK(b.greedy() >= 0);
  int32_t bad = 512;
  CHECK(dsrt_session_append_tokens(b.s, &bad, 1) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(std::string(dsrt_last_error()).find("512") != std::string::npos);
}

TEST_CASE("cancel stops evaluation at a step boundary and keeps what was done") {
  Model m(tiny("no-qlora"));
  Engine e(m, DSRT_ATTENTION_AUTO, 16);
  Session s(e);
  dsrt_cancel *c;
  CHECK_OK(dsrt_cancel_create(&c));
  dsrt_cancel_trigger(c);
  s.append(prompt_tokens(m.vocab(), 100));
  CHECK(dsrt_session_eval(s.s, c) == DSRT_ERR_CANCELLED);
  dsrt_session_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_session_stats_get(s.s, &st));
  CHECK(st.n_tokens + st.n_pending == 100);
  dsrt_cancel_reset(c);
  CHECK_OK(dsrt_session_eval(s.s, c));
  CHECK_OK(dsrt_session_stats_get(s.s, &st));
  CHECK(st.n_tokens == 100);
  dsrt_cancel_free(c);
}

TEST_CASE("sampling: greedy is the argmax, a seed repeats, temperature follows the softmax") {
  Model m(tiny("no-qlora"));
  const size_t V = size_t(m.vocab());
  Engine e(m);
  Session s(e, false, 42);
  s.append({0, 11, 22});
  s.eval();
  auto l = s.logits();
  CHECK(s.greedy() == int32_t(std::max_element(l.begin(), l.end()) - l.begin()));
  dsrt_sampling_params sp;
  dsrt_sampling_params_init(&sp, sizeof sp);
  sp.temperature = 2.0f;
  auto draws = [&](uint64_t seed, int n) {
    Session x(e, false, seed);
    x.append({0, 11, 22});
    x.eval();
    std::vector<int32_t> out;
    for (int i = 0; i < n; i++) {
      int32_t t;
      CHECK_OK(dsrt_session_sample(x.s, &sp, &t));
      out.push_back(t);
    }
    return out;
  };
  CHECK(draws(7, 50) == draws(7, 50));
  CHECK(draws(7, 50) != draws(8, 50));
  // Chi-square over the 8 most likely tokens plus "the rest", 20000 draws at T = 2.
  const int N = 20000;
  auto d = draws(123, N);
  std::vector<double> p(V);
  double mx = *std::max_element(l.begin(), l.end()), z = 0;
  for (size_t i = 0; i < V; i++) z += p[i] = std::exp((l[i] - mx) / 2.0);
  std::vector<size_t> order(V);
  for (size_t i = 0; i < V; i++) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
  std::vector<double> obs(9), expc(9);
  for (int k = 0; k < 8; k++) expc[size_t(k)] = p[order[size_t(k)]] / z * N;
  expc[8] = N - std::accumulate(expc.begin(), expc.begin() + 8, 0.0);
  for (int32_t t : d) {
    auto it = std::find(order.begin(), order.begin() + 8, size_t(t));
    obs[size_t(it - order.begin())] += 1;
  }
  double chi2 = 0;
  for (int k = 0; k < 9; k++) chi2 += (obs[size_t(k)] - expc[size_t(k)]) * (obs[size_t(k)] - expc[size_t(k)]) / expc[size_t(k)];
  CHECK(chi2 < 26.12);  // 8 degrees of freedom, p = 0.001
}
