// The engine's step thread (design.md §5): continuous batching with decode rows first (a generating session
// keeps its pace while another prefills), cancel at step boundaries, admission by page reservation, rollback
// of a failed prefill, the log callback.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "engine/engine.h"
#include "engine/load.h"
#include "helpers.h"

using namespace testing;
using Clock = std::chrono::steady_clock;

namespace {

std::shared_ptr<dsrt::Engine> make_engine(const dsrt::LoadedModel &m, int64_t max_batch, int64_t max_tokens) {
  dsrt::EngineOptions eo;
  eo.max_batch_tokens = max_batch;
  eo.max_tokens = max_tokens;
  dsrt::BackendOptions bo;
  bo.n_threads = 2;
  return std::make_shared<dsrt::Engine>(m.model, m.vocab, dsrt::make_cpu_backend(bo), eo);
}

dsrt::GenParams greedy(int n) {
  dsrt::GenParams g;
  g.sampling.temperature = 0;
  g.max_new_tokens = n;
  g.ignore_eos = true;
  return g;
}

}  // namespace

TEST_CASE("a decoding session keeps its pace while another session prefills 2048 tokens") {
  auto model = dsrt::load_model(tiny("bf16"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto e = make_engine(model, 64, 4096);
  auto a = e->create_session(0, false, 1), b = e->create_session(0, false, 2);
  const auto pa = prompt_tokens(V, 8), pb = prompt_tokens(V, 2048);
  a->append(pa.data(), pa.size());
  a->start(greedy(1000));
  a->next();  // A is generating
  std::atomic<bool> b_done{false};
  uint64_t b_first = 0, b_last = 0;
  std::vector<uint64_t> steps_at;  // engine steps when each of A's tokens arrived, while B prefilled
  std::vector<double> gaps_ms;
  std::thread tb([&] {
    b->append(pb.data(), pb.size());
    b_first = e->steps_done();
    b->eval(nullptr);
    b_last = e->steps_done();
    b_done = true;
  });
  auto t_prev = Clock::now();
  while (!b_done) {
    dsrt::Event ev = a->next();
    REQUIRE(!ev.done);
    const auto now = Clock::now();
    steps_at.push_back(e->steps_done());
    gaps_ms.push_back(std::chrono::duration<double, std::milli>(now - t_prev).count());
    t_prev = now;
  }
  tb.join();
  const uint64_t b_steps = b_last - b_first;
  const dsrt::EngineStats st = e->stats();
  // B needed at least 2048 / 64 = 32 steps; A got a token in (nearly) every one of them.
  CHECK(b_steps >= 32);
  CHECK(steps_at.size() + 2 >= b_steps);
  uint64_t worst = 0;
  for (size_t i = 1; i < steps_at.size(); i++) worst = std::max(worst, steps_at[i] - steps_at[i - 1]);
  CHECK(worst <= 2);  // below 3 step times
  CHECK(st.max_batch_seqs >= 2);
  std::sort(gaps_ms.begin(), gaps_ms.end());
  const double step_ms = 1e3 * st.forward_seconds / double(st.n_steps);
  MESSAGE("A's inter-token gap during B's 2048-token prefill: median ", gaps_ms[gaps_ms.size() / 2], " ms, max ",
          gaps_ms.back(), " ms; mean step ", step_ms, " ms; B took ", b_steps, " steps, A emitted ", steps_at.size(),
          " tokens, worst gap ", worst, " steps");
  a->cancel();
  a->next();
}

TEST_CASE("cancel from another thread ends a long prefill at the next step boundary, keeping what ran") {
  auto model = dsrt::load_model(tiny("bf16"), {});
  auto e = make_engine(model, 32, 4096);
  auto s = e->create_session(0, false, 1);
  const auto p = prompt_tokens(int32_t(model.model->cfg.vocab_size), 2048);
  s->append(p.data(), p.size());
  std::atomic<int> cancel{0};
  std::thread t([&] {
    while (e->steps_done() < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    cancel = 1;
  });
  dsrt_status code = DSRT_OK;
  try {
    s->eval(&cancel);
  } catch (const dsrt::Error &err) {
    code = err.code();
  }
  t.join();
  CHECK(code == DSRT_ERR_CANCELLED);
  const dsrt::SessionStats st = s->stats();
  CHECK(st.n_tokens > 0);
  CHECK(st.n_tokens < 2048);
  CHECK(st.n_tokens % 32 == 0);
  CHECK(st.n_tokens + st.n_pending == 2048);
  s->eval(nullptr);  // and it goes on from there
  CHECK(s->stats().n_tokens == 2048);
}

TEST_CASE("a running turn keeps the pages it reserved: a newcomer's prefill cannot end it early") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto e = make_engine(model, 64, 256);  // 4 pages
  auto a = e->create_session(0, false, 1), b = e->create_session(0, false, 2);
  const auto pa = prompt_tokens(V, 10), pb = prompt_tokens(V, 150);
  a->append(pa.data(), pa.size());
  a->start(greedy(150));  // needs ceil(160 / 64) = 3 pages: reserved now
  a->next();
  b->append(pb.data(), pb.size());  // 3 pages, only 1 unreserved
  dsrt_status code = DSRT_OK;
  try {
    b->eval(nullptr);
  } catch (const dsrt::Error &err) {
    code = err.code();
  }
  CHECK(code == DSRT_ERR_CONTEXT_FULL);
  CHECK(b->stats().n_tokens == 0);  // rolled back whole
  CHECK(b->stats().n_pages == 0);
  int n = 1;
  for (;;) {
    dsrt::Event ev = a->next();
    if (ev.done) {
      CHECK(ev.finish == dsrt::Finish::Length);
      break;
    }
    n++;
  }
  CHECK(n == 150);
  a->reset();
  b->append(pb.data(), pb.size());  // the same input again, now that there is room
  b->eval(nullptr);
  CHECK(b->stats().n_tokens == 150);
}

TEST_CASE("a prefill that runs out of pages part-way is rolled back; other sessions go on") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto e = make_engine(model, 64, 256);  // 4 pages
  auto x = e->create_session(0, false, 1), b = e->create_session(0, false, 2);
  const auto px = prompt_tokens(V, 100), pb = prompt_tokens(V, 200);
  x->append(px.data(), px.size());
  x->eval(nullptr);  // 2 pages
  const std::vector<float> x_logits(x->logits_view().data, x->logits_view().data + V);
  b->append(pb.data(), pb.size());  // 4 pages wanted: the third chunk fails
  dsrt_status code = DSRT_OK;
  try {
    b->eval(nullptr);
  } catch (const dsrt::Error &err) {
    code = err.code();
  }
  CHECK(code == DSRT_ERR_CONTEXT_FULL);
  CHECK(b->stats().n_tokens == 0);
  CHECK(b->stats().n_pending == 0);
  CHECK(b->stats().n_pages == 0);
  CHECK(e->stats().pages_used == 2);
  // x is untouched and keeps working.
  CHECK(std::equal(x_logits.begin(), x_logits.end(), x->logits_view().data));
  const int32_t t = 3;
  x->append(&t, 1);
  x->eval(nullptr);
  CHECK(x->stats().n_tokens == 101);
  x.reset();
  b->append(pb.data(), pb.size());
  b->eval(nullptr);
  CHECK(b->stats().n_tokens == 200);
}

TEST_CASE("many threads, each with its own session, are batched by the step thread") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  std::vector<std::vector<int32_t>> alone;
  for (int k = 0; k < 4; k++) {
    auto e = make_engine(model, 512, 0);
    auto s = e->create_session(0, false, 1);
    const auto p = prompt_tokens(V, 5 + 7 * k);
    s->append(p.data(), p.size());
    s->start(greedy(20));
    std::vector<int32_t> out;
    for (dsrt::Event ev = s->next(); !ev.done; ev = s->next()) out.push_back(ev.token);
    alone.push_back(out);
  }
  auto e = make_engine(model, 512, 0);
  std::vector<std::vector<int32_t>> got(4);
  std::vector<std::thread> ts;
  for (int k = 0; k < 4; k++)
    ts.emplace_back([&, k] {
      auto s = e->create_session(0, false, 1);
      const auto p = prompt_tokens(V, 5 + 7 * k);
      s->append(p.data(), p.size());
      s->start(greedy(20));
      for (dsrt::Event ev = s->next(); !ev.done; ev = s->next()) got[size_t(k)].push_back(ev.token);
    });
  for (auto &t : ts) t.join();
  CHECK(got == alone);
  CHECK(e->stats().max_batch_seqs >= 2);
}

