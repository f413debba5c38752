// Byte-pair tokenizers: Hugging Face tokenizer.json (byte-level BPE with Split pre-tokenizers, as DeepSeek
// ships) and tiktoken.model (rank-ordered byte strings, as Kimi-K2/Moonlight ship). Both become: regex
// splits, then BPE over bytes where adjacent parts (a, b) merge by the rank of the pair.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <new>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "core/json.h"
#include "core/status.h"
#include "core/file.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

namespace dsrt {
namespace {

using json = nlohmann::json;

// Unicode White_Space (what Oniguruma's and Rust regex's \s match) has U+0085, which PCRE2's \s lacks.
std::string pcre2_pattern(const std::string &p) {
  std::string out;
  int in_class = 0;
  for (size_t i = 0; i < p.size(); i++) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char n = p[i + 1];
      if (n == 's')
        out += in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
      else if (n == 'S' && !in_class)
        out += "[^\\s\\x{85}]";
      else
        out += p.substr(i, 2);
      i++;
      continue;
    }
    if (c == '[') in_class++;
    if (c == ']' && in_class) in_class--;
    out += c;
  }
  return out;
}

// What one pcre2_match call may spend, sized for its subject (a pre-tokenizer regex from a file can
// backtrack catastrophically; the shipped ones need stack and steps linear in the longest match).
// Measured with Kimi-K2's split pattern (the most demanding we ship) on one 100 KB run of letters: 1 MiB
// of JIT stack (~8.4 bytes per byte of match) and ~105,000 match-limit steps (~1 per byte); runs of digits,
// CJK, spaces, punctuation and emoji need less.
struct RegexBounds {
  static constexpr size_t kJitStackPerByte = 16;                  // 2x the measured need
  static constexpr size_t kJitStackMin = size_t(32) << 10;        // PCRE2's own default
  static constexpr size_t kJitStackMax = size_t(256) << 20;       // one match of ~16 MB of letters
  static constexpr uint32_t kMatchLimitBase = 10'000'000;         // PCRE2's default
  static constexpr uint32_t kMatchLimitPerByte = 8;               // 8x the measured need
  static constexpr uint32_t kHeapLimitBaseKiB = 20 << 10;         // interpreter only (no JIT): PCRE2's default
  static constexpr uint32_t kHeapLimitPerKiB = 256;               // KiB of backtracking frames per KiB of subject
  static constexpr uint32_t kHeapLimitMaxKiB = 1u << 20;          // 1 GiB

  // Spans up to 2 KiB fit PCRE2's default stack (on the machine stack, no allocation).
  static size_t jit_stack(size_t n) { return std::clamp(n * kJitStackPerByte, kJitStackMin, kJitStackMax); }
  static uint32_t match_limit(size_t n) {
    return uint32_t(std::min<uint64_t>(kMatchLimitBase + uint64_t(n) * kMatchLimitPerByte, UINT32_MAX));
  }
  static uint32_t heap_limit_kib(size_t n) {
    return uint32_t(std::min<uint64_t>(kHeapLimitBaseKiB + (uint64_t(n) >> 10) * kHeapLimitPerKiB, kHeapLimitMaxKiB));
  }
};

