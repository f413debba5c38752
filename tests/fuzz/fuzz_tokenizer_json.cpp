// tokenizer.json: vocab, merges, added tokens, pre-tokenizer regexes; an accepted tokenizer must encode
// and round-trip a fixed text.
#include "fuzz_common.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const auto dir = fuzz::workdir() / "tokjson";
  fuzz::fs::create_directories(dir);
  fuzz::write_file(dir / "tokenizer.json", data, n);
  try {
    auto t = dsrt::Tokenizer::load(dir.string(), 0);
    if (t) {
      const std::string text = "Hello, world! 你好 123 <｜User｜>";
      auto ids = t->encode(text, true);
      (void)t->decode(ids, false);
    }
  } catch (const dsrt::Error &) {
  }
  return 0;
}
