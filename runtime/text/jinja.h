// A bounded Jinja-subset interpreter for chat templates, with the environment Hugging Face transformers
// renders chat templates in: trim_blocks and lstrip_blocks on, loop controls, `tojson` as Python's
// json.dumps(ensure_ascii=False), `raise_exception`. Values are JSON values plus "undefined".
//
// Bounds (a hostile template or context ends in dsrt::Error, never a crash, a hang or unbounded memory):
// - depth: expressions and blocks nest at most max_depth levels (parse and render; the parser's recursion
//   stops at half of it), values at most max_value_depth, so every recursive walk stays small;
// - size: the prompt is at most max_output bytes, every string value at most max_string, every list the
//   template builds at most max_items entries;
// - work: at most max_steps statements, expressions and loop iterations, and at most max_work bytes
//   copied, produced or scanned in all (variables are read in place, not copied), which bounds time and the
//   memory values hold together; a cancel flag, when given, is read at every step.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace dsrt::jinja {

// Hard caps on the depth limits below, whatever a caller asks (the stack each level needs).
inline constexpr int kMaxTemplateDepth = 256;
inline constexpr int kMaxTemplateValueDepth = 320;  // JSON input's 256 (core/json.h) plus room to wrap it

struct Limits {
  size_t max_output = size_t(16) << 20;
  size_t max_string = size_t(16) << 20;
  size_t max_items = size_t(1) << 20;
  uint64_t max_steps = 5'000'000;               // loop iterations + statements + expressions evaluated
  uint64_t max_work = uint64_t(256) << 20;      // bytes copied, produced or scanned (64 per JSON node)
  int max_depth = 200;                          // nesting of expressions and blocks
  int max_value_depth = kMaxTemplateValueDepth;  // nesting of lists and dicts in values
};

struct Node;
// Template values keep object keys in insertion order, as Python dicts do (tojson output depends on it).
using Json = nlohmann::ordered_json;

class Template {
 public:
  // Throws dsrt::Error(DSRT_ERR_FORMAT) naming the line on a syntax error.
  explicit Template(const std::string &source, Limits limits = {});
  ~Template();
  // Throws dsrt::Error(DSRT_ERR_FORMAT) on a render error (raise_exception, a limit, a type error),
  // DSRT_ERR_INVALID_ARGUMENT when the context nests deeper than max_value_depth, DSRT_ERR_CANCELLED once
  // *cancel is non-zero (read at every step; may be NULL).
  std::string render(const Json &context, const std::atomic<int> *cancel = nullptr) const;

 private:
  std::shared_ptr<Node> root_;
  Limits limits_;
};

// Python's json.dumps(v, ensure_ascii=False) with its default separators (", ", ": ").
std::string python_json_dumps(const Json &v, int indent = -1);

}  // namespace dsrt::jinja
