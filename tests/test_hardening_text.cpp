// Hardening of the text side (issue 16, items 1, 2, 13): JSON nested past any stack, templates that crash,
// starve or exhaust the interpreter, and prompts that hold a NUL. Each case is an input that crashed, hung,
// leaked or cut text before; each now ends in a clean dsrt error (or the right text) within its bound.
// Huge inputs are generated here, not stored.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>

#include "core/json.h"
#include "core/status.h"
#include "helpers.h"
#include "model/config.h"
#include "text/chat_template.h"
#include "text/jinja.h"

using namespace testing;
using Json = dsrt::jinja::Json;

namespace {

std::string repeat(const std::string &s, size_t n) {
  std::string r;
  r.reserve(s.size() * n);
  for (size_t i = 0; i < n; i++) r += s;
  return r;
}
// "[[[...[x]...]]]", depth levels of arrays around x.
std::string nested_array(size_t depth, const std::string &x = "1") { return repeat("[", depth) + x + repeat("]", depth); }

// The code and message of the dsrt::Error that fn throws; FAILs when it throws nothing.
template <class F>
std::pair<dsrt_status, std::string> error_of(F &&fn) {
  try {
    fn();
  } catch (const dsrt::Error &e) {
    return {e.code(), e.what()};
  }
  FAIL("no error");
  return {DSRT_OK, ""};
}

std::string render(const std::string &src, const Json &ctx = Json::object(), dsrt::jinja::Limits lim = {}) {
  return dsrt::jinja::Template(src, lim).render(ctx);
}
// A template that must fail (to parse or to render) with DSRT_ERR_FORMAT and a message naming `bound`.
void fails_on(const std::string &src, const char *bound, const Json &ctx = Json::object(), dsrt::jinja::Limits lim = {}) {
  auto [code, msg] = error_of([&] { render(src, ctx, lim); });
  INFO("template starts: ", src.substr(0, 80), "; error: ", msg);
  CHECK(code == DSRT_ERR_FORMAT);
  CHECK(msg.find(bound) != std::string::npos);
}

std::string v3_tokenizer_dir() {
  static std::string dir;
  if (!dir.empty()) return dir;
  fs::path d = fresh_dir("hardening_v3tok");
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

// ---------------------------------------------------------------- item 1: nested JSON

TEST_CASE("parse_json refuses nesting past 256 levels before parsing, in linear time") {
  CHECK(dsrt::parse_json(nested_array(dsrt::kMaxJsonDepth), "x").is_array());
  auto [code, msg] = error_of([] { dsrt::parse_json(nested_array(dsrt::kMaxJsonDepth + 1), "messages_json"); });
  CHECK(code == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(msg.find("messages_json nests deeper than 256 levels") != std::string::npos);
  // Brackets inside strings (escaped quotes included) are text, not nesting.
  CHECK(dsrt::parse_json("[\"" + repeat("[{", 10000) + "\\\"" + repeat("[", 1000) + "\"]", "x").size() == 1);
  // 10 M levels: one scan, refused without building anything.
  auto [code2, msg2] = error_of([] { dsrt::parse_json_sorted(nested_array(10'000'000), "config.json"); });
  CHECK(code2 == DSRT_ERR_FORMAT);
  CHECK(dsrt::json_text_depth("{\"a\": [1, {\"b\": []}]}", 100) == 4);
  // Values built in C++ are measured without recursion, however deep.
  Json deep = 1;
  for (int i = 0; i < 200000; i++) {
    Json wrap = Json::array();
    wrap.push_back(std::move(deep));
    deep = std::move(wrap);
  }
  CHECK(dsrt::json_value_depth(deep, 300) == 301);
  Json ctx = Json::object();
  ctx["deep"] = std::move(deep);  // moved, never copied (a copy recurses)
  auto [code3, msg3] = error_of([&] { dsrt::jinja::Template("{{ 1 }}").render(ctx); });
  CHECK(code3 == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(msg3.find("nest deeper") != std::string::npos);
}

TEST_CASE("messages, tools and content nested 100,000 deep are refused by chat apply (they crashed it)") {
  TokModel tm(v3_tokenizer_dir());
  char *out = nullptr;
  size_t len = 0;
  const std::string deep_messages = nested_array(100000, "{\"role\":\"user\",\"content\":\"hi\"}");
  CHECK(dsrt_chat_apply(tm.m, deep_messages.c_str(), nullptr, nullptr, 0, &out) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(std::string(dsrt_last_error()).find("nests deeper than 256") != std::string::npos);
  const std::string msgs = R"([{"role":"user","content":"hi"}])";
  const std::string deep_tools = nested_array(100000);
  CHECK(dsrt_chat_apply_n(tm.m, msgs.c_str(), deep_tools.c_str(), nullptr, 0, &out, &len) == DSRT_ERR_INVALID_ARGUMENT);
  const std::string deep_content = R"([{"role":"user","content":)" + nested_array(50000) + "}]";
  CHECK(dsrt_chat_apply(tm.m, deep_content.c_str(), nullptr, nullptr, 0, &out) == DSRT_ERR_INVALID_ARGUMENT);
  const std::string deep_kwargs = "{\"x\":" + nested_array(100000) + "}";
  CHECK(dsrt_chat_apply(tm.m, msgs.c_str(), nullptr, deep_kwargs.c_str(), 0, &out) == DSRT_ERR_INVALID_ARGUMENT);
  // Within the bound, nesting is fine.
  const std::string ok_kwargs = "{\"x\":" + nested_array(200) + "}";
  CHECK_OK(dsrt_chat_apply(tm.m, msgs.c_str(), nullptr, ok_kwargs.c_str(), 0, &out));
  CHECK(std::string(out) == "<｜begin▁of▁sentence｜><｜User｜>hi");
  dsrt_free(out);
}

TEST_CASE("config.json nested past the bound is a format error naming the file") {
  auto [code, msg] = error_of([] { dsrt::parse_model_config("{\"a\":" + nested_array(100000) + "}", "dir/config.json"); });
  CHECK(code == DSRT_ERR_FORMAT);
  CHECK(msg.find("dir/config.json nests deeper than 256") != std::string::npos);
}

TEST_CASE("values built inside a template cannot nest past the value bound") {
  // Each wrap adds a level; past 320 the next copy is refused (tojson, ==, copies recurse over levels).
  fails_on("{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x|tojson }}",
           "nests deeper");
  fails_on("{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = {'k': ns.x} %}{% endfor %}", "nests deeper");
  fails_on("{% set ns = namespace(a=1) %}{% for i in range(100000) %}{% set ns.a = ns %}{% endfor %}", "nests deeper");
  const Json ctx = Json::parse("{\"x\":" + nested_array(250) + "}");
  CHECK(render("{{ [[[x]]]|tojson|length }}", ctx) == std::to_string(2 * 253 + 1));
}

// ---------------------------------------------------------------- item 2(a): parser and tree depth

TEST_CASE("deep and long expressions fail to parse cleanly (they overflowed the stack)") {
  fails_on("{{ " + repeat("not ", 40000) + "1 }}", "nested too deeply");
  fails_on("{{ " + repeat("-", 1000000) + "1 }}", "nested too deeply");
  fails_on("{{ 1" + repeat(" + 1", 200000) + " }}", "nested too deeply");
  fails_on("{{ x" + repeat(".x", 1000000) + " }}", "nested too deeply");
  fails_on("{{ x" + repeat("[0]", 1000000) + " }}", "nested too deeply");
  fails_on("{{ x" + repeat(" or x", 1000000) + " }}", "nested too deeply");
  fails_on("{{ x" + repeat(" ~ x", 1000000) + " }}", "nested too deeply");
  fails_on("{{ 'a'" + repeat(".upper()", 100000) + " }}", "nested too deeply");
  fails_on("{{ 'a'" + repeat("|upper", 100000) + " }}", "nested too deeply");
  fails_on("{{ " + repeat("(", 100000) + "1" + repeat(")", 100000) + " }}", "nested too deeply");
  fails_on("{{ " + repeat("[", 100000) + repeat("]", 100000) + " }}", "nested too deeply");
  fails_on("{% if " + repeat("f(", 100000) + " %}", "nested too deeply");
  // The same shapes within the bound still render.
  CHECK(render("{{ 1" + repeat(" + 1", 150) + " }}") == "151");
  CHECK(render("{{ " + repeat("not ", 90) + "true }}") == "True");
  CHECK(render("{{ " + repeat("-", 90) + "1 }}") == "1");
  CHECK(render("{{ 'a'" + repeat("|upper", 150) + " }}") == "A");
}

// ---------------------------------------------------------------- item 2(b): strftime_now

TEST_CASE("strftime_now returns its whole result, however long (it carried uninitialised bytes)") {
  char year[16];
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  std::strftime(year, sizeof year, "%Y", &tm);
  // 200 x 4 digits: past the old 256-byte buffer. (A render straddling New Year's midnight would differ.)
  const std::string got = render("{{ strftime_now('" + repeat("%Y", 200) + "') }}");
  CHECK(got == repeat(year, 200));
  CHECK(render("{{ strftime_now('') }}|{{ strftime_now('x') }}") == "|x");
  // Output past the string bound is refused, not truncated.
  dsrt::jinja::Limits lim;
  lim.max_string = 1000;
  fails_on("{{ strftime_now('" + repeat("%Y", 400) + "') }}", "string size limit", Json::object(), lim);
}

// ---------------------------------------------------------------- item 2(c): sizes

TEST_CASE("no string or list grows past its bound: doubling, ~, +, replace, join, tojson(indent)") {
  // A namespace attribute doubled 60 times passed 8 GB.
  fails_on("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "string size limit");
  fails_on("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "string size limit");
  fails_on("{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}", "limit");
  fails_on("{{ ('a' * 1000000).replace('a', 'aaaaaaaaaaaaaaaaaaaa') }}", "string size limit");
  fails_on("{{ ('a' * 1000000)|replace('a', 'aaaaaaaaaaaaaaaaaaaa') }}", "string size limit");
  fails_on("{{ range(100000)|join('x' * 1000) }}", "string size limit");
  fails_on("{{ ','.join(range(100000)|list) * 1000 }}", "string size limit");
  fails_on("{{ 'x' * 9223372036854775807 }}", "string size limit");
  fails_on("{{ ('x' * 2000000)|list|length }}", "item limit");
  // tojson(indent=268435455): 1.5 GB then abort. Now refused before the first indent is written.
  fails_on("{{ {'a': [1, 2]}|tojson(indent=268435455) }}", "string size limit");
  fails_on("{{ [[[[1]]]]|tojson(indent=9223372036854775807) }}", "string size limit");
  CHECK(render("{{ {'a': [1]}|tojson(indent=2) }}") == "{\n  \"a\": [\n    1\n  ]\n}");
  // The prompt itself.
  dsrt::jinja::Limits lim;
  lim.max_output = 1000;
  fails_on("{% for i in range(1000) %}xy{% endfor %}", "output size limit", Json::object(), lim);
}

// ---------------------------------------------------------------- item 2(d): time

TEST_CASE("work is bounded in bytes, not only steps: huge counts, copies and scans") {
  // '' * 2^63-1 looped over the count (1e10 took 50 s): now no work at all.
  CHECK(render("{{ '' * 9223372036854775807 }}|{{ 0 * 'abc' }}|{{ 2 * 'ab' }}") == "||abab");
  // Reading a variable no longer copies it: 200,000 reads of a 16 MB string (3.2 TB of copies before; 1.2 M
  // took ~14 min) cost what the loop costs (13 MB of work: its list, loop variables, loop.previtem/nextitem).
  const Json big = {{"big", std::string(16 << 20, 'x')}};
  dsrt::jinja::Limits lim;
  lim.max_work = 32 << 20;
  CHECK(render("{% for i in range(200000) %}{% if big %}{% endif %}{% endfor %}{{ big|length }}", big, lim) ==
        std::to_string(16 << 20));
  // ... while copying it is counted: 100 copies are 1.6 GB, past the default 256 MB of work.
  fails_on("{% for i in range(100) %}{% set x = big %}{% endfor %}", "work limit", big);
  fails_on("{% for i in range(100000) %}{% set x = big[:16000000] %}{% endfor %}", "work limit", big);
  // Substring search is linear (memmem's two-way algorithm), not |haystack| x |needle|.
  CHECK(render("{{ ('a' * 4000000 + 'b') in ('a' * 16000000) }} {{ ('a' * 16000000).count('a' * 4000000 + 'b') }} "
               "{{ ('a' * 16000000).split('a' * 4000000 + 'b')|length }} {{ ('a' * 16000000).rsplit('a' * 4000000 + 'b')|length }}") ==
        "False 0 1 1");
  // strip with a long set of characters is a table lookup per character.
  CHECK(render("{{ ('ab' * 1000000 + 'c').strip('ab' * 1000000) }}") == "c");
  // rsplit still splits from the right, overlapping separators included.
  CHECK(render("{{ 'aaa'.rsplit('aa', 1) }} {{ 'a,b,c'.rsplit(',', 1) }} {{ 'a,b,c'.rsplit(',') }}") ==
        "['a', ''] ['a,b', 'c'] ['a', 'b', 'c']");
}

TEST_CASE("a cancel flag reaches rendering") {
  dsrt::jinja::Template t("{% for i in range(100) %}{% for j in range(1000) %}{% endfor %}{% endfor %}done");
  std::atomic<int> cancel{0};
  CHECK(t.render(Json::object(), &cancel) == "done");
  cancel = 1;
  auto [code, msg] = error_of([&] { t.render(Json::object(), &cancel); });
  CHECK(code == DSRT_ERR_CANCELLED);
}

// ---------------------------------------------------------------- item 13: NUL in the prompt

TEST_CASE("dsrt_chat_apply_n returns every byte of a prompt that holds U+0000") {
  TokModel tm(v3_tokenizer_dir());
  char *out = nullptr;
  size_t len = 0;
  CHECK_OK(dsrt_chat_apply_n(tm.m, R"([{"role":"user","content":"a\u0000b"}])", nullptr, nullptr,
                             DSRT_CHAT_ADD_GENERATION_PROMPT, &out, &len));
  const std::string want = std::string("<｜begin▁of▁sentence｜><｜User｜>a") + '\0' + "b<｜Assistant｜>";
  CHECK(std::string(out, len) == want);
  CHECK(out[len] == '\0');
  CHECK(std::strlen(out) < len);  // what a caller of dsrt_chat_apply alone would see
  dsrt_free(out);
}

TEST_CASE("append_chat tokenizes the same bytes chat_apply_n returns, NUL included") {
  Model m(tiny("v3-mini"));
  Engine e(m);
  Session s(e);
  const char *msgs = R"([{"role":"user","content":"a\u0000b"}])";
  char *out = nullptr;
  size_t len = 0;
  CHECK_OK(dsrt_chat_apply_n(m.m, msgs, nullptr, nullptr, DSRT_CHAT_ADD_GENERATION_PROMPT, &out, &len));
  std::vector<int32_t> want(len + 8);
  size_t n = 0;
  CHECK_OK(dsrt_tokenize(m.m, out, len, DSRT_TOKENIZE_PARSE_SPECIAL, want.data(), want.size(), &n));
  want.resize(n);
  std::vector<int32_t> cut(len + 8);
  CHECK_OK(dsrt_tokenize(m.m, out, std::strlen(out), DSRT_TOKENIZE_PARSE_SPECIAL, cut.data(), cut.size(), &n));
  cut.resize(n);
  dsrt_free(out);
  CHECK(cut.size() < want.size());  // the NUL-cut prompt loses "b" and the generation prompt
  CHECK_OK(dsrt_session_append_chat(s.s, msgs, nullptr, DSRT_CHAT_ADD_GENERATION_PROMPT));
  s.eval();
  const int32_t *tok = nullptr;
  CHECK_OK(dsrt_session_tokens(s.s, &tok, &n));
  CHECK(std::vector<int32_t>(tok, tok + n) == want);
}

TEST_CASE("the bounds leave room for real prompts: DeepSeek-V3's template over a 15 MB conversation") {
  Json msgs = Json::array();
  const std::string text(15000, 'w');
  msgs.push_back({{"role", "system"}, {"content", text}});
  for (int i = 0; i < 999; i++) msgs.push_back({{"role", i % 2 ? "assistant" : "user"}, {"content", text}});
  Json ctx = {{"messages", msgs}, {"add_generation_prompt", true}, {"bos_token", "<s>"}, {"eos_token", "</s>"}};
  const std::string prompt = dsrt::jinja::Template(dsrt::ChatTemplate::builtin_deepseek_v3()).render(ctx);
  CHECK(prompt.size() > 15000000);
  CHECK(prompt.size() < dsrt::jinja::Limits{}.max_output);
}
