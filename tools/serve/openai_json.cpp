#include "openai_json.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <random>

namespace dsrt::serve {

ApiError::ApiError(int status_, std::string message_, std::string param_, std::string code_, std::string type_)
    : status(status_), message(std::move(message_)), param(std::move(param_)), code(std::move(code_)) {
  type = type_.empty() ? error_type_for_status(status) : std::move(type_);
}

std::string error_type_for_status(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

json error_body(const std::string &message, const std::string &type, const std::string &param, const std::string &code) {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return json{{"error", e}};
}

json error_body(const ApiError &e) { return error_body(e.message, e.type, e.param, e.code); }

std::string dump(const json &v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

size_t json_depth(const std::string &text) {
  size_t depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') max_depth = std::max(max_depth, ++depth);
    else if ((c == ']' || c == '}') && depth > 0) depth--;
  }
  return max_depth;
}

json parse_body(const std::string &body, size_t max_depth) {
  if (json_depth(body) > max_depth)
    throw ApiError(400, "the request body nests deeper than " + std::to_string(max_depth) + " levels");
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw ApiError(400, "the request body is not valid JSON", "", "invalid_json");
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object", "", "invalid_json");
  return j;
}

namespace {

// A present, non-null field.
const json *field(const json &o, const char *key) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

[[noreturn]] void bad(const std::string &param, const std::string &msg) {
  throw ApiError(400, "'" + param + "': " + msg, param, "invalid_value");
}

std::optional<double> number(const json &o, const char *key, double lo, double hi, bool lo_open = false) {
  const json *v = field(o, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(key, "expected a number");
  const double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi || (lo_open && d == lo))
    bad(key, std::string("must be in ") + (lo_open ? "(" : "[") + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return d;
}

std::optional<int64_t> integer(const json &o, const char *key, int64_t lo, int64_t hi) {
  const json *v = field(o, key);
  if (!v) return std::nullopt;
  int64_t i;
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    if (u > uint64_t(INT64_MAX)) bad(key, "out of range");
    i = int64_t(u);
  } else if (v->is_number_integer()) {
    i = v->get<int64_t>();
  } else {
    bad(key, "expected an integer");
  }
  if (i < lo || i > hi) bad(key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return i;
}

bool boolean(const json &o, const char *key, bool def) {
  const json *v = field(o, key);
  if (!v) return def;
  if (!v->is_boolean()) bad(key, "expected a boolean");
  return v->get<bool>();
}

std::string string_field(const json &o, const char *key, const std::string &param) {
  const json *v = field(o, key);
  if (!v) return "";
  if (!v->is_string()) bad(param, "expected a string");
  return v->get<std::string>();
}

void parse_sampling(const json &b, SamplingRequest &r, int64_t min_tokens = 1) {
  r.model = string_field(b, "model", "model");
  auto mt = integer(b, "max_completion_tokens", min_tokens, INT32_MAX);
  if (!mt) mt = integer(b, "max_tokens", min_tokens, INT32_MAX);
  r.max_tokens = mt;
  r.temperature = number(b, "temperature", 0.0, 2.0);
  r.top_p = number(b, "top_p", 0.0, 1.0, /*lo_open=*/true);
  r.top_k = integer(b, "top_k", -1, INT32_MAX);
  if (r.top_k && *r.top_k < 0) r.top_k = 0;  // vLLM's -1 = off
  r.min_p = number(b, "min_p", 0.0, 1.0);
  r.presence_penalty = number(b, "presence_penalty", -2.0, 2.0);
  r.frequency_penalty = number(b, "frequency_penalty", -2.0, 2.0);
  r.repetition_penalty = number(b, "repetition_penalty", 0.0, 10.0, /*lo_open=*/true);
  r.seed = integer(b, "seed", INT64_MIN, INT64_MAX);
  if (auto n = integer(b, "n", 1, 128); n && *n != 1) bad("n", "only n = 1 is supported");
  if (auto n = integer(b, "best_of", 1, 128); n && *n != 1) bad("best_of", "only best_of = 1 is supported");
  if (const json *s = field(b, "stop")) {
    if (s->is_string()) {
      r.stop.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      if (s->size() > 4) bad("stop", "at most 4 stop sequences");
      for (const auto &x : *s) {
        if (!x.is_string()) bad("stop", "expected a string or an array of strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      bad("stop", "expected a string or an array of strings");
    }
    for (const auto &x : r.stop) {
      if (x.empty()) bad("stop", "stop sequences must not be empty");
      if (x.size() > 1024) bad("stop", "a stop sequence is longer than 1024 bytes");
      if (x.find('\0') != std::string::npos) bad("stop", "a stop sequence holds U+0000");
    }
  }
  if (const json *lb = field(b, "logit_bias")) {
    if (!lb->is_object()) bad("logit_bias", "expected an object mapping token ids to biases");
    if (lb->size() > 1024) bad("logit_bias", "at most 1024 entries");
    for (auto it = lb->begin(); it != lb->end(); ++it) {
      const std::string &k = it.key();
      char *end = nullptr;
      errno = 0;
      const long long id = std::strtoll(k.c_str(), &end, 10);
      if (k.empty() || *end || errno || id < 0 || id > INT32_MAX) bad("logit_bias", "\"" + k + "\" is not a token id");
      if (!it->is_number() || !std::isfinite(it->get<double>()) || it->get<double>() < -100 || it->get<double>() > 100)
        bad("logit_bias", "biases must be numbers in [-100, 100]");
      r.logit_bias.emplace_back(id, it->get<double>());
    }
  }
  r.ignore_eos = boolean(b, "ignore_eos", false);
  r.stream = boolean(b, "stream", false);
  if (const json *so = field(b, "stream_options")) {
    if (!so->is_object()) bad("stream_options", "expected an object");
    if (!r.stream) bad("stream_options", "only allowed when 'stream' is true");
    r.include_usage = boolean(*so, "include_usage", false);
  }
  if (const json *rf = field(b, "response_format")) {
    if (!rf->is_object() || !rf->contains("type") || !(*rf)["type"].is_string()) bad("response_format", "expected {\"type\": ...}");
    if ((*rf)["type"] != "text")
      throw ApiError(400, "'response_format': only {\"type\": \"text\"} is supported", "response_format", "unsupported");
  }
}

// The text of a message's content: a string, or an array of {"type": "text", "text"} parts.
std::optional<std::string> content_text(const json &m, const std::string &param) {
  const json *c = field(m, "content");
  if (!c) return std::nullopt;
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array()) bad(param, "expected a string, an array of content parts, or null");
  std::string out;
  for (const auto &part : *c) {
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) bad(param, "a content part needs a \"type\"");
    if (part["type"] != "text")
      throw ApiError(400, "'" + param + "': content parts of type \"" + part["type"].get<std::string>() +
                              "\" are not supported (text only)", param, "unsupported");
    if (!part.contains("text") || !part["text"].is_string()) bad(param, "a text part needs a string \"text\"");
    if (!out.empty()) out += "\n";
    out += part["text"].get<std::string>();
  }
  return out;
}

json normalise_tool_calls(const json &calls, const std::string &param) {
  if (!calls.is_array()) bad(param, "expected an array");
  json out = json::array();
  for (size_t i = 0; i < calls.size(); i++) {
    const json &c = calls[i];
    const std::string p = param + "[" + std::to_string(i) + "]";
    if (!c.is_object()) bad(p, "expected an object");
    const json *f = field(c, "function");
    if (!f || !f->is_object()) bad(p + ".function", "expected an object");
    const json *name = field(*f, "name");
    if (!name || !name->is_string()) bad(p + ".function.name", "expected a string");
    std::string args = "{}";
    if (const json *a = field(*f, "arguments")) args = a->is_string() ? a->get<std::string>() : dump(*a);
    json o = {{"type", "function"}, {"function", {{"name", *name}, {"arguments", args}}}};
    if (const json *id = field(c, "id")) {
      if (!id->is_string()) bad(p + ".id", "expected a string");
      o["id"] = *id;
    }
    out.push_back(std::move(o));
  }
  return out;
}

}  // namespace

ChatRequest parse_chat_request(const json &b) {
  ChatRequest r;
  parse_sampling(b, r);
  const json *msgs = field(b, "messages");
  if (!msgs) throw ApiError(400, "'messages' is required", "messages", "missing_required_parameter");
  if (!msgs->is_array()) bad("messages", "expected an array of messages");
  if (msgs->empty()) bad("messages", "must hold at least one message");
  if (msgs->size() > 100000) bad("messages", "too many messages");
  r.messages = json::array();
  for (size_t i = 0; i < msgs->size(); i++) {
    const json &m = (*msgs)[i];
    const std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) bad(p, "expected an object");
    const json *role = field(m, "role");
    if (!role || !role->is_string()) bad(p + ".role", "expected a string");
    std::string rl = role->get<std::string>();
    if (rl == "developer") rl = "system";
    if (rl != "system" && rl != "user" && rl != "assistant" && rl != "tool")
      bad(p + ".role", "must be system, developer, user, assistant or tool, not \"" + rl + "\"");
    json o = {{"role", rl}};
    auto text = content_text(m, p + ".content");
    if (rl == "assistant") {
      json calls;
      if (const json *tc = field(m, "tool_calls")) calls = normalise_tool_calls(*tc, p + ".tool_calls");
      if (!calls.is_null() && !calls.empty()) {
        o["tool_calls"] = calls;
        // The template renders a message with tool calls only when its content is null.
        o["content"] = (text && !text->empty()) ? json(*text) : json(nullptr);
      } else {
        o["content"] = text.value_or("");
      }
    } else {
      if (!text) bad(p + ".content", "expected a string or an array of text parts");
      o["content"] = *text;
      if (rl == "tool") {
        if (const json *id = field(m, "tool_call_id")) {
          if (!id->is_string()) bad(p + ".tool_call_id", "expected a string");
          o["tool_call_id"] = *id;
        }
      }
    }
    if (const json *name = field(m, "name")) {
      if (!name->is_string()) bad(p + ".name", "expected a string");
      o["name"] = *name;
    }
    r.messages.push_back(std::move(o));
  }
  if (const json *tools = field(b, "tools")) {
    if (!tools->is_array()) bad("tools", "expected an array");
    if (tools->size() > 128) bad("tools", "at most 128 tools");
    r.tools = json::array();
    for (size_t i = 0; i < tools->size(); i++) {
      const json &t = (*tools)[i];
      const std::string p = "tools[" + std::to_string(i) + "]";
      if (!t.is_object()) bad(p, "expected an object");
      if (string_field(t, "type", p + ".type") != "function") bad(p + ".type", "must be \"function\"");
      const json *f = field(t, "function");
      if (!f || !f->is_object()) bad(p + ".function", "expected an object");
      const json *name = field(*f, "name");
      if (!name || !name->is_string() || name->get<std::string>().empty()) bad(p + ".function.name", "expected a non-empty string");
      json fo = {{"name", *name}};
      if (const json *d = field(*f, "description")) {
        if (!d->is_string()) bad(p + ".function.description", "expected a string");
        fo["description"] = *d;
      }
      if (const json *params = field(*f, "parameters")) {
        if (!params->is_object()) bad(p + ".function.parameters", "expected a JSON Schema object");
        fo["parameters"] = *params;
      }
      r.tools.push_back({{"type", "function"}, {"function", fo}});
    }
  }
  if (const json *tc = field(b, "tool_choice")) {
    if (tc->is_string()) {
      r.tool_choice = tc->get<std::string>();
      if (r.tool_choice != "none" && r.tool_choice != "auto" && r.tool_choice != "required")
        bad("tool_choice", "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}");
    } else if (tc->is_object()) {
      const json *f = field(*tc, "function");
      const json *name = f && f->is_object() ? field(*f, "name") : nullptr;
      if (!name || !name->is_string()) bad("tool_choice", "expected {\"type\": \"function\", \"function\": {\"name\"}}");
      r.tool_choice = name->get<std::string>();
      r.tool_choice_named = true;
    } else {
      bad("tool_choice", "expected a string or an object");
    }
    if (r.tool_choice != "none" && r.tool_choice != "auto" && (r.tools.is_null() || r.tools.empty()))
      bad("tool_choice", "needs 'tools'");
    if (r.tool_choice_named) {
      bool found = false;
      json only = json::array();
      for (const auto &t : r.tools)
        if (t["function"]["name"] == r.tool_choice) {
          found = true;
          only.push_back(t);
        }
      if (!found) bad("tool_choice", "names a function that is not in 'tools'");
      r.tools = std::move(only);  // the named function is the only one the model is shown
    }
  }
  if (const json *kw = field(b, "chat_template_kwargs")) {
    if (!kw->is_object()) bad("chat_template_kwargs", "expected an object");
    r.template_kwargs = *kw;
  }
  if (const json *lp = field(b, "logprobs")) {
    if (!lp->is_boolean()) bad("logprobs", "expected a boolean");
    r.logprobs = lp->get<bool>();
  }
  if (auto tl = integer(b, "top_logprobs", 0, 20)) {
    if (!r.logprobs) bad("top_logprobs", "'logprobs' must be true when 'top_logprobs' is given");
    r.top_logprobs = *tl;
  }
  return r;
}

CompletionRequest parse_completion_request(const json &b) {
  CompletionRequest r;
  // max_tokens 0 with echo scores the prompt alone (lm-evaluation-harness's loglikelihood requests, as vLLM).
  parse_sampling(b, r, boolean(b, "echo", false) ? 0 : 1);
  const json *p = field(b, "prompt");
  if (!p) throw ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter");
  auto token_list = [&](const json &a) {
    std::vector<int32_t> ids;
    for (const auto &x : a) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
        bad("prompt", "a token array must hold non-negative integers");
      ids.push_back(int32_t(x.get<int64_t>()));
    }
    return ids;
  };
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
    r.prompt = (*p)[0].get<std::string>();
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_array()) {
    r.prompt_tokens = token_list((*p)[0]);
    r.prompt_is_tokens = true;
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    r.prompt_tokens = token_list(*p);
    r.prompt_is_tokens = true;
  } else if (p->is_array() && p->size() > 1) {
    throw ApiError(400, "'prompt': only one prompt per request is supported", "prompt", "unsupported");
  } else {
    bad("prompt", "expected a string, an array of one string, or an array of token ids");
  }
  if (r.prompt_is_tokens && r.prompt_tokens.empty()) bad("prompt", "must not be empty");
  r.echo = boolean(b, "echo", false);
  if (const json *s = field(b, "suffix"))
    if (!s->is_string() || !s->get<std::string>().empty())
      throw ApiError(400, "'suffix' is not supported", "suffix", "unsupported");
  if (const json *lp = field(b, "logprobs")) {
    if (!lp->is_number_integer() || lp->get<int64_t>() < 0 || lp->get<int64_t>() > 5) bad("logprobs", "expected an integer in [0, 5]");
    r.logprobs = true;
    r.top_logprobs = lp->get<int64_t>();
  }
  return r;
}

