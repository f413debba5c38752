// The engine's step thread (design.md §5): continuous batching with decode rows first (a generating session
// keeps its pace while another prefills), cancel at step boundaries, admission by page reservation, rollback
// of a failed prefill, the log callback.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "engine/engine.h"
#include "engine/load.h"
#include "forwarding_backend.h"
#include "helpers.h"

using namespace testing;
using Clock = std::chrono::steady_clock;

namespace {

std::shared_ptr<dsrt::Engine> make_engine(const dsrt::LoadedModel &m, int64_t max_batch, int64_t max_tokens,
                                          int decode_wait_ms = 5) {
  dsrt::EngineOptions eo;
  eo.max_batch_tokens = max_batch;
  eo.max_tokens = max_tokens;
  eo.decode_wait_ms = decode_wait_ms;
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
  // The step thread holds each step for A's thread to sample and append (EngineOptions::decode_wait_ms) up to
  // 5 ms by default; a loaded test machine can starve that thread longer, so here the bound is long enough to
  // make "A's token rides with every chunk of B" a property of the scheduler, not of thread timing.
  auto e = make_engine(model, 64, 4096, 10000);
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
  dsrt::EngineOptions eo;
  eo.max_batch_tokens = 32;
  eo.max_tokens = 4096;
  dsrt::BackendOptions bo;
  bo.n_threads = 2;
  auto be = std::make_unique<ForwardingBackend>(dsrt::make_cpu_backend(bo), false);
  auto gate = be->gate;
  auto e = std::make_shared<dsrt::Engine>(model.model, model.vocab, std::move(be), eo);
  auto s = e->create_session(0, false, 1);
  const auto p = prompt_tokens(int32_t(model.model->cfg.vocab_size), 2048);
  s->append(p.data(), p.size());
  std::atomic<int> cancel{0};
  gate->close();  // the steps pass one at a time: the cancel comes while the third runs
  dsrt_status code = DSRT_OK;
  std::thread t([&] {
    try {
      s->eval(&cancel);
    } catch (const dsrt::Error &err) {
      code = err.code();
    }
  });
  gate->wait_arrived(1);
  gate->step_and_wait();
  gate->step_and_wait();
  cancel = 1;
  gate->open();
  t.join();
  CHECK(code == DSRT_ERR_CANCELLED);
  const dsrt::SessionStats st = s->stats();
  CHECK(st.n_tokens == 3 * 32);  // the step running when the cancel came finished; no other started
  CHECK(st.n_pending == 2048 - 3 * 32);
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
  auto dev = engine(true);
  const auto [df, dfin, ds] = run(dev);
  // The token after the second page's last was run ahead with. Either the step thread planned it first, found no
  // page and took it back (Session::retract_ahead; next() appended it again), or next() took it before any plan
  // did: which one depends on thread timing (a busy CI box saw both). Both end the turn as the host path does.
  CHECK(dev->stats().tokens_retracted <= 1);
  CHECK(dev->stats().pages_used == 0);
  CHECK(hfin == dsrt::Finish::ContextFull);
  CHECK(dfin == dsrt::Finish::ContextFull);
  CHECK(hf.size() >= 60);
  CHECK(df == hf);
  CHECK(hs.size() == 5);
  CHECK(ds == hs);
}

// Run-ahead (Session::ahead_): with device sampling a step's commit appends the turn's next token itself, so the
// next step starts without waiting for the session's thread. Every call on the session sees it as without
// run-ahead: a token not taken yet is retracted (Session::retract_ahead) or left out of views and stats. These
// tests hold the step thread at a gate (ForwardingBackend::Gate) to put the session in each state on purpose;
// no result depends on timing. The reference is the same path without run-ahead (EngineOptions::run_ahead).
namespace {

// An engine on the CPU backend behind a ForwardingBackend: the device-sampling path, with or without run-ahead.
// gated: run-ahead on, the tests drive its steps through the gate.
struct Rig {
  std::shared_ptr<dsrt::Engine> e;
  std::shared_ptr<ForwardingBackend::Gate> gate;
  bool gated = false;
};

Rig rig(const dsrt::LoadedModel &m, bool run_ahead, int64_t max_tokens = 2048, bool device = true) {
  dsrt::EngineOptions eo;
  eo.max_tokens = max_tokens;
  eo.max_batch_tokens = 512;
  eo.run_ahead = run_ahead;
  dsrt::BackendOptions bo;
  bo.n_threads = 2;
  auto be = std::make_unique<ForwardingBackend>(dsrt::make_cpu_backend(bo), device);
  Rig r;
  r.gate = be->gate;
  r.gated = device && run_ahead;
  r.e = std::make_shared<dsrt::Engine>(m.model, m.vocab, std::move(be), eo);
  return r;
}

dsrt::GenParams sampled(int n, uint64_t seed) {
  dsrt::GenParams g = greedy(n);
  g.has_seed = true;
  g.seed = seed;
  g.sampling.temperature = 0.9f;
  g.sampling.top_k = 20;
  return g;
}

// Until the step thread has finished `n` steps in all (each step passes the gate once).
void settle(dsrt::Engine &e, int64_t n) {
  while (int64_t(e.steps_done()) < n) std::this_thread::yield();
}

// A turn's tokens in lockstep with the step thread (run-ahead, gate closed): the step of the token taken last
// passes the gate, its commit runs ahead with the next token, whose step then waits at the gate, and next() takes
// that token at once. Without run-ahead: next().
struct Lockstep {
  Rig &r;
  dsrt::Session &s;
  bool first = true;
  dsrt::Event next() {
    if (!r.gated) return s.next();
    if (first) {
      first = false;
      const int64_t a = r.gate->n_arrived();
      auto f = std::async(std::launch::async, [this] { return s.next(); });
      r.gate->wait_arrived(a + 1);  // the prompt's step
      r.gate->step_and_wait();      // through; the step of the token its commit ran ahead with waits
      return f.get();
    }
    r.gate->step_and_wait();
    return s.next();
  }
};

// What a session shows through its calls, for comparing the two paths: how many tokens it holds (cached or
// pending: whether a step has evaluated the last one yet is timing, not state), the cached ones but the last,
// whether the logits are on the host.
std::vector<int64_t> observe(dsrt::Session &s) {
  const dsrt::SessionStats st = s.stats();
  const auto tv = s.tokens_view();
  const int64_t n = st.n_tokens + st.n_pending;
  std::vector<int64_t> o{n, int64_t(tv.size()) == st.n_tokens ? 1 : 0};
  o.insert(o.end(), tv.begin(), tv.begin() + std::max<int64_t>(0, std::min<int64_t>(int64_t(tv.size()), n - 1)));
  dsrt_status code = DSRT_OK;
  try {
    s.logits_view();
  } catch (const dsrt::Error &e) {
    code = e.code();
  }
  o.push_back(-int64_t(code));
  return o;
}

std::vector<int64_t> tokens_of_turn(dsrt::Session &s, const dsrt::GenParams &g, std::vector<int64_t> &log) {
  s.start(g);
  std::vector<int64_t> t;
  for (dsrt::Event ev = s.next();; ev = s.next()) {
    if (ev.token >= 0) t.push_back(ev.token);
    if (ev.done) {
      t.push_back(-1000 - int64_t(ev.finish));
      break;
    }
  }
  log.insert(log.end(), t.begin(), t.end());
  return t;
}

void finish_by_cancel(dsrt::Session &s, std::vector<int64_t> &log) {
  s.cancel();
  const dsrt::Event ev = s.next();
  CHECK(ev.done);
  CHECK(ev.finish == dsrt::Finish::Cancelled);
  log.push_back(-1000 - int64_t(ev.finish));
}

}  // namespace

TEST_CASE("run-ahead: every call in the middle of a turn sees the session as without it (gated steps)") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  Rig ref = rig(model, false), dev = rig(model, true);
  const dsrt::GenParams g = sampled(1000, 11);  // (ended by the scripts: every token is run ahead with)
  // What the script does after the turn's `take` tokens, with the token after them (on the device path) run ahead
  // with: one call (retracts: it takes that token back), then the rest; it records what it sees.
  using Fn = std::function<void(dsrt::Session &, const std::vector<int32_t> &prompt, std::vector<int64_t> &log)>;
  struct Script {
    const char *name;
    bool retracts;
    Fn call, rest;
  };
  const int32_t x = 7;
  std::shared_ptr<dsrt::Session> child;
  const std::vector<Script> scripts = {
      {"stats and views", false,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         const auto o = observe(s);
         log.insert(log.end(), o.begin(), o.end());
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) { finish_by_cancel(s, log); }},
      {"cancel", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         finish_by_cancel(s, log);
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         const auto o = observe(s);
         log.insert(log.end(), o.begin(), o.end());
         tokens_of_turn(s, sampled(6, 21), log);
       }},
      {"append", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         s.append(&x, 1);  // the turn goes on after it
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         for (int i = 0; i < 4; i++) log.push_back(s.next().token);
         finish_by_cancel(s, log);
         const auto o = observe(s);
         log.insert(log.end(), o.begin(), o.end());
       }},
      {"truncate", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &p, std::vector<int64_t> &log) {
         s.truncate(p.size() - 1);  // (then cancel: it used to pop a token from an empty cache)
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &p, std::vector<int64_t> &log) {
         finish_by_cancel(s, log);
         const auto o = observe(s);
         log.insert(log.end(), o.begin(), o.end());
         s.append(&p.back(), 1);
         tokens_of_turn(s, sampled(6, 22), log);
       }},
      {"fork", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         child = s.fork();
         const auto o = observe(*child);
         log.insert(log.end(), o.begin(), o.end());
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         for (int i = 0; i < 3; i++) log.push_back(s.next().token);  // the parent's turn goes on
         finish_by_cancel(s, log);
         dsrt::GenParams g6 = sampled(6, 0);
         g6.has_seed = false;  // the child's stream is the parent's
         tokens_of_turn(*child, g6, log);
         child.reset();
       }},
      {"start", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &) {
         s.start(sampled(6, 23));  // a new turn in place of this one
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         for (dsrt::Event ev = s.next(); !ev.done; ev = s.next()) log.push_back(ev.token);
         const auto o = observe(s);
         log.insert(log.end(), o.begin(), o.end());
       }},
      {"sample and eval", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         dsrt_status code = DSRT_OK;
         try {
           s.sample(0.5f);
         } catch (const dsrt::Error &e) {
           code = e.code();
         }
         log.push_back(-int64_t(code));
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         s.eval(nullptr);
         for (int i = 0; i < 3; i++) log.push_back(s.next().token);
         finish_by_cancel(s, log);
       }},
      {"keep_logprobs", false,
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &) { s.keep_logprobs(true); },
       [&](dsrt::Session &s, const std::vector<int32_t> &, std::vector<int64_t> &log) {
         for (int i = 0; i < 3; i++) log.push_back(s.next().token);
         std::vector<std::pair<int32_t, float>> top;
         int32_t tok = -1;
         const float lp = s.token_logprobs(3, &tok, top);
         log.push_back(tok);
         log.push_back(int64_t(std::lround(double(lp) * 1e6)));
         for (const auto &t : top) log.push_back(t.first);
         finish_by_cancel(s, log);
         s.keep_logprobs(false);
       }},
      {"reset", true,
       [&](dsrt::Session &s, const std::vector<int32_t> &p, std::vector<int64_t> &log) {
         s.reset();
       },
       [&](dsrt::Session &s, const std::vector<int32_t> &p, std::vector<int64_t> &log) {
         const auto o = observe(s);
         log.insert(log.end(), o.begin(), o.end());
         s.append(p.data(), p.size());
         tokens_of_turn(s, sampled(6, 24), log);
       }},
  };
  // in_flight: the step that evaluates the token run ahead with is still running when the script starts (its
  // calls wait for it); otherwise it has finished (the token is in the cache, its successor drawn).
  for (const Script &sc : scripts)
    for (int take : {1, 3})
      for (bool in_flight : {false, true}) {
        const std::string name = sc.name;
        CAPTURE(name);
        CAPTURE(take);
        CAPTURE(in_flight);
        const auto prompt = prompt_tokens(V, 9);
        std::vector<int64_t> logs[2];
        for (Rig *r : {&ref, &dev}) {
          auto &log = logs[r->gated];
          auto s = r->e->create_session(0, false, 5);
          s->append(prompt.data(), prompt.size());
          s->start(g);
          if (r->gated) r->gate->close();
          Lockstep ls{*r, *s};
          for (int i = 0; i < take; i++) {
            const dsrt::Event ev = ls.next();
            REQUIRE(!ev.done);
            log.push_back(ev.token);
          }
          const dsrt::EngineStats before = r->e->stats();
          if (r->gated) {
            // The step of the token taken last waits at the gate; through it, its commit runs ahead with the next
            // token, whose step then waits.
            r->gate->step_and_wait();
            CHECK(r->e->stats().tokens_run_ahead == before.tokens_run_ahead + 1);
            if (!in_flight) {
              r->gate->allow(1);
              settle(*r->e, r->gate->n_arrived());
              const dsrt::SessionStats st = s->stats();
              CHECK(st.n_tokens == int64_t(prompt.size()) + take);  // the token ahead is not counted
              CHECK(st.n_pending == 0);
            } else {
              const dsrt::SessionStats st = s->stats();  // (from this thread while the step runs)
              CHECK(st.n_tokens + st.n_pending == int64_t(prompt.size()) + take);
            }
            r->gate->open();
          }
          sc.call(*s, prompt, log);
          if (r->gated) CHECK(r->e->stats().tokens_retracted == before.tokens_retracted + (sc.retracts ? 1 : 0));
          sc.rest(*s, prompt, log);
        }
        auto str = [](const std::vector<int64_t> &v) {
          std::string t;
          for (int64_t x : v) t += std::to_string(x) + " ";
          return t;
        };
        INFO("run-ahead: ", str(logs[1]));
        INFO("reference: ", str(logs[0]));
        CHECK(logs[1] == logs[0]);
      }
  CHECK(ref.e->stats().tokens_run_ahead == 0);
  for (Rig *r : {&ref, &dev}) {
    const dsrt::EngineStats st = r->e->stats();  // every session is gone, and every page it held
    CHECK(st.n_sessions == 0);
    CHECK(st.pages_used == 0);
  }
}

