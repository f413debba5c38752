#include "tool_calls.h"

#include <algorithm>
#include <cstring>

#include "openai_json.h"

namespace dsrt::serve {

namespace {

std::string ltrim(const std::string &s) {
  const size_t a = s.find_first_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a);
}

// The arguments of an open call as far as they are certain: split_v3_call_body's / close_call's result is
// known to start with them whatever text comes next. body: V3.1's body, or V3's body after the name line.
std::string certain_arguments(const std::string &body, bool v3) {
  std::string a = ltrim(body);
  bool fenced = false;
  if (v3) {
    if (a.size() < 3 && std::string("```").compare(0, a.size(), a) == 0) return "";  // maybe a fence
    fenced = a.rfind("```", 0) == 0;
    if (fenced) {
      const size_t eol = a.find('\n');
      if (eol == std::string::npos) return "";
      a = ltrim(a.substr(eol + 1));
      const size_t close = a.find("```");
      if (close != std::string::npos) a.resize(close);
    }
  }
  // Held back: trailing whitespace (trimmed at the end) and, in a fence, backticks that may open its close.
  while (!a.empty() && (std::strchr(" \t\r\n", a.back()) || (fenced && a.back() == '`'))) a.pop_back();
  return a;
}

std::string trim(const std::string &s) {
  const char *ws = " \t\r\n";
  const size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  const size_t b = s.find_last_not_of(ws);
  return s.substr(a, b - a + 1);
}

}  // namespace

void split_v3_call_body(const std::string &body, std::string &name, std::string &args) {
  const size_t nl = body.find('\n');
  if (nl == std::string::npos) {
    name = trim(body);
    args.clear();
    return;
  }
  name = trim(body.substr(0, nl));
  std::string rest = trim(body.substr(nl + 1));
  if (rest.rfind("```", 0) == 0) {  // ```json\n ... \n```
    const size_t eol = rest.find('\n');
    rest = eol == std::string::npos ? "" : rest.substr(eol + 1);
    const size_t fence = rest.rfind("```");
    if (fence != std::string::npos) rest = rest.substr(0, fence);
  }
  args = trim(rest);
}

std::string tools_system_prompt(const json &tools, const std::string &call_format) {
  std::string s = "## Tools\nYou have access to the following tools:\n";
  for (const auto &t : tools) {
    const json &f = t["function"];
    s += "\n### " + f["name"].get<std::string>() + "\n";
    if (f.contains("description")) s += "Description: " + f["description"].get<std::string>() + "\n";
    s += "\nParameters: " + (f.contains("parameters") ? dump(f["parameters"]) : std::string("{}")) + "\n";
  }
  s += "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n" + call_format +
       "{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\nWhere:\n\n"
       "- `tool_call_name` must be an exact match to one of the available tools\n"
       "- `tool_call_arguments` must be valid JSON based on the tool's description\n"
       "- For multiple tool calls, chain them directly without separators or spaces\n";
  return s;
}

OutputParser::OutputParser(const MarkerTokens &m, bool tools, bool in_reasoning)
    : m_(m), tools_(tools), state_(in_reasoning ? State::Reasoning : State::Content) {}

std::string OutputParser::strip(const std::string &text, const std::string &marker) const {
  if (!marker.empty() && text.size() >= marker.size() &&
      text.compare(text.size() - marker.size(), marker.size(), marker) == 0)
    return text.substr(0, text.size() - marker.size());
  return text;
}

void OutputParser::add_text(const std::string &text, ParsedDelta &d) {
  if (text.empty()) return;
  switch (state_) {
    case State::Content: d.content += text; break;
    case State::Reasoning: d.reasoning += text; break;
    case State::Calls: break;  // whitespace between calls
    case State::CallHeader: header_ += text; break;
    case State::CallBody:
      body_ += text;
      if (v3_format_ && !name_sent_) {
        const size_t nl = body_.find('\n');
        if (nl != std::string::npos) {
          std::string name, args;
          split_v3_call_body(body_.substr(0, nl), name, args);
          ParsedDelta::Call c;
          c.index = n_calls_;
          c.first = true;
          c.id = random_id("call_");
          c.name = name;
          d.calls.push_back(c);
          name_sent_ = true;
        }
      }
      stream_arguments(d);
      break;
  }
}

