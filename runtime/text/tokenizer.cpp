#include "text/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/fault.h"
#include "core/status.h"
#include "core/file.h"

namespace dsrt {

namespace {

// tokenizer_config.json writes special tokens as strings or as {"content": ...} objects.
std::string token_text(const nlohmann::json &v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string &dir, int64_t model_vocab) {
  if (fault::alloc_should_fail()) fail(DSRT_ERR_OUT_OF_MEMORY, dir + ": out of memory loading the tokenizer");
  nlohmann::json tc = nlohmann::json::object();
  const std::string tc_path = dir + "/tokenizer_config.json";
  if (file_exists(tc_path)) tc = read_json_file(tc_path);
  try {
    return load_files(dir, model_vocab, tc);
  } catch (const nlohmann::json::exception &e) {  // a field of the wrong type or shape in a hostile file
    failf(DSRT_ERR_FORMAT, dir, ": malformed tokenizer files (", e.what(), ")");
  }
}

std::unique_ptr<Tokenizer> Tokenizer::load_files(const std::string &dir, int64_t model_vocab, const nlohmann::json &tc) {
  std::unique_ptr<Tokenizer> t;
  if (file_exists(dir + "/tokenizer.json"))
    t = make_hf_bpe_tokenizer(dir + "/tokenizer.json", model_vocab);
  else if (file_exists(dir + "/tiktoken.model"))
    t = make_tiktoken_tokenizer(dir + "/tiktoken.model", model_vocab, tc.dump());
  else if (file_exists(dir + "/tokenizer.model"))
    t = make_spm_tokenizer(dir + "/tokenizer.model", model_vocab);
  else
    return nullptr;

  // tokenizer_config.json: BOS/EOS, whether encode adds them, the chat template.
  auto find_id = [&](const char *key) -> int32_t {
    if (!tc.contains(key)) return -1;
    std::string s = token_text(tc[key]);
    return s.empty() ? -1 : t->find_token(s);
  };
  if (int32_t b = find_id("bos_token"); b >= 0) t->bos_id = b;
  if (int32_t e = find_id("eos_token"); e >= 0) t->eos_id = e;
  if (tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean()) t->add_bos = tc["add_bos_token"].get<bool>();
  if (tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean()) t->add_eos = tc["add_eos_token"].get<bool>();
  if (auto it = tc.find("chat_template"); it != tc.end()) {
    if (it->is_string()) {
      t->chat_template = it->get<std::string>();
    } else if (it->is_array()) {  // [{"name": "default", "template": ...}, ...]
      for (auto &e : *it)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
          t->chat_template = e["template"].get<std::string>();
    }
  }
  if (t->bos_id >= 0) t->bos_text = t->token_bytes(t->bos_id);
  if (t->eos_id >= 0) {
    t->eos_text = t->token_bytes(t->eos_id);
    t->attrs_[size_t(t->eos_id)] |= kTokenEog;
  }
  for (const char *eot : {"<|EOT|>", "<|im_end|>", "<|eot_id|>", "[EOT]", "<|end_of_text|>"})
    if (int32_t id = t->find_token(eot); id >= 0 && (t->attr(id) & kTokenSpecial)) t->attrs_[size_t(id)] |= kTokenEog;
  return t;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special, const std::atomic<int> *cancel) const {
  std::vector<int32_t> out;
  for (const Segment &seg : split_specials(text, parse_special)) {
    if (cancel && cancel->load(std::memory_order_relaxed)) fail(DSRT_ERR_CANCELLED, "tokenization cancelled");
    if (seg.id >= 0)
      out.push_back(seg.id);
    else
      encode_ordinary(text.substr(seg.begin, seg.end - seg.begin), out, cancel);
  }
  return out;
}

std::vector<int32_t> Tokenizer::encode_prompt(std::string_view text, bool add_special, bool parse_special,
                                              const std::atomic<int> *cancel) const {
  std::vector<int32_t> ids;
  if (add_special && add_bos && bos_id >= 0) ids.push_back(bos_id);
  std::vector<int32_t> body = encode(text, parse_special, cancel);
  ids.insert(ids.end(), body.begin(), body.end());
  if (add_special && add_eos && eos_id >= 0) ids.push_back(eos_id);
  return ids;
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= n_tokens())
    failf(DSRT_ERR_INVALID_ARGUMENT, "token id ", id, " is outside the vocabulary [0, ", n_tokens(), ")");
}

void Tokenizer::set_id_limit(int64_t model_vocab, const std::string &path) {
  if (model_vocab > 0) {
    id_limit_ = model_vocab;
    return;
  }
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(path, ec);
  id_limit_ = std::max<int64_t>(kMinIdLimit, ec ? 0 : int64_t(std::min<uintmax_t>(bytes, INT32_MAX)));
}

int32_t Tokenizer::checked_file_id(int64_t id, const std::string &where) const {
  if (id < 0 || id >= id_limit_)
    failf(DSRT_ERR_FORMAT, where, ": token id ", id, " is outside the vocabulary (ids must be below ", id_limit_,
          ": the model's vocab_size, or without a model config the tokenizer file's size in bytes)");
  return int32_t(id);
}

const std::string &Tokenizer::token_bytes(int32_t id) const {
  static const std::string empty;
  return id >= 0 && size_t(id) < pieces_.size() ? pieces_[size_t(id)] : empty;
}

std::string Tokenizer::decode(const std::vector<int32_t> &ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) check_id(id);
  for (int32_t id : ids) {
    if (skip_special && (attr(id) & kTokenControl)) continue;  // HF's skip_special_tokens: tokens marked special
    out += token_bytes(id);
  }
  if (strip_leading_space_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

int32_t Tokenizer::find_token(std::string_view s) const {
  auto it = std::lower_bound(specials_.begin(), specials_.end(), s, [](auto &a, std::string_view b) { return a.first < b; });
  if (it != specials_.end() && it->first == s) return it->second;
  for (size_t i = 0; i < pieces_.size(); i++)
    if (pieces_[i] == s && !(attrs_[i] & kTokenUnused)) return int32_t(i);
  return -1;
}

void Tokenizer::add_special(int32_t id, const std::string &text, bool special) {
  if (id < 0) return;
  if (size_t(id) >= pieces_.size()) {
    pieces_.resize(size_t(id) + 1);
    attrs_.resize(size_t(id) + 1, kTokenUnused);
  }
  pieces_[size_t(id)] = text;
  attrs_[size_t(id)] = uint8_t(kTokenSpecial | (special ? kTokenControl : 0));
  specials_.push_back({text, id});
}

void Tokenizer::finish_specials() {
  std::sort(specials_.begin(), specials_.end());
  specials_.erase(std::unique(specials_.begin(), specials_.end(), [](auto &a, auto &b) { return a.first == b.first; }),
                  specials_.end());
}

// Leftmost-longest matching of special-token strings (what Hugging Face's added-token splitter does).
std::vector<Tokenizer::Segment> Tokenizer::split_specials(std::string_view text, bool parse_special) const {
  std::vector<Segment> out;
  if (!parse_special || specials_.empty()) {
    if (!text.empty()) out.push_back({0, text.size(), -1});
    return out;
  }
  bool first_byte[256] = {};
  for (auto &[s, _] : specials_)
    if (!s.empty()) first_byte[uint8_t(s[0])] = true;
  size_t plain = 0, i = 0;
  while (i < text.size()) {
    if (first_byte[uint8_t(text[i])]) {
      // specials_ is sorted: candidates share text[i]; take the longest that matches here.
      size_t best_len = 0;
      int32_t best_id = -1;
      auto lo = std::lower_bound(specials_.begin(), specials_.end(), text.substr(i, 1),
                                 [](auto &a, std::string_view b) { return a.first < b; });
      for (auto it = lo; it != specials_.end() && !it->first.empty() && it->first[0] == text[i]; ++it)
        if (it->first.size() > best_len && text.compare(i, it->first.size(), it->first) == 0) {
          best_len = it->first.size();
          best_id = it->second;
        }
      if (best_id >= 0) {
        if (i > plain) out.push_back({plain, i, -1});
        out.push_back({i, i + best_len, best_id});
        i += best_len;
        plain = i;
        continue;
      }
    }
    i++;
  }
  if (plain < text.size()) out.push_back({plain, text.size(), -1});
  return out;
}

}  // namespace dsrt
