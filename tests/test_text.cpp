// Text in, text out through the C API: tokenize/detokenize, the incremental decoder, chat templates,
// streaming generation (pull and push), stop strings, cancel, fork, state save/restore, many threads.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "core/status.h"
#include "engine/load.h"
#include "engine/sampler.h"
#include "model/model.h"
#include "helpers.h"
#include "text/detokenizer.h"
#include "text/jinja.h"
#include "text/utf8.h"

using namespace testing;

namespace {

std::vector<int32_t> tokenize(dsrt_model *m, const std::string &text, int32_t flags) {
  std::vector<int32_t> ids(text.size() + 8);
  size_t n = 0;
  CHECK_OK(dsrt_tokenize(m, text.data(), text.size(), flags, ids.data(), ids.size(), &n));
  ids.resize(n);
  return ids;
}

std::string detokenize(dsrt_model *m, const std::vector<int32_t> &ids, int32_t flags = 0) {
  size_t n = 0;
  CHECK(dsrt_detokenize(m, ids.data(), ids.size(), flags, nullptr, 0, &n) ==
        (ids.empty() ? DSRT_OK : DSRT_ERR_BUFFER_TOO_SMALL));
  std::string s(n, '\0');
  CHECK_OK(dsrt_detokenize(m, ids.data(), ids.size(), flags, s.data(), s.size(), &n));
  return s;
}

// A tokenizer-only directory for the real DeepSeek-V3 tokenizer (config.json + tokenizer files, no weights).
std::string v3_tokenizer_dir() {
  static std::string dir;
  if (!dir.empty()) return dir;
  fs::path d = fresh_dir("v3tok");
  const std::string shared = DSRT_SHARED_DATA;
  fs::copy_file(shared + "/configs/deepseek-v3/config.json", d / "config.json");
  fs::copy_file(shared + "/tokenizers/deepseek-v3/tokenizer.json", d / "tokenizer.json");
  fs::copy_file(shared + "/tokenizers/deepseek-v3/tokenizer_config.json", d / "tokenizer_config.json");
  return dir = d.string();
}

struct TokModel {
  dsrt_model *m = nullptr;
  explicit TokModel(const std::string &dir) {
    dsrt_model_params p;
    dsrt_model_params_init(&p, sizeof p);
    p.tokenizer_only = 1;
    CHECK_OK(dsrt_model_load(dir.c_str(), &p, &m));
  }
  ~TokModel() { dsrt_model_free(m); }
};

}  // namespace

TEST_CASE("tokenize and detokenize round-trip CJK, emoji and special tokens through the C API") {
  TokModel tm(v3_tokenizer_dir());
  struct {
    dsrt_model *m;
  } m{tm.m};
  const std::string text = "你好，世界！ こんにちは 👨‍👩‍👧 👍🏽 café naïve <｜User｜>hi";
  auto plain = tokenize(m.m, text, 0), special = tokenize(m.m, text, DSRT_TOKENIZE_PARSE_SPECIAL);
  CHECK(detokenize(m.m, plain) == text);
  CHECK(detokenize(m.m, special) == text);
  CHECK(std::find(special.begin(), special.end(), 128803) != special.end());  // <｜User｜> as one token
  CHECK(std::find(plain.begin(), plain.end(), 128803) == plain.end());
  auto with_bos = tokenize(m.m, "Hello", DSRT_TOKENIZE_ADD_SPECIAL);
  CHECK(with_bos.front() == 0);
  CHECK(dsrt_special_token(m.m, DSRT_SPECIAL_BOS) == 0);
  CHECK(dsrt_special_token(m.m, DSRT_SPECIAL_EOS) == 1);
  CHECK(dsrt_special_token(m.m, DSRT_SPECIAL_USER) == 128803);
  CHECK(dsrt_special_token(m.m, DSRT_SPECIAL_ASSISTANT) == 128804);
  CHECK((dsrt_token_attr(m.m, 1) & DSRT_TOKEN_ATTR_EOG));
  CHECK(detokenize(m.m, {0, 19923}, DSRT_DETOKENIZE_SKIP_SPECIAL) == "Hello");
  int32_t small[2];
  size_t n;
  CHECK(dsrt_tokenize(m.m, text.data(), text.size(), 0, small, 2, &n) == DSRT_ERR_BUFFER_TOO_SMALL);
  CHECK(n == plain.size());
  // A tokenizer-only model cannot run.
  dsrt_engine *e = nullptr;
  CHECK(dsrt_engine_create(tm.m, nullptr, &e) == DSRT_ERR_UNSUPPORTED);
}

