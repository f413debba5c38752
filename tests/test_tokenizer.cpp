// Tokenizers against reference implementations: the real DeepSeek-V3 tokenizer.json, Kimi-K2's
// tiktoken.model and sentencepiece models, with expected ids made by Hugging Face tokenizers, tiktoken and
// sentencepiece (../shared/data/tokenizers/SOURCES.md and tests/data/tokenizer/README.md say how).
#include <doctest/doctest.h>

#include <chrono>
#include <fstream>
#include <random>
#include <sstream>

#include "core/status.h"
#include "helpers.h"
#include "text/tokenizer.h"

using namespace testing;
using dsrt::Tokenizer;

namespace {

const std::string kShared = DSRT_SHARED_DATA "/tokenizers";

std::string slurp(const std::string &p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "missing test data " << p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// llama.cpp's test-tokenizer-0 format: strings separated by "\n__ggml_vocab_test__\n"; one line of ids each.
std::vector<std::pair<std::string, std::vector<int32_t>>> vectors(const std::string &inp, const std::string &out) {
  std::string in = slurp(inp), o = slurp(out);
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  size_t pos = 0;
  while (pos < in.size()) {
    size_t e = in.find(sep, pos);
    if (e == std::string::npos) break;
    texts.push_back(in.substr(pos, e - pos));
    pos = e + sep.size();
  }
  std::vector<std::pair<std::string, std::vector<int32_t>>> v;
  std::istringstream lines(o);
  std::string line;
  for (auto &t : texts) {
    std::getline(lines, line);
    std::vector<int32_t> ids;
    std::istringstream ls(line);
    int32_t id;
    while (ls >> id) ids.push_back(id);
    v.push_back({t, ids});
  }
  return v;
}

std::unique_ptr<Tokenizer> load_dir(const std::string &dir, int64_t vocab) {
  auto t = Tokenizer::load(dir, vocab);
  REQUIRE(t != nullptr);
  return t;
}

void check_vectors(const Tokenizer &t, const std::string &inp, const std::string &out, bool parse_special) {
  auto v = vectors(inp, out);
  REQUIRE(v.size() > 40);
  int ok = 0;
  for (auto &[text, ids] : v) {
    auto got = t.encode(text, parse_special);
    CHECK_MESSAGE(got == ids, "text: \"" << text << "\"");
    ok += got == ids;
    CHECK(t.decode(got, false) == text);
  }
  MESSAGE(ok << "/" << v.size() << " strings encode exactly");
}

}  // namespace

TEST_CASE("DeepSeek-V3 tokenizer.json: Hugging Face tokenizers' ids on the shared test vectors") {
  auto t = load_dir(kShared + "/deepseek-v3", 129280);
  CHECK(std::string(t->kind()) == "bpe");
  CHECK(t->bos_id == 0);
  CHECK(t->eos_id == 1);
  CHECK(t->add_bos);
  CHECK(!t->chat_template.empty());
  CHECK(t->find_token("<｜User｜>") == 128803);
  CHECK(t->find_token("<｜Assistant｜>") == 128804);
  CHECK((t->attr(1) & dsrt::kTokenEog));
  CHECK((t->attr(129000) & dsrt::kTokenUnused));  // embedding rows past the tokenizer
  check_vectors(*t, kShared + "/deepseek-v3/test-vectors.inp", kShared + "/deepseek-v3/test-vectors.out", true);
}

TEST_CASE("Kimi-K2 tiktoken.model: tiktoken's ids on the shared test vectors") {
  fs::path d = fresh_dir("kimi");
  fs::copy_file(kShared + "/kimi-k2/tiktoken.model", d / "tiktoken.model");
  fs::copy_file(kShared + "/kimi-k2/tokenizer_config.json", d / "tokenizer_config.json");
  auto t = load_dir(d.string(), 163840);
  CHECK(std::string(t->kind()) == "tiktoken");
  CHECK(t->find_token("[BOS]") == 163584);
  CHECK(t->find_token("<|im_end|>") == 163586);
  CHECK((t->attr(163586) & dsrt::kTokenEog));
  CHECK(t->encode("Hello world", false) == std::vector<int32_t>{19180, 2695});
  check_vectors(*t, kShared + "/kimi-k2/test-vectors.inp", kShared + "/kimi-k2/test-vectors.out", false);
}

TEST_CASE("sentencepiece models: sentencepiece's ids on the shared test vectors") {
  for (const char *m : {"test_model.model", "test_ja_model.model"}) {
    CAPTURE(m);
    fs::path d = fresh_dir("spm");
    fs::copy_file(kShared + "/sentencepiece-test/" + m, d / "tokenizer.model");
    auto t = load_dir(d.string(), 0);
    CHECK(std::string(t->kind()) == "sentencepiece");
    auto v = vectors(kShared + "/sentencepiece-test/test-vectors.inp", kShared + "/sentencepiece-test/" + m + ".out");
    for (auto &[raw, ids] : v) {
      // These expected ids were made by Python reading the .inp in text mode, which turns the one CRLF in
      // it into LF (string 55); encode what the generator encoded.
      std::string text = raw;
      for (size_t p = text.find("\r\n"); p != std::string::npos; p = text.find("\r\n", p)) text.erase(p, 1);
      auto got = t->encode(text, false);
      std::string g, w;
      for (int32_t i : got) g += " " + std::to_string(i);
      for (int32_t i : ids) w += " " + std::to_string(i);
      CHECK_MESSAGE(g == w, "text: \"" << text << "\"");
    }
  }
}

TEST_CASE("any bytes round-trip through the byte-level tokenizers, invalid UTF-8 included") {
  auto t = load_dir(kShared + "/deepseek-v3", 129280);
  std::mt19937 rng(9);
  for (int i = 0; i < 200; i++) {
    std::string s(size_t(rng() % 40), '\0');
    for (auto &c : s) c = char(rng() % 4 ? rng() % 128 : rng() % 256);
    CHECK(t->decode(t->encode(s, false), false) == s);
  }
  std::string bad = "ok \xff\xfe \xc3( \xed\xa0\x80 \xf0\x9f\x98";  // stray, truncated, surrogate, cut emoji
  CHECK(t->decode(t->encode(bad, true), false) == bad);
}
