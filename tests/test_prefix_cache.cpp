// The prefix cache (engine/kv_pages.h, engine/prefix_cache.h): full KV pages shared across sessions by their
// token ids from position 0, copy-on-write, LRU eviction that respects reservations. Every case compares,
// bitwise, against an engine without the cache (the CPU backend is deterministic, and both engines use one
// attention form so that a shorter prefill does not switch the arithmetic), and ends with every page free once
// the sessions are gone and the cache is cleared.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "engine/engine.h"
#include "engine/load.h"
#include "engine/prefix_cache.h"
#include "helpers.h"

using namespace testing;

namespace {

const dsrt::LoadedModel &model() {
  static dsrt::LoadedModel m = dsrt::load_model(tiny("no-qlora"), {});
  return m;
}

std::shared_ptr<dsrt::Engine> make_engine(bool cache, int64_t max_tokens = 4096, int64_t max_batch = 512, int tp = 1,
                                          const dsrt::LoadedModel &m = model(), int mtp = 0) {
  dsrt::EngineOptions eo;
  eo.max_batch_tokens = max_batch;
  eo.max_tokens = max_tokens;
  eo.attention = dsrt::AttentionPolicy::Naive;
  eo.prefix_cache_pages = cache ? -1 : 0;
  eo.mtp_drafts = mtp;
  eo.backend.n_threads = 2;
  if (tp > 1) {
    eo.tp = tp;
    return std::make_shared<dsrt::Engine>(m.model, m.vocab, eo);
  }
  return std::make_shared<dsrt::Engine>(m.model, m.vocab, dsrt::make_cpu_backend(eo.backend), eo);
}

int32_t V() { return int32_t(model().model->cfg.vocab_size); }

// Tokens that differ from prompt_tokens: a suffix of their own.
std::vector<int32_t> other_tokens(int32_t vocab, int n, int salt) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; i++) t.push_back(int32_t((int64_t(i) * 104729 + 31 * salt + 7) % vocab));
  return t;
}

std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t> &b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<float> last_logits(dsrt::Session &s) {
  auto v = s.logits_view();
  REQUIRE(v.rows >= 1);
  const float *row = v.data + (v.rows - 1) * V();
  return std::vector<float>(row, row + V());
}

// Evaluates what is pending, then decodes n tokens greedily (argmax), one eval each: the logits after every
// evaluation, in order.
std::vector<std::vector<float>> decode(dsrt::Session &s, int n) {
  std::vector<std::vector<float>> out;
  s.eval(nullptr);
  out.push_back(last_logits(s));
  for (int i = 0; i < n; i++) {
    const auto &l = out.back();
    const int32_t t = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    s.append(&t, 1);
    s.eval(nullptr);
    out.push_back(last_logits(s));
  }
  return out;
}

// The same prompt through a session of the engine without the cache.
std::vector<std::vector<float>> reference(dsrt::Engine &ref, const std::vector<int32_t> &prompt, int n) {
  auto s = ref.create_session(0, false, 1);
  s->append(prompt.data(), prompt.size());
  return decode(*s, n);
}

std::vector<std::vector<float>> run(dsrt::Engine &e, std::shared_ptr<dsrt::Session> &s,
                                    const std::vector<int32_t> &prompt, int n) {
  s = e.create_session(0, false, 1);
  s->append(prompt.data(), prompt.size());
  return decode(*s, n);
}

// Every page free once the sessions are gone and the cache is cleared.
void check_all_free(dsrt::Engine &e) {
  CHECK(e.stats().pages_used == 0);
  e.set_prefix_cache(0);
  const dsrt::EngineStats st = e.stats();
  CHECK(st.pages_cached == 0);
  CHECK(st.pages_used == 0);
  e.set_prefix_cache(-1);
}

}  // namespace

