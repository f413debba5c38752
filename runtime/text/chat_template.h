// Chat templates: the Jinja `chat_template` of tokenizer_config.json rendered by a bounded Jinja-subset
// interpreter (text/jinja.cpp), or a built-in DeepSeek-V3 template when a checkpoint has none.
#pragma once
#include <atomic>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace dsrt {

namespace jinja {
class Template;
}

class ChatTemplate {
 public:
  // Parses the template; throws DSRT_ERR_FORMAT with the line on a syntax error.
  explicit ChatTemplate(const std::string &source);
  ~ChatTemplate();
  // context: messages, tools, add_generation_prompt, bos_token, eos_token and any extra variables.
  // Throws DSRT_ERR_FORMAT on a render error or when a limit (depth, size, steps, work: text/jinja.h) is
  // hit, DSRT_ERR_CANCELLED once *cancel (may be NULL; a session's cancel flag) is non-zero.
  std::string render(const nlohmann::ordered_json &context, const std::atomic<int> *cancel = nullptr) const;

  static const char *builtin_deepseek_v3();

 private:
  std::unique_ptr<jinja::Template> t_;
};

}  // namespace dsrt