TEST_CASE("a model without tokenizer files runs on tokens; text calls fail with a clear message") {
  fs::path d = fresh_dir("notok");
  for (auto &e : fs::directory_iterator(tiny("no-qlora")))
    if (e.path().filename().string().rfind("tokenizer", 0) != 0) fs::copy_file(e.path(), d / e.path().filename());
  Model m(d.string());
  int32_t ids[4];
  size_t n;
  CHECK(dsrt_tokenize(m.m, "hi", 2, 0, ids, 4, &n) == DSRT_ERR_UNSUPPORTED);
  CHECK(std::string(dsrt_last_error()).find("no tokenizer") != std::string::npos);
  Engine e(m);
  Session s(e);
  s.append({0, 5, 6});
  s.eval();
  CHECK(s.greedy() >= 0);
  auto p = greedy_params(m, 3);
  Turn t = pull(s.s, &p);  // token-level generation works; text deltas are empty
  CHECK(t.tokens.size() >= 1);
  CHECK(t.text.empty());
}

TEST_CASE("incremental decoding: pieces are complete UTF-8 and concatenate to the full decode") {
  TokModel tm(v3_tokenizer_dir());
  dsrt::LoadOptions lo;
  lo.config_only = true;  // a tokenizer-only load
  const dsrt::LoadedModel model = dsrt::load_model(v3_tokenizer_dir(), lo);
  const dsrt::Tokenizer &t = *model.vocab->tokenizer;
  std::mt19937 rng(11);
  std::vector<int32_t> pool = t.encode("漢字 😀👍🏽 ñ é ü — “quotes” Ελληνικά עברית 🦙🦙 \xff\xfe", false);
  for (int i = 0; i < 200; i++) pool.push_back(int32_t(rng() % 128000));
  for (int trial = 0; trial < 300; trial++) {
    std::vector<int32_t> ids;
    for (int k = 0; k < int(rng() % 30); k++) ids.push_back(pool[rng() % pool.size()]);
    dsrt::Detokenizer d(t, false);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string &piece = d.push(id);
      std::string check;
      CHECK(dsrt::utf8_sanitize(piece, true, &check) == piece.size());
      CHECK(check == piece);  // each piece is valid UTF-8 on its own
      streamed += piece;
    }
    streamed += d.flush();
    std::string full;
    dsrt::utf8_sanitize(t.decode(ids, false), true, &full);
    CHECK(streamed == full);
  }
  // Through the C API: a 4-byte emoji split over byte tokens appears only when complete.
  std::vector<int32_t> emoji = t.encode("🦙", false);
  dsrt_detok *d;
  CHECK_OK(dsrt_detok_create(tm.m, 0, &d));
  std::string got;
  for (int32_t id : emoji) {
    const char *txt;
    size_t len;
    CHECK_OK(dsrt_detok_push(d, id, &txt, &len));
    if (len) CHECK(std::string(txt, len) == "🦙");
    got.append(txt, len);
  }
  const char *txt;
  size_t len;
  CHECK_OK(dsrt_detok_flush(d, &txt, &len));
  CHECK(got + std::string(txt, len) == "🦙");
  dsrt_detok_free(d);
}

TEST_CASE("stop strings are held back until resolved and never appear in the text") {
  const dsrt::LoadedModel model = dsrt::load_model(tiny("no-qlora"), {});
  const dsrt::Tokenizer &t = *model.vocab->tokenizer;
  std::vector<int32_t> ids = t.encode("The answer is 42. STOP here and more text", false);
  for (const char *stop : {"STOP", ". S", "42", "x"}) {
    CAPTURE(stop);
    dsrt::Detokenizer d(t, true, {stop});
    std::string out;
    for (int32_t id : ids) {
      out += d.push(id);
      CHECK(out.find(stop) == std::string::npos);
    }
    out += d.flush();
    const std::string full = "The answer is 42. STOP here and more text";
    size_t p = full.find(stop);
    CHECK(out == (p == std::string::npos ? full : full.substr(0, p)));
    CHECK(d.stopped() == (p != std::string::npos));
  }
}

TEST_CASE("chat templates render DeepSeek-V3's and R1's conversations") {
  TokModel tm(v3_tokenizer_dir());
  char *out = nullptr;
  CHECK_OK(dsrt_chat_apply(tm.m, R"([{"role":"user","content":"Hello"}])", nullptr, nullptr,
                           DSRT_CHAT_ADD_GENERATION_PROMPT, &out));
  CHECK(std::string(out) == "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜>");  // spec §1.3's example
  dsrt_free(out);
  CHECK_OK(dsrt_chat_apply(tm.m,
                           R"([{"role":"system","content":"Be brief."},{"role":"system","content":"Be kind."},
                               {"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"},
                               {"role":"user","content":"2+2?"}])",
                           nullptr, nullptr, 0, &out));
  CHECK(std::string(out) ==
        "<｜begin▁of▁sentence｜>Be brief.\n\nBe kind.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>2+2?");
  dsrt_free(out);
  CHECK(dsrt_chat_apply(tm.m, "not json", nullptr, nullptr, 0, &out) == DSRT_ERR_INVALID_ARGUMENT);
}