TEST_CASE("prefix index: a hash chain over full pages, verified by the ids and the parent") {
  dsrt::PrefixIndex ix;
  std::vector<int32_t> a = other_tokens(1000, 192, 1), b = a;
  b[100] = 999;  // differs in the second page
  dsrt::PrefixIndex::Walk w;
  CHECK(ix.insert(w, a.data(), 7));
  CHECK(ix.insert(w, a.data() + 64, 3));
  CHECK(ix.match(a.data(), 192, 3).pages == std::vector<int32_t>{7, 3});
  CHECK(ix.match(a.data(), 127, 3).pages == std::vector<int32_t>{7});  // full pages only
  CHECK(ix.match(b.data(), 192, 3).pages == std::vector<int32_t>{7});
  // A page with the same ids at another depth is another key: no match out of place.
  CHECK(ix.match(a.data() + 64, 64, 1).pages.empty());
  // The same content again is refused (its key is taken), and so is a page that is already an entry.
  dsrt::PrefixIndex::Walk w2;
  CHECK_FALSE(ix.insert(w2, a.data(), 9));
  ix.erase_page(7);  // the root goes: its child is unreachable
  CHECK(ix.match(a.data(), 192, 3).pages.empty());
  dsrt::PrefixIndex::Walk w3;
  CHECK(ix.insert(w3, a.data(), 9));  // a new root entry with a new serial: the orphan does not continue it
  CHECK(ix.match(a.data(), 192, 3).pages == std::vector<int32_t>{9});
  CHECK(ix.size() == 2);
}

