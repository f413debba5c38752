// Speculative decoding with the MTP module: whatever the drafts are (the module's own, always right, always
// wrong), a turn emits exactly the tokens of plain decoding, greedy or sampled with a seed; accepted drafts
// save forward steps; the session stays consistent across turns, truncation and forks.
#include <doctest/doctest.h>

#include <functional>
#include <map>

#include "backend/backend.h"
#include "engine/engine.h"
#include "helpers.h"
#include "model/model.h"

namespace {

using Override = std::function<int32_t(const std::vector<int32_t> &, int32_t)>;

struct TurnResult {
  std::vector<int32_t> emitted, cached;  // the turn's tokens; the session's sequence afterwards
  dsrt::Finish finish = dsrt::Finish::None;
  dsrt::SessionStats stats;
};

struct Setup {
  std::shared_ptr<dsrt::Engine> engine;
  explicit Setup(const std::shared_ptr<dsrt::Model> &m, bool mtp, Override ov = {},
                 dsrt::AttentionPolicy att = dsrt::AttentionPolicy::Absorbed) {
    dsrt::EngineOptions eo;
    eo.max_tokens = 1024;
    eo.attention = att;
    eo.mtp_drafts = mtp ? 1 : 0;
    eo.mtp_draft_override = std::move(ov);
    dsrt::BackendOptions bo;
    bo.n_threads = 2;
    engine = std::make_shared<dsrt::Engine>(m, dsrt::make_cpu_backend(bo), eo);
  }
};

dsrt::GenParams params(float temperature, int n, uint64_t seed) {
  dsrt::GenParams g;
  g.sampling.temperature = temperature;
  g.sampling.top_p = temperature > 0 ? 0.95f : 1.0f;
  g.max_new_tokens = n;
  g.ignore_eos = true;
  g.has_seed = true;
  g.seed = seed;
  return g;
}

TurnResult turn(dsrt::Session &s, const dsrt::GenParams &g) {
  TurnResult r;
  s.start(g);
  for (;;) {
    dsrt::Event ev = s.next();
    if (ev.token >= 0) r.emitted.push_back(ev.token);
    if (ev.done) {
      r.finish = ev.finish;
      break;
    }
  }
  r.cached = s.tokens();
  r.stats = s.stats();
  return r;
}

}  // namespace

TEST_CASE("MTP drafts (the module's, always right, always wrong) never change a turn's tokens, greedy or sampled") {
  for (const std::string &preset : {std::string("v3-mini"), std::string("partial-yarn")}) {
    CAPTURE(preset);
    auto model = dsrt::Model::load(testing::tiny(preset), {});
    REQUIRE(model->w.mtp.size() == 1);
    const int32_t V = int32_t(model->cfg.vocab_size);
    const std::vector<int32_t> prompt = testing::prompt_tokens(V, 21);
    for (float temperature : {0.0f, 0.9f}) {
      CAPTURE(temperature);
      const int n = 40;
      Setup plain(model, false);
      auto ps = plain.engine->create_session(0, false, 7);
      ps->append(prompt.data(), prompt.size());
      const TurnResult want = turn(*ps, params(temperature, n, 11));
      REQUIRE(want.emitted.size() == size_t(n));
      std::vector<int32_t> full = prompt;
      full.insert(full.end(), want.emitted.begin(), want.emitted.end());
      const Override right = [&](const std::vector<int32_t> &seq, int32_t) {
        return seq.size() < full.size() ? full[seq.size()] : 0;
      };
      const Override wrong = [&](const std::vector<int32_t> &seq, int32_t) {
        return seq.size() < full.size() ? (full[seq.size()] + 1) % V : 0;
      };
      for (int mode = 0; mode < 3; mode++) {
        CAPTURE(mode);  // 0: the module's drafts, 1: always right, 2: always wrong
        Setup spec(model, true, mode == 0 ? Override{} : mode == 1 ? right : wrong);
        auto s = spec.engine->create_session(0, false, 7);
        s->append(prompt.data(), prompt.size());
        const TurnResult got = turn(*s, params(temperature, n, 11));
        CHECK(got.emitted == want.emitted);
        CHECK(got.finish == want.finish);
        const auto es = spec.engine->stats();
        CHECK(got.stats.mtp_drafted > 0);
        CHECK(uint64_t(got.stats.mtp_drafted) == es.mtp_drafted);
        CHECK(uint64_t(got.stats.mtp_accepted) == es.mtp_accepted);
        if (mode == 1) {
          CHECK(got.stats.mtp_accepted == got.stats.mtp_drafted);
          // the prompt step, then two tokens per step
          CHECK(es.n_steps <= 1 + uint64_t(n + 1) / 2 + 1);
        }
        if (mode == 2) CHECK(got.stats.mtp_accepted == 0);
        // The cache holds the same sequence as plain decoding's (the last token may still be pending there).
        std::vector<int32_t> cached = got.cached;
        cached.resize(std::min(cached.size(), want.cached.size()));
        CHECK(cached == std::vector<int32_t>(want.cached.begin(), want.cached.begin() + cached.size()));
        CHECK(got.cached.size() + 1 >= prompt.size() + size_t(n));
      }
    }
  }
}