class Regex {
 public:
  Regex(const std::string &pattern, const std::string &where) : where_(where) {
    int err;
    PCRE2_SIZE off;
    std::string p = pcre2_pattern(pattern);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.c_str()), p.size(), PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK,
                          &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      failf(DSRT_ERR_FORMAT, where, ": pre-tokenizer regex does not compile at offset ", off, ": ",
            reinterpret_cast<char *>(msg));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;  // the interpreter runs it if JIT is unavailable
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex &) = delete;
  Regex &operator=(const Regex &) = delete;

  // Calls fn(begin, end) for each match in text (valid UTF-8) left to right. Every match error (a limit of
  // RegexBounds reached, or anything else PCRE2 reports) throws: a failed match never ends the text early.
  // cancel is read before each match.
  template <class F>
  void for_each_match(std::string_view text, const std::atomic<int> *cancel, F &&fn) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), pcre2_match_data_free);
    std::unique_ptr<pcre2_match_context, decltype(&pcre2_match_context_free)> mc(pcre2_match_context_create(nullptr),
                                                                                 pcre2_match_context_free);
    if (!md || !mc) throw std::bad_alloc();
    std::unique_ptr<pcre2_jit_stack, decltype(&pcre2_jit_stack_free)> stack(nullptr, pcre2_jit_stack_free);
    const size_t stack_bytes = RegexBounds::jit_stack(text.size());
    if (jit_ && stack_bytes > RegexBounds::kJitStackMin) {  // reserved, then committed only as the match grows
      stack.reset(pcre2_jit_stack_create(RegexBounds::kJitStackMin, stack_bytes, nullptr));
      if (!stack) throw std::bad_alloc();
      pcre2_jit_stack_assign(mc.get(), nullptr, stack.get());
    }
    const uint32_t match_limit = RegexBounds::match_limit(text.size()), heap_kib = RegexBounds::heap_limit_kib(text.size());
    pcre2_set_match_limit(mc.get(), match_limit);
    pcre2_set_depth_limit(mc.get(), match_limit);
    pcre2_set_heap_limit(mc.get(), heap_kib);
    size_t pos = 0;
    while (pos < text.size()) {
      if (cancel && cancel->load(std::memory_order_relaxed)) fail(DSRT_ERR_CANCELLED, "tokenization cancelled");
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos, PCRE2_NO_UTF_CHECK,
                           md.get(), mc.get());
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) match_failed(rc, pos, text.size(), stack_bytes, match_limit, heap_kib);
      PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md.get());
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // an empty match: step over one character
        pos = b + 1;
        while (pos < text.size() && (uint8_t(text[pos]) & 0xc0) == 0x80) pos++;
        continue;
      }
      fn(b, e);
      pos = e;
    }
  }

 private:
  [[noreturn]] void match_failed(int rc, size_t pos, size_t n, size_t stack_bytes, uint32_t match_limit,
                                 uint32_t heap_kib) const {
    const char *what = rc == PCRE2_ERROR_JIT_STACKLIMIT ? "JIT stack"
                       : rc == PCRE2_ERROR_MATCHLIMIT   ? "match limit"
                       : rc == PCRE2_ERROR_DEPTHLIMIT   ? "depth limit"
                       : rc == PCRE2_ERROR_HEAPLIMIT    ? "heap limit"
                                                        : nullptr;
    if (what)
      failf(DSRT_ERR_INVALID_ARGUMENT, "tokenizing: the pre-tokenizer regex of ", where_, " exceeded its ", what,
            " (JIT stack ", stack_bytes >> 10, " KiB, match limit ", match_limit, " steps, heap ", heap_kib,
            " KiB for a ", n, "-byte span) at byte ", pos, " of the span: the text is beyond this tokenizer's bounds");
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    failf(DSRT_ERR_INTERNAL, "tokenizing: PCRE2 match error ", rc, " (", reinterpret_cast<char *>(msg), ") at byte ", pos,
          " of a ", n, "-byte span with the pre-tokenizer regex of ", where_);
  }

  pcre2_code *code_ = nullptr;
  bool jit_ = false;
  std::string where_;
};