TEST_CASE("prefix cache: the next turn of a conversation starts from the cached pages, bitwise the same") {
  auto e = make_engine(true), ref = make_engine(false);
  const auto p1 = prompt_tokens(V(), 150);
  std::shared_ptr<dsrt::Session> a, b;
  auto first = run(*e, a, p1, 20);  // 150 + 20 tokens: the last one evaluated too
  CHECK(first == reference(*ref, p1, 20));
  std::vector<int32_t> turn1(a->tokens_view().begin(), a->tokens_view().end());
  REQUIRE(turn1.size() == 170);
  CHECK(e->stats().pages_cached == 2);
  a.reset();  // the conversation's session is gone; its full pages stay cached
  CHECK(e->stats().pages_used == 0);
  CHECK(e->stats().pages_cached == 2);
  const auto p2 = cat(turn1, other_tokens(V(), 40, 2));
  auto second = run(*e, b, p2, 10);
  CHECK(b->stats().cached_tokens == 128);
  CHECK(second == reference(*ref, p2, 10));
  CHECK(e->stats().prefix_hits == 1);
  CHECK(e->stats().prefix_tokens == 128);
  b.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: a common system prompt ending mid-page shares its full pages only") {
  auto e = make_engine(true), ref = make_engine(false);
  const auto sys = prompt_tokens(V(), 100);
  const auto px = cat(sys, other_tokens(V(), 80, 1)), py = cat(sys, other_tokens(V(), 30, 2));
  std::shared_ptr<dsrt::Session> x, y;
  auto rx = run(*e, x, px, 5);
  auto ry = run(*e, y, py, 5);  // while x is alive: its pages are shared, not copied
  CHECK(x->stats().cached_tokens == 0);
  CHECK(y->stats().cached_tokens == 64);  // page 1 holds system tokens 64..99 and then x's own
  CHECK(rx == reference(*ref, px, 5));
  CHECK(ry == reference(*ref, py, 5));
  x.reset();
  y.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: a prompt that is exactly a cached prefix copies its last page and evaluates one token") {
  auto e = make_engine(true), ref = make_engine(false);
  const auto p = prompt_tokens(V(), 128);
  std::shared_ptr<dsrt::Session> a, b, c;
  auto ra = run(*e, a, p, 0);
  const int64_t used = e->stats().pages_used;
  auto rb = run(*e, b, p, 3);
  CHECK(b->stats().cached_tokens == 127);
  CHECK(ra == reference(*ref, p, 0));
  CHECK(rb == reference(*ref, p, 3));
  CHECK(e->stats().pages_used == used + 2);  // page 0 shared, page 1 copied (b writes position 127), page 2 new
  // A prompt shorter than a page takes nothing; one within the cached pages takes its full pages.
  const std::vector<int32_t> p100(p.begin(), p.begin() + 100);
  auto rc = run(*e, c, p100, 2);
  CHECK(c->stats().cached_tokens == 64);
  CHECK(rc == reference(*ref, p100, 2));
  a.reset();
  b.reset();
  c.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: eviction under a small pool never takes held or reserved pages") {
  auto e = make_engine(true, 256, 64), ref = make_engine(false, 256, 64);  // 4 pages
  const auto p = prompt_tokens(V(), 192);
  std::shared_ptr<dsrt::Session> a, b;
  auto ra = run(*e, a, p, 0);
  a.reset();
  CHECK(e->stats().pages_cached == 3);
  CHECK(e->stats().pages_used == 0);
  // Another prompt of 4 pages: the cached ones are evicted for it.
  const auto q = other_tokens(V(), 250, 3);
  auto rb = run(*e, b, q, 0);
  CHECK(rb == reference(*ref, q, 0));
  CHECK(e->stats().pages_used == 4);
  CHECK(e->stats().pages_cached <= 4);
  b.reset();

  // A turn's reservation holds against a newcomer that would take idle cached pages.
  e->set_prefix_cache(0);
  e->set_prefix_cache(-1);
  auto w = e->create_session(0, false, 1);
  const auto p128(prompt_tokens(V(), 128));
  w->append(p128.data(), p128.size());
  w->eval(nullptr);
  w.reset();  // 2 idle cached pages, 2 free
  auto g = e->create_session(0, false, 2);
  const auto pg = other_tokens(V(), 10, 4);
  g->append(pg.data(), pg.size());
  dsrt::GenParams gp;
  gp.sampling.temperature = 0;
  gp.max_new_tokens = 150;  // ceil(160 / 64) = 3 pages: 1 taken, 2 reserved
  gp.ignore_eos = true;
  g->start(gp);
  REQUIRE_FALSE(g->next().done);
  auto d = e->create_session(0, false, 3);
  const auto pd = cat(p128, other_tokens(V(), 60, 5));  // wants both cached pages and a third one
  d->append(pd.data(), pd.size());
  dsrt_status code = DSRT_OK;
  try {
    d->eval(nullptr);
  } catch (const dsrt::Error &err) {
    code = err.code();
  }
  CHECK(code == DSRT_ERR_CONTEXT_FULL);
  CHECK(d->stats().n_pages == 0);  // rolled back whole, cached pages included
  int n = 1;
  for (;;) {
    dsrt::Event ev = g->next();
    if (ev.done) {
      CHECK(ev.finish == dsrt::Finish::Length);
      break;
    }
    n++;
  }
  CHECK(n == 150);  // the reservation held
  g.reset();
  d->append(pd.data(), pd.size());
  auto rd = decode(*d, 2);
  CHECK(rd == reference(*ref, pd, 2));
  d.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: sessions sharing pages decode concurrently, each as if alone") {
  auto e = make_engine(true), ref = make_engine(false);
  const auto sys = prompt_tokens(V(), 200);
  std::shared_ptr<dsrt::Session> warm;
  run(*e, warm, sys, 0);  // publishes 3 pages
  const int k = 4;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < k; i++) prompts.push_back(cat(sys, other_tokens(V(), 20 + 30 * i, 10 + i)));
  std::vector<std::vector<std::vector<float>>> got(k);
  std::vector<std::shared_ptr<dsrt::Session>> ss(k);
  std::vector<std::thread> ts;
  for (int i = 0; i < k; i++)
    ts.emplace_back([&, i] {
      ss[size_t(i)] = e->create_session(0, false, 1);
      ss[size_t(i)]->append(prompts[size_t(i)].data(), prompts[size_t(i)].size());
      got[size_t(i)] = decode(*ss[size_t(i)], 12);
    });
  for (auto &t : ts) t.join();
  for (int i = 0; i < k; i++) {
    CHECK(ss[size_t(i)]->stats().cached_tokens == 192);
    CHECK(got[size_t(i)] == reference(*ref, prompts[size_t(i)], 12));
  }
  CHECK(e->stats().max_batch_seqs >= 1);
  warm.reset();
  ss.clear();
  check_all_free(*e);
}