TEST_CASE("MTP: a second turn, a truncation and a fork continue exactly like plain decoding") {
  auto model = dsrt::Model::load(testing::tiny("v3-mini"), {});
  const int32_t V = int32_t(model->cfg.vocab_size);
  const std::vector<int32_t> prompt = testing::prompt_tokens(V, 30), more = testing::prompt_tokens(V, 9);
  auto script = [&](bool mtp) {
    Setup st(model, mtp);
    auto s = st.engine->create_session(0, false, 3);
    std::vector<std::vector<int32_t>> out;
    s->append(prompt.data(), prompt.size());
    out.push_back(turn(*s, params(0, 17, 1)).emitted);
    s->append(more.data(), more.size());
    out.push_back(turn(*s, params(0.8f, 23, 2)).emitted);
    s->truncate(prompt.size() + 5);
    s->append(more.data(), 4);
    out.push_back(turn(*s, params(0, 19, 3)).emitted);
    auto f = s->fork();
    out.push_back(turn(*f, params(0, 15, 4)).emitted);
    out.push_back(turn(*s, params(0.7f, 15, 5)).emitted);
    return out;
  };
  const auto want = script(false), got = script(true);
  REQUIRE(want.size() == got.size());
  for (size_t k = 0; k < want.size(); k++) {
    CAPTURE(k);
    CHECK(got[k] == want[k]);
  }
}

TEST_CASE("MTP: sessions batched together each emit what they emit alone") {
  auto model = dsrt::Model::load(testing::tiny("v3-mini"), {});
  const int32_t V = int32_t(model->cfg.vocab_size);
  std::vector<std::vector<int32_t>> prompts = {testing::prompt_tokens(V, 12), testing::prompt_tokens(V, 50),
                                               {1, 2, 3}};
  std::vector<std::vector<int32_t>> alone;
  for (auto &p : prompts) {
    Setup st(model, false);
    auto s = st.engine->create_session(0, false, 1);
    s->append(p.data(), p.size());
    alone.push_back(turn(*s, params(0, 25, 1)).emitted);
  }
  Setup st(model, true);
  std::vector<std::shared_ptr<dsrt::Session>> ss;
  for (auto &p : prompts) {
    ss.push_back(st.engine->create_session(0, false, 1));
    ss.back()->append(p.data(), p.size());
    ss.back()->start(params(0, 25, 1));
  }
  // One thread pulls the sessions in turn: every step carries the others' pending tokens and drafts.
  std::vector<std::vector<int32_t>> got(ss.size());
  std::vector<bool> done(ss.size(), false);
  for (size_t live = ss.size(); live > 0;) {
    for (size_t k = 0; k < ss.size(); k++) {
      if (done[k]) continue;
      dsrt::Event ev = ss[k]->next();
      if (ev.token >= 0) got[k].push_back(ev.token);
      if (ev.done) {
        done[k] = true;
        live--;
      }
    }
  }
  for (size_t k = 0; k < ss.size(); k++) {
    CAPTURE(k);
    CHECK(got[k] == alone[k]);
  }
  CHECK(st.engine->stats().max_batch_seqs >= 2);
  CHECK(st.engine->stats().mtp_drafted > 0);
}

TEST_CASE("MTP through the C API: engine option, per-turn and engine counters, the same text") {
  testing::Model m(testing::tiny("v3-mini"));
  std::string texts[2];
  for (int mtp = 0; mtp < 2; mtp++) {
    dsrt_engine_params ep;
    dsrt_engine_params_init(&ep, sizeof ep);
    CHECK(ep.mtp_drafts == 0);
    ep.mtp_drafts = mtp;
    ep.attention = DSRT_ATTENTION_ABSORBED;
    dsrt_engine *e = nullptr;
    CHECK_OK(dsrt_engine_create(m.m, &ep, &e));
    dsrt_session_params sp;
    dsrt_session_params_init(&sp, sizeof sp);
    dsrt_session *s = nullptr;
    CHECK_OK(dsrt_session_create(e, &sp, &s));
    CHECK_OK(dsrt_session_append_text(s, "Hello world", 11, DSRT_TOKENIZE_ADD_SPECIAL));
    auto p = testing::greedy_params(m, 30);
    texts[mtp] = testing::pull(s, &p).text;
    dsrt_session_stats ss;
    ss.struct_size = sizeof ss;
    CHECK_OK(dsrt_session_stats_get(s, &ss));
    dsrt_engine_stats es;
    es.struct_size = sizeof es;
    CHECK_OK(dsrt_engine_stats_get(e, &es));
    if (mtp) {
      CHECK(ss.mtp_drafted > 0);
      CHECK(ss.mtp_accepted <= ss.mtp_drafted);
      CHECK(es.mtp_drafted == uint64_t(ss.mtp_drafted));
    } else {
      CHECK(ss.mtp_drafted == 0);
      CHECK(es.mtp_drafted == 0);
    }
    dsrt_session_free(s);
    dsrt_engine_free(e);
  }
  CHECK(texts[0] == texts[1]);
  CHECK(!texts[0].empty());
  dsrt_engine_params ep;
  dsrt_engine_params_init(&ep, sizeof ep);
  ep.mtp_drafts = 2;
  dsrt_engine *e = nullptr;
  CHECK(dsrt_engine_create(m.m, &ep, &e) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(e == nullptr);
}
