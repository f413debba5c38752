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
#include "forwarding_backend.h"
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

TEST_CASE("dsrt_engine_step with pending tokens that cannot get pages returns no step (it used to spin forever)") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto e = make_engine(model, 64, 256);  // 4 pages
  auto x = e->create_session(0, false, 1), b = e->create_session(0, false, 2);
  const auto px = prompt_tokens(V, 200);
  std::vector<int32_t> pb(px.rbegin(), px.rbegin() + 100);  // (not a prefix of x's: no cached pages to adopt)
  x->append(px.data(), px.size());
  x->eval(nullptr);  // every page
  b->append(pb.data(), pb.size());  // nobody waits for it
  CHECK(e->step() == 0);
  CHECK(e->step() == 0);
  CHECK(b->stats().n_pending == 100);  // still pending, for later
  x.reset();                           // its pages come back
  CHECK(e->step() == 64);              // now it runs (one chunk of max_batch_tokens)
  b->eval(nullptr);
  CHECK(b->stats().n_tokens == 100);
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

// The engine's device-sampling path (EngineOptions::device_sampling) run on the CPU: a backend that claims to
// sample where its logits are (ForwardingBackend; its sample_rows is the default, the CPU sampler) against the
// same backend without the claim (the host path). Same tokens for greedy and seeded sampling with every
// filter, penalties, bias and bans, several sessions batched in each step; no logits row comes to the host
// during a plain turn; the logits are still there where someone reads them (logits_all, kept logprobs, an
// eval outside a turn), and a turn's own step says clearly that its logits stayed on the device.
TEST_CASE("device-sampling path (CPU stand-in): host path's tokens, logits copied only when asked") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto engine = [&](bool device, std::shared_ptr<ForwardingBackend::Counts> &counts) {
    dsrt::EngineOptions eo;
    eo.max_tokens = 2048;
    dsrt::BackendOptions bo;
    bo.n_threads = 2;
    auto be = std::make_unique<ForwardingBackend>(dsrt::make_cpu_backend(bo), device);
    counts = be->counts;
    return std::make_shared<dsrt::Engine>(model.model, model.vocab, std::move(be), eo);
  };
  std::shared_ptr<ForwardingBackend::Counts> hc, dc, pc;
  auto host = engine(false, hc), dev = engine(true, dc);
  CHECK(!host->device_sampling());
  CHECK(dev->device_sampling());
  CHECK(!make_engine(model, 64, 1024)->device_sampling());  // the CPU backend samples on the host
  {
    dsrt::EngineOptions eo;
    eo.device_sampling = false;
    auto off = std::make_shared<dsrt::Engine>(model.model, model.vocab,
                                              std::make_unique<ForwardingBackend>(dsrt::make_cpu_backend({}), true), eo);
    CHECK(!off->device_sampling());
  }
  std::vector<dsrt::GenParams> settings;
  for (int k = 0; k < 6; k++) {
    dsrt::GenParams g = greedy(12);
    g.has_seed = true;
    g.seed = 40 + uint64_t(k);
    if (k > 0) g.sampling.temperature = 0.9f;
    if (k == 2 || k == 5) g.sampling.top_k = 7;
    if (k == 3 || k == 5) g.sampling.top_p = 0.7f;
    if (k == 4 || k == 5) g.sampling.min_p = 0.1f;
    if (k == 0 || k == 5) {
      g.sampling.repetition_penalty = 1.2f;
      g.sampling.presence_penalty = 0.3f;
      g.sampling.frequency_penalty = 0.2f;
      g.sampling.penalty_window = 6;
      g.sampling.logit_bias = {{5, 2.0f}, {9, -INFINITY}};
    }
    settings.push_back(g);
  }
  // Every setting in its own session on its own thread: batched together in each step.
  auto run_all = [&](std::shared_ptr<dsrt::Engine> &e) {
    std::vector<std::vector<int32_t>> out(settings.size());
    std::vector<std::thread> th;
    for (size_t k = 0; k < settings.size(); k++)
      th.emplace_back([&, k] {
        auto s = e->create_session(0, false, 7);
        const auto p = prompt_tokens(V, 5 + int(k) * 3);
        s->append(p.data(), p.size());
        // Two turns back to back, nothing appended between them: the second continues from the token the first
        // ended with, whose successor the step may already have sampled on the device (and the turn not taken).
        for (int turn = 0; turn < 2; turn++) {
          s->start(settings[k]);
          for (;;) {
            dsrt::Event ev = s->next();
            if (ev.token >= 0) out[k].push_back(ev.token);
            if (ev.token >= 0 && out[k].size() % 12 == 0)  // the turn's last token: let the step run ahead of us
              std::this_thread::sleep_for(std::chrono::milliseconds(100));
            if (ev.done) {
              CHECK(ev.finish == dsrt::Finish::Length);
              break;
            }
          }
        }
      });
    for (auto &t : th) t.join();
    return out;
  };
  const auto want = run_all(host), got = run_all(dev);
  for (size_t k = 0; k < settings.size(); k++) {
    CAPTURE(k);
    CHECK(got[k].size() == 24);
    CHECK(got[k] == want[k]);
  }
  CHECK(hc->sampled_rows == 0);
  CHECK(dc->sampled_rows >= int64_t(settings.size()) * 12);
  CHECK(host->stats().tokens_run_ahead == 0);
  CHECK(dev->stats().tokens_run_ahead > 0);  // the steps appended turn tokens themselves
  CHECK(dev->stats().max_batch_seqs > 1);

  // One plain turn: no logits row comes to the host; the turn's step says where its logits are.
  auto s = dev->create_session(0, false, 3), hs = host->create_session(0, false, 3);
  const auto prompt = prompt_tokens(V, 20);
  s->append(prompt.data(), prompt.size());
  hs->append(prompt.data(), prompt.size());
  const int64_t floats0 = dc->host_floats;
  s->start(settings[5]);
  hs->start(settings[5]);
  for (int i = 0; i < 4; i++) CHECK(s->next().token == hs->next().token);
  CHECK(dc->host_floats == floats0);
  dsrt_status code = DSRT_OK;
  std::string msg;
  try {
    s->logits_view();
  } catch (const dsrt::Error &e) {
    code = e.code();
    msg = e.what();
  }
  CHECK(code == DSRT_ERR_BAD_STATE);
  CHECK(msg.find("sampled where the logits are computed") != std::string::npos);
  s->cancel();
  hs->cancel();
  CHECK(s->next().finish == dsrt::Finish::Cancelled);
  CHECK(hs->next().finish == dsrt::Finish::Cancelled);
  // Outside a turn, the evaluated token's logits come to the host as always, equal to the host path's.
  s->eval(nullptr);
  hs->eval(nullptr);
  const auto lv = s->logits_view(), hv = hs->logits_view();
  REQUIRE(lv.rows == 1);
  REQUIRE(hv.rows == 1);
  CHECK(std::equal(lv.data, lv.data + V, hv.data));
  CHECK(dc->host_floats == floats0 + V);

  // Sessions that read their logits keep the host path: logits_all, and kept logprobs.
  auto a = dev->create_session(0, true, 3), ha = host->create_session(0, true, 3);
  auto b = dev->create_session(0, false, 3), hb = host->create_session(0, false, 3);
  b->keep_logprobs(true);
  hb->keep_logprobs(true);
  for (auto *x : {a.get(), ha.get(), b.get(), hb.get()}) {
    x->append(prompt.data(), prompt.size());
    x->start(settings[3]);
  }
  const int64_t rows0 = dc->sampled_rows;
  for (int i = 0; i < 5; i++) {
    const dsrt::Event ea = a->next(), eha = ha->next(), eb = b->next(), ehb = hb->next();
    CHECK(ea.token == eha.token);
    CHECK(eb.token == ehb.token);
    const auto la = a->logits_view(), lha = ha->logits_view();
    REQUIRE(la.rows == lha.rows);
    CHECK(std::equal(la.data, la.data + la.rows * V, lha.data));
    std::vector<std::pair<int32_t, float>> tb, thb;
    int32_t kb = -1, khb = -2;
    CHECK(b->token_logprobs(5, &kb, tb) == hb->token_logprobs(5, &khb, thb));
    CHECK(kb == khb);
    CHECK(tb == thb);
  }
  CHECK(dc->sampled_rows == rows0);  // none of these went through sample_rows
  for (auto *x : {a.get(), ha.get(), b.get(), hb.get()}) x->cancel(), x->next();
}

