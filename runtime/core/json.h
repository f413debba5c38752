// Bounded JSON reading: every JSON text that comes from a caller or a file goes through parse_json, which
// refuses nesting deeper than a fixed bound before nlohmann builds (and later copies, compares or dumps,
// all recursively) a value deep enough to overflow the stack.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "dsrt.h"

namespace dsrt {

// Where a JSON parse failed (a byte offset), never the text around it: file contents stay out of messages.
std::string json_error_position(const std::exception &e);

// The deepest nesting of arrays and objects any JSON input may have. Real messages, tools, configs and
// tokenizer files nest fewer than 20 levels; 256 leaves room and keeps every recursive walk well inside a
// thread's stack (template values are held to the same bound: text/jinja.h).
inline constexpr int kMaxJsonDepth = 256;

// Parses `text`; throws dsrt::Error(code) naming `what` when it is not valid JSON or nests deeper than
// max_depth. The depth check is one linear scan before parsing, so the error comes in linear time.
nlohmann::ordered_json parse_json(std::string_view text, const char *what, dsrt_status code = DSRT_ERR_INVALID_ARGUMENT,
                                  int max_depth = kMaxJsonDepth);
// The same for callers that want nlohmann::json (sorted keys): configs, tokenizer files, the index.
nlohmann::json parse_json_sorted(std::string_view text, const char *what, dsrt_status code = DSRT_ERR_FORMAT,
                                 int max_depth = kMaxJsonDepth);

// The nesting depth of a JSON text (brackets outside strings), scanning no further than one level past
// `limit`: a scalar is 0, [] is 1.
int json_text_depth(std::string_view text, int limit);
// The nesting depth of a value, walked without recursion and stopping past `limit`; for values built in
// C++ rather than parsed, before handing them to recursive code.
int json_value_depth(const nlohmann::ordered_json &v, int limit);

}  // namespace dsrt
