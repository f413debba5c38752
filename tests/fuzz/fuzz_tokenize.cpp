// Encoding arbitrary bytes (invalid UTF-8, special-token look-alikes) with the byte-level BPE tokenizer:
// decode(encode(x)) must give x back exactly, with and without special-token matching, and the incremental
// decoder must emit only valid UTF-8.
#include "fuzz_common.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static std::unique_ptr<dsrt::Tokenizer> t = dsrt::Tokenizer::load(fuzz::tiny_model().string(), 0);
  const std::string text(reinterpret_cast<const char *>(data), n);
  for (bool special : {false, true}) {
    auto ids = t->encode(text, special);
    if (t->decode(ids, false) != text) std::abort();  // the round trip is a property, not an error
    dsrt::Detokenizer d(*t, false, {"stop"});
    std::string out;
    for (int32_t id : ids) out += d.push(id);
    out += d.flush();
    std::string check;
    if (dsrt::utf8_sanitize(out, true, &check) != out.size() || check != out) std::abort();
  }
  return 0;
}
