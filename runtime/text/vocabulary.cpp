#include "text/vocabulary.h"

#include <sys/stat.h>

#include <algorithm>

#include "core/file.h"
#include "core/status.h"

namespace dsrt {

const Tokenizer &Vocabulary::tok() const {
  if (!tokenizer)
    failf(DSRT_ERR_UNSUPPORTED, dir, " has no tokenizer files (tokenizer.json, tiktoken.model or tokenizer.model): "
                                      "use token ids, or add the checkpoint's tokenizer files");
  return *tokenizer;
}

std::shared_ptr<const Vocabulary> Vocabulary::make(const std::string &dir, std::shared_ptr<const Tokenizer> tokenizer,
                                                   int64_t vocab_size, const std::vector<int64_t> &eos_ids) {
  auto v = std::make_shared<Vocabulary>();
  v->dir = dir;
  v->tokenizer = std::move(tokenizer);
  const Tokenizer *t = v->tokenizer.get();
  if (t)
    for (int32_t i = 0; i < int32_t(vocab_size); i++)
      if (t->attr(i) & kTokenUnused) v->unused_ids.push_back(i);
  if (t && t->n_tokens() > vocab_size)
    failf(DSRT_ERR_FORMAT, dir, ": the tokenizer has ", t->n_tokens(), " tokens, more than vocab_size ", vocab_size);
  for (int64_t e : eos_ids)
    if (e >= 0 && e < vocab_size) v->eog_ids.push_back(int32_t(e));
  if (t)
    for (int32_t i = 0; i < t->n_tokens(); i++)
      if (t->attr(i) & kTokenEog) v->eog_ids.push_back(i);
  std::sort(v->eog_ids.begin(), v->eog_ids.end());
  v->eog_ids.erase(std::unique(v->eog_ids.begin(), v->eog_ids.end()), v->eog_ids.end());
  return v;
}

std::shared_ptr<const Vocabulary> Vocabulary::load(const std::string &dir, int64_t vocab_size,
                                                   const std::vector<int64_t> &eos_ids) {
  return make(dir, Tokenizer::load(dir, vocab_size), vocab_size, eos_ids);
}

std::string tokenizer_file(const std::string &dir) {
  for (const char *f : {"/tokenizer.json", "/tiktoken.model", "/tokenizer.model"})
    if (file_exists(dir + f)) return dir + f;
  return "";
}

void check_tokenizer_only_vocab_size(const std::string &dir, const std::string &config_path, int64_t vocab_size) {
  const std::string tf = tokenizer_file(dir);
  if (tf.empty()) return;
  struct stat st;
  const int64_t bytes = ::stat(tf.c_str(), &st) == 0 ? int64_t(st.st_size) : 0;
  if (vocab_size > bytes + kTokenizerOnlyPaddingMax)
    failf(DSRT_ERR_FORMAT, config_path, ": vocab_size ", vocab_size, " is more than ", tf, " (", bytes,
          " bytes) can define plus ", kTokenizerOnlyPaddingMax, " padding ids");
}

}  // namespace dsrt
