// Hardening, round 2 (issue 16), the C API and text side: what a hostile caller or file used to get through
// silently or by crashing, now a clean DSRT_ERR_* within a stated bound. docs/reliability-round2-api.md
// lists each bound and the test here that holds it.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/fault.h"
#include "core/status.h"
#include "core/thread_pool.h"
#include "engine/sampler.h"
#include "helpers.h"
#include "text/tokenizer.h"
#include "tiny_tokenizer.h"

using namespace testing;
using dsrt::Tokenizer;

namespace {

const std::string kShared = DSRT_SHARED_DATA "/tokenizers";

// The status and message of a dsrt::Error thrown by fn (DSRT_OK if none).
template <class F>
std::pair<dsrt_status, std::string> error_of(F &&fn) {
  try {
    fn();
  } catch (const dsrt::Error &e) {
    return {e.code(), e.what()};
  }
  return {DSRT_OK, ""};
}

// Every tokenizer kind we ship, loaded once: DeepSeek-V3's tokenizer.json, Kimi-K2's tiktoken.model, and
// Llama 2's sentencepiece model (byte fallback, no whitespace normalisation: a round trip is exact).
const Tokenizer &shipped(const std::string &kind) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> loaded;
  auto &t = loaded[kind];
  if (!t) {
    fs::path d = fresh_dir("shipped-" + kind);
    int64_t vocab = 0;
    if (kind == "deepseek-v3") {
      fs::copy_file(kShared + "/deepseek-v3/tokenizer.json", d / "tokenizer.json");
      fs::copy_file(kShared + "/deepseek-v3/tokenizer_config.json", d / "tokenizer_config.json");
      vocab = 129280;
    } else if (kind == "kimi-k2") {
      fs::copy_file(kShared + "/kimi-k2/tiktoken.model", d / "tiktoken.model");
      fs::copy_file(kShared + "/kimi-k2/tokenizer_config.json", d / "tokenizer_config.json");
      vocab = 163840;
    } else {
      fs::copy_file(kShared + "/llama2/tokenizer.model", d / "tokenizer.model");
    }
    t = Tokenizer::load(d.string(), vocab);
    REQUIRE(t != nullptr);
  }
  return *t;
}

std::string repeat_to(const std::string &unit, size_t n) {
  std::string s;
  while (s.size() < n) s += unit;
  return s;
}

// The tiny byte-level tokenizer with its pre-tokenizer replaced by one Split stage of `regex`.
std::unique_ptr<Tokenizer> tiny_with_split(const std::string &regex) {
  fs::path d = fresh_dir("split");
  dsrt::tools::write_tiny_tokenizer(d.string(), 512);
  auto j = nlohmann::json::parse(slurp(d / "tokenizer.json"));
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
                          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  spit(d / "tokenizer.json", j.dump());
  return Tokenizer::load(d.string(), 512);
}

// A copy of a tiny checkpoint whose tokenizer_config.json is replaced by `config`.
std::string tiny_with_tokenizer_config(const std::string &preset, const std::string &config_path) {
  fs::path d = fresh_dir("tokcfg-" + preset);
  for (auto &e : fs::directory_iterator(tiny(preset))) fs::copy(e.path(), d / e.path().filename(), fs::copy_options::recursive);
  fs::copy_file(config_path, d / "tokenizer_config.json", fs::copy_options::overwrite_existing);
  return d.string();
}

// Two pages, the second inaccessible: a struct placed at the end of the first faults on any read past it.
struct GuardedPage {
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  char *base = nullptr;
  GuardedPage() {
    void *p = mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    base = static_cast<char *>(p);
    REQUIRE(mprotect(base + page, page, PROT_NONE) == 0);
  }
  ~GuardedPage() { munmap(base, 2 * page); }
  template <class T>
  T *at_end() {
    std::memset(base, 0, page);
    return reinterpret_cast<T *>(base + page - sizeof(T));
  }
};

}  // namespace

// ---- item 9: silent text loss, bounded regex work, cancel

TEST_CASE("Kimi-K2: a DNA fragment of 5,000 letters and the text after it are encoded (PCRE2 used to drop both)") {
  const Tokenizer &t = shipped("kimi-k2");
  const std::string text = "Sequence: " + repeat_to("ACGT", 5000) + " ends here.";
  const auto ids = t.encode(text, false);
  CHECK(t.decode(ids, false) == text);
}