// A device-sampled turn whose next step fails (the pool is full) rolls that step's token back; the turn's last
// evaluated token, whose logits stayed on the device, goes back to pending, so the next turn starts as the host
// path's does (it used to fail "no logits after evaluation").
TEST_CASE("device-sampling path (CPU stand-in): a turn ended by a full pool leaves the session usable") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto engine = [&](bool device) {
    dsrt::EngineOptions eo;
    eo.max_tokens = 256;  // 4 pages
    eo.max_batch_tokens = 64;
    dsrt::BackendOptions bo;
    bo.n_threads = 2;
    return std::make_shared<dsrt::Engine>(model.model, model.vocab,
                                          std::make_unique<ForwardingBackend>(dsrt::make_cpu_backend(bo), device), eo);
  };
  auto run = [&](std::shared_ptr<dsrt::Engine> e) {
    auto other = e->create_session(0, false, 1), s = e->create_session(0, false, 2);
    const auto po = prompt_tokens(V, 128);
    std::vector<int32_t> ps(po.rbegin(), po.rbegin() + 60);
    other->append(po.data(), po.size());
    other->eval(nullptr);  // 2 pages
    s->append(ps.data(), ps.size());
    s->start(greedy(200));  // its second page is the pool's last: the turn ends when it is full
    std::vector<int32_t> first, second;
    dsrt::Finish finish = dsrt::Finish::None;
    for (dsrt::Event ev = s->next();; ev = s->next()) {
      if (ev.token >= 0) first.push_back(ev.token);
      if (ev.done) {
        finish = ev.finish;
        break;
      }
    }
    other.reset();
    s->start(greedy(5));
    for (dsrt::Event ev = s->next(); !ev.done; ev = s->next()) second.push_back(ev.token);
    return std::make_tuple(first, finish, second);
  };
  const auto [hf, hfin, hs] = run(engine(false));
  const auto [df, dfin, ds] = run(engine(true));
  CHECK(hfin == dsrt::Finish::ContextFull);
  CHECK(dfin == dsrt::Finish::ContextFull);
  CHECK(hf.size() >= 60);
  CHECK(df == hf);
  CHECK(hs.size() == 5);
  CHECK(ds == hs);
}