TEST_CASE("the Jinja interpreter: whitespace control, loops, filters, tests, limits") {
  auto render = [](const std::string &src, const dsrt::jinja::Json &ctx = dsrt::jinja::Json::object()) {
    return dsrt::jinja::Template(src).render(ctx);
  };
  CHECK(render("{% for x in xs %}{{ loop.index }}:{{ x }}{% if not loop.last %},{% endif %}{% endfor %}",
               {{"xs", {"a", "b", "c"}}}) == "1:a,2:b,3:c");
  CHECK(render("  {% if true %}\n  yes\n  {% endif %}\nend") == "  yes\nend");  // lstrip_blocks + trim_blocks
  CHECK(render("a  {%- if true -%}  b  {%- endif -%}  c") == "abc");
  CHECK(render("{{ 'a,b,,c'.split(',') }}|{{ '  x '|trim }}|{{ [1,2,3]|length }}|{{ 'AbC'.lower() }}") ==
        "['a', 'b', '', 'c']|x|3|abc");
  CHECK(render("{{ {'k': [1, 'é', none, true, 1.5]}|tojson }}") == "{\"k\": [1, \"é\", null, true, 1.5]}");
  CHECK(render("{% set ns = namespace(n=0) %}{% for i in range(5) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}") == "10");
  CHECK(render("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% endfor %}{{ x }}") == "1");  // loop scope
  CHECK(render("{{ x is defined }} {{ none is none }} {{ 'a' in 'cat' }} {{ 3 not in [1,2] }} {{ y|default('d') }}") ==
        "False True True True d");
  CHECK(render("{{ 'think</think>answer'.split('</think>')[-1] }}|{{ 'abcdef'[1:4] }}|{{ 7 // 2 }} {{ 7 % 3 }}") ==
        "answer|bcd|3 1");
  CHECK(render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", {{"d", {{"a", 1}, {"b", 2}}}}) == "a=1;b=2;");
  CHECK(render("{{ 'x' if false else 'y' }}{% for i in [1,2,3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "y1");
  // Python's integer semantics: floor division and a remainder with the divisor's sign; no wrap-around past
  // int64 (found by fuzz_chat_template: a product overflowed), huge steps end loops instead of wrapping.
  CHECK(render("{{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7 // -2 }} {{ (-9223372036854775807 - 1) // -1 > 0 }}") ==
        "-4 2 -2 -4 True");
  CHECK(render("{{ 40000000000000 * 100000000 > 9223372036854775807 }} {{ -(-9223372036854775807 - 1) > 0 }}") ==
        "True True");
  CHECK(render("{{ range(0, 10, 9223372036854775807)|list }} {{ 'abc'[::9223372036854775807] }} {{ (1e300)|int > 0 }}") ==
        "[0] a True");
  auto fails = [&](const std::string &src, const char *needle) {
    try {
      render(src);
      FAIL("rendered: " << src);
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_FORMAT);
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  fails("{% for i in range(100000000) %}{% endfor %}", "item limit");  // a list of at most Limits::max_items
  fails("{% for i in range(1000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}", "limit");
  fails("{{ 'x' * 100000000 }}", "limit");
  fails("{{ raise_exception('bad role') }}", "bad role");
  fails("{% if x %}unclosed", "endif");
  fails("{% %}", "empty");      // found by fuzz_chat_template: an empty tag threw std::out_of_range
  fails("{% if true %}{%   %}{% endif %}", "empty");
  fails("{{ (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))) }}",
        "deeply");
  fails("{% macro m() %}{% endmacro %}", "macro");
  fails("{{ 3 / 0 }}", "division by zero");
  fails("{{ 3 // 0 }}", "division by zero");
  fails("{{ 3 % 0 }}", "division by zero");
}

TEST_CASE("generation: pull equals push, equals a manual greedy loop; finish reasons") {
  Model m(tiny("v3-mini"));
  Engine e(m);
  Session a(e), b(e), c(e);
  for (Session *s : {&a, &b, &c}) CHECK_OK(dsrt_session_append_text(s->s, "Hello world", 11, DSRT_TOKENIZE_ADD_SPECIAL));
  auto p = greedy_params(m, 12);
  Turn pulled = pull(a.s, &p);
  CHECK((pulled.finish == DSRT_FINISH_LENGTH || pulled.finish == DSRT_FINISH_EOS));
  CHECK(pulled.tokens.size() == (pulled.finish == DSRT_FINISH_LENGTH ? 12 : pulled.tokens.size()));
  struct Push {
    Turn t;
  } push;
  CHECK_OK(dsrt_session_generate(
      b.s, &p,
      [](const dsrt_event *ev, void *u) -> int32_t {
        auto *t = &static_cast<Push *>(u)->t;
        t->text.append(ev->text, ev->text_len);
        if (ev->token >= 0) t->tokens.push_back(ev->token);
        if (ev->type == DSRT_EVENT_DONE) t->finish = ev->finish_reason;
        return 0;
      },
      &push));
  CHECK(push.t.tokens == pulled.tokens);
  CHECK(push.t.text == pulled.text);
  std::vector<int32_t> manual;
  for (size_t i = 0; i < pulled.tokens.size(); i++) {
    c.eval();
    manual.push_back(c.greedy());
    c.append({manual.back()});
  }
  CHECK(manual == pulled.tokens);
  p.ignore_eos = 1;
  // The text is the detokenized tokens.
  std::string full = detokenize(m.m, pulled.tokens, DSRT_DETOKENIZE_SKIP_SPECIAL), clean;
  dsrt::utf8_sanitize(full, true, &clean);
  CHECK(pulled.text == clean);
  // A stop token ends the turn with that reason.
  Session d(e);
  CHECK_OK(dsrt_session_append_text(d.s, "Hello world", 11, DSRT_TOKENIZE_ADD_SPECIAL));
  p.stop_tokens = &pulled.tokens[3];
  p.n_stop_tokens = 1;
  Turn st = pull(d.s, &p);
  CHECK(st.finish == DSRT_FINISH_STOP_TOKEN);
  CHECK(st.tokens.size() == 4);
  // A push callback returning non-zero stops the turn as cancelled.
  Session f(e);
  CHECK_OK(dsrt_session_append_text(f.s, "Hello", 5, 0));
  int seen = 0;
  CHECK_OK(dsrt_session_generate(
      f.s, &p,
      [](const dsrt_event *ev, void *u) -> int32_t {
        int *n = static_cast<int *>(u);
        if (ev->type == DSRT_EVENT_DONE) CHECK(ev->finish_reason == DSRT_FINISH_CANCELLED);
        return ++*n == 2;
      },
      &seen));
  CHECK(seen == 3);
  dsrt_event ev;
  ev.struct_size = sizeof ev;
  CHECK(dsrt_session_next(f.s, &ev) == DSRT_ERR_BAD_STATE);  // the turn is over
}

TEST_CASE("stop strings end the turn and never reach the text") {
  Model m(tiny("v3-mini"));
  Engine e(m);
  auto p = greedy_params(m, 24);
  p.ignore_eos = 1;
  Session a(e);
  CHECK_OK(dsrt_session_append_text(a.s, "The quick", 9, DSRT_TOKENIZE_ADD_SPECIAL));
  Turn full = pull(a.s, &p);
  REQUIRE(full.text.size() > 6);
  const std::string stop = full.text.substr(full.text.size() / 2, 3);  // somewhere in the middle
  const char *stops[] = {stop.c_str()};
  p.stop_strings = stops;
  p.n_stop_strings = 1;
  Session b(e);
  CHECK_OK(dsrt_session_append_text(b.s, "The quick", 9, DSRT_TOKENIZE_ADD_SPECIAL));
  Turn cut = pull(b.s, &p);
  CHECK(cut.finish == DSRT_FINISH_STOP_STRING);
  CHECK(cut.text == full.text.substr(0, full.text.find(stop)));
  CHECK(cut.text.find(stop) == std::string::npos);
}

TEST_CASE("cancel from another thread ends the turn as cancelled within a few steps, keeping the tokens") {
  Model m(tiny("v3-mini"));
  Engine e(m);
  Session s(e);
  CHECK_OK(dsrt_session_append_text(s.s, "Hello", 5, DSRT_TOKENIZE_ADD_SPECIAL));
  dsrt_cancel *c;
  CHECK_OK(dsrt_cancel_create(&c));
  auto p = greedy_params(m, 100000);
  p.max_new_tokens = 0;
  p.ignore_eos = 1;
  p.cancel = c;
  std::atomic<int> tokens{0};
  std::atomic<int> at_cancel{-1};
  std::thread killer([&] {
    while (tokens.load() < 5) std::this_thread::yield();
    at_cancel = tokens.load();
    dsrt_cancel_trigger(c);
  });
  CHECK_OK(dsrt_session_start(s.s, &p));
  int32_t finish = 0;
  for (;;) {
    dsrt_event ev;
    ev.struct_size = sizeof ev;
    CHECK_OK(dsrt_session_next(s.s, &ev));
    if (ev.type == DSRT_EVENT_DONE) {
      finish = ev.finish_reason;
      break;
    }
    tokens++;
  }
  killer.join();
  CHECK(finish == DSRT_FINISH_CANCELLED);
  CHECK(tokens.load() - at_cancel.load() <= 3);
  dsrt_session_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_session_stats_get(s.s, &st));
  CHECK(st.n_tokens + st.n_pending >= 2 + tokens.load());  // BOS + prompt + every emitted token kept
  // dsrt_session_cancel works the same without a token.
  dsrt_cancel_reset(c);
  p.cancel = nullptr;
  CHECK_OK(dsrt_session_start(s.s, &p));
  dsrt_session_cancel(s.s);
  dsrt_event ev;
  ev.struct_size = sizeof ev;
  CHECK_OK(dsrt_session_next(s.s, &ev));
  CHECK(ev.type == DSRT_EVENT_DONE);
  CHECK(ev.finish_reason == DSRT_FINISH_CANCELLED);
  dsrt_cancel_free(c);
}

TEST_CASE("state save/restore then continue equals the uninterrupted run; a fork continues the same way") {
  Model m(tiny("partial-yarn"));
  Engine e(m);
  auto p = greedy_params(m, 8);
  p.ignore_eos = 1;
  Session a(e);
  CHECK_OK(dsrt_session_append_chat(a.s, R"([{"role":"user","content":"Tell me a story."}])", nullptr,
                                    DSRT_CHAT_ADD_GENERATION_PROMPT));
  Turn first = pull(a.s, &p);
  void *blob;
  size_t n;
  CHECK_OK(dsrt_session_state_save(a.s, &blob, &n));
  dsrt_session *f;
  CHECK_OK(dsrt_session_fork(a.s, &f));
  CHECK_OK(dsrt_session_append_chat(a.s, R"([{"role":"user","content":"And then?"}])", nullptr,
                                    DSRT_CHAT_ADD_GENERATION_PROMPT));
  Turn second = pull(a.s, &p);

  Session b(e);
  CHECK_OK(dsrt_session_state_load(b.s, blob, n));
  CHECK_OK(dsrt_session_append_chat(b.s, R"([{"role":"user","content":"And then?"}])", nullptr,
                                    DSRT_CHAT_ADD_GENERATION_PROMPT));
  Turn restored = pull(b.s, &p);
  CHECK(restored.tokens == second.tokens);
  CHECK(restored.text == second.text);
  CHECK_OK(dsrt_session_append_chat(f, R"([{"role":"user","content":"And then?"}])", nullptr,
                                    DSRT_CHAT_ADD_GENERATION_PROMPT));
  Turn forked = pull(f, &p);
  CHECK(forked.tokens == second.tokens);
  dsrt_session_free(f);
  // The conversation's second render reused the cached first turn.
  dsrt_session_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_session_stats_get(b.s, &st));
  CHECK(st.reused_tokens > 10);
  CHECK(st.generated_tokens == 8);
  // Another model's session refuses the blob; a corrupted blob is an error, not a crash.
  Model other(tiny("no-qlora"));
  Engine oe(other);
  Session o(oe);
  CHECK(dsrt_session_state_load(o.s, blob, n) == DSRT_ERR_VERSION_MISMATCH);
  std::string bad(static_cast<char *>(blob), n);
  for (size_t cut : {size_t(0), size_t(5), size_t(20), n / 2, n - 1}) CHECK(dsrt_session_state_load(b.s, bad.data(), cut) != DSRT_OK);
  bad[0] = 'X';
  CHECK(dsrt_session_state_load(b.s, bad.data(), bad.size()) == DSRT_ERR_FORMAT);
  dsrt_free(blob);
}

TEST_CASE("16 threads x 4 chat turns are batched and each reply equals the conversation run alone") {
  Model m(tiny("no-qlora"));
  auto p = greedy_params(m, 6);
  p.ignore_eos = 1;
  auto conversation = [&](Engine &e, int k, std::vector<std::string> &replies) {
    Session s(e);
    for (int turn = 0; turn < 4; turn++) {
      std::string msg = R"([{"role":"user","content":"Question )" + std::to_string(k) + " turn " + std::to_string(turn) + R"("}])";
      CHECK_OK(dsrt_session_append_chat(s.s, msg.c_str(), nullptr, DSRT_CHAT_ADD_GENERATION_PROMPT));
      replies.push_back(pull(s.s, &p).text);
    }
  };
  std::vector<std::vector<std::string>> alone(16), together(16);
  {
    Engine e(m);
    for (int k = 0; k < 16; k++) conversation(e, k, alone[size_t(k)]);
  }
  Engine e(m);
  std::vector<std::thread> th;
  for (int k = 0; k < 16; k++) th.emplace_back([&, k] { conversation(e, k, together[size_t(k)]); });
  for (auto &t : th) t.join();
  CHECK(together == alone);
  dsrt_engine_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_engine_stats_get(e.e, &st));
  MESSAGE("most sessions in one step: " << st.max_batch_seqs);
  CHECK(st.max_batch_seqs > 1);
}

TEST_CASE("samplers: each distribution equals its definition on fixed logits; draws follow it") {
  const std::vector<float> logits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, 3.0f, 1.0f, -2.0f};
  const int64_t V = int64_t(logits.size());
  auto softmax = [&](std::vector<double> l, double t) {
    double mx = *std::max_element(l.begin(), l.end()), z = 0;
    for (auto &v : l) z += v = std::exp((v - mx) / t);
    for (auto &v : l) v /= z;
    return l;
  };
  std::vector<double> base(logits.begin(), logits.end());
  auto close = [](const std::vector<double> &a, const std::vector<double> &b) {
    for (size_t i = 0; i < a.size(); i++) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-9));
  };
  dsrt::SamplingParams p;
  p.temperature = 0.75f;  // exactly representable, so the float parameter equals the reference's
  close(dsrt::sampling_distribution(logits.data(), V, p, nullptr, 0, {}), softmax(base, 0.75));
  p.temperature = 1.0f;
  p.top_k = 3;  // ids 5, 0, 1 (1 before 6 on equal logits)
  {
    auto q = softmax({3.0, 2.0, 1.0}, 1.0);
    std::vector<double> want(8, 0.0);
    want[5] = q[0], want[0] = q[1], want[1] = q[2];
    close(dsrt::sampling_distribution(logits.data(), V, p, nullptr, 0, {}), want);
  }
  p.top_k = 0;
  p.top_p = 0.8f;  // the smallest prefix reaching 0.8
  {
    auto full = softmax(base, 1.0);
    std::vector<int> order = {5, 0, 1, 6, 2, 3, 4, 7};
    double acc = 0;
    size_t keep = 0;
    while (acc < 0.8) acc += full[size_t(order[keep++])];
    std::vector<double> want(8, 0.0);
    for (size_t i = 0; i < keep; i++) want[size_t(order[i])] = full[size_t(order[i])] / acc;
    close(dsrt::sampling_distribution(logits.data(), V, p, nullptr, 0, {}), want);
  }
  p.top_p = 1.0f;
  p.min_p = 0.3f;  // keep p >= 0.3 * p_max
  {
    auto full = softmax(base, 1.0);
    double pmax = full[5], z = 0;
    std::vector<double> want(8, 0.0);
    for (int i = 0; i < 8; i++)
      if (full[size_t(i)] >= 0.3 * pmax) z += want[size_t(i)] = full[size_t(i)];
    for (auto &w : want) w /= z;
    close(dsrt::sampling_distribution(logits.data(), V, p, nullptr, 0, {}), want);
  }
  p.min_p = 0.0f;
  p.repetition_penalty = 2.0f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  p.penalty_window = 3;
  p.logit_bias = {{7, 4.0f}};
  {
    const int32_t hist[] = {4, 5, 5, 0, 4};  // window = last 3: 5, 0, 4
    std::vector<double> l = base;
    l[7] += 4.0;
    l[5] = 3.0 / 2.0 - 0.5 - 0.25;
    l[0] = 2.0 / 2.0 - 0.5 - 0.25;
    l[4] = -1.0 * 2.0 - 0.5 - 0.25;
    close(dsrt::sampling_distribution(logits.data(), V, p, hist, 5, {}), softmax(l, 1.0));
    // Banned ids (EOS under ignore_eos) get probability 0.
    auto q = dsrt::sampling_distribution(logits.data(), V, p, hist, 5, {7});
    CHECK(q[7] == 0.0);
  }
  // Draws: chi-square against the distribution, 20000 draws, 7 degrees of freedom.
  dsrt::SamplingParams t;
  t.temperature = 1.3f;
  auto want = dsrt::sampling_distribution(logits.data(), V, t, nullptr, 0, {});
  dsrt::Rng rng(5);
  std::vector<double> obs(8);
  const int N = 20000;
  for (int i = 0; i < N; i++) obs[size_t(dsrt::sample_token(logits.data(), V, t, nullptr, 0, {}, rng))] += 1;
  double chi2 = 0;
  for (int i = 0; i < 8; i++) chi2 += (obs[size_t(i)] - want[size_t(i)] * N) * (obs[size_t(i)] - want[size_t(i)] * N) / (want[size_t(i)] * N);
  CHECK(chi2 < 24.32);  // p = 0.001
  // Greedy is the argmax regardless of the other settings.
  dsrt::SamplingParams g;
  g.top_k = 2;
  CHECK(dsrt::sample_token(logits.data(), V, g, nullptr, 0, {}, rng) == 5);
}

