// Tokenizers of the DeepSeek-V3 family: Hugging Face tokenizer.json byte-level BPE (DeepSeek-V3/R1/V3.1),
// tiktoken.model (Kimi-K2, Moonlight), sentencepiece tokenizer.model. One interface; token text is raw
// bytes (a token may hold part of a UTF-8 character).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsrt {

enum TokenAttr : uint8_t {
  kTokenNormal = 0,
  kTokenSpecial = 1,  // an added/special token (matched in text before splitting, never merged)
  kTokenControl = 2,  // special and not meant to be shown (BOS, EOS, pad, role markers)
  kTokenEog = 4,      // ends generation (EOS, EOT)
  kTokenUnused = 8,   // an id with no token (padding rows of the embedding)
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Loads the tokenizer files of a model directory (tokenizer.json, tiktoken.model or tokenizer.model,
  // plus tokenizer_config.json). Returns null when the directory has none. Throws DSRT_ERR_FORMAT on bad files.
  static std::unique_ptr<Tokenizer> load(const std::string &dir, int64_t model_vocab);

  // Ids of the text's exact bytes. parse_special: strings of added/special tokens are matched as those
  // tokens (as Hugging Face tokenizers does); otherwise they are ordinary text. cancel (optional) is read
  // before each pre-token chunk: non-zero ends the call with DSRT_ERR_CANCELLED. Text beyond the split
  // regex's bounds (bpe_tokenizer.cpp) is DSRT_ERR_INVALID_ARGUMENT, never a shorter result.
  std::vector<int32_t> encode(std::string_view text, bool parse_special, const std::atomic<int> *cancel = nullptr) const;
  // The ids of a prompt: encode, plus BOS/EOS when add_special and tokenizer_config.json's add_bos_token /
  // add_eos_token ask for them. The one path of dsrt_tokenize and dsrt_session_append_text.
  std::vector<int32_t> encode_prompt(std::string_view text, bool add_special, bool parse_special,
                                     const std::atomic<int> *cancel = nullptr) const;
  const std::string &token_bytes(int32_t id) const;  // "" for out-of-range ids
  uint8_t attr(int32_t id) const { return id >= 0 && size_t(id) < attrs_.size() ? attrs_[size_t(id)] : uint8_t(kTokenUnused); }
  int32_t n_tokens() const { return int32_t(pieces_.size()); }
  // Decodes ids to bytes; skip_special leaves out control tokens (those tokenizer.json marks special, as
  // Hugging Face's skip_special_tokens does). Invalid UTF-8 is kept as is. An id outside [0, n_tokens())
  // is DSRT_ERR_INVALID_ARGUMENT naming it.
  std::string decode(const std::vector<int32_t> &ids, bool skip_special) const;
  // DSRT_ERR_INVALID_ARGUMENT naming the id unless 0 <= id < n_tokens().
  void check_id(int32_t id) const;
  // The id of a token whose text is exactly `s` (special tokens first), or -1.
  int32_t find_token(std::string_view s) const;
  // sentencepiece drops the space it prepended to the first word when decoding.
  bool strip_leading_space() const { return strip_leading_space_; }
  const char *kind() const { return kind_; }

  int32_t bos_id = -1, eos_id = -1;
  bool add_bos = false, add_eos = false;
  std::string chat_template;   // from tokenizer_config.json, "" if none
  std::string bos_text, eos_text;

 protected:
  // Ids of text that holds no special token (the model-specific part of encode).
  virtual void encode_ordinary(std::string_view text, std::vector<int32_t> &out, const std::atomic<int> *cancel) const = 0;
  static std::unique_ptr<Tokenizer> load_files(const std::string &dir, int64_t model_vocab, const nlohmann::json &tc);
  // Ids read from files must lie below id_limit_ before any table grows to hold them: the model's
  // vocab_size when the loader knows it, otherwise the tokenizer file's size in bytes (a file defines at
  // most one token per byte), at least kMinIdLimit. A forged id of 2^31-1 is then DSRT_ERR_FORMAT, not a
  // 64 GiB table.
  static constexpr int64_t kMinIdLimit = int64_t(1) << 16;
  void set_id_limit(int64_t model_vocab, const std::string &path);
  int32_t checked_file_id(int64_t id, const std::string &where) const;  // the id, or DSRT_ERR_FORMAT
  int64_t id_limit_ = kMinIdLimit;
  void add_special(int32_t id, const std::string &text, bool special);
  void finish_specials();  // builds the matcher for parse_special
  // Splits text into ordinary spans and special-token ids (in order). span: (begin, end) or id >= 0.
  struct Segment {
    size_t begin, end;
    int32_t id;  // >= 0: a special token
  };
  std::vector<Segment> split_specials(std::string_view text, bool parse_special) const;

  std::vector<std::string> pieces_;  // id -> bytes
  std::vector<uint8_t> attrs_;
  std::vector<std::pair<std::string, int32_t>> specials_;  // sorted by text
  bool strip_leading_space_ = false;
  const char *kind_ = "";
};

// The loaders behind Tokenizer::load, one per file format.
std::unique_ptr<Tokenizer> make_hf_bpe_tokenizer(const std::string &path, int64_t model_vocab);
std::unique_ptr<Tokenizer> make_tiktoken_tokenizer(const std::string &path, int64_t model_vocab,
                                                   const std::string &tokenizer_config_json);
std::unique_ptr<Tokenizer> make_spm_tokenizer(const std::string &path, int64_t model_vocab);

}  // namespace dsrt