// A stop string ends the turn at the token whose text completes it: the step already evaluating that token does
// not run ahead with the next one (Session::stopping_), so ending the turn waits for no further step and takes
// nothing back.
TEST_CASE("run-ahead: a stop string ends the turn without a step for a token nobody takes") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  Rig ref = rig(model, false), dev = rig(model, true);
  const auto prompt = prompt_tokens(V, 9);
  // The reference's texts, token by token, pick a stop string that ends on a token boundary: the text of tokens
  // j-1 and j, found nowhere before.
  std::vector<std::string> texts;
  {
    auto s = ref.e->create_session(0, false, 5);
    s->append(prompt.data(), prompt.size());
    s->start(sampled(30, 11));
    for (dsrt::Event ev = s->next(); !ev.done; ev = s->next()) texts.push_back(ev.text);
  }
  REQUIRE(texts.size() == 30);
  std::string stop;
  size_t at = 0;
  for (size_t j = 4; j < texts.size() && stop.empty(); j++) {
    std::string before;
    for (size_t i = 0; i + 1 < j; i++) before += texts[i];
    const std::string cand = texts[j - 1] + texts[j];
    if (texts[j].empty() || texts[j - 1].empty() || (before + texts[j - 1]).find(cand) != std::string::npos) continue;
    bool clean = true;  // no match of the stop string that starts before token j-1 either
    for (size_t n = 1; n < cand.size() && clean; n++)
      clean = before.size() < n || before.compare(before.size() - n, n, cand, 0, n) != 0;
    if (clean) stop = cand, at = j;
  }
  std::string all;
  for (auto &t : texts) all += "[" + t + "]";
  INFO(all);
  REQUIRE(!stop.empty());
  CAPTURE(at);
  struct Out {
    std::vector<int32_t> tokens;
    std::string text;
    dsrt::Finish finish = dsrt::Finish::None;
    std::vector<int64_t> after, next_turn;
  } out[2];
  for (Rig *r : {&ref, &dev}) {
    Out &o = out[r->gated];
    auto s = r->e->create_session(0, false, 5);
    s->append(prompt.data(), prompt.size());
    dsrt::GenParams g = sampled(30, 11);
    g.stop_strings = {stop};
    s->start(g);
    if (r->gated) r->gate->close();
    Lockstep ls{*r, *s};
    for (;;) {
      const dsrt::Event ev = ls.next();
      REQUIRE(!ev.done);
      o.tokens.push_back(ev.token);
      o.text += ev.text;
      if (int(o.tokens.size()) == int(at) + 1) break;  // the token that completes the stop string
    }
    dsrt::EngineStats before = r->e->stats();
    int64_t steps = 0;
    if (r->gated) {
      steps = r->gate->n_arrived();  // the step of that token waits at the gate
      r->gate->open();
    }
    const dsrt::Event ev = s->next();
    CHECK(ev.done);
    o.finish = ev.finish;
    o.text += ev.text;
    if (r->gated) {
      const dsrt::EngineStats st = r->e->stats();
      CHECK(int64_t(st.n_steps) == steps);  // no step after the one of the last token
      CHECK(st.tokens_run_ahead == before.tokens_run_ahead);
      CHECK(st.tokens_retracted == before.tokens_retracted);
      CHECK(before.tokens_run_ahead >= at);  // every token but the first was run ahead with
    }
    o.after = observe(*s);
    tokens_of_turn(*s, sampled(6, 3), o.next_turn);
  }
  CHECK(out[0].finish == dsrt::Finish::StopString);
  CHECK(out[1].finish == dsrt::Finish::StopString);
  CHECK(out[1].tokens == out[0].tokens);
  CHECK(out[1].text == out[0].text);
  CHECK(out[1].after == out[0].after);
  CHECK(out[1].next_turn == out[0].next_turn);
  for (Rig *r : {&ref, &dev}) CHECK(r->e->stats().pages_used == 0);  // (the sessions are gone)
}

