#include "core/json.h"

#include <string>
#include <utility>
#include <vector>

#include "core/status.h"

namespace dsrt {

int json_text_depth(std::string_view text, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); i++) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        i++;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest && (deepest = depth) > limit) return deepest;
    } else if (c == ']' || c == '}') {
      depth -= depth > 0;  // unbalanced text is the parser's error to report; only the deepest point matters here
    }
  }
  return deepest;
}

int json_value_depth(const nlohmann::ordered_json &v, int limit) {
  std::vector<std::pair<const nlohmann::ordered_json *, int>> todo{{&v, 0}};
  int deepest = 0;
  while (!todo.empty()) {
    auto [j, d] = todo.back();
    todo.pop_back();
    if (!j->is_structured()) continue;
    if (d + 1 > deepest && (deepest = d + 1) > limit) return deepest;
    for (const auto &child : *j) todo.push_back({&child, d + 1});
  }
  return deepest;
}

std::string json_error_position(const std::exception &e) {
  if (auto *pe = dynamic_cast<const nlohmann::json::parse_error *>(&e))
    return "syntax error at byte " + std::to_string(pe->byte);
  if (dynamic_cast<const nlohmann::json::exception *>(&e)) return "malformed";
  return e.what();  // not a parser message (e.g. std::bad_alloc): holds no file contents
}

namespace {
template <class J>
J parse_bounded(std::string_view text, const char *what, dsrt_status code, int max_depth) {
  if (json_text_depth(text, max_depth) > max_depth)
    failf(code, what, " nests deeper than ", max_depth, " levels (the limit for JSON input)");
  try {
    return J::parse(text);
  } catch (const std::exception &e) {
    failf(code, what, " is not valid JSON (", json_error_position(e), ")");
  }
}
}  // namespace

nlohmann::ordered_json parse_json(std::string_view text, const char *what, dsrt_status code, int max_depth) {
  return parse_bounded<nlohmann::ordered_json>(text, what, code, max_depth);
}

nlohmann::json parse_json_sorted(std::string_view text, const char *what, dsrt_status code, int max_depth) {
  return parse_bounded<nlohmann::json>(text, what, code, max_depth);
}

}  // namespace dsrt