TEST_CASE("prefix cache: a prefill cancelled part-way keeps its cached and evaluated tokens and resumes exactly") {
  auto e = make_engine(true, 4096, 32), ref = make_engine(false, 4096, 32);
  const auto base = prompt_tokens(V(), 256);
  std::shared_ptr<dsrt::Session> warm, s;
  run(*e, warm, base, 0);
  const auto p = cat(std::vector<int32_t>(base.begin(), base.begin() + 200), other_tokens(V(), 1500, 6));
  s = e->create_session(0, false, 1);
  s->append(p.data(), p.size());
  std::atomic<int> cancel{0};
  const uint64_t before = e->steps_done();
  std::thread watcher([&] {
    while (e->steps_done() < before + 3) std::this_thread::sleep_for(std::chrono::microseconds(200));
    cancel = 1;
  });
  dsrt_status code = DSRT_OK;
  try {
    s->eval(&cancel);
  } catch (const dsrt::Error &err) {
    code = err.code();
  }
  watcher.join();
  CHECK(code == DSRT_ERR_CANCELLED);
  const auto st = s->stats();
  CHECK(st.cached_tokens == 192);
  CHECK(st.n_tokens >= 192);
  CHECK(st.n_tokens < int64_t(p.size()));
  CHECK(st.n_tokens + st.n_pending == int64_t(p.size()));
  auto got = decode(*s, 4);
  CHECK(got == reference(*ref, p, 4));
  warm.reset();
  s.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: state save/restore and forks of sessions on shared pages") {
  auto e = make_engine(true), ref = make_engine(false);
  const auto sys = prompt_tokens(V(), 140);
  const auto p = cat(sys, other_tokens(V(), 50, 7));
  std::shared_ptr<dsrt::Session> warm, a;
  run(*e, warm, sys, 0);
  a = e->create_session(0, false, 1);
  a->append(p.data(), p.size());
  a->eval(nullptr);
  CHECK(a->stats().cached_tokens == 128);
  const auto expect = reference(*ref, p, 6);
  CHECK(last_logits(*a) == expect[0]);

  // The saved state reads the shared pages; it loads into pages of the new session's own.
  const std::string blob = a->save_state();
  auto r = e->create_session(0, false, 1);
  r->load_state(blob);
  CHECK(decode(*r, 6) == expect);

  // A fork shares every page (no copy now); each of the two copies the page it writes into first.
  const int64_t used = e->stats().pages_used;
  auto f = a->fork();
  CHECK(e->stats().pages_used == used);
  CHECK(f->stats().n_pages == a->stats().n_pages);
  std::vector<std::vector<float>> ga, gf;
  std::thread ta([&] { ga = decode(*a, 6); });
  std::thread tf([&] { gf = decode(*f, 6); });
  ta.join();
  tf.join();
  CHECK(ga == expect);
  CHECK(gf == expect);
  // A fork that goes another way.
  auto f2 = a->fork();
  f2->truncate(130);  // into a page a holds: the next write copies it
  const auto tail = other_tokens(V(), 20, 8);
  f2->append(tail.data(), tail.size());
  const auto p2 = cat(std::vector<int32_t>(p.begin(), p.begin() + 130), tail);
  CHECK(decode(*f2, 3) == reference(*ref, p2, 3));
  CHECK(decode(*a, 1).front() == expect.back());  // a is untouched by f2
  warm.reset();
  a.reset();
  r.reset();
  f.reset();
  f2.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: off, limited, cleared") {
  auto e = make_engine(false);
  const auto p = prompt_tokens(V(), 200);
  std::shared_ptr<dsrt::Session> a, b;
  run(*e, a, p, 0);
  run(*e, b, p, 0);
  CHECK(b->stats().cached_tokens == 0);
  CHECK(e->stats().pages_cached == 0);
  a.reset();
  b.reset();
  e->set_prefix_cache(2);
  run(*e, a, p, 0);
  CHECK(e->stats().pages_cached == 2);  // the limit, though 3 pages are full
  run(*e, b, p, 0);
  CHECK(b->stats().cached_tokens == 128);
  a.reset();
  b.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: tensor-parallel ranks copy pages on every rank") {
  auto e = make_engine(true, 4096, 512, 2), ref = make_engine(false, 4096, 512, 2);
  const auto p = prompt_tokens(V(), 128);
  std::shared_ptr<dsrt::Session> a, b;
  run(*e, a, p, 0);
  auto rb = run(*e, b, p, 4);  // exactly the cached prefix: page 1 copied on both ranks
  CHECK(b->stats().cached_tokens == 127);
  CHECK(rb == reference(*ref, p, 4));
  a.reset();
  b.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: with MTP drafts the tokens are those of plain decoding") {
  const dsrt::LoadedModel &m = [] () -> const dsrt::LoadedModel & {
    static dsrt::LoadedModel l = dsrt::load_model(tiny("v3-mini"), {});
    return l;
  }();
  const int32_t Vm = int32_t(m.model->cfg.vocab_size);
  auto e = make_engine(true, 4096, 512, 1, m, 2), ref = make_engine(false, 4096, 512, 1, m, 0);
  auto gen = [&](dsrt::Engine &eng, const std::vector<int32_t> &prompt, std::shared_ptr<dsrt::Session> &s) {
    s = eng.create_session(0, false, 1);
    s->append(prompt.data(), prompt.size());
    dsrt::GenParams gp;
    gp.sampling.temperature = 0;
    gp.max_new_tokens = 70;
    gp.ignore_eos = true;
    s->start(gp);
    std::vector<int32_t> out;
    for (;;) {
      dsrt::Event ev = s->next();
      if (ev.token >= 0) out.push_back(ev.token);
      if (ev.done) break;
    }
    return out;
  };
  const auto sys = prompt_tokens(Vm, 130);
  const auto p1 = cat(sys, other_tokens(Vm, 10, 1)), p2 = cat(sys, other_tokens(Vm, 25, 2));
  std::shared_ptr<dsrt::Session> a, b, ra, rb;
  const auto ta = gen(*e, p1, a);
  const auto tb = gen(*e, p2, b);
  CHECK(b->stats().cached_tokens == 128);
  CHECK(ta == gen(*ref, p1, ra));
  CHECK(tb == gen(*ref, p2, rb));
  a.reset();
  b.reset();
  check_all_free(*e);
}

