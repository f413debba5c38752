#include "tool_calls.h"

#include "openai_json.h"

namespace dsrt::serve {

namespace {

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
      break;
  }
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
  c.arguments = args;
  if (!name_sent_) {
    c.first = true;
    c.id = random_id("call_");
    c.name = name;
  }
  d.calls.push_back(c);
  n_calls_++;
  header_.clear();
  body_.clear();
  name_sent_ = false;
  v3_format_ = false;
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