TEST_CASE("same seed and input give the same sampled tokens") {
  Model m(tiny("no-qlora"));
  Engine e(m);
  auto run = [&](uint64_t seed) {
    Session s(e);
    CHECK_OK(dsrt_session_append_text(s.s, "Once upon a time", 16, DSRT_TOKENIZE_ADD_SPECIAL));
    dsrt_gen_params p;
    dsrt_gen_params_init(&p, sizeof p, m.m);
    p.temperature = 1.0f;
    p.top_p = 0.95f;
    p.has_seed = 1;
    p.seed = seed;
    p.max_new_tokens = 16;
    p.ignore_eos = 1;
    return pull(s.s, &p).tokens;
  };
  CHECK(run(3) == run(3));
  CHECK(run(3) != run(4));
  // generation_config.json's defaults fill dsrt_gen_params_init (the tiny models ship temperature 0.6).
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, m.m);
  CHECK(p.temperature == doctest::Approx(0.6));
  CHECK(p.top_p == doctest::Approx(0.95));
}

TEST_CASE("greedy sampling's fast path picks the argmax of the full distribution's adjusted logits") {
  std::mt19937 rng(5);
  const int64_t V = 300;
  for (int trial = 0; trial < 400; trial++) {
    CAPTURE(trial);
    std::vector<float> logits(static_cast<size_t>(V));
    std::uniform_int_distribution<int> coarse(-3, 3);  // coarse values make ties common
    for (auto &v : logits) v = float(coarse(rng)) * 0.5f;
    if (trial % 7 == 0) logits[size_t(rng() % V)] = NAN;
    if (trial % 11 == 0) std::fill(logits.begin(), logits.end(), -INFINITY);
    dsrt::SamplingParams p;
    if (trial % 2) p.repetition_penalty = 1.3f;
    if (trial % 3 == 0) p.presence_penalty = 0.5f;
    if (trial % 5 == 0) p.frequency_penalty = 0.25f;
    if (trial % 4 == 0) p.logit_bias = {{int32_t(rng() % V), 2.0f}, {int32_t(rng() % V), -1.0f}};
    std::vector<int32_t> hist, banned;
    for (int i = 0; i < 20; i++) hist.push_back(int32_t(rng() % 40));
    for (int i = 0; i < int(trial % 4); i++) banned.push_back(int32_t(rng() % 40));
    dsrt::Rng r(1);
    if (trial % 7 == 0 || trial % 11 == 0) {  // a NaN or nothing finite: both paths refuse alike
      CHECK_THROWS_AS(dsrt::sampling_distribution(logits.data(), V, p, hist.data(), hist.size(), banned), dsrt::Error);
      CHECK_THROWS_AS(dsrt::sample_token(logits.data(), V, p, hist.data(), hist.size(), banned, r), dsrt::Error);
      continue;
    }
    auto prob = dsrt::sampling_distribution(logits.data(), V, p, hist.data(), hist.size(), banned);
    const int32_t want = int32_t(std::max_element(prob.begin(), prob.end()) - prob.begin());
    CHECK(dsrt::sample_token(logits.data(), V, p, hist.data(), hist.size(), banned, r) == want);
  }
}

