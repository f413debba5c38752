// OpenAI request parsing (untrusted input: every field's type and range is checked) and response/chunk
// formatting for `dsrt serve`. No dsrt calls here: plain JSON in, plain JSON out, so it is unit-testable.
#pragma once
#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsrt::serve {

using json = nlohmann::ordered_json;  // keys in the order OpenAI writes them

// An error that goes back to the client as {"error": {"message", "type", "param", "code"}} with `status`.
struct ApiError : std::exception {
  int status = 400;
  std::string message, type = "invalid_request_error", param, code;
  ApiError(int status_, std::string message_, std::string param_ = "", std::string code_ = "",
           std::string type_ = "");
  const char *what() const noexcept override { return message.c_str(); }
};

// The error body; param/code are null when empty.
json error_body(const std::string &message, const std::string &type, const std::string &param, const std::string &code);
json error_body(const ApiError &e);
// The error type OpenAI uses for an HTTP status (invalid_request_error, authentication_error, ...).
std::string error_type_for_status(int status);

// JSON text of v that never throws on invalid UTF-8 (replaced by U+FFFD).
std::string dump(const json &v);

// Nesting depth of a JSON text ([ and { outside strings); bodies deeper than a limit are refused before parsing.
size_t json_depth(const std::string &text);
// Parses an untrusted request body into an object, or throws ApiError 400.
json parse_body(const std::string &body, size_t max_depth = 64);

// Fields common to chat and text completions.
struct SamplingRequest {
  std::string model;                       // "" when absent
  std::optional<int64_t> max_tokens;       // max_tokens or max_completion_tokens, >= 1
  std::optional<double> temperature;       // [0, 2]
  std::optional<double> top_p;             // (0, 1]
  std::optional<int64_t> top_k;            // >= 0 (extension, as vLLM)
  std::optional<double> min_p;             // [0, 1] (extension)
  std::optional<double> presence_penalty;  // [-2, 2]
  std::optional<double> frequency_penalty; // [-2, 2]
  std::optional<double> repetition_penalty;// > 0 (extension)
  std::optional<int64_t> seed;
  std::vector<std::string> stop;           // at most 4, non-empty strings
  std::vector<std::pair<int64_t, double>> logit_bias;  // token id -> [-100, 100]
  bool ignore_eos = false;                 // extension
  bool stream = false;
  bool include_usage = false;              // stream_options.include_usage
  bool logprobs = false;
  int64_t top_logprobs = 0;
};

struct ChatRequest : SamplingRequest {
  json messages;          // normalised for the chat template: [{"role", "content" (string or null), ...}]
  json tools;             // null, or [{"type": "function", "function": {"name", ...}}]
  std::string tool_choice = "auto";  // none | auto | required | the forced function's name (tool_choice_named:
                                     // tools then holds that function only)
  bool tool_choice_named = false;
  json template_kwargs;   // null or object (chat_template_kwargs)
};

struct CompletionRequest : SamplingRequest {
  std::string prompt;                 // text prompt, or
  std::vector<int32_t> prompt_tokens; // token ids (prompt_is_tokens)
  bool prompt_is_tokens = false;
  bool echo = false;
};

// Throw ApiError (400) naming the offending parameter.
ChatRequest parse_chat_request(const json &body);
CompletionRequest parse_completion_request(const json &body);

// ---- responses

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
};
json usage_json(const Usage &u);

struct ToolCall {
  std::string id, name, arguments;
};

// One generated token's log-probability and its most likely alternatives (token = the token's bytes).
struct TokenLogprob {
  struct Alt {
    std::string token;
    double logprob = 0;
  };
  std::string token;
  double logprob = 0;
  std::vector<Alt> top;
  bool none = false;  // no log-probability: the first token of an echoed prompt (null in the response)
};
// Chat's choice "logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}.
json chat_logprobs(const std::vector<TokenLogprob> &lp);
// Completions' choice "logprobs": {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"};
// each top_logprobs object holds the alternatives and the sampled token (OpenAI: up to logprobs + 1 entries).
// offsets: each token's character offset in the choice's text. An entry with `none` (an echoed prompt's first
// token) has null in token_logprobs and top_logprobs.
json completion_logprobs(const std::vector<TokenLogprob> &lp, const std::vector<int64_t> &offsets);

// "stop" | "length" | "tool_calls" | ... as OpenAI spells them. logprobs: the choice's (null when not asked).
json chat_completion(const std::string &id, int64_t created, const std::string &model, const std::string &content,
                     const std::string &reasoning, const std::vector<ToolCall> &calls, const std::string &finish,
                     const Usage &u, const json &logprobs = nullptr);
// One streaming chunk; delta is the choice's delta object; finish null while running; with_usage adds "usage": null.
json chat_chunk(const std::string &id, int64_t created, const std::string &model, const json &delta,
                const json &finish, bool with_usage, const json &logprobs = nullptr);
// The last chunk of a stream with include_usage: no choices, the usage.
json usage_chunk(const std::string &id, int64_t created, const std::string &model, const char *object, const Usage &u);

json text_completion(const std::string &id, int64_t created, const std::string &model, const std::string &text,
                     const std::string &finish, const Usage &u, const json &logprobs = nullptr);
json text_chunk(const std::string &id, int64_t created, const std::string &model, const std::string &text,
                const json &finish, bool with_usage, const json &logprobs = nullptr);
// Characters (code points) of UTF-8 text, for text_offset.
int64_t utf8_chars(const std::string &s);

// "data: <json>\n\n"
std::string sse(const json &v);
inline const char *sse_done() { return "data: [DONE]\n\n"; }

// A random id with the prefix: "chatcmpl-" + 24 hex digits.
std::string random_id(const std::string &prefix);

}  // namespace dsrt::serve
