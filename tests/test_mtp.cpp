// The MTP module (spec §6) against an fp64 evaluation of its formula, and its cache across steps.
// Speculative decoding with it: whatever the drafts are (the module's own, always right, always
// wrong), a turn emits exactly the tokens of plain decoding, greedy or sampled with a seed; accepted drafts
// save forward steps; the session stays consistent across turns, truncation and forks.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <thread>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/load.h"
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
  explicit Setup(const dsrt::LoadedModel &m, int drafts, Override ov = {},
                 dsrt::AttentionPolicy att = dsrt::AttentionPolicy::Absorbed) {
    dsrt::EngineOptions eo;
    eo.max_tokens = 1024;
    eo.attention = att;
    eo.mtp_drafts = drafts;
    eo.mtp_draft_override = std::move(ov);
    dsrt::BackendOptions bo;
    bo.n_threads = 2;
    engine = std::make_shared<dsrt::Engine>(m.model, m.vocab, dsrt::make_cpu_backend(bo), eo);
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
  const auto view = s.tokens_view();
  r.cached.assign(view.begin(), view.end());
  r.stats = s.stats();
  return r;
}

// Zeroes, in every shard of `dir`, the tensors whose names start with `prefix` and end with one of `suffixes`.
void zero_tensors(const std::string &dir, const std::string &prefix, const std::vector<std::string> &suffixes) {
  for (const auto &f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() != ".safetensors") continue;
    std::fstream io(f.path(), std::ios::in | std::ios::out | std::ios::binary);
    uint64_t n = 0;
    io.read(reinterpret_cast<char *>(&n), 8);
    std::string header(n, '\0');
    io.read(header.data(), std::streamsize(n));
    const nlohmann::json index = nlohmann::json::parse(header);  // kept alive: items() refers to it
    for (auto &[name, t] : index.items()) {
      if (name.rfind(prefix, 0) != 0) continue;
      for (const std::string &suf : suffixes) {
        if (name.size() < suf.size() || name.compare(name.size() - suf.size(), suf.size(), suf) != 0) continue;
        const uint64_t b = t["data_offsets"][0], e = t["data_offsets"][1];
        std::string zeros(e - b, '\0');
        io.seekp(std::streamoff(8 + n + b));
        io.write(zeros.data(), std::streamsize(zeros.size()));
      }
    }
  }
}

std::vector<double> rms_norm64(const std::vector<double> &x, const dsrt::Weight &w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); i++) y[i] = x[i] * r * double(w.at(int64_t(i)));
  return y;
}

std::vector<double> matvec64(const dsrt::Weight &w, const std::vector<double> &x) {
  std::vector<double> y(size_t(w.rows));
  std::vector<float> row(size_t(w.cols));
  for (int64_t r = 0; r < w.rows; r++) {
    w.dequant_row(r, 0, w.cols, row.data());
    double acc = 0;
    for (int64_t c = 0; c < w.cols; c++) acc += double(row[size_t(c)]) * x[size_t(c)];
    y[size_t(r)] = acc;
  }
  return y;
}