// Rows for the sampling op tests: coarse logits (ties everywhere), and per row a sampler setting of every kind
// (greedy, each filter alone and all together, penalties, bias with a repeated id, bans) and the failures the
// sampler reports (NaN, +inf, nothing finite, a bias id outside the vocabulary, a bias that makes +inf).
struct SampleCase {
  std::vector<float> logits;
  dsrt::SamplingParams p;
  std::vector<int32_t> hist, banned;
};
std::vector<SampleCase> sample_cases(int64_t V, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> coarse(-6, 6);
  std::vector<SampleCase> v;
  for (int r = 0; r < n; r++) {
    SampleCase c;
    c.logits.resize(size_t(V));
    for (auto &x : c.logits) x = float(coarse(rng)) * 0.25f;
    dsrt::SamplingParams &p = c.p;
    const int kind = r % 12;
    p.temperature = kind == 0 ? 0.0f : 0.7f + 0.1f * float(r % 5);
    if (kind == 1 || kind == 4) p.top_k = 1 + int32_t(rng() % 40);
    if (kind == 2 || kind == 4) p.top_p = 0.5f + 0.1f * float(r % 4);
    if (kind == 3 || kind == 4) p.min_p = 0.05f * float(1 + r % 4);
    if (kind == 5 || kind == 4 || kind == 0) {
      p.repetition_penalty = 1.3f;
      p.presence_penalty = 0.5f;
      p.frequency_penalty = 0.25f;
      p.penalty_window = 8;
      p.logit_bias = {{int32_t(rng() % V), 1.5f}, {3, -0.75f}, {3, 0.5f}};  // id 3 twice: added in order
    }
    for (int i = 0; i < 20; i++) c.hist.push_back(int32_t(rng() % 30));
    if (r % 3 == 0) c.banned = {int32_t(rng() % V), 1, 2};
    if (kind == 6) p.top_k = int32_t(V + 5);  // larger than the vocabulary: off
    if (kind == 7) c.logits[size_t(rng() % V)] = NAN;
    if (kind == 8) c.logits[size_t(rng() % V)] = INFINITY;
    if (kind == 9) {  // nothing finite once banned
      std::fill(c.logits.begin(), c.logits.end(), -INFINITY);
      c.logits[5] = 1.0f;
      c.banned = {5};
    }
    if (kind == 10) p.logit_bias = {{int32_t(V), 1.0f}};
    if (kind == 11) p.logit_bias = {{7, INFINITY}};
    v.push_back(std::move(c));
  }
  return v;
}