namespace {
std::mutex g_log_mu;
std::vector<std::pair<int, std::string>> g_log;
void collect(int32_t level, const char *msg, void *) {
  std::lock_guard lk(g_log_mu);
  g_log.push_back({level, msg});
}
}  // namespace

TEST_CASE("dsrt_set_log_callback receives the library's messages instead of stderr") {
  dsrt_set_log_callback(collect, nullptr);
  {
    dsrt_model_params mp;
    dsrt_model_params_init(&mp, sizeof mp);
    mp.backend = DSRT_BACKEND_CPU;
    dsrt_model *m = nullptr;
    CHECK_OK(dsrt_model_load(tiny("no-qlora").c_str(), &mp, &m));
    dsrt_engine_params ep;
    dsrt_engine_params_init(&ep, sizeof ep);
    ep.tp = 2;
    dsrt_engine *e = nullptr;
    CHECK_OK(dsrt_engine_create(m, &ep, &e));
    dsrt_engine_free(e);
    dsrt_model_free(m);
  }
  dsrt_set_log_callback(nullptr, nullptr);
  std::lock_guard lk(g_log_mu);
  const bool saw = std::any_of(g_log.begin(), g_log.end(), [](auto &l) {
    return l.first == DSRT_LOG_INFO && l.second.find("2 in-process ranks") != std::string::npos;
  });
  CHECK(saw);
}
