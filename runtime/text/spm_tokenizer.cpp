// sentencepiece tokenizer.model through libsentencepiece (Llama-style and unigram models).
#include <sentencepiece_processor.h>

#include "core/status.h"
#include "text/tokenizer.h"

namespace dsrt {
namespace {

class SpmTokenizer : public Tokenizer {
 public:
  sentencepiece::SentencePieceProcessor sp;

  // sentencepiece encodes a span in one call: cancel is read before it (Tokenizer::encode reads it between
  // spans).
  void encode_ordinary(std::string_view text, std::vector<int32_t> &out, const std::atomic<int> *cancel) const override {
    if (cancel && cancel->load(std::memory_order_relaxed)) fail(DSRT_ERR_CANCELLED, "tokenization cancelled");
    std::vector<int> ids;
    auto st = sp.Encode(text, &ids);
    if (!st.ok()) fail(DSRT_ERR_INTERNAL, "sentencepiece: " + st.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

  void build(int64_t model_vocab) {
    const int n = sp.GetPieceSize();
    pieces_.resize(size_t(std::max<int64_t>(n, model_vocab)));
    attrs_.assign(pieces_.size(), kTokenUnused);
    for (int i = 0; i < n; i++) {
      std::string p = sp.IdToPiece(i);
      if (sp.IsByte(i) && p.size() == 6) {  // <0xAB>
        pieces_[size_t(i)] = std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
        attrs_[size_t(i)] = kTokenNormal;
      } else if (sp.IsControl(i) || sp.IsUnknown(i)) {
        add_special(i, p, true);
        if (sp.IsUnknown(i)) attrs_[size_t(i)] = kTokenSpecial;  // shown (as its piece), not control
      } else {
        // U+2581 (the word-boundary marker) is a space in text.
        std::string text;
        for (size_t k = 0; k < p.size(); k++) {
          if (p.compare(k, 3, "\xe2\x96\x81") == 0) {
            text += ' ';
            k += 2;
          } else {
            text += p[k];
          }
        }
        pieces_[size_t(i)] = text;
        attrs_[size_t(i)] = kTokenNormal;
      }
    }
    if (sp.bos_id() >= 0) bos_id = sp.bos_id();
    if (sp.eos_id() >= 0) eos_id = sp.eos_id();
    strip_leading_space_ = true;
    kind_ = "sentencepiece";
    finish_specials();
  }
};

}  // namespace

std::unique_ptr<Tokenizer> make_spm_tokenizer(const std::string &path, int64_t model_vocab) {
  auto t = std::make_unique<SpmTokenizer>();
  auto st = t->sp.Load(path);
  if (!st.ok()) failf(DSRT_ERR_FORMAT, path, ": sentencepiece cannot load it: ", st.ToString());
  t->build(model_vocab);
  t->add_bos = true;  // Llama-style default; tokenizer_config.json may override
  return t;
}

}  // namespace dsrt