TEST_CASE("Backend::sample_rows' default (the CPU backend) is sample_token row by row, draws and errors alike") {
  const int64_t V = 300;
  const auto cases = sample_cases(V, 48, 17);
  auto be = dsrt::make_cpu_backend({});
  be->begin_step();
  dsrt::Tensor t = be->alloc(int64_t(cases.size()), V);
  std::vector<float> all;
  for (const auto &c : cases) all.insert(all.end(), c.logits.begin(), c.logits.end());
  be->from_host(t, all.data());
  std::vector<dsrt::SampleRequest> req;
  std::vector<dsrt::Rng> after;  // the stream as sample_token leaves it
  std::vector<int32_t> want;
  std::vector<std::pair<dsrt_status, std::string>> want_err;
  int errors = 0;
  for (size_t r = 0; r < cases.size(); r++) {
    const SampleCase &c = cases[r];
    dsrt::Rng ref(100 + r), copy(100 + r);
    dsrt::SampleRequest q;
    q.row = int32_t(cases.size() - 1 - r);  // rows in any order
    q.params = &c.p;
    q.history = c.hist.data();
    q.n_history = c.hist.size();
    q.banned = &c.banned;
    q.u = c.p.temperature > 0 ? copy.uniform() : 0.0;
    req.push_back(q);
    uint64_t before[4], now[4];
    ref.state(before);
    try {
      want.push_back(dsrt::sample_token(c.logits.data(), V, c.p, c.hist.data(), c.hist.size(), c.banned, ref));
      want_err.push_back({DSRT_OK, ""});
      ref.state(now);
      uint64_t drawn[4];
      copy.state(drawn);
      CHECK(std::equal(now, now + 4, drawn));  // the one draw, taken exactly when the sampler takes it
    } catch (const dsrt::Error &e) {
      want.push_back(-1);
      want_err.push_back({e.code(), e.what()});
      ref.state(now);
      CHECK(std::equal(now, now + 4, before));  // a failure draws nothing
      errors++;
    }
  }
  // The op reads row q.row: lay the logits out in that order.
  for (size_t r = 0; r < cases.size(); r++)
    be->from_host(t.rows_view(req[r].row, 1), cases[r].logits.data());
  const auto got = be->sample_rows(t, req);
  REQUIRE(got.size() == cases.size());
  for (size_t r = 0; r < cases.size(); r++) {
    CAPTURE(r);
    CHECK(got[r].status == want_err[r].first);
    CHECK(got[r].error == want_err[r].second);
    if (want_err[r].first == DSRT_OK) CHECK(got[r].token == want[r]);
  }
  CHECK(errors >= 4 * 5);  // NaN, +inf, nothing finite, bias outside, +inf bias: each kind 4 times
  CHECK(!be->samples_on_device());  // the engine keeps its host path on the CPU
}