void OutputParser::stream_arguments(ParsedDelta &d) {
  if (!name_sent_) return;  // the first delta carries the id and the name
  std::string args;
  if (v3_format_) {
    const size_t nl = body_.find('\n');
    if (nl == std::string::npos) return;
    args = certain_arguments(body_.substr(nl + 1), true);
  } else {
    args = certain_arguments(body_, false);
  }
  if (args.size() <= args_sent_) return;
  ParsedDelta::Call c;
  c.index = n_calls_;
  c.arguments = args.substr(args_sent_);
  args_sent_ = args.size();
  d.calls.push_back(c);
}

void OutputParser::close_call(ParsedDelta &d) {
  std::string name, args;
  if (v3_format_) {
    split_v3_call_body(body_, name, args);
  } else {
    name = trim(header_);
    args = trim(body_);
  }
  ParsedDelta::Call c;
  c.index = n_calls_;
  c.arguments = args.substr(std::min(args_sent_, args.size()));  // what certain_arguments held back
  if (!name_sent_) {
    c.first = true;
    c.id = random_id("call_");
    c.name = name;
  }
  if (c.first || !c.arguments.empty()) d.calls.push_back(c);
  n_calls_++;
  header_.clear();
  body_.clear();
  name_sent_ = false;
  v3_format_ = false;
  args_sent_ = 0;
}

ParsedDelta OutputParser::push(int32_t token, const std::string &text) {
  ParsedDelta d;
  auto is = [&](int32_t id) { return id >= 0 && token == id; };
  if (is(m_.think_begin)) {
    add_text(strip(text, m_.think_begin_text), d);
    if (state_ == State::Content) state_ = State::Reasoning;
  } else if (is(m_.think_end)) {
    add_text(strip(text, m_.think_end_text), d);
    if (state_ == State::Reasoning) state_ = State::Content;
  } else if (tools_ && is(m_.calls_begin)) {
    add_text(strip(text, m_.calls_begin_text), d);
    if (state_ == State::Content || state_ == State::Reasoning) state_ = State::Calls;
  } else if (tools_ && is(m_.call_begin)) {
    add_text(strip(text, m_.call_begin_text), d);
    if (state_ == State::CallHeader || state_ == State::CallBody) close_call(d);
    state_ = State::CallHeader;
    header_.clear();
    body_.clear();
    name_sent_ = false;
    args_sent_ = 0;
  } else if (tools_ && is(m_.sep)) {
    add_text(strip(text, m_.sep_text), d);
    if (state_ == State::CallHeader) {
      const std::string h = trim(header_);
      v3_format_ = h == "function";
      state_ = State::CallBody;
      if (!v3_format_) {  // V3.1: the name is known now
        ParsedDelta::Call c;
        c.index = n_calls_;
        c.first = true;
        c.id = random_id("call_");
        c.name = h;
        d.calls.push_back(c);
        name_sent_ = true;
      }
    }
  } else if (tools_ && is(m_.call_end)) {
    add_text(strip(text, m_.call_end_text), d);
    if (state_ == State::CallHeader || state_ == State::CallBody) {
      close_call(d);
      state_ = State::Calls;
    }
  } else if (tools_ && is(m_.calls_end)) {
    add_text(strip(text, m_.calls_end_text), d);
    if (state_ == State::CallHeader || state_ == State::CallBody) close_call(d);
    state_ = State::Content;
  } else {
    add_text(text, d);
  }
  return d;
}

ParsedDelta OutputParser::finish(const std::string &text) {
  ParsedDelta d;
  add_text(text, d);
  if (state_ == State::CallHeader || state_ == State::CallBody) {
    close_call(d);
    state_ = State::Calls;
  }
  return d;
}

}  // namespace dsrt::serve