TEST_CASE("100 KB runs of each character class round-trip through every tokenizer kind we ship") {
  const std::vector<std::pair<const char *, std::string>> classes = {
      {"letters", "ACGTTGCA"},       {"digits", "0123456789"},
      {"cjk", "中文字符测试漢字"},   {"spaces", " "},
      {"punctuation", "!?.,;:-()"},  {"emoji", "😀🚀👍🏽"},
      {"mixed", "word 42 中文 !? 😀\n\tnext"}};
  for (const std::string kind : {"deepseek-v3", "kimi-k2", "llama2-spm"}) {
    const Tokenizer &t = shipped(kind);
    for (auto &[name, unit] : classes) {
      CAPTURE(kind);
      const std::string class_name = name;
      CAPTURE(class_name);
      const std::string text = repeat_to(unit, 100 * 1024);
      const auto ids = t.encode(text, false);
      CHECK(!ids.empty());
      CHECK(t.decode(ids, false) == text);
    }
  }
}

TEST_CASE("a split regex that backtracks catastrophically ends at its match limit with an error, not lost text") {
  auto t = tiny_with_split("(a|aa)+$");
  const std::string text = "before " + std::string(40, 'a') + "! after";  // 2^40 ways to fail at '!'
  const auto t0 = std::chrono::steady_clock::now();
  auto [code, msg] = error_of([&] { (void)t->encode(text, false); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(code == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(msg.find("match limit") != std::string::npos);
  CHECK(s < 5.0);  // one match call's limit: ~10 M steps, ~0.1 s measured
}

TEST_CASE("a cancel flag reaches tokenization: set before, and set while a quadratic split regex runs") {
  auto t = tiny_with_split("a*b|a");  // every match from position i scans to the end: O(n^2) work
  std::atomic<int> cancel{1};
  CHECK(error_of([&] { (void)t->encode("abc", false, &cancel); }).first == DSRT_ERR_CANCELLED);
  cancel = 0;
  CHECK(t->decode(t->encode("aab", false, &cancel), false) == "aab");
  const std::string text(200000, 'a');  // ~20 s of matching uncancelled (0.04 ms per byte at 20 KB, growing)
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    cancel = 1;
  });
  const auto t0 = std::chrono::steady_clock::now();
  auto [code, msg] = error_of([&] { (void)t->encode(text, false, &cancel); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  canceller.join();
  CHECK(code == DSRT_ERR_CANCELLED);
  CHECK(s < 3.0);  // one match call (at most a few ms here) past the flag
}

// ---- item 3 (part): added token ids against the vocabulary before any table grows

TEST_CASE("tokenizer.json: added token ids of 2^31-1 and 3e8 are FORMAT errors before any allocation") {
  fs::path d = fresh_dir("huge-id");
  dsrt::tools::write_tiny_tokenizer(d.string(), 512);
  const auto base = nlohmann::json::parse(slurp(d / "tokenizer.json"));
  for (int64_t id : {int64_t(INT32_MAX), int64_t(300000000), int64_t(512), int64_t(-1)}) {
    for (int64_t model_vocab : {int64_t(0), int64_t(512)}) {
      CAPTURE(id);
      CAPTURE(model_vocab);
      if (id == 512 && model_vocab == 0) continue;  // below the file-size cap without a model: a valid id
      auto j = base;
      j["added_tokens"].push_back({{"id", id}, {"content", "<forged>"}, {"special", true}});
      spit(d / "tokenizer.json", j.dump());
      auto [code, msg] = error_of([&] { (void)Tokenizer::load(d.string(), model_vocab); });
      CHECK(code == DSRT_ERR_FORMAT);
      CHECK(msg.find(std::to_string(id)) != std::string::npos);
    }
  }
  // 3e8 written as a JSON float is not an id either.
  std::string text = base.dump();
  auto j = base;
  j["added_tokens"].push_back({{"id", 3e8}, {"content", "<forged>"}});
  spit(d / "tokenizer.json", j.dump());
  CHECK(error_of([&] { (void)Tokenizer::load(d.string(), 0); }).first == DSRT_ERR_FORMAT);
}

TEST_CASE("tiktoken: ranks and added_tokens_decoder ids beyond the vocabulary are FORMAT errors") {
  fs::path d = fresh_dir("tiktoken-ids");
  static const char *b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string model;
  for (int b = 0; b < 256; b++)  // one byte -> 2 base64 characters and "=="
    model += std::string{b64[b >> 2], b64[(b & 3) << 4], '=', '='} + " " + std::to_string(b) + "\n";
  spit(d / "tiktoken.model", model);
  spit(d / "tokenizer_config.json", R"({"added_tokens_decoder": {"256": {"content": "<|im_end|>"}}})");
  auto ok = Tokenizer::load(d.string(), 0);
  REQUIRE(ok != nullptr);
  CHECK(ok->find_token("<|im_end|>") == 256);
  for (const char *key : {"2147483647", "300000000", "12abc", "-1"}) {
    CAPTURE(key);
    spit(d / "tokenizer_config.json", std::string(R"({"added_tokens_decoder": {")") + key + R"(": {"content": "<x>"}}})");
    CHECK(error_of([&] { (void)Tokenizer::load(d.string(), 0); }).first == DSRT_ERR_FORMAT);
  }
  spit(d / "tokenizer_config.json", "{}");
  spit(d / "tiktoken.model", model + "QQ== 2147483647\n");
  auto [code, msg] = error_of([&] { (void)Tokenizer::load(d.string(), 0); });
  CHECK(code == DSRT_ERR_FORMAT);
  CHECK(msg.find("2147483647") != std::string::npos);
}

// ---- item 6 (part): non-finite logits are errors, never tokens

TEST_CASE("sampling refuses NaN and +inf logits, naming the token id") {
  std::vector<float> logits(100, 0.5f);
  dsrt::Rng rng(1);
  dsrt::SamplingParams greedy, sampled;
  sampled.temperature = 0.8f;
  for (float bad : {NAN, INFINITY}) {
    logits[37] = bad;
    for (auto *p : {&greedy, &sampled}) {
      auto [code, msg] = error_of([&] { (void)dsrt::sample_token(logits.data(), 100, *p, nullptr, 0, {}, rng); });
      CHECK(code == DSRT_ERR_INTERNAL);
      CHECK(msg.find("non-finite logits") != std::string::npos);
      CHECK(msg.find(std::isnan(bad) ? "NaN at token id 37" : "+inf at token id 37") != std::string::npos);
    }
  }
  logits[37] = -INFINITY;  // a mask, not an error
  CHECK(dsrt::sample_token(logits.data(), 100, greedy, nullptr, 0, {}, rng) == 0);
}

TEST_CASE("a logit bias of -inf on every token is an error, not token 0") {
  std::vector<float> logits(50, 1.0f);
  dsrt::Rng rng(1);
  for (float temperature : {0.0f, 0.7f}) {
    dsrt::SamplingParams p;
    p.temperature = temperature;
    for (int32_t id = 0; id < 50; id++) p.logit_bias.push_back({id, -INFINITY});
    auto [code, msg] = error_of([&] { (void)dsrt::sample_token(logits.data(), 50, p, nullptr, 0, {}, rng); });
    CHECK(code == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(msg.find("no token to sample") != std::string::npos);
  }
  // The same through the C API: the turn ends with an error (DONE, FINISH_ERROR, the status in the event and
  // the text in dsrt_last_error) instead of emitting token 0.
  Model m(tiny("no-qlora"));
  Engine e(m);
  Session s(e);
  s.append({1, 2, 3});
  const int32_t V = m.vocab();
  std::vector<int32_t> ids(size_t(V), 0);
  std::vector<float> bias(size_t(V), -INFINITY);
  for (int32_t i = 0; i < V; i++) ids[size_t(i)] = i;
  dsrt_gen_params gp;
  dsrt_gen_params_init(&gp, sizeof gp, nullptr);
  gp.logit_bias_tokens = ids.data();
  gp.logit_bias_values = bias.data();
  gp.n_logit_bias = size_t(V);
  gp.max_new_tokens = 4;
  CHECK_OK(dsrt_session_start(s.s, &gp));
  dsrt_event ev;
  ev.struct_size = sizeof ev;
  const dsrt_status st = dsrt_session_next(s.s, &ev);
  CHECK(st == DSRT_OK);
  CHECK(ev.type == DSRT_EVENT_DONE);
  CHECK(ev.finish_reason == DSRT_FINISH_ERROR);
  CHECK(ev.status == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(ev.token == -1);
  CHECK(std::string(dsrt_last_error()).find("no token to sample") != std::string::npos);
  CHECK(dsrt_session_next(s.s, &ev) == DSRT_ERR_BAD_STATE);  // the turn is over
}

// ---- item 7: threads

TEST_CASE("n_threads beyond the machine is INVALID_ARGUMENT; a pool whose thread start fails joins what started") {
  const int cap = dsrt::ThreadPool::max_threads();
  CHECK(cap == DSRT_MAX_THREADS_PER_CORE * int(std::max(1u, std::thread::hardware_concurrency())));
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  dsrt_model *m = nullptr;
  for (int32_t n : {100000, cap + 1, -1}) {
    CAPTURE(n);
    mp.n_threads = n;
    CHECK(dsrt_model_load(tiny("no-qlora").c_str(), &mp, &m) == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(m == nullptr);
    CHECK(std::string(dsrt_last_error()).find("n_threads") != std::string::npos);
  }
  CHECK(error_of([&] { dsrt::ThreadPool pool(100000); }).first == DSRT_ERR_INVALID_ARGUMENT);
  // The 4th thread start fails: the three started ones are stopped and joined, then a clean error.
  const int n = std::min(cap, 8);
  dsrt::fault::arm_alloc_failure(3);
  auto [code, msg] = error_of([&] { dsrt::ThreadPool pool(n); });
  dsrt::fault::disarm();
  if (n > 4) {
    CHECK(code == DSRT_ERR_OUT_OF_MEMORY);
    CHECK(msg.find("started 4 of " + std::to_string(n)) != std::string::npos);
  }
  dsrt::ThreadPool pool(n);  // the process is unharmed: a full pool starts and works
  std::atomic<int64_t> sum{0};
  pool.parallel_for(1000, 10, [&](int64_t b, int64_t e) { sum += e - b; });
  CHECK(sum == 1000);
}

// ---- item 8: garbage struct_size

TEST_CASE("a struct_size above DSRT_MAX_STRUCT_SIZE is INVALID_ARGUMENT and nothing past the struct is touched") {
  Model m(tiny("no-qlora"));
  GuardedPage g;
  dsrt_engine *e = nullptr;
  auto *ep = g.at_end<dsrt_engine_params>();
  dsrt_engine_params_init(ep, sizeof *ep);
  ep->struct_size = 0xffffffffu;  // the library used to scan 4 GiB past it for non-zero fields
  CHECK(dsrt_engine_create(m.m, ep, &e) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(std::string(dsrt_last_error()).find("DSRT_MAX_STRUCT_SIZE") != std::string::npos);
  ep->struct_size = DSRT_MAX_STRUCT_SIZE + 1;
  CHECK(dsrt_engine_create(m.m, ep, &e) == DSRT_ERR_INVALID_ARGUMENT);
  auto *mp = g.at_end<dsrt_model_params>();
  dsrt_model_params_init(mp, sizeof *mp);
  mp->struct_size = 0xffffffffu;
  dsrt_model *m2 = nullptr;
  CHECK(dsrt_model_load(tiny("no-qlora").c_str(), mp, &m2) == DSRT_ERR_INVALID_ARGUMENT);
  // _init with a garbage size writes only struct_size (0), so the next call rejects the struct.
  auto *sp = g.at_end<dsrt_sampling_params>();
  dsrt_sampling_params_init(sp, 0xffffffffu);
  CHECK(sp->struct_size == 0);
  // Output structs: a garbage size is refused before anything is written.
  auto *info = g.at_end<dsrt_model_info>();
  info->struct_size = 0xffffffffu;
  CHECK(dsrt_model_info_get(m.m, info) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(info->n_vocab == 0);
  // The largest allowed size still works when the bytes past the known fields are zero.
  std::vector<unsigned char> big(DSRT_MAX_STRUCT_SIZE, 0);
  auto *bp = reinterpret_cast<dsrt_engine_params *>(big.data());
  dsrt_engine_params_init(bp, sizeof *bp);
  bp->struct_size = DSRT_MAX_STRUCT_SIZE;
  CHECK_OK(dsrt_engine_create(m.m, bp, &e));
  dsrt_engine_free(e);
}

// ---- item 14: bad values are errors naming them

TEST_CASE("token ids outside the vocabulary: detokenize, the detokenizer stream, stop tokens, logit bias") {
  Model m(tiny("no-qlora"));
  const int32_t V = m.vocab();
  for (int32_t bad : {V, -1, INT32_MAX}) {
    CAPTURE(bad);
    const int32_t ids[] = {5, bad};
    char buf[64];
    size_t n = 0;
    CHECK(dsrt_detokenize(m.m, ids, 2, 0, buf, sizeof buf, &n) == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(std::string(dsrt_last_error()).find(std::to_string(bad)) != std::string::npos);
    dsrt_detok *d = nullptr;
    CHECK_OK(dsrt_detok_create(m.m, 0, &d));
    const char *text;
    size_t len;
    CHECK(dsrt_detok_push(d, bad, &text, &len) == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(std::string(dsrt_last_error()).find(std::to_string(bad)) != std::string::npos);
    CHECK_OK(dsrt_detok_push(d, 5, &text, &len));  // the stream is still usable
    dsrt_detok_free(d);
  }
  Engine e(m);
  Session s(e);
  s.append({1, 2, 3});
  dsrt_gen_params gp;
  dsrt_gen_params_init(&gp, sizeof gp, nullptr);
  const int32_t stop[] = {2, V + 7};
  gp.stop_tokens = stop;
  gp.n_stop_tokens = 2;
  CHECK(dsrt_session_start(s.s, &gp) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(std::string(dsrt_last_error()).find(std::to_string(V + 7)) != std::string::npos);
  gp.n_stop_tokens = 0;
  const int32_t bias_ids[] = {-3};
  const float bias_vals[] = {1.0f};
  gp.logit_bias_tokens = bias_ids;
  gp.logit_bias_values = bias_vals;
  gp.n_logit_bias = 1;
  CHECK(dsrt_session_start(s.s, &gp) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(std::string(dsrt_last_error()).find("-3") != std::string::npos);
  const int32_t ok_id[] = {4};
  const float nan_val[] = {NAN};
  gp.logit_bias_tokens = ok_id;
  gp.logit_bias_values = nan_val;
  CHECK(dsrt_session_start(s.s, &gp) == DSRT_ERR_INVALID_ARGUMENT);
}

TEST_CASE("kv_memory_fraction on the CPU: engines of one process share the free memory; bad fractions refused") {
  Model m(tiny("no-qlora"));
  auto make = [&](float fraction, dsrt_engine **out) {
    dsrt_engine_params p;
    dsrt_engine_params_init(&p, sizeof p);
    p.kv_memory_fraction = fraction;
    return dsrt_engine_create(m.m, &p, out);
  };
  auto pages = [](dsrt_engine *e) {
    dsrt_engine_stats st;
    st.struct_size = sizeof st;
    CHECK_OK(dsrt_engine_stats_get(e, &st));
    return int64_t(st.kv_pages_total);
  };
  for (float bad : {-0.1f, 1.5f, NAN, 0.96f}) {
    dsrt_engine *e = nullptr;
    CHECK(make(bad, &e) == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(e == nullptr);
  }
  dsrt_engine *a = nullptr, *b = nullptr, *c = nullptr;
  CHECK_OK(make(0.5f, &a));
  CHECK_OK(make(0.5f, &b));
  const int64_t pa = pages(a), pb = pages(b);
  // b sees what a may still allocate as taken: about half of a's share (free memory moves a little).
  CHECK(pb < pa * 3 / 4);
  CHECK(pb > pa / 4);
  dsrt_engine_free(a);
  dsrt_engine_free(b);
  CHECK_OK(make(0.5f, &c));  // freed pools give their promise back
  CHECK(pages(c) > pb * 3 / 2);
  dsrt_engine_free(c);
}

// ---- issue 9 item 7a: one tokenization path

TEST_CASE("dsrt_tokenize and dsrt_session_append_text agree on ADD_SPECIAL, with R1's add_bos_token false") {
  const std::string r1 = tiny_with_tokenizer_config("no-qlora", kShared + "/deepseek-r1-cdn/tokenizer_config.json");
  for (const std::string &dir : {r1, tiny("no-qlora")}) {  // add_bos_token false (R1) and true (tiny)
    CAPTURE(dir);
    Model m(dir);
    Engine e(m);
    const std::string text = "Hello <｜User｜> world";
    for (int32_t flags : {0, DSRT_TOKENIZE_ADD_SPECIAL, DSRT_TOKENIZE_PARSE_SPECIAL,
                          DSRT_TOKENIZE_ADD_SPECIAL | DSRT_TOKENIZE_PARSE_SPECIAL}) {
      CAPTURE(flags);
      std::vector<int32_t> ids(256);
      size_t n = 0;
      CHECK_OK(dsrt_tokenize(m.m, text.data(), text.size(), flags, ids.data(), ids.size(), &n));
      ids.resize(n);
      Session s(e);
      CHECK_OK(dsrt_session_append_text(s.s, text.data(), text.size(), flags));
      s.eval();  // the token view holds evaluated tokens
      const int32_t *toks;
      size_t nt;
      CHECK_OK(dsrt_session_tokens(s.s, &toks, &nt));
      CHECK(std::vector<int32_t>(toks, toks + nt) == ids);
      const int32_t bos = dsrt_special_token(m.m, DSRT_SPECIAL_BOS);
      REQUIRE(bos >= 0);
      const bool wants_bos = dir != r1 && (flags & DSRT_TOKENIZE_ADD_SPECIAL);
      CHECK((!ids.empty() && ids[0] == bos) == wants_bos);
    }
  }
}
