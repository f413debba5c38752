// The Jinja-subset interpreter on arbitrary templates, with the limits (depth, sizes, steps, work) that
// make hostile templates fail cleanly.
#include "fuzz_common.h"
#include "text/jinja.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static const dsrt::jinja::Json ctx = dsrt::jinja::Json::parse(R"({
    "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi <think>"},
                 {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                  "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                 {"role": "tool", "content": "ok"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>"})");
  dsrt::jinja::Limits lim;
  lim.max_output = 1 << 20;
  lim.max_string = 1 << 20;
  lim.max_steps = 200000;
  lim.max_work = 32 << 20;  // bytes copied, produced or scanned: keeps each input to milliseconds
  try {
    dsrt::jinja::Template t(std::string(reinterpret_cast<const char *>(data), n), lim);
    (void)t.render(ctx);
  } catch (const dsrt::Error &) {
  }
  return 0;
}