class BytePairTokenizer : public Tokenizer {
 public:
  // Pieces that pass through one split stage: Isolated (matches and the gaps between) or matches only.
  struct Stage {
    std::unique_ptr<Regex> re;
    bool keep_gaps;
  };
  std::vector<Stage> stages;
  int32_t byte_id[256];
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged id)
  std::unordered_map<std::string, int32_t> by_bytes;                 // ordinary token bytes -> id

  // Regex splitting runs over valid UTF-8; a byte that is not part of a valid character is a piece of its
  // own (its byte token), so any byte string round-trips.
  void encode_ordinary(std::string_view span, std::vector<int32_t> &out, const std::atomic<int> *cancel) const override {
    size_t i = 0;
    while (i < span.size()) {
      size_t j = i;
      while (j < span.size()) {
        size_t l = utf8_len_at(span, j);
        if (!l) break;
        j += l;
      }
      if (j > i) split_and_merge(span.substr(i, j - i), out, cancel);
      if (j < span.size()) {
        out.push_back(byte_id[uint8_t(span[j])]);
        j++;
      }
      i = j;
    }
  }

  void split_and_merge(std::string_view span, std::vector<int32_t> &out, const std::atomic<int> *cancel) const {
    std::vector<std::pair<size_t, size_t>> pieces = {{0, span.size()}}, next;
    for (const Stage &st : stages) {
      next.clear();
      for (const auto &piece : pieces) {
        const size_t pb = piece.first, pe = piece.second;  // plain names: lambdas cannot capture bindings in clang 14
        size_t last = pb;
        st.re->for_each_match(span.substr(pb, pe - pb), cancel, [&](size_t b, size_t e) {
          if (st.keep_gaps && pb + b > last) next.push_back({last, pb + b});
          next.push_back({pb + b, pb + e});
          last = pb + e;
        });
        if (st.keep_gaps && last < pe) next.push_back({last, pe});
      }
      pieces.swap(next);
    }
    for (auto [b, e] : pieces) bpe(span.substr(b, e - b), out);
  }

  // BPE of one piece: repeatedly merge the adjacent pair of lowest rank (leftmost first). A heap over
  // candidate pairs and a linked list of parts keep long pieces O(n log n).
  void bpe(std::string_view piece, std::vector<int32_t> &out) const {
    if (piece.empty()) return;
    if (piece.size() <= 64) {
      std::lock_guard lk(cache_mu_);
      auto it = cache_.find(std::string(piece));
      if (it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t n = piece.size();
    std::vector<int32_t> id(n), prev(n), next(n);
    for (size_t i = 0; i < n; i++) {
      id[i] = byte_id[uint8_t(piece[i])];
      prev[i] = int32_t(i) - 1;
      next[i] = i + 1 < n ? int32_t(i + 1) : -1;
    }
    struct Cand {
      int32_t rank, left, right_id, left_id;
      bool operator>(const Cand &o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int32_t l) {
      int32_t r = next[size_t(l)];
      if (r < 0) return;
      auto it = merges.find(uint64_t(uint32_t(id[size_t(l)])) << 32 | uint32_t(id[size_t(r)]));
      if (it != merges.end()) heap.push({it->second.first, l, id[size_t(r)], id[size_t(l)]});
    };
    for (size_t i = 0; i + 1 < n; i++) push(int32_t(i));
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      int32_t l = c.left, r = next[size_t(l)];
      if (id[size_t(l)] != c.left_id || r < 0 || id[size_t(r)] != c.right_id) continue;  // stale
      id[size_t(l)] = merges.at(uint64_t(uint32_t(c.left_id)) << 32 | uint32_t(c.right_id)).second;
      id[size_t(r)] = -1;
      next[size_t(l)] = next[size_t(r)];
      if (next[size_t(r)] >= 0) prev[size_t(next[size_t(r)])] = l;
      if (prev[size_t(l)] >= 0) push(prev[size_t(l)]);
      push(l);
    }
    size_t start = out.size();
    for (int32_t i = 0; i >= 0; i = next[size_t(i)]) out.push_back(id[size_t(i)]);
    if (piece.size() <= 64) {
      std::lock_guard lk(cache_mu_);
      if (cache_.size() > 200000) cache_.clear();
      cache_.emplace(std::string(piece), std::vector<int32_t>(out.begin() + long(start), out.end()));
    }
  }

  void set_piece(int32_t id, std::string bytes) {
    if (size_t(id) >= pieces_.size()) {
      pieces_.resize(size_t(id) + 1);
      attrs_.resize(size_t(id) + 1, kTokenUnused);
    }
    pieces_[size_t(id)] = bytes;
    attrs_[size_t(id)] = kTokenNormal;
    by_bytes.emplace(std::move(bytes), id);
  }

  void finish(int64_t model_vocab, const std::string &where) {
    for (int b = 0; b < 256; b++) {
      auto it = by_bytes.find(std::string(1, char(b)));
      if (it == by_bytes.end()) failf(DSRT_ERR_FORMAT, where, ": no token for byte ", b);
      byte_id[b] = it->second;
    }
    if (model_vocab > int64_t(pieces_.size())) {
      pieces_.resize(size_t(model_vocab));
      attrs_.resize(size_t(model_vocab), kTokenUnused);
    }
    finish_specials();
  }

  friend std::unique_ptr<Tokenizer> dsrt::make_hf_bpe_tokenizer(const std::string &, int64_t);
  friend std::unique_ptr<Tokenizer> dsrt::make_tiktoken_tokenizer(const std::string &, int64_t, const std::string &);

 private:
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// GPT-2's byte <-> printable-character table used by ByteLevel.
std::unordered_map<uint32_t, uint8_t> byte_level_decoder() {
  std::unordered_map<uint32_t, uint8_t> m;
  int n = 0;
  for (int b = 0; b < 256; b++) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    m[printable ? uint32_t(b) : uint32_t(256 + n++)] = uint8_t(b);
  }
  return m;
}

// Byte-level token text -> bytes. Returns false if a character is not in the table.
bool byte_level_to_bytes(const std::string &s, const std::unordered_map<uint32_t, uint8_t> &table, std::string *out) {
  out->clear();
  for (size_t i = 0; i < s.size();) {
    uint8_t c = uint8_t(s[i]);
    uint32_t cp;
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
    if (i + size_t(len) > s.size()) return false;
    cp = len == 1 ? c : c & (0x7f >> len);
    for (int k = 1; k < len; k++) cp = cp << 6 | (uint8_t(s[i + size_t(k)]) & 0x3f);
    auto it = table.find(cp);
    if (it == table.end()) return false;
    *out += char(it->second);
    i += size_t(len);
  }
  return true;
}

std::string b64decode(std::string_view s, bool *ok) {
  static int8_t t[256];
  static std::once_flag once;
  std::call_once(once, [] {
    std::fill(std::begin(t), std::end(t), int8_t(-1));
    const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; i++) t[uint8_t(a[i])] = int8_t(i);
  });
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  *ok = true;
  for (char c : s) {
    if (c == '=') break;
    int8_t v = t[uint8_t(c)];
    if (v < 0) {
      *ok = false;
      return out;
    }
    acc = acc << 6 | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((acc >> bits) & 0xff);
    }
  }
  return out;
}