// The turn's remaining tokens appended to t; its finish (the turn must end without an error).
static dsrt::Finish rest_of_turn(dsrt::Session &s, std::vector<int32_t> &t) {
  dsrt::Event ev;
  for (ev = s.next(); !ev.done; ev = s.next()) t.push_back(ev.token);
  CHECK(ev.status == DSRT_OK);
  return ev.finish;
}

// Lets the gated rig's next step (which runs ahead with the turn's token) reach the gate and fail there; waits
// until the engine has settled and the ahead token was retracted.
static void fail_step_run_ahead(Rig &r) {
  r.gate->step_and_wait();
  {
    std::lock_guard l(r.gate->m);
    r.gate->fail_at = r.gate->passed + 1;
  }
  const uint64_t retracted = r.e->stats().tokens_retracted;
  r.gate->allow(1);
  settle(*r.e, r.gate->n_arrived());
  CHECK(r.e->stats().tokens_retracted == retracted + 1);
}

// A step that fails on the token a step ran ahead with (here: injected; a full pool, out of memory, another
// session's failure) fails nobody: the token goes back to being the turn's draw, and next() appends it and waits
// for its step as without run-ahead.
TEST_CASE("run-ahead: a failed step on the token run ahead with fails nobody; the turn goes on as without") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  Rig ref = rig(model, false), dev = rig(model, true);
  const auto prompt = prompt_tokens(V, 9);
  std::vector<int32_t> toks[2];
  dsrt::Finish fin[2];
  for (Rig *r : {&ref, &dev}) {
    auto s = r->e->create_session(0, false, 5);
    s->append(prompt.data(), prompt.size());
    s->start(sampled(14, 12));
    if (r->gated) r->gate->close();
    Lockstep ls{*r, *s};
    auto &t = toks[r->gated];
    for (int i = 0; i < 4; i++) t.push_back(ls.next().token);
    if (r->gated) {
      fail_step_run_ahead(*r);  // the step of the 5th token, run ahead with
      const dsrt::SessionStats st = s->stats();
      CHECK(st.n_tokens == int64_t(prompt.size()) + 4);
      CHECK(st.n_pending == 0);  // the token is the turn's draw again
      CHECK(st.n_pages == 1);
      r->gate->open();
    }
    fin[r->gated] = rest_of_turn(*s, t);
  }
  CHECK(fin[0] == dsrt::Finish::Length);
  CHECK(fin[1] == dsrt::Finish::Length);
  CHECK(toks[0].size() == 14);
  CHECK(toks[1] == toks[0]);
  for (Rig *r : {&ref, &dev}) CHECK(r->e->stats().pages_used == 0);  // (the sessions are gone)
}