TEST_CASE("prefix cache: C API (limit, stats, a session's cached tokens, struct size)") {
  Model m(tiny("no-qlora"));
  Engine e(m, DSRT_ATTENTION_AUTO);
  CHECK(dsrt_struct_size(DSRT_STRUCT_PREFIX_CACHE_STATS) == sizeof(dsrt_prefix_cache_stats));
  dsrt_prefix_cache_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_engine_prefix_cache_stats(e.e, &st));
  CHECK(st.max_pages == -1);  // on by default, the whole pool
  CHECK(st.pages == 0);
  CHECK(dsrt_engine_set_prefix_cache(e.e, -2) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_engine_set_prefix_cache(nullptr, 1) == DSRT_ERR_INVALID_ARGUMENT);
  int32_t n = -1;
  CHECK(dsrt_session_cached_tokens(nullptr, &n) == DSRT_ERR_INVALID_ARGUMENT);
  const auto p = prompt_tokens(m.vocab(), 130);
  std::vector<float> la, lb;
  {
    Session a(e);
    a.append(p);
    a.eval();
    CHECK_OK(dsrt_session_cached_tokens(a.s, &n));
    CHECK(n == 0);
    la = a.logits();
  }
  Session b(e);
  b.append(p);
  b.eval();
  CHECK_OK(dsrt_session_cached_tokens(b.s, &n));
  CHECK(n == 127);  // 2 full pages, less the 3 tokens the automatic attention form evaluates again
  lb = b.logits();
  CHECK(la == lb);
  CHECK_OK(dsrt_engine_prefix_cache_stats(e.e, &st));
  CHECK(st.hits == 1);
  CHECK(st.cached_tokens == 127);
  CHECK(st.pages == 2);
  CHECK_OK(dsrt_engine_set_prefix_cache(e.e, 0));
  CHECK_OK(dsrt_engine_prefix_cache_stats(e.e, &st));
  CHECK(st.max_pages == 0);
  CHECK(st.pages == 0);
}