// The main model's normed final hidden states of `toks` (one prefill), and the MTP logits of the pairs
// (hidden[j], toks[j+1]) for j < toks.size()-1, either in one batch or one pair per step.
struct MtpRun {
  std::vector<float> hidden, logits;
};
MtpRun run_mtp(const dsrt::Model &m, const std::vector<int32_t> &toks, bool one_pair_per_step) {
  const int64_t P = int64_t(toks.size()), H = m.cfg.hidden_size, V = m.cfg.vocab_size;
  dsrt::BackendOptions bo;
  bo.n_threads = 2;
  auto be = dsrt::make_cpu_backend(bo);
  dsrt::KvCacheSpec spec;
  spec.n_layers = m.cfg.num_hidden_layers + 1;
  spec.width = m.cfg.kv_cache_width();
  spec.max_pages = (P + dsrt::kPageTokens - 1) / dsrt::kPageTokens;
  be->kv_init(spec);
  std::vector<int32_t> pages(size_t(spec.max_pages));
  for (size_t i = 0; i < pages.size(); i++) pages[i] = int32_t(i);
  dsrt::Batch b;
  b.tokens = toks;
  for (int64_t i = 0; i < P; i++) b.positions.push_back(int32_t(i));
  b.seqs.push_back({0, int32_t(P), 0, 0, int32_t(pages.size())});
  b.pages = pages;
  dsrt::Tensor hidden;
  dsrt::forward(m, *be, b, {}, dsrt::AttentionPolicy::Auto, nullptr, &hidden);
  MtpRun r;
  r.hidden.resize(size_t(P * H));
  be->to_host(hidden, r.hidden.data());
  r.logits.resize(size_t((P - 1) * V));
  const int64_t chunk = one_pair_per_step ? 1 : P - 1;
  for (int64_t j0 = 0; j0 < P - 1; j0 += chunk) {
    dsrt::Batch mb;
    std::vector<int32_t> rows;
    for (int64_t j = j0; j < j0 + chunk; j++) {
      mb.tokens.push_back(toks[size_t(j + 1)]);
      mb.positions.push_back(int32_t(j));
      rows.push_back(int32_t(j - j0));
    }
    mb.seqs.push_back({0, int32_t(chunk), int32_t(j0), 0, int32_t(pages.size())});
    mb.pages = pages;
    be->begin_step();
    dsrt::Tensor h = be->alloc(chunk, H);
    be->from_host(h, r.hidden.data() + j0 * H);
    dsrt::mtp_forward(m, *be, mb, h, rows, dsrt::AttentionPolicy::Auto, r.logits.data() + j0 * V);
  }
  return r;
}

}  // namespace

TEST_CASE("the MTP module's math: with its decoder layer zeroed, logits equal an fp64 evaluation of spec §6") {
  // o_proj and every down_proj of the MTP layer zeroed: its decoder layer adds nothing to the residual, so
  // logits = head(head_norm(eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]))), computed here in fp64 from the
  // checkpoint's tensors. This pins the concatenation order, the norms, the projection and the head.
  const std::string src = testing::tiny("v3-mini"), dir = testing::fresh_dir("mtp-identity").string();
  for (const auto &f : std::filesystem::directory_iterator(src))
    std::filesystem::copy_file(f.path(), dir + "/" + f.path().filename().string());
  auto probe = dsrt::Model::load(src, {});
  const int64_t L = probe->cfg.num_hidden_layers;
  zero_tensors(dir, "model.layers." + std::to_string(L) + ".", {"o_proj.weight", "down_proj.weight"});
  auto model = dsrt::Model::load(dir, {});
  const dsrt::LayerWeights &M = model->w.mtp.at(0);
  const int64_t H = model->cfg.hidden_size, V = model->cfg.vocab_size;
  const double eps = model->cfg.rms_norm_eps;
  const auto toks = testing::prompt_tokens(int32_t(V), 9);
  const MtpRun run = run_mtp(*model, toks, false);
  double worst = 0;
  int same_argmax = 0;
  for (size_t j = 0; j + 1 < toks.size(); j++) {
    std::vector<double> e(static_cast<size_t>(H)), h(static_cast<size_t>(H));
    std::vector<float> row(static_cast<size_t>(H));
    M.mtp_embed.dequant_row(toks[j + 1], 0, H, row.data());
    for (int64_t i = 0; i < H; i++) e[size_t(i)] = row[size_t(i)], h[size_t(i)] = run.hidden[j * size_t(H) + size_t(i)];
    std::vector<double> cat = rms_norm64(e, M.enorm, eps), hn = rms_norm64(h, M.hnorm, eps);
    cat.insert(cat.end(), hn.begin(), hn.end());  // embedding first, hidden second
    const std::vector<double> want = matvec64(M.head, rms_norm64(matvec64(M.eh_proj, cat), M.head_norm, eps));
    const float *got = run.logits.data() + j * size_t(V);
    worst = std::max(worst, testing::rel_l2(got, want.data(), size_t(V)));
    same_argmax += std::max_element(got, got + V) - got == std::max_element(want.begin(), want.end()) - want.begin();
  }
  CHECK(worst < 1e-5);
  CHECK(same_argmax == int(toks.size()) - 1);
}