// The failed step above, with the token run ahead with on a page's first position and the pool fully reserved:
// the page that step grew came out of the turn's reservation, and the retract gives it back to the reservation,
// not to the pool, so another session cannot take it and the turn still reaches its length (run-ahead off never
// took that page). Found by review: the page went to the pool and the turn later ended ContextFull.
TEST_CASE("run-ahead: a retract on a page boundary keeps the turn's reserved page") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  Rig ref = rig(model, false, 128), dev = rig(model, true, 128);  // a pool of 2 pages
  const auto prompt = prompt_tokens(V, 60);
  const auto other = prompt_tokens(V, 10);
  std::vector<int32_t> toks[2];
  dsrt::Finish fin[2];
  for (Rig *r : {&ref, &dev}) {
    auto s = r->e->create_session(0, false, 5);
    s->append(prompt.data(), prompt.size());
    s->start(sampled(68, 12));  // 60 + 68 = 128 tokens: its page and the pool's other, reserved
    if (r->gated) r->gate->close();
    Lockstep ls{*r, *s};
    auto &t = toks[r->gated];
    for (int i = 0; i < 4; i++) t.push_back(ls.next().token);  // positions 60..63
    if (r->gated) {
      fail_step_run_ahead(*r);  // the step of the 5th token (position 64: the second page's first), run ahead with
      CHECK(s->stats().n_pages == 1);
      r->gate->open();
    }
    auto b = r->e->create_session(0, false, 6);  // wants a page: every page is the turn's
    b->append(other.data(), other.size());
    CHECK_THROWS(b->eval(nullptr));
    fin[r->gated] = rest_of_turn(*s, t);
  }
  CHECK(fin[0] == dsrt::Finish::Length);
  CHECK(fin[1] == dsrt::Finish::Length);
  CHECK(toks[0].size() == 68);
  CHECK(toks[1] == toks[0]);
}