// Run-ahead (Session::ahead_): with device sampling a step's commit appends the turn's next token itself, so
// the next step starts without waiting for the session's thread. A turn that ends without taking that token
// (a cancel, a stop string) takes it back out of the session, cache and random stream included: the tokens
// emitted, the session's tokens afterwards and the next turn's tokens are the host path's.
TEST_CASE("device-sampling run-ahead: a turn that ends without the token a step ran ahead with leaves no trace") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  auto engine = [&](bool device) {
    dsrt::EngineOptions eo;
    eo.max_tokens = 2048;
    dsrt::BackendOptions bo;
    bo.n_threads = 2;
    auto be = std::make_unique<ForwardingBackend>(dsrt::make_cpu_backend(bo), device);
    be->step_delay = std::chrono::milliseconds(25);  // the app thread takes each token while the next step runs
    return std::make_shared<dsrt::Engine>(model.model, model.vocab, std::move(be), eo);
  };
  auto host = engine(false), dev = engine(true);
  dsrt::GenParams g = greedy(40);
  g.has_seed = true;
  g.seed = 11;
  g.sampling.temperature = 0.9f;
  g.sampling.top_k = 20;
  struct Outcome {
    std::vector<int32_t> emitted, after, next_turn;
    std::string text;
    dsrt::Finish finish = dsrt::Finish::None;
  };
  // Takes `take` tokens, then (after a pause: the step in flight appends the next token meanwhile) ends the turn
  // with cancel(), or, when `stop` is set, ends it by the stop string; then the session's tokens and a next turn
  // of 6.
  auto run = [&](std::shared_ptr<dsrt::Engine> &e, int take, const std::string &stop) {
    Outcome o;
    auto s = e->create_session(0, false, 5);
    const auto p = prompt_tokens(V, 9);
    s->append(p.data(), p.size());
    dsrt::GenParams gt = g;
    if (!stop.empty()) gt.stop_strings = {stop};
    s->start(gt);
    for (;;) {
      if (stop.empty() && int(o.emitted.size()) == take) {
        std::this_thread::sleep_for(std::chrono::milliseconds(40));
        s->cancel();
      }
      const dsrt::Event ev = s->next();
      o.text += ev.text;
      if (ev.token >= 0) o.emitted.push_back(ev.token);
      if (ev.done) {
        o.finish = ev.finish;
        break;
      }
    }
    const auto tv = s->tokens_view();
    o.after.assign(tv.begin(), tv.end());
    dsrt::GenParams g6 = g;
    g6.max_new_tokens = 6;
    g6.has_seed = false;  // the stream goes on from where the turn left it
    s->start(g6);
    for (dsrt::Event ev = s->next(); !ev.done; ev = s->next()) o.next_turn.push_back(ev.token);
    return o;
  };
  for (int take : {1, 3, 8}) {
    CAPTURE(take);
    const Outcome h = run(host, take, ""), d = run(dev, take, "");
    CHECK(h.finish == dsrt::Finish::Cancelled);
    CHECK(d.finish == dsrt::Finish::Cancelled);
    CHECK(h.emitted.size() == size_t(take));
    CHECK(d.emitted == h.emitted);
    CHECK(d.after == h.after);
    CHECK(d.next_turn.size() == 6);
    CHECK(d.next_turn == h.next_turn);
  }
  // A stop string: the turn ends at the token whose text reaches it, the token after it is not taken.
  const Outcome free_run = run(host, 40, "\x01never");  // (a stop string that never shows)
  REQUIRE(free_run.text.size() > 8);
  const std::string stop = free_run.text.substr(free_run.text.size() / 2, 2);
  const Outcome h = run(host, 40, stop), d = run(dev, 40, stop);
  CHECK(h.finish == dsrt::Finish::StopString);
  CHECK(d.finish == dsrt::Finish::StopString);
  CHECK(d.emitted == h.emitted);
  CHECK(d.text == h.text);
  CHECK(d.after == h.after);
  CHECK(d.next_turn == h.next_turn);
  CHECK(dev->stats().tokens_run_ahead > 0);
}