// ---- responses

json usage_json(const Usage &u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

namespace {
// JSON has no -inf: a token the model rules out gets OpenAI's floor.
double finite_logprob(double lp) { return std::isfinite(lp) ? std::max(lp, -9999.0) : -9999.0; }
json bytes_of(const std::string &s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}
}  // namespace

json chat_logprobs(const std::vector<TokenLogprob> &lp) {
  json content = json::array();
  for (const auto &t : lp) {
    json top = json::array();
    for (const auto &a : t.top)
      top.push_back({{"token", a.token}, {"logprob", finite_logprob(a.logprob)}, {"bytes", bytes_of(a.token)}});
    content.push_back({{"token", t.token}, {"logprob", finite_logprob(t.logprob)}, {"bytes", bytes_of(t.token)}, {"top_logprobs", top}});
  }
  return {{"content", content}, {"refusal", nullptr}};
}

json completion_logprobs(const std::vector<TokenLogprob> &lp, const std::vector<int64_t> &offsets) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (size_t i = 0; i < lp.size(); i++) {
    const auto &t = lp[i];
    tokens.push_back(t.token);
    offs.push_back(i < offsets.size() ? offsets[i] : 0);
    if (t.none) {  // the prompt's first token: nothing predicts it
      lps.push_back(nullptr);
      tops.push_back(nullptr);
      continue;
    }
    lps.push_back(finite_logprob(t.logprob));
    json top = json::object();
    for (const auto &a : t.top)
      if (!top.contains(a.token)) top[a.token] = finite_logprob(a.logprob);
    if (!top.contains(t.token)) top[t.token] = finite_logprob(t.logprob);
    tops.push_back(top);
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

int64_t utf8_chars(const std::string &s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

json chat_completion(const std::string &id, int64_t created, const std::string &model, const std::string &content,
                     const std::string &reasoning, const std::vector<ToolCall> &calls, const std::string &finish,
                     const Usage &u, const json &logprobs) {
  json msg = {{"role", "assistant"}, {"content", content}};
  if (!reasoning.empty()) msg["reasoning_content"] = reasoning;
  if (!calls.empty()) {
    if (content.empty()) msg["content"] = nullptr;
    json tc = json::array();
    for (const auto &c : calls)
      tc.push_back({{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
    msg["tool_calls"] = tc;
  }
  return {{"id", id},
          {"object", "chat.completion"},
          {"created", created},
          {"model", model},
          {"system_fingerprint", nullptr},
          {"choices", json::array({{{"index", 0}, {"message", msg}, {"logprobs", logprobs}, {"finish_reason", finish}}})},
          {"usage", usage_json(u)}};
}

json chat_chunk(const std::string &id, int64_t created, const std::string &model, const json &delta, const json &finish,
                bool with_usage, const json &logprobs) {
  json c = {{"id", id},
            {"object", "chat.completion.chunk"},
            {"created", created},
            {"model", model},
            {"system_fingerprint", nullptr},
            {"choices", json::array({{{"index", 0}, {"delta", delta}, {"logprobs", logprobs}, {"finish_reason", finish}}})}};
  if (with_usage) c["usage"] = nullptr;
  return c;
}

json usage_chunk(const std::string &id, int64_t created, const std::string &model, const char *object, const Usage &u) {
  return {{"id", id},       {"object", object},         {"created", created}, {"model", model},
          {"system_fingerprint", nullptr}, {"choices", json::array()}, {"usage", usage_json(u)}};
}

json text_completion(const std::string &id, int64_t created, const std::string &model, const std::string &text,
                     const std::string &finish, const Usage &u, const json &logprobs) {
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model},
          {"system_fingerprint", nullptr},
          {"choices", json::array({{{"index", 0}, {"text", text}, {"logprobs", logprobs}, {"finish_reason", finish}}})},
          {"usage", usage_json(u)}};
}

json text_chunk(const std::string &id, int64_t created, const std::string &model, const std::string &text,
                const json &finish, bool with_usage, const json &logprobs) {
  json c = {{"id", id},
            {"object", "text_completion"},
            {"created", created},
            {"model", model},
            {"system_fingerprint", nullptr},
            {"choices", json::array({{{"index", 0}, {"text", text}, {"logprobs", logprobs}, {"finish_reason", finish}}})}};
  if (with_usage) c["usage"] = nullptr;
  return c;
}

std::string sse(const json &v) { return "data: " + dump(v) + "\n\n"; }

std::string random_id(const std::string &prefix) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char *hex = "0123456789abcdef";
  std::string s = prefix;
  for (int i = 0; i < 24; i++) s += hex[rng() & 15];
  return s;
}

}  // namespace dsrt::serve