// A session whose context is nearly full: the token run ahead with fills its last position, so that step copies the
// logits to the host (no draw follows it). Those rows are not the session's: the views refuse them, a cancel drops
// them, and the turn that goes on ends ContextFull where the reference does.
TEST_CASE("run-ahead: a token run ahead with into a session's last position (small max_ctx)") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  Rig ref = rig(model, false), dev = rig(model, true);
  const auto prompt = prompt_tokens(V, 9);
  const int64_t max_ctx = 15;
  for (bool cancel : {true, false}) {
    CAPTURE(cancel);
    std::vector<int64_t> logs[2];
    for (Rig *r : {&ref, &dev}) {
      auto &log = logs[r->gated];
      auto s = r->e->create_session(max_ctx, false, 5);
      s->append(prompt.data(), prompt.size());
      s->start(sampled(1000, 13));
      if (r->gated) r->gate->close();
      Lockstep ls{*r, *s};
      for (int i = 0; i < 5; i++) log.push_back(ls.next().token);  // the 5th at max_ctx - 2
      if (r->gated) {
        r->gate->step_and_wait();  // the 6th, run ahead with, at max_ctx - 1: its step copies its logits
        r->gate->allow(1);
        settle(*r->e, r->gate->n_arrived());
        CHECK(s->stats().n_tokens == max_ctx - 1);
        CHECK_THROWS_AS(s->logits_view(), dsrt::Error);  // (they are the 6th token's, not taken yet)
        r->gate->open();
      }
      if (cancel) {
        finish_by_cancel(*s, log);
      } else {
        dsrt::Event ev;
        for (ev = s->next(); !ev.done; ev = s->next()) log.push_back(ev.token);
        log.push_back(-1000 - int64_t(ev.finish));
        CHECK(ev.finish == dsrt::Finish::ContextFull);
      }
      const auto o = observe(*s);
      log.insert(log.end(), o.begin(), o.end());
      s->truncate(prompt.size() - 1);
      s->append(&prompt.back(), 1);
      tokens_of_turn(*s, sampled(3, 14), log);
    }
    CHECK(logs[1] == logs[0]);
  }
  for (Rig *r : {&ref, &dev}) CHECK(r->e->stats().pages_used == 0);  // (the sessions are gone)
}