// A token id written in decimal (a tiktoken rank, an added_tokens_decoder key): its value, or -1 when the text
// is not 1 to 10 digits.
int64_t decimal_id(std::string_view s) {
  while (!s.empty() && (s.back() == '\r' || s.back() == ' ')) s.remove_suffix(1);
  if (s.empty() || s.size() > 10) return -1;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v;
}

}  // namespace

std::unique_ptr<Tokenizer> make_hf_bpe_tokenizer(const std::string &path, int64_t model_vocab) {
  const json j = read_json_file(path);
  auto t = std::make_unique<BytePairTokenizer>();
  t->kind_ = "bpe";
  t->set_id_limit(model_vocab, path);
  const json &model = j.value("model", json::object());
  if (model.value("type", "") != "BPE") failf(DSRT_ERR_UNSUPPORTED, path, ": model.type is not BPE");
  if (!model.contains("vocab") || !model["vocab"].is_object()) failf(DSRT_ERR_FORMAT, path, ": model.vocab missing");
  if (!model.contains("merges") || !model["merges"].is_array()) failf(DSRT_ERR_FORMAT, path, ": model.merges missing");

  // Pre-tokenizer: a Sequence of Split(Regex, Isolated) stages and a ByteLevel without its own regex.
  const json &pre = j.value("pre_tokenizer", json());
  std::vector<const json *> steps;
  if (pre.is_object() && pre.value("type", "") == "Sequence") {
    for (auto &s : pre.at("pretokenizers")) steps.push_back(&s);
  } else if (pre.is_object()) {
    steps.push_back(&pre);
  }
  bool byte_level = false;
  for (const json *s : steps) {
    std::string type = s->value("type", "");
    if (type == "Split") {
      const json &pat = s->at("pattern");
      std::string re = pat.contains("Regex") ? pat.at("Regex").get<std::string>() : "";
      if (re.empty()) failf(DSRT_ERR_UNSUPPORTED, path, ": Split pre-tokenizer without a Regex pattern");
      if (s->value("behavior", "") != "Isolated" || s->value("invert", false))
        failf(DSRT_ERR_UNSUPPORTED, path, ": Split behaviour other than Isolated");
      t->stages.push_back({std::make_unique<Regex>(re, path), true});
    } else if (type == "ByteLevel") {
      byte_level = true;
      if (s->value("use_regex", true))  // GPT-2's own split pattern
        t->stages.push_back({std::make_unique<Regex>(
                                 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", path),
                             true});
      if (s->value("add_prefix_space", false)) failf(DSRT_ERR_UNSUPPORTED, path, ": ByteLevel add_prefix_space");
    } else {
      failf(DSRT_ERR_UNSUPPORTED, path, ": pre-tokenizer type \"", type, "\"");
    }
  }
  if (!byte_level) failf(DSRT_ERR_UNSUPPORTED, path, ": only byte-level BPE tokenizers are supported");
  const json &norm = j.value("normalizer", json());
  if (norm.is_object() && !(norm.value("type", "") == "Sequence" && norm.value("normalizers", json::array()).empty()))
    failf(DSRT_ERR_UNSUPPORTED, path, ": normalizer \"", norm.value("type", ""), "\"");

  const auto table = byte_level_decoder();
  std::unordered_map<std::string, int32_t> by_text;
  std::string bytes;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer()) failf(DSRT_ERR_FORMAT, path, ": vocab id of ", it.key(), " is not an integer");
    const int32_t id = t->checked_file_id(it.value().get<int64_t>(), path);
    if (!byte_level_to_bytes(it.key(), table, &bytes)) bytes = it.key();
    t->set_piece(id, bytes);
    by_text[it.key()] = id;
  }
  int32_t rank = 0;
  for (auto &m : model["merges"]) {
    std::string a, b;
    if (m.is_string()) {
      std::string s = m.get<std::string>();
      size_t sp = s.find(' ', 1);
      if (sp == std::string::npos) failf(DSRT_ERR_FORMAT, path, ": merge \"", s, "\" has no space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      failf(DSRT_ERR_FORMAT, path, ": merge ", rank, " is neither \"a b\" nor [a, b]");
    }
    auto ia = by_text.find(a), ib = by_text.find(b), im = by_text.find(a + b);
    if (ia == by_text.end() || ib == by_text.end() || im == by_text.end())
      failf(DSRT_ERR_FORMAT, path, ": merge ", rank, " (\"", a, "\", \"", b, "\") names a token not in the vocab");
    t->merges.emplace(uint64_t(uint32_t(ia->second)) << 32 | uint32_t(ib->second), std::pair{rank, im->second});
    rank++;
  }
  for (auto &a : j.value("added_tokens", json::array())) {
    if (!a.contains("id") || !a.contains("content")) failf(DSRT_ERR_FORMAT, path, ": added token without id or content");
    if (!a["id"].is_number_integer()) failf(DSRT_ERR_FORMAT, path, ": added token id ", a["id"].dump(), " is not an integer");
    t->add_special(t->checked_file_id(a["id"].get<int64_t>(), path), a.at("content").get<std::string>(),
                   a.value("special", false));
  }
  t->finish(model_vocab, path);
  return t;
}

