// tokenizer_config.json (special tokens, chat_template in its string and list forms) beside a valid
// tokenizer.json; an accepted chat template is rendered on a fixed conversation.
#include "fuzz_common.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static const fuzz::fs::path dir = [] {
    auto d = fuzz::workdir() / "tokconf";
    fuzz::fs::create_directories(d);
    fuzz::fs::copy_file(fuzz::tiny_model() / "tokenizer.json", d / "tokenizer.json", fuzz::fs::copy_options::overwrite_existing);
    return d;
  }();
  fuzz::write_file(dir / "tokenizer_config.json", data, n);
  try {
    auto t = dsrt::Tokenizer::load(dir.string(), 0);
    if (t && !t->chat_template.empty()) {
      dsrt::ChatTemplate tmpl(t->chat_template);
      nlohmann::ordered_json ctx;
      ctx["messages"] = nlohmann::ordered_json::parse(R"([{"role":"user","content":"hi"}])");
      ctx["add_generation_prompt"] = true;
      (void)tmpl.render(ctx);
    }
  } catch (const dsrt::Error &) {
  }
  return 0;
}