TEST_CASE("the MTP layer's own cache: pairs run one per step give the logits of one batch") {
  auto model = dsrt::Model::load(testing::tiny("v3-mini"), {});
  const auto toks = testing::prompt_tokens(int32_t(model->cfg.vocab_size), 70);  // across a page boundary
  const MtpRun batch = run_mtp(*model, toks, false), steps = run_mtp(*model, toks, true);
  const size_t V = size_t(model->cfg.vocab_size);
  double worst = 0;
  for (size_t j = 0; j + 1 < toks.size(); j++)
    worst = std::max(worst, testing::rel_l2(steps.logits.data() + j * V, batch.logits.data() + j * V, V));
  CHECK(worst < 1e-5);
}

TEST_CASE("MTP drafts (the module's, always right, always wrong) never change a turn's tokens, greedy or sampled") {
  for (const std::string &preset : {std::string("v3-mini"), std::string("partial-yarn")}) {
    CAPTURE(preset);
    const dsrt::LoadedModel loaded = dsrt::load_model(testing::tiny(preset), {});
    const auto &model = loaded.model;
    REQUIRE(model->w.mtp.size() == 1);
    const int32_t V = int32_t(model->cfg.vocab_size);
    const std::vector<int32_t> prompt = testing::prompt_tokens(V, 21);
    for (float temperature : {0.0f, 0.9f}) {
      CAPTURE(temperature);
      const int n = 40;
      auto plain_turn = [&](dsrt::AttentionPolicy att) {
        Setup plain(loaded, 0, {}, att);
        auto ps = plain.engine->create_session(0, false, 7);
        ps->append(prompt.data(), prompt.size());
        return turn(*ps, params(temperature, n, 11));
      };
      const TurnResult want_absorbed = plain_turn(dsrt::AttentionPolicy::Absorbed);
      const TurnResult want_auto = plain_turn(dsrt::AttentionPolicy::Auto);
      REQUIRE(want_absorbed.emitted.size() == size_t(n));
      REQUIRE(want_auto.emitted.size() == size_t(n));
      std::vector<int32_t> full;  // the sequence the drafts are right or wrong about
      const Override right = [&](const std::vector<int32_t> &seq, int32_t) {
        return seq.size() < full.size() ? full[seq.size()] : 0;
      };
      const Override wrong = [&](const std::vector<int32_t> &seq, int32_t) {
        return seq.size() < full.size() ? (full[seq.size()] + 1) % V : 0;
      };
      const Override some = [&](const std::vector<int32_t> &seq, int32_t) {  // wrong at every third position
        return seq.size() % 3 ? right(seq, 0) : wrong(seq, 0);
      };
      for (int drafts : {1, 3})
      for (int mode = 0; mode < 5; mode++) {
        CAPTURE(drafts);
        CAPTURE(mode);  // 0: the module's, 1: always right, 2: always wrong, 3: 1 under the default policy, 4: some
        const TurnResult &want = mode == 3 ? want_auto : want_absorbed;
        full = prompt;
        full.insert(full.end(), want.emitted.begin(), want.emitted.end());
        Setup spec(loaded, drafts, mode == 0 ? Override{} : mode == 2 ? wrong : mode == 4 ? some : right,
                   mode == 3 ? dsrt::AttentionPolicy::Auto : dsrt::AttentionPolicy::Absorbed);
        auto s = spec.engine->create_session(0, false, 7);
        s->append(prompt.data(), prompt.size());
        const TurnResult got = turn(*s, params(temperature, n, 11));
        CHECK(got.emitted == want.emitted);
        CHECK(got.finish == want.finish);
        const auto es = spec.engine->stats();
        CHECK(got.stats.mtp_drafted > 0);
        CHECK(uint64_t(got.stats.mtp_drafted) == es.mtp_drafted);
        CHECK(uint64_t(got.stats.mtp_accepted) == es.mtp_accepted);
        if (mode == 1 || mode == 3) {
          CHECK(got.stats.mtp_accepted == got.stats.mtp_drafted);
          // the prompt step, then drafts + 1 tokens per step
          CHECK(es.n_steps <= 1 + uint64_t(n + drafts) / uint64_t(drafts + 1) + 1);
        }
        if (mode == 2) CHECK(got.stats.mtp_accepted == 0);
        if (mode == 4) CHECK((got.stats.mtp_accepted > 0 && got.stats.mtp_accepted < got.stats.mtp_drafted));
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
  const dsrt::LoadedModel loaded = dsrt::load_model(testing::tiny("v3-mini"), {});
  const auto &model = loaded.model;
  const int32_t V = int32_t(model->cfg.vocab_size);
  const std::vector<int32_t> prompt = testing::prompt_tokens(V, 30), more = testing::prompt_tokens(V, 9);
  auto script = [&](int drafts) {
    Setup st(loaded, drafts);
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
  const auto want = script(0);
  for (int drafts : {1, 2, 4}) {
    CAPTURE(drafts);
    const auto got = script(drafts);
    REQUIRE(want.size() == got.size());
    for (size_t k = 0; k < want.size(); k++) {
      CAPTURE(k);
      CHECK(got[k] == want[k]);
    }
  }
}

TEST_CASE("MTP: sessions batched together each emit what they emit alone") {
  const dsrt::LoadedModel loaded = dsrt::load_model(testing::tiny("v3-mini"), {});
  const auto &model = loaded.model;
  const int32_t V = int32_t(model->cfg.vocab_size);
  std::vector<std::vector<int32_t>> prompts = {testing::prompt_tokens(V, 12), testing::prompt_tokens(V, 50),
                                               {1, 2, 3}};
  std::vector<std::vector<int32_t>> alone;
  for (auto &p : prompts) {
    Setup st(loaded, 0);
    auto s = st.engine->create_session(0, false, 1);
    s->append(p.data(), p.size());
    alone.push_back(turn(*s, params(0, 25, 1)).emitted);
  }
  // Drafts from the module (rarely right on random weights), and from an oracle that knows each session's
  // plain-decoding continuation except at every fourth position.
  std::vector<std::vector<int32_t>> full;
  for (size_t k = 0; k < prompts.size(); k++) {
    full.push_back(prompts[k]);
    full.back().insert(full.back().end(), alone[k].begin(), alone[k].end());
  }
  const Override oracle = [&](const std::vector<int32_t> &seq, int32_t d) {
    for (const auto &f : full)
      if (seq.size() < f.size() && std::equal(seq.begin(), seq.end(), f.begin()))
        return seq.size() % 4 ? f[seq.size()] : (f[seq.size()] + 1) % V;
    return d;
  };
  for (int with_oracle = 0; with_oracle < 2; with_oracle++) {
    CAPTURE(with_oracle);
    Setup st(loaded, 2, with_oracle ? oracle : Override{});
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
    const auto es = st.engine->stats();
    CHECK(es.max_batch_seqs >= 2);
    CHECK(es.mtp_drafted > 0);
    if (with_oracle) CHECK((es.mtp_accepted > 0 && es.mtp_accepted < es.mtp_drafted));
  }
}

TEST_CASE("MTP: mid-turn views hide undecided drafts; the logits are those of the last visible token") {
  const dsrt::LoadedModel loaded = dsrt::load_model(testing::tiny("v3-mini"), {});
  const auto &model = loaded.model;
  const int32_t V = int32_t(model->cfg.vocab_size);
  const std::vector<int32_t> prompt = testing::prompt_tokens(V, 15);
  Setup plain(loaded, 0);
  auto ps = plain.engine->create_session(0, false, 1);
  ps->append(prompt.data(), prompt.size());
  const TurnResult want = turn(*ps, params(0, 30, 1));
  std::vector<int32_t> full = prompt;
  full.insert(full.end(), want.emitted.begin(), want.emitted.end());
  const Override some = [&](const std::vector<int32_t> &seq, int32_t) {
    return seq.size() < full.size() && seq.size() % 4 ? full[seq.size()] : 0;
  };
  Setup spec(loaded, 3, some);
  auto s = spec.engine->create_session(0, false, 1);
  s->append(prompt.data(), prompt.size());
  s->start(params(0, 30, 1));
  struct View {
    std::vector<int32_t> tokens;
    std::vector<float> logits;
  };
  std::vector<View> views;
  for (size_t emitted = 0;;) {
    dsrt::Event ev = s->next();
    if (ev.done) break;
    emitted++;
    View v;
    const auto tv = s->tokens_view();
    v.tokens.assign(tv.begin(), tv.end());
    const auto lv = s->logits_view();
    REQUIRE(lv.rows == 1);
    v.logits.assign(lv.data, lv.data + V);
    // what is visible is what was emitted: the prompt and the emitted tokens, the last one perhaps pending
    CHECK(v.tokens.size() <= prompt.size() + emitted);
    CHECK(v.tokens.size() + 1 >= prompt.size() + emitted);
    CHECK(std::equal(v.tokens.begin(), v.tokens.end(), full.begin()));
    views.push_back(std::move(v));
  }
  CHECK(spec.engine->stats().mtp_accepted > 0);
  // Reference: every position's logits of the whole sequence in one prefill.
  Setup ref(loaded, 0);
  auto rs = ref.engine->create_session(0, true, 1);
  rs->append(full.data(), full.size());
  rs->eval(nullptr);
  const auto all = rs->logits_view();
  REQUIRE(all.rows == int64_t(full.size()));
  double worst = 0;
  for (const View &v : views)
    worst = std::max(worst, testing::rel_l2(v.logits.data(), all.data + (v.tokens.size() - 1) * size_t(V), size_t(V)));
  CHECK(worst < 1e-5);
}

TEST_CASE("MTP: 8 threads x 3 chat turns with drafts each reply as the conversation run alone without") {
  const dsrt::LoadedModel loaded = dsrt::load_model(testing::tiny("v3-mini"), {});
  const auto &model = loaded.model;
  auto conversation = [&](dsrt::Engine &e, int k, std::vector<std::vector<int32_t>> &replies) {
    auto s = e.create_session(0, false, uint64_t(k));
    for (int t = 0; t < 3; t++) {
      const std::string msg = R"([{"role":"user","content":"Question )" + std::to_string(k) + " turn " + std::to_string(t) + R"("}])";
      s->append_chat(msg, "", true);
      replies.push_back(turn(*s, params(t == 1 ? 0.8f : 0.0f, 9, uint64_t(k * 10 + t))).emitted);
    }
  };
  std::vector<std::vector<std::vector<int32_t>>> alone(8), together(8);
  {
    Setup st(loaded, 0);
    for (int k = 0; k < 8; k++) conversation(*st.engine, k, alone[size_t(k)]);
  }
  Setup st(loaded, 2);
  std::vector<std::thread> th;
  for (int k = 0; k < 8; k++) th.emplace_back([&, k] { conversation(*st.engine, k, together[size_t(k)]); });
  for (auto &t : th) t.join();
  CHECK(together == alone);
  CHECK(st.engine->stats().mtp_drafted > 0);
}

TEST_CASE("MTP through the C API: engine option, per-turn and engine counters, the same text") {
  testing::Model m(testing::tiny("v3-mini"));
  std::string texts[2];
  for (int mtp = 0; mtp < 2; mtp++) {
    dsrt_engine_params ep;
    dsrt_engine_params_init(&ep, sizeof ep);
    CHECK(ep.mtp_drafts == 0);
    ep.mtp_drafts = mtp * 3;
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
  for (int32_t bad : {-1, 5}) {
    ep.mtp_drafts = bad;
    dsrt_engine *e = nullptr;
    CHECK(dsrt_engine_create(m.m, &ep, &e) == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(e == nullptr);
  }
}
