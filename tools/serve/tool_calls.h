// Splits a DeepSeek model's output, token by token, into OpenAI's channels: `content`, `reasoning_content`
// (R1-style <think>...</think>) and `tool_calls` (DeepSeek's tool-call tokens). It works on token ids, so the
// markers are recognised whether or not the detokenizer shows their text.
//
// Tool-call formats understood (both are DeepSeek's):
//   V3:   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
//   V3.1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
// A call's arguments stream as they come, less a tail the call's end may still trim (whitespace, the start of
// V3's closing fence), so what was sent is always a prefix of the final arguments.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "openai_json.h"

namespace dsrt::serve {

// Ids of the marker tokens (-1 when the model has none) and their visible text (what the detokenizer may
// show for them; stripped from deltas).
struct MarkerTokens {
  int32_t think_begin = -1, think_end = -1;
  int32_t calls_begin = -1, calls_end = -1, call_begin = -1, call_end = -1, sep = -1;
  std::string think_begin_text, think_end_text, calls_begin_text, calls_end_text, call_begin_text, call_end_text,
      sep_text;
};

// What one event adds to each channel.
struct ParsedDelta {
  std::string content, reasoning;
  struct Call {
    int index = 0;
    bool first = false;       // the call's first delta: id and name are set
    std::string id, name;
    std::string arguments;    // appended to the call's arguments
  };
  std::vector<Call> calls;
  bool empty() const { return content.empty() && reasoning.empty() && calls.empty(); }
};

class OutputParser {
 public:
  // tools: parse tool-call tokens (else they stay text); in_reasoning: the prompt ended with <think>, so the
  // output starts inside the reasoning.
  OutputParser(const MarkerTokens &m, bool tools, bool in_reasoning);
  // One generated token and the text delta its event carried (which may hold text released from before it).
  ParsedDelta push(int32_t token, const std::string &text);
  // End of the output: a call left open is closed with what it has.
  ParsedDelta finish(const std::string &text);
  int n_calls() const { return n_calls_; }

 private:
  enum class State { Content, Reasoning, Calls, CallHeader, CallBody };
  void add_text(const std::string &text, ParsedDelta &d);
  void close_call(ParsedDelta &d);
  void stream_arguments(ParsedDelta &d);
  std::string strip(const std::string &text, const std::string &marker) const;
  const MarkerTokens &m_;
  bool tools_;
  State state_;
  std::string header_, body_;  // of the open call
  bool name_sent_ = false, v3_format_ = false;
  size_t args_sent_ = 0;  // bytes of the open call's arguments already in deltas
  int n_calls_ = 0;
};

// V3: "NAME\n```json\nARGS\n```" -> name, args; V3.1 gives the name in the header and the body is the args.
void split_v3_call_body(const std::string &body, std::string &name, std::string &args);

// The system-prompt section that shows `tools` (the request's, normalised) to a model whose chat template does
// not render them (DeepSeek-V3's own template renders only calls and results): laid out after DeepSeek-V3.1's
// template ("## Tools", one "### NAME" per function with its description and JSON-schema parameters, then
// the exact call format). call_format: one call as the model's template writes it, with tool_call_name and
// tool_call_arguments in place of the name and the arguments.
std::string tools_system_prompt(const json &tools, const std::string &call_format);

}  // namespace dsrt::serve