std::unique_ptr<Tokenizer> make_tiktoken_tokenizer(const std::string &path, int64_t model_vocab, const std::string &tc_text) {
  const json tc = parse_json_sorted(tc_text, "tokenizer_config.json", DSRT_ERR_FORMAT);
  auto t = std::make_unique<BytePairTokenizer>();
  t->kind_ = "tiktoken";
  t->set_id_limit(model_vocab, path);
  // The split pattern of Kimi-K2 / Moonlight (tokenization_kimi.py pat_str). Character-class intersection
  // [X&&[^\p{Han}]] is written as (?:(?!\p{Han})[X]), which PCRE2 can express.
  const std::string nh_upper = "(?:(?!\\p{Han})[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}])";
  const std::string nh_lower = "(?:(?!\\p{Han})[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}])";
  const std::string contractions = "(?i:'s|'t|'re|'ve|'m|'ll|'d)?";
  const std::string pat = "[\\p{Han}]+|[^\\r\\n\\p{L}\\p{N}]?" + nh_upper + "*" + nh_lower + "+" + contractions +
                          "|[^\\r\\n\\p{L}\\p{N}]?" + nh_upper + "+" + nh_lower + "*" + contractions +
                          "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  t->stages.push_back({std::make_unique<Regex>(pat, path), false});
  const std::string text = read_text_file(path);
  size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string_view line(text.data() + pos, eol - pos);
    pos = eol + 1;
    line_no++;
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    bool ok = sp != std::string::npos;
    std::string bytes = ok ? b64decode(line.substr(0, sp), &ok) : "";
    const int64_t rank = ok ? decimal_id(line.substr(sp + 1)) : -1;
    if (!ok || rank < 0) failf(DSRT_ERR_FORMAT, path, ": line ", line_no, " is not \"base64 rank\"");
    t->set_piece(t->checked_file_id(rank, path), bytes);
  }
  const int32_t n_base = int32_t(t->pieces_.size());
  // Every concatenation of two tokens that is itself a token merges at that token's rank.
  for (int32_t id = 0; id < n_base; id++) {
    const std::string &s = t->pieces_[size_t(id)];
    for (size_t k = 1; k < s.size(); k++) {
      auto a = t->by_bytes.find(s.substr(0, k));
      if (a == t->by_bytes.end()) continue;
      auto b = t->by_bytes.find(s.substr(k));
      if (b == t->by_bytes.end()) continue;
      t->merges.emplace(uint64_t(uint32_t(a->second)) << 32 | uint32_t(b->second), std::pair{id, id});
    }
  }
  if (auto it = tc.find("added_tokens_decoder"); it != tc.end() && it->is_object())
    for (auto a = it->begin(); a != it->end(); ++a) {
      const int64_t id = decimal_id(a.key());
      if (id < 0) failf(DSRT_ERR_FORMAT, "tokenizer_config.json: added_tokens_decoder key \"", a.key(), "\" is not a token id");
      t->add_special(t->checked_file_id(id, "tokenizer_config.json"), a.value().value("content", ""),
                     a.value().value("special", true));
    }
  // Ids between the base vocabulary and the embedding rows are reserved special tokens (tokenization_kimi.py).
  for (int64_t id = n_base; id < model_vocab; id++)
    if (size_t(id) >= t->pieces_.size() || (t->attrs_[size_t(id)] & kTokenUnused))
      t->add_special(int32_t(id), "<|reserved_token_" + std::to_string(id) + "|>", true);
  t->finish(model_vocab, path);
  return t;
}

}  // namespace dsrt
