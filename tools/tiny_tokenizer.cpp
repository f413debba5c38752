#include "tiny_tokenizer.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/status.h"
#include "text/chat_template.h"

namespace dsrt::tools {
namespace {

using ojson = nlohmann::ordered_json;

// Training text: plain English prose, a little code, numbers, and a few lines in other scripts.
const char *kCorpus = R"(The quick brown fox jumps over the lazy dog. A tiny model is still a model: it has
an embedding, attention layers that read a compressed latent cache, experts chosen by a router, and a head
that turns the last hidden state into logits over the vocabulary. When you ask it a question, it answers with
tokens, and the runtime turns those tokens back into text, one complete character at a time.
Hello world! Hello, world. How are you today? I am fine, thank you. What is the weather like in the city?
It is sunny and warm, with a light breeze from the sea. The meeting starts at 10:30 and ends at 12:15.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 2.71828 1,000,000 and 99%.
def add(a, b):
    return a + b

for (int i = 0; i < n; i++) { sum += x[i] * y[i]; }
The user writes a message and the assistant replies. The assistant thinks before it answers, and sometimes it
calls a tool to look something up: the tool returns its output, and the assistant uses it in the reply.
Once upon a time there was a small runtime that wanted to run very large models on many machines. It learned
to read weights as they were published, to keep only what it needed in memory, and to stream its answers.
你好，世界！今天天气很好。机器学习和深度学习。こんにちは、世界。カタカナとひらがな。
Привет, мир! Bonjour le monde. Hola mundo. Guten Tag, Welt. 안녕하세요 세계. مرحبا بالعالم
Emoji: 😀 🎉 👍🏽 👨‍👩‍👧 ❤️ ✨ 🦙
)";

std::vector<std::string> split_words(const std::string &text) {
  // Runs of letters (with one leading space), digits, other non-space characters, or whitespace: a coarse
  // cousin of DeepSeek-V3's pre-tokenizer, enough to learn merges that its splits will use.
  std::vector<std::string> words;
  size_t i = 0;
  auto cls = [&](size_t k) {
    unsigned char c = uint8_t(text[k]);
    if (c >= 0x80 || std::isalpha(c)) return 0;
    if (std::isdigit(c)) return 1;
    if (std::isspace(c)) return 2;
    return 3;
  };
  while (i < text.size()) {
    size_t j = i;
    int c = cls(i);
    if (text[i] == ' ' && i + 1 < text.size() && cls(i + 1) == 0) {
      j = i + 1;
      c = 0;
    }
    while (j < text.size() && cls(j) == c) j++;
    if (j == i) j++;
    words.push_back(text.substr(i, j - i));
    i = j;
  }
  return words;
}

std::string byte_level(const std::string &bytes) {
  // GPT-2's byte -> printable character table.
  static std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int b = 0; b < 256; b++) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + n++);
      std::string s;
      if (cp < 0x80) {
        s += char(cp);
      } else {
        s += char(0xc0 | (cp >> 6));
        s += char(0x80 | (cp & 0x3f));
      }
      t[size_t(b)] = s;
    }
    return t;
  }();
  std::string out;
  for (unsigned char c : bytes) out += table[c];
  return out;
}

const char *kSpecialsFront[] = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"};
const char *kSpecialsBack[] = {"<think>", "</think>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
                               "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                               "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                               "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"};

void write_text(const std::string &path, const std::string &text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  if (!f) failf(DSRT_ERR_IO, path, ": write failed");
}

}  // namespace