// The token run ahead with at a page boundary: the page its step takes for it, and the full page it completes,
// are not the session's yet (stats, the prefix cache); taken back, the page returns to the pool.
TEST_CASE("run-ahead: a token run ahead with on a page boundary") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  const auto prompt = prompt_tokens(V, 60);
  // take 3: the token ahead is the 64th (it completes the first page); take 4: the 65th (a page of its own).
  for (int take : {3, 4}) {
    CAPTURE(take);
    Rig ref = rig(model, false), dev = rig(model, true);
    std::vector<int64_t> logs[2];
    for (Rig *r : {&ref, &dev}) {
      auto &log = logs[r->gated];
      auto s = r->e->create_session(0, false, 5);
      s->append(prompt.data(), prompt.size());
      s->start(sampled(1000, 15));
      if (r->gated) r->gate->close();
      Lockstep ls{*r, *s};
      for (int i = 0; i < take; i++) log.push_back(ls.next().token);
      if (r->gated) {
        r->gate->step_and_wait();
        CHECK(s->stats().n_pages == 1);  // (its step, in flight, has its page if it needed one)
        CHECK(r->e->stats().pages_used == (take == 4 ? 2 : 1));
        r->gate->allow(1);
        settle(*r->e, r->gate->n_arrived());
        const dsrt::SessionStats st = s->stats();
        CHECK(st.n_tokens == 60 + take);
        CHECK(st.n_pending == 0);
        CHECK(st.n_pages == 1);
        // take 3: the first page is full only with the token ahead, not published; take 4: full with the 4th.
        CHECK(r->e->stats().pages_cached == (take == 3 ? 0 : 1));
        r->gate->open();
      }
      const dsrt::SessionStats st = s->stats();
      log.push_back(st.n_pages);
      finish_by_cancel(*s, log);
      CHECK(r->e->stats().pages_used == 1);
      if (take == 3) CHECK(r->e->stats().pages_cached == 0);
      const auto o = observe(*s);
      log.insert(log.end(), o.begin(), o.end());
      tokens_of_turn(*s, sampled(8, 16), log);  // through the page boundary
      log.push_back(s->stats().n_pages);
    }
    CHECK(logs[1] == logs[0]);
    for (Rig *r : {&ref, &dev}) CHECK(r->e->stats().pages_used == 0);
  }
}

