// A bounded Jinja-subset interpreter for chat templates, with the environment Hugging Face transformers
// renders chat templates in: trim_blocks and lstrip_blocks on, loop controls, `tojson` as Python's
// json.dumps(ensure_ascii=False), `raise_exception`. Values are JSON values plus "undefined".
// Limits (output bytes, loop iterations, nesting depth) make a hostile template fail cleanly.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace dsrt::jinja {

struct Limits {
  size_t max_output = size_t(16) << 20;
  uint64_t max_steps = 5'000'000;  // loop iterations + statements executed
  int max_depth = 200;             // nesting of expressions and blocks
};

struct Node;
// Template values keep object keys in insertion order, as Python dicts do (tojson output depends on it).
using Json = nlohmann::ordered_json;

class Template {
 public:
  // Throws dsrt::Error(DSRT_ERR_FORMAT) naming the line on a syntax error.
  explicit Template(const std::string &source, Limits limits = {});
  ~Template();
  // Throws dsrt::Error(DSRT_ERR_FORMAT) on a render error (raise_exception, a limit, a type error).
  std::string render(const Json &context) const;

 private:
  std::shared_ptr<Node> root_;
  Limits limits_;
};

// Python's json.dumps(v, ensure_ascii=False) with its default separators (", ", ": ").
std::string python_json_dumps(const Json &v, int indent = -1);

}  // namespace dsrt::jinja