// The adjustments a device kernel applies (sampling_adjustments), applied here as the kernel does, give the
// sampler's own distribution: with temperature 1 and no truncation it is the softmax of the adjusted logits.
TEST_CASE("sampling_adjustments writes out the sampler's own bias, penalties and bans") {
  const int64_t V = 300;
  auto cases = sample_cases(V, 48, 23);
  int checked = 0;
  for (size_t r = 0; r < cases.size(); r++) {
    CAPTURE(r);
    SampleCase &c = cases[r];
    c.p.temperature = 1.0f;
    c.p.top_k = 0;
    c.p.top_p = 1.0f;
    c.p.min_p = 0.0f;
    const dsrt::SamplingAdjustments a = dsrt::sampling_adjustments(V, c.p, c.hist.data(), c.hist.size(), c.banned);
    bool in_range = true;
    for (auto [id, b] : c.p.logit_bias) in_range = in_range && id >= 0 && id < V;
    CHECK(a.valid == in_range);
    std::vector<double> l(c.logits.begin(), c.logits.end());
    bool bad = false;
    for (float x : c.logits) bad = bad || !(x < INFINITY);
    for (const dsrt::SamplingAdjust &t : a.ids) {
      double v = double(c.logits[size_t(t.id)]);
      for (int j = 0; j < t.n_bias; j++) v += double(a.bias[size_t(t.bias0 + j)]);
      if (t.count > 0) {
        v = v > 0 ? v / double(c.p.repetition_penalty) : v * double(c.p.repetition_penalty);
        v -= double(c.p.presence_penalty) + double(c.p.frequency_penalty) * t.count;
      }
      if (t.banned) v = -INFINITY;
      bad = bad || !(v < INFINITY);
      l[size_t(t.id)] = v;
    }
    double mx = -INFINITY;
    for (double v : l) mx = std::max(mx, v);
    if (bad || !a.valid || mx == -INFINITY) {
      CHECK_THROWS_AS(dsrt::sampling_distribution(c.logits.data(), V, c.p, c.hist.data(), c.hist.size(), c.banned),
                      dsrt::Error);
      continue;
    }
    double z = 0;
    for (auto &v : l) z += v = std::exp(v - mx);
    const auto q = dsrt::sampling_distribution(c.logits.data(), V, c.p, c.hist.data(), c.hist.size(), c.banned);
    for (int64_t i = 0; i < V; i++) CHECK(q[size_t(i)] == doctest::Approx(l[size_t(i)] / z).epsilon(1e-12));
    checked++;
  }
  CHECK(checked >= 24);
}