// Two sessions generating at once on one engine, one of them keeping logprobs (its rows come to the host and it
// samples there, so the step thread holds steps for it): the same tokens, logprobs and final states as the
// reference; the run-ahead session's tokens are run ahead with.
TEST_CASE("run-ahead: next to a session that keeps logprobs (host sampling), tokens as without") {
  auto model = dsrt::load_model(tiny("no-qlora"), {});
  const int32_t V = int32_t(model.model->cfg.vocab_size);
  Rig ref = rig(model, false), dev = rig(model, true);
  struct Out {
    std::vector<int64_t> a, b;
  } out[2];
  for (Rig *r : {&ref, &dev}) {
    Out &o = out[r->gated];
    auto a = r->e->create_session(0, false, 5), b = r->e->create_session(0, false, 6);
    b->keep_logprobs(true);
    const auto pa = prompt_tokens(V, 9), pb = prompt_tokens(V, 70);
    a->append(pa.data(), pa.size());
    b->append(pb.data(), pb.size());
    std::thread tb([&] {
      b->start(sampled(20, 17));
      for (dsrt::Event ev = b->next(); !ev.done; ev = b->next()) {
        std::vector<std::pair<int32_t, float>> top;
        int32_t tok = -1;
        o.b.push_back(ev.token);
        o.b.push_back(int64_t(std::lround(double(b->token_logprobs(2, &tok, top)) * 1e6)));
        o.b.push_back(tok);
      }
      o.b.push_back(b->stats().n_tokens + b->stats().n_pending);
    });
    a->start(sampled(1000, 18));
    for (int i = 0; i < 25; i++) o.a.push_back(a->next().token);
    const dsrt::SessionStats st = a->stats();  // (the turn's next token may be ahead: not counted)
    o.a.push_back(st.n_tokens + st.n_pending);
    finish_by_cancel(*a, o.a);
    tb.join();
    // (b's steps take a's pending token whenever they run: evaluated, whichever way, the state is one)
    a->eval(nullptr);
    const auto oa = observe(*a);
    o.a.insert(o.a.end(), oa.begin(), oa.end());
    tokens_of_turn(*a, sampled(5, 19), o.a);
  }
  auto str = [](const std::vector<int64_t> &v) {
    std::string t;
    for (int64_t x : v) t += std::to_string(x) + " ";
    return t;
  };
  INFO("a run-ahead: ", str(out[1].a));
  INFO("a reference: ", str(out[0].a));
  INFO("b run-ahead: ", str(out[1].b));
  INFO("b reference: ", str(out[0].b));
  CHECK(out[1].a == out[0].a);
  CHECK(out[1].b == out[0].b);
  CHECK(dev.e->stats().tokens_run_ahead > 0);
  CHECK(ref.e->stats().tokens_run_ahead == 0);
  for (Rig *r : {&ref, &dev}) CHECK(r->e->stats().pages_used == 0);  // (the sessions are gone)
}
