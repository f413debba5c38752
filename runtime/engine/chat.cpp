// Chat sessions: the conversation is rendered whole with the model's chat template and only what differs
// from the cached tokens is appended (the common prefix stays in the KV cache).
#include <nlohmann/json.hpp>

#include "core/json.h"
#include "core/status.h"
#include "engine/engine.h"
#include "text/chat_template.h"

namespace dsrt {

void Session::replace_tail(const std::vector<int32_t> &want) {
  size_t common = 0;
  {
    auto lk = lock_settled();
    drop_drafts();
    std::vector<int32_t> have = tokens_;
    have.insert(have.end(), pending_.begin(), pending_.end());
    while (common < have.size() && common < want.size() && have[common] == want[common]) common++;
    if (common < have.size()) {
      if (common < tokens_.size()) {
        forget_mtp_after(int64_t(common));
        tokens_.resize(common);
        pending_.clear();
        logits_.clear();
        logits_rows_ = 0;
        engine_->release_pages(*this, int64_t(common));
      } else {
        pending_.resize(common - tokens_.size());
      }
      pending_started_ = false;
      sampled_pending_ = false;
    }
    last_.reused_tokens = int64_t(std::min(common, tokens_.size()));
  }
  append(want.data() + common, want.size() - common);
}

void Session::append_chat(const std::string &messages_json, const std::string &tools_json, bool add_generation_prompt) {
  const Tokenizer &t = engine_->vocab().tok();
  // Depth-bounded (core/json.h): the conversions below and the template recurse over the values.
  nlohmann::ordered_json add = parse_json(messages_json, "messages", DSRT_ERR_INVALID_ARGUMENT);
  if (add.is_object()) add = nlohmann::ordered_json::array({add});
  if (!add.is_array()) fail(DSRT_ERR_INVALID_ARGUMENT, "messages must be a JSON array of {\"role\", \"content\"} objects");
  for (auto &msg : add)
    if (!msg.is_object() || !msg.contains("role") || !msg["role"].is_string())
      fail(DSRT_ERR_INVALID_ARGUMENT, "every message needs a string \"role\"");
  nlohmann::ordered_json all = messages_;
  for (auto &msg : add) all.push_back(msg);
  nlohmann::ordered_json ctx;
  ctx["messages"] = all;
  const std::string tools = tools_json.empty() ? tools_json_ : tools_json;
  if (!tools.empty()) ctx["tools"] = parse_json(tools, "tools", DSRT_ERR_INVALID_ARGUMENT);
  ctx["add_generation_prompt"] = add_generation_prompt;
  ctx["bos_token"] = t.bos_text;
  ctx["eos_token"] = t.eos_text;
  ChatTemplate tmpl(t.chat_template.empty() ? ChatTemplate::builtin_deepseek_v3() : t.chat_template);
  const std::string prompt = tmpl.render(ctx, &cancel_flag_);
  // The template writes BOS itself: tokenize without adding one (no double BOS).
  replace_tail(t.encode(prompt, true));
  messages_ = std::move(all);
  tools_json_ = tools;
}

}  // namespace dsrt