void write_tiny_tokenizer(const std::string &dir, int64_t vocab_size) {
  const int64_t n_front = 3, n_back = int64_t(std::size(kSpecialsBack));
  const int64_t n_merges = vocab_size - n_front - 256 - n_back;
  if (n_merges < 0) failf(DSRT_ERR_INVALID_ARGUMENT, "vocab_size ", vocab_size, " is too small for a byte-level tokenizer");
  // Train: words as sequences of token ids (bytes at n_front + b), merge the most frequent pair repeatedly.
  std::map<std::string, int64_t> counts;
  for (auto &w : split_words(kCorpus)) counts[w]++;
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (auto &[w, c] : counts) {
    std::vector<int32_t> ids;
    for (unsigned char b : w) ids.push_back(int32_t(n_front + b));
    words.push_back({ids, c});
  }
  std::vector<std::string> piece(size_t(n_front + 256));
  for (int b = 0; b < 256; b++) piece[size_t(n_front + b)] = std::string(1, char(b));
  std::vector<std::pair<int32_t, int32_t>> merges;
  while (int64_t(merges.size()) < n_merges) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (auto &[ids, c] : words)
      for (size_t i = 0; i + 1 < ids.size(); i++) pairs[{ids[i], ids[i + 1]}] += c;
    if (pairs.empty()) break;
    auto best = pairs.begin();  // most frequent; ties to the smallest pair (std::map order)
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;
    const int32_t id = int32_t(piece.size());
    piece.push_back(piece[size_t(best->first.first)] + piece[size_t(best->first.second)]);
    merges.push_back(best->first);
    for (auto &[ids, c] : words) {
      std::vector<int32_t> next;
      for (size_t i = 0; i < ids.size(); i++) {
        if (i + 1 < ids.size() && ids[i] == best->first.first && ids[i + 1] == best->first.second) {
          next.push_back(id);
          i++;
        } else {
          next.push_back(ids[i]);
        }
      }
      ids.swap(next);
    }
  }
  ojson vocab = ojson::object();
  for (size_t i = size_t(n_front); i < piece.size(); i++) vocab[byte_level(piece[i])] = i;
  ojson merge_list = ojson::array();
  for (auto [a, b] : merges) merge_list.push_back(byte_level(piece[size_t(a)]) + " " + byte_level(piece[size_t(b)]));
  ojson added = ojson::array();
  auto add = [&](int64_t id, const char *content, bool special) {
    added.push_back({{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", !special}, {"special", special}});
  };
  for (int64_t i = 0; i < n_front; i++) add(i, kSpecialsFront[i], true);
  // Past the merges: the remaining special tokens, then placeholders up to the embedding size, as
  // DeepSeek-V3's tokenizer has (<｜place▁holder▁no▁N｜>), so every embedding row is a token.
  int64_t next_id = int64_t(piece.size());
  for (const char *s : kSpecialsBack) add(next_id++, s, std::string(s) == "<|EOT|>");
  for (int64_t k = 0; next_id < vocab_size; k++) {
    const std::string h = "<｜place▁holder▁no▁" + std::to_string(k) + "｜>";
    add(next_id++, h.c_str(), true);
  }
  ojson tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = added;
  tok["normalizer"] = {{"type", "Sequence"}, {"normalizers", ojson::array()}};
  // DeepSeek-V3's pre-tokenizer, verbatim.
  tok["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", "\\p{N}{1,3}"}}}, {"behavior", "Isolated"}, {"invert", false}},
        {{"type", "Split"},
         {"pattern", {{"Regex", "[一-龥぀-ゟ゠-ヿ]+"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "Split"},
         {"pattern",
          {{"Regex",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
            "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  tok["post_processor"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  tok["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},           {"dropout", nullptr},           {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                  {"byte_fallback", false}, {"vocab", vocab},                {"merges", merge_list}};
  write_text(dir + "/tokenizer.json", tok.dump(1));
  ojson cfg;
  cfg["add_bos_token"] = true;
  cfg["add_eos_token"] = false;
  cfg["bos_token"] = {{"__type", "AddedToken"}, {"content", kSpecialsFront[0]}, {"lstrip", false}, {"normalized", true},
                      {"rstrip", false}, {"single_word", false}};
  cfg["eos_token"] = {{"__type", "AddedToken"}, {"content", kSpecialsFront[1]}, {"lstrip", false}, {"normalized", true},
                      {"rstrip", false}, {"single_word", false}};
  cfg["clean_up_tokenization_spaces"] = false;
  cfg["legacy"] = true;
  cfg["model_max_length"] = 16384;
  cfg["pad_token"] = cfg["eos_token"];
  cfg["unk_token"] = nullptr;
  cfg["tokenizer_class"] = "LlamaTokenizerFast";
  cfg["chat_template"] = ChatTemplate::builtin_deepseek_v3();
  write_text(dir + "/tokenizer_config.json", cfg.dump(2));
}

}  // namespace dsrt::tools
