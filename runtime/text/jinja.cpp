// Jinja-subset interpreter (see jinja.h). Structure: a lexer that cuts the source into text and tags and
// applies whitespace control (trim_blocks, lstrip_blocks, '-' markers); a recursive-descent parser with
// Jinja2's operator precedence; a tree-walking evaluator over JSON values with an explicit "undefined".
#include "text/jinja.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <map>
#include <string_view>

#include "core/json.h"
#include "core/status.h"

namespace dsrt::jinja {

using json = Json;

namespace {

[[noreturn]] void syntax(int line, const std::string &msg) {
  failf(DSRT_ERR_FORMAT, "chat template line ", line, ": ", msg);
}
[[noreturn]] void runtime_error(const std::string &msg) { failf(DSRT_ERR_FORMAT, "chat template: ", msg); }

[[noreturn]] void too_long(const char *what, size_t limit) {
  failf(DSRT_ERR_FORMAT, "chat template: ", what, " exceeds the string size limit (", limit, " bytes)");
}

// ---------------------------------------------------------------- values
// A template value: JSON plus "undefined". What a variable, attribute or item names is borrowed (`ref`
// points into the scopes, the context or the template's literals, all of which outlive the expression
// being evaluated), so reading a 16 MB message copies nothing; only what an operation makes is owned.
struct Value {
  json own;
  const json *ref = nullptr;
  bool undefined = false;
  static Value undef() { return {json(), nullptr, true}; }
  static Value borrow(const json &j) { return {json(), &j, false}; }
  const json &j() const { return ref ? *ref : own; }
};

bool truthy(const Value &v) {
  if (v.undefined) return false;
  const json &j = v.j();
  if (j.is_null()) return false;
  if (j.is_boolean()) return j.get<bool>();
  if (j.is_number_integer()) return j.get<int64_t>() != 0;
  if (j.is_number()) return j.get<double>() != 0.0;
  if (j.is_string()) return !j.get_ref<const std::string &>().empty();
  if (j.is_array() || j.is_object()) return !j.empty();
  return false;
}

std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  std::string s = json(d).dump();  // shortest round-trip form
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

std::string py_str_literal(const std::string &s) {
  bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
  char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + q;
}

// Python's repr(j) appended to out; fails once out passes `limit` bytes. Recursion is bounded by the
// values' nesting bound (Limits::max_value_depth).
void repr_into(const json &j, std::string &out, size_t limit) {
  if (j.is_null()) out += "None";
  else if (j.is_boolean()) out += j.get<bool>() ? "True" : "False";
  else if (j.is_number_integer()) out += std::to_string(j.get<int64_t>());
  else if (j.is_number_unsigned()) out += std::to_string(j.get<uint64_t>());
  else if (j.is_number_float()) out += py_float(j.get<double>());
  else if (j.is_string()) {
    if (out.size() + j.get_ref<const std::string &>().size() > limit) too_long("a value's text", limit);
    out += py_str_literal(j.get_ref<const std::string &>());
  } else if (j.is_array()) {
    out += '[';
    for (size_t i = 0; i < j.size(); i++) {
      if (i) out += ", ";
      repr_into(j[i], out, limit);
    }
    out += ']';
  } else {
    out += '{';
    bool first = true;
    for (auto it = j.begin(); it != j.end(); ++it) {
      out += (first ? "" : ", ") + py_str_literal(it.key()) + ": ";
      repr_into(it.value(), out, limit);
      first = false;
    }
    out += '}';
  }
  if (out.size() > limit) too_long("a value's text", limit);
}
// For messages: short, whatever the value's size.
std::string py_repr(const json &j) {
  std::string out;
  try {
    repr_into(j, out, 200);
  } catch (const Error &) {
    out.resize(std::min<size_t>(out.size(), 200));
    out += "...";
  }
  return out;
}

// json.dumps into out; fails once out would pass `limit` bytes (checked before each indent is appended, so
// a huge indent costs nothing). Recursion is bounded by the values' nesting bound.
void dumps(const json &j, int64_t indent, int level, std::string &out, size_t limit = SIZE_MAX) {
  auto nl = [&](int lv) {
    if (indent < 0) return;
    if (uint64_t(indent) * uint64_t(lv) + 1 > limit - std::min(limit, out.size())) too_long("tojson's result", limit);
    out += '\n';
    out.append(size_t(indent) * size_t(lv), ' ');
  };
  if (out.size() > limit) too_long("tojson's result", limit);
  if (j.is_string()) {
    const std::string &s = j.get_ref<const std::string &>();
    if (out.size() + s.size() > limit) too_long("tojson's result", limit);
    out += '"';
    for (unsigned char c : s) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
          } else {
            out += char(c);
          }
      }
    }
    out += '"';
  } else if (j.is_array()) {
    if (j.empty()) {
      out += "[]";
      return;
    }
    out += '[';
    for (size_t i = 0; i < j.size(); i++) {
      if (i) out += indent < 0 ? ", " : ",";
      nl(level + 1);
      dumps(j[i], indent, level + 1, out, limit);
    }
    nl(level);
    out += ']';
  } else if (j.is_object()) {
    if (j.empty()) {
      out += "{}";
      return;
    }
    out += '{';
    bool first = true;
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!first) out += indent < 0 ? ", " : ",";
      first = false;
      nl(level + 1);
      dumps(json(it.key()), indent, level + 1, out, limit);
      out += ": ";
      dumps(it.value(), indent, level + 1, out, limit);
    }
    nl(level);
    out += '}';
  } else if (j.is_boolean()) {
    out += j.get<bool>() ? "true" : "false";
  } else if (j.is_null()) {
    out += "null";
  } else if (j.is_number_float()) {
    double d = j.get<double>();
    out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity") : py_float(d);
  } else {
    out += j.dump();
  }
}

// ---------------------------------------------------------------- lexer
enum class Seg { Text, Expr, Stmt, Comment };
struct Segment {
  Seg kind;
  std::string body;
  int line;
};

std::vector<Segment> lex(const std::string &src) {
  struct Raw {
    Seg kind;
    std::string body;
    int line;
    bool lminus = false, rminus = false, lplus = false;
  };
  std::vector<Raw> raw;
  size_t i = 0;
  int line = 1;
  std::string text;
  auto count_lines = [&](size_t a, size_t b) {
    for (size_t k = a; k < b; k++) line += src[k] == '\n';
  };
  while (i < src.size()) {
    size_t open = src.find('{', i);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
           src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open == std::string::npos || open + 1 >= src.size()) {
      text += src.substr(i);
      count_lines(i, src.size());
      break;
    }
    text += src.substr(i, open - i);
    count_lines(i, open);
    char kind = src[open + 1];
    const char *close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    size_t end = src.find(close, open + 2);
    if (end == std::string::npos) syntax(line, std::string("unclosed '{") + kind + "'");
    std::string body = src.substr(open + 2, end - open - 2);
    Raw r{kind == '{' ? Seg::Expr : kind == '%' ? Seg::Stmt : Seg::Comment, "", line};
    if (!body.empty() && (body[0] == '-' || body[0] == '+')) {
      (body[0] == '-' ? r.lminus : r.lplus) = true;
      body.erase(0, 1);
    }
    if (!body.empty() && (body.back() == '-' || body.back() == '+')) {
      r.rminus = body.back() == '-';
      body.pop_back();
    }
    r.body = body;
    if (!text.empty() || raw.empty() || raw.back().kind != Seg::Text) raw.push_back({Seg::Text, text, line});
    text.clear();
    count_lines(open, end + 2);
    raw.push_back(r);
    // {% raw %} ... {% endraw %}: copied verbatim.
    if (r.kind == Seg::Stmt) {
      std::string b = r.body;
      b.erase(0, b.find_first_not_of(" \t\n"));
      b.erase(b.find_last_not_of(" \t\n") + 1);
      if (b == "raw") {
        size_t e = src.find("endraw", end + 2);
        size_t tag = e == std::string::npos ? e : src.rfind("{%", e);
        if (tag == std::string::npos) syntax(line, "unclosed raw block");
        raw.back().kind = Seg::Text;
        raw.back().body = src.substr(end + 2, tag - end - 2);
        size_t tag_end = src.find("%}", e);
        if (tag_end == std::string::npos) syntax(line, "unclosed endraw tag");
        count_lines(end + 2, tag_end + 2);
        i = tag_end + 2;
        continue;
      }
    }
    i = end + 2;
  }
  raw.push_back({Seg::Text, text, line});
  // Whitespace control, in Jinja2's order: '-' strips all whitespace on its side; otherwise lstrip_blocks
  // removes a line's leading blanks before a block or comment tag, and trim_blocks one newline after it.
  for (size_t k = 0; k < raw.size(); k++) {
    Raw &r = raw[k];
    if (r.kind == Seg::Text) continue;
    bool block = r.kind != Seg::Expr;
    if (k > 0 && raw[k - 1].kind == Seg::Text) {
      std::string &t = raw[k - 1].body;
      if (r.lminus) {
        t.erase(t.find_last_not_of(" \t\r\n") + 1);
      } else if (block && !r.lplus) {
        size_t nl = t.find_last_of('\n');
        size_t start = nl == std::string::npos ? 0 : nl + 1;
        bool blank = t.find_first_not_of(" \t", start) == std::string::npos;
        // Only at the start of a line: after a newline, or at the very start of the template.
        if (blank && (nl != std::string::npos || k == 1)) t.erase(start);
      }
    }
    if (k + 1 < raw.size() && raw[k + 1].kind == Seg::Text) {
      std::string &t = raw[k + 1].body;
      if (r.rminus) {
        t.erase(0, t.find_first_not_of(" \t\r\n") == std::string::npos ? t.size() : t.find_first_not_of(" \t\r\n"));
      } else if (block) {
        if (t.rfind("\r\n", 0) == 0)
          t.erase(0, 2);
        else if (!t.empty() && t[0] == '\n')
          t.erase(0, 1);
      }
    }
  }
  std::vector<Segment> out;
  for (auto &r : raw) {
    if (r.kind == Seg::Comment) continue;
    if (r.kind == Seg::Text && r.body.empty()) continue;
    out.push_back({r.kind, r.body, r.line});
  }
  return out;
}

// ---------------------------------------------------------------- expression tokens
enum class Tk { Name, Int, Float, Str, Op, End };
struct Token {
  Tk kind;
  std::string s;
  int64_t i = 0;
  double f = 0;
};

// The token at src[i...], advancing i past it; End at the end. The parser pulls tokens one at a time, so
// an expression too deep to parse is refused after its first few hundred tokens, whatever its length.
Token next_token(const std::string &src, size_t &i, int line) {
  while (i < src.size()) {
    char c = src[i];
    if (std::isspace(uint8_t(c))) {
      i++;
      continue;
    }
    if (std::isalpha(uint8_t(c)) || c == '_') {
      size_t j = i;
      while (j < src.size() && (std::isalnum(uint8_t(src[j])) || src[j] == '_')) j++;
      Token t{Tk::Name, src.substr(i, j - i)};
      i = j;
      return t;
    } else if (std::isdigit(uint8_t(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < src.size() && (std::isdigit(uint8_t(src[j])) || src[j] == '_')) j++;
      if (j + 1 < src.size() && src[j] == '.' && std::isdigit(uint8_t(src[j + 1]))) {
        is_float = true;
        j++;
        while (j < src.size() && std::isdigit(uint8_t(src[j]))) j++;
      }
      if (j < src.size() && (src[j] == 'e' || src[j] == 'E')) {
        is_float = true;
        j++;
        if (j < src.size() && (src[j] == '+' || src[j] == '-')) j++;
        while (j < src.size() && std::isdigit(uint8_t(src[j]))) j++;
      }
      std::string num = src.substr(i, j - i);
      num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
      Token t{is_float ? Tk::Float : Tk::Int, num};
      try {
        if (is_float)
          t.f = std::stod(num);
        else
          t.i = std::stoll(num);
      } catch (const std::exception &) {
        syntax(line, "bad number " + num);
      }
      i = j;
      return t;
    } else if (c == '\'' || c == '"') {
      std::string s;
      size_t j = i + 1;
      for (; j < src.size() && src[j] != c; j++) {
        if (src[j] == '\\' && j + 1 < src.size()) {
          char e = src[++j];
          switch (e) {
            case 'n': s += '\n'; break;
            case 't': s += '\t'; break;
            case 'r': s += '\r'; break;
            case '\\': s += '\\'; break;
            case '\'': s += '\''; break;
            case '"': s += '"'; break;
            default: s += '\\'; s += e;
          }
        } else {
          s += src[j];
        }
      }
      if (j >= src.size()) syntax(line, "unterminated string");
      i = j + 1;
      return {Tk::Str, s};
    } else {
      // Two-character operators first, then one character: a direct match per character (a template of
      // millions of operators tokenizes in linear time, with a small constant).
      static constexpr std::string_view two[] = {"//", "**", "==", "!=", "<=", ">="};
      static constexpr std::string_view one = "+-*/%~<>()[]{},.:|=";
      const std::string_view rest(src.data() + i, std::min<size_t>(2, src.size() - i));
      size_t n = 0;
      for (std::string_view op : two)
        if (rest == op) n = 2;
      if (!n && one.find(c) != std::string_view::npos) n = 1;
      if (!n) syntax(line, std::string("unexpected character '") + c + "'");
      Token t{Tk::Op, src.substr(i, n)};
      i += n;
      return t;
    }
  }
  return {Tk::End, ""};
}

// ---------------------------------------------------------------- AST
struct Expr;
using ExprP = std::shared_ptr<Expr>;
struct Expr {
  enum Kind { Lit, Var, Attr, Item, Slice, Call, Filter, Test, Not, Neg, Bin, Cond, List, Dict } kind;
  json lit;
  std::string name;  // Var, Attr, Filter, Test, Bin op
  std::vector<ExprP> args;  // operands / positional args / list items / dict (k, v) pairs
  std::vector<std::pair<std::string, ExprP>> kwargs;
  bool negated = false;
  int line = 0;
  int height = 1;  // of this subtree: the parser keeps it within Limits::max_depth, which bounds the
                   // recursion of evaluating and of destroying the tree
};

}  // namespace

using NodeP = std::shared_ptr<Node>;
using Body = std::vector<NodeP>;

struct Node {
  enum Kind { Text, Output, If, For, Set, Break, Continue } kind;
  std::string text;
  ExprP expr;                                  // Output, Set value, For iterable
  std::vector<std::pair<ExprP, Body>> branches;  // If
  Body body, else_body;                        // For / If else
  std::vector<std::string> targets;            // For loop vars, Set target (name or ns.attr)
  ExprP filter;                                // For ... if cond
  int line = 0;
};

namespace {

class Parser {
 public:
  Parser(std::string src, int line, int max_depth) : src_(std::move(src)), line_(line), max_depth_(max_depth) {}
  const Token &peek(size_t k = 0) {
    while (t_.size() <= p_ + k && (t_.empty() || t_.back().kind != Tk::End)) t_.push_back(next_token(src_, at_, line_));
    return t_[std::min(p_ + k, t_.size() - 1)];
  }
  bool is_op(const char *op, size_t k = 0) { return peek(k).kind == Tk::Op && peek(k).s == op; }
  bool is_name(const char *n, size_t k = 0) { return peek(k).kind == Tk::Name && peek(k).s == n; }
  Token take() {
    peek();
    return t_[std::min(p_++, t_.size() - 1)];
  }
  void expect_op(const char *op) {
    if (!is_op(op)) syntax(line_, std::string("expected '") + op + "', found '" + peek().s + "'");
    p_++;
  }
  std::string expect_name() {
    if (peek().kind != Tk::Name) syntax(line_, "expected a name, found '" + peek().s + "'");
    return take().s;
  }
  bool at_end() { return peek().kind == Tk::End; }
  void expect_end() {
    if (!at_end()) syntax(line_, "unexpected '" + peek().s + "'");
  }

  ExprP make(Expr::Kind k) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line_;
    return e;
  }
  // Called on each node once its operands are attached: a left-leaning chain (`a + b + ...`, `x.a.b...`,
  // `s|upper|upper...`) is built by loops, not recursion, so its height is checked here, node by node.
  ExprP seal(ExprP e) {
    int h = 0;
    for (const ExprP &a : e->args)
      if (a) h = std::max(h, a->height);
    for (const auto &kv : e->kwargs) h = std::max(h, kv.second->height);
    e->height = h + 1;
    if (e->height > max_depth_) syntax(line_, "expression nested too deeply (limit " + std::to_string(max_depth_) + ")");
    return e;
  }
  // Each recursive descent (parentheses, brackets, call arguments, `not`, unary minus) holds one of these:
  // the parser's own recursion stops at the same bound, before the stack can run out.
  struct Descent {
    Parser &p;
    explicit Descent(Parser &parser) : p(parser) {
      if (++p.nesting_ > p.max_depth_ / 2)
        syntax(p.line_, "expression nested too deeply (limit " + std::to_string(p.max_depth_ / 2) + ")");
    }
    ~Descent() { p.nesting_--; }
  };

  ExprP expression(int depth = 0) {
    Descent guard(*this);
    ExprP e = or_expr(depth);
    if (is_name("if")) {  // a if cond else b
      take();
      auto c = make(Expr::Cond);
      ExprP cond = or_expr(depth);
      ExprP other = nullptr;
      if (is_name("else")) {
        take();
        other = expression(depth + 1);
      }
      c->args = {e, cond, other};
      return seal(c);
    }
    return e;
  }
  ExprP bin(const std::string &op, ExprP a, ExprP b) {
    auto e = make(Expr::Bin);
    e->name = op;
    e->args = {a, b};
    return seal(e);
  }
  ExprP or_expr(int d) {
    ExprP e = and_expr(d);
    while (is_name("or")) {
      take();
      e = bin("or", e, and_expr(d));
    }
    return e;
  }
  ExprP and_expr(int d) {
    ExprP e = not_expr(d);
    while (is_name("and")) {
      take();
      e = bin("and", e, not_expr(d));
    }
    return e;
  }
  ExprP not_expr(int d) {
    if (is_name("not")) {
      Descent guard(*this);
      take();
      auto e = make(Expr::Not);
      e->args = {not_expr(d + 1)};
      return seal(e);
    }
    return compare(d);
  }
  ExprP compare(int d) {
    ExprP e = math1(d);
    for (;;) {
      if (peek().kind == Tk::Op && (peek().s == "==" || peek().s == "!=" || peek().s == "<" || peek().s == ">" ||
                                    peek().s == "<=" || peek().s == ">=")) {
        std::string op = take().s;
        e = bin(op, e, math1(d));
      } else if (is_name("in")) {
        take();
        e = bin("in", e, math1(d));
      } else if (is_name("not") && is_name("in", 1)) {
        take();
        take();
        e = bin("not in", e, math1(d));
      } else {
        return e;
      }
    }
  }
  ExprP math1(int d) {
    ExprP e = concat(d);
    while (is_op("+") || is_op("-")) {
      std::string op = take().s;
      e = bin(op, e, concat(d));
    }
    return e;
  }
  ExprP concat(int d) {
    ExprP e = math2(d);
    while (is_op("~")) {
      take();
      e = bin("~", e, math2(d));
    }
    return e;
  }
  ExprP math2(int d) {
    ExprP e = unary(d);
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = take().s;
      e = bin(op, e, unary(d));
    }
    return e;
  }
  ExprP unary(int d) {
    if (is_op("-")) {
      Descent guard(*this);
      take();
      auto e = make(Expr::Neg);
      e->args = {unary(d + 1)};
      return seal(e);
    }
    if (is_op("+")) take();
    ExprP e = postfix(primary(d), d);
    return filters(e, d);
  }
  void call_args(Expr &c, int d) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().kind == Tk::Name && is_op("=", 1)) {
        std::string k = take().s;
        take();
        c.kwargs.push_back({k, expression(d + 1)});
      } else {
        c.args.push_back(expression(d + 1));
      }
      if (!is_op(")")) expect_op(",");
    }
    expect_op(")");
  }
  ExprP postfix(ExprP e, int d) {
    for (;;) {
      if (is_op(".")) {
        take();
        auto a = make(Expr::Attr);
        a->name = peek().kind == Tk::Int ? std::to_string(take().i) : expect_name();
        a->args = {e};
        e = seal(a);
      } else if (is_op("[")) {
        take();
        ExprP lo = nullptr, hi = nullptr, step = nullptr;
        if (!is_op(":")) lo = expression(d + 1);
        if (is_op(":")) {  // a slice
          take();
          if (!is_op("]") && !is_op(":")) hi = expression(d + 1);
          if (is_op(":")) {
            take();
            if (!is_op("]")) step = expression(d + 1);
          }
          auto s = make(Expr::Slice);
          s->args = {e, lo, hi, step};
          e = seal(s);
        } else {
          auto it = make(Expr::Item);
          it->args = {e, lo};
          e = seal(it);
        }
        expect_op("]");
      } else if (is_op("(")) {
        auto c = make(Expr::Call);
        c->args = {e};
        call_args(*c, d);
        e = seal(c);
      } else {
        return e;
      }
    }
  }
  ExprP filters(ExprP e, int d) {
    for (;;) {
      if (is_op("|")) {
        take();
        auto f = make(Expr::Filter);
        f->name = expect_name();
        f->args = {e};
        if (is_op("(")) call_args(*f, d);
        e = seal(f);
      } else if (is_name("is")) {
        take();
        auto t = make(Expr::Test);
        if (is_name("not")) {
          take();
          t->negated = true;
        }
        t->name = expect_name();
        t->args = {e};
        if (is_op("(")) {
          call_args(*t, d);
        } else if (peek().kind == Tk::Str || peek().kind == Tk::Int || peek().kind == Tk::Float ||
                   (peek().kind == Tk::Name && !is_name("and") && !is_name("or") && !is_name("else") &&
                    !is_name("if") && !is_name("not") && !is_name("in"))) {
          t->args.push_back(primary(d));  // `is divisibleby 3`, `is sameas none`
        }
        e = seal(t);
      } else {
        return e;
      }
    }
  }
  ExprP primary(int d) {
    const Token t = peek();  // a copy: pulling more tokens may move the buffer
    if (t.kind == Tk::Str) {
      auto e = make(Expr::Lit);
      std::string s = take().s;
      while (peek().kind == Tk::Str) s += take().s;  // adjacent literals concatenate
      e->lit = s;
      return e;
    }
    if (t.kind == Tk::Int) {
      auto e = make(Expr::Lit);
      e->lit = take().i;
      return e;
    }
    if (t.kind == Tk::Float) {
      auto e = make(Expr::Lit);
      e->lit = take().f;
      return e;
    }
    if (t.kind == Tk::Name) {
      std::string n = take().s;
      auto e = make(Expr::Lit);
      if (n == "true" || n == "True") {
        e->lit = true;
      } else if (n == "false" || n == "False") {
        e->lit = false;
      } else if (n == "none" || n == "None") {
        e->lit = nullptr;
      } else {
        e->kind = Expr::Var;
        e->name = n;
      }
      return e;
    }
    if (is_op("(")) {
      take();
      if (is_op(")")) {  // empty tuple
        take();
        auto e = make(Expr::List);
        return e;
      }
      ExprP e = expression(d + 1);
      if (is_op(",")) {  // a tuple: a list for our purposes
        auto l = make(Expr::List);
        l->args.push_back(e);
        while (is_op(",")) {
          take();
          if (is_op(")")) break;
          l->args.push_back(expression(d + 1));
        }
        e = seal(l);
      }
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      take();
      auto l = make(Expr::List);
      while (!is_op("]")) {
        l->args.push_back(expression(d + 1));
        if (!is_op("]")) expect_op(",");
      }
      expect_op("]");
      return seal(l);
    }
    if (is_op("{")) {
      take();
      auto m = make(Expr::Dict);
      while (!is_op("}")) {
        m->args.push_back(expression(d + 1));
        expect_op(":");
        m->args.push_back(expression(d + 1));
        if (!is_op("}")) expect_op(",");
      }
      expect_op("}");
      return seal(m);
    }
    syntax(line_, "unexpected '" + t.s + "'");
  }

 private:
  std::string src_;
  size_t at_ = 0;          // next character of src_ to tokenize
  std::vector<Token> t_;   // tokens pulled so far
  size_t p_ = 0;
  int line_;
  int max_depth_;
  int nesting_ = 0;
};

// Statements: builds the tree from the segment list.
class Builder {
 public:
  Builder(std::vector<Segment> segs, int max_depth) : s_(std::move(segs)), max_depth_(max_depth) {}

  Body parse_all() {
    Body b = parse_body({});
    if (i_ < s_.size()) syntax(s_[i_].line, "unexpected {% " + head(s_[i_]) + " %}");
    return b;
  }

 private:
  static std::string head(const Segment &s) {
    size_t a = s.body.find_first_not_of(" \t\r\n");
    if (a == std::string::npos) return "";
    size_t b = a;
    while (b < s.body.size() && (std::isalnum(uint8_t(s.body[b])) || s.body[b] == '_')) b++;
    return s.body.substr(a, b - a);
  }
  static std::string rest(const Segment &s) {
    size_t a = s.body.find_first_not_of(" \t\r\n");
    if (a == std::string::npos) return "";
    size_t b = a;
    while (b < s.body.size() && (std::isalnum(uint8_t(s.body[b])) || s.body[b] == '_')) b++;
    return s.body.substr(b);
  }

  // Parses nodes until a statement whose head is in `stops` (left unconsumed).
  Body parse_body(const std::vector<std::string> &stops, int depth = 0) {
    if (depth > 100) syntax(i_ < s_.size() ? s_[i_].line : 0, "blocks nested too deeply");
    Body body;
    while (i_ < s_.size()) {
      const Segment &seg = s_[i_];
      if (seg.kind == Seg::Text) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Text;
        n->text = seg.body;
        body.push_back(n);
        i_++;
        continue;
      }
      if (seg.kind == Seg::Expr) {
        Parser p(seg.body, seg.line, max_depth_);
        auto n = std::make_shared<Node>();
        n->kind = Node::Output;
        n->expr = p.expression();
        p.expect_end();
        n->line = seg.line;
        body.push_back(n);
        i_++;
        continue;
      }
      std::string h = head(seg);
      if (h.empty()) syntax(seg.line, "empty or malformed {% %} tag");
      if (std::find(stops.begin(), stops.end(), h) != stops.end()) return body;
      i_++;
      Parser p(rest(seg), seg.line, max_depth_);
      auto n = std::make_shared<Node>();
      n->line = seg.line;
      if (h == "if") {
        n->kind = Node::If;
        ExprP cond = p.expression();
        p.expect_end();
        for (;;) {
          Body b = parse_body({"elif", "else", "endif"}, depth + 1);
          n->branches.push_back({cond, b});
          if (i_ >= s_.size()) syntax(seg.line, "if without endif");
          std::string h2 = head(s_[i_]);
          Parser p2(rest(s_[i_]), s_[i_].line, max_depth_);
          i_++;
          if (h2 == "elif") {
            cond = p2.expression();
            p2.expect_end();
          } else if (h2 == "else") {
            n->else_body = parse_body({"endif"}, depth + 1);
            if (i_ >= s_.size()) syntax(seg.line, "if without endif");
            i_++;
            break;
          } else {
            break;
          }
        }
      } else if (h == "for") {
        n->kind = Node::For;
        n->targets.push_back(p.expect_name());
        while (p.is_op(",")) {
          p.take();
          n->targets.push_back(p.expect_name());
        }
        if (!p.is_name("in")) syntax(seg.line, "expected 'in' in for");
        p.take();
        n->expr = p.or_expr(0);
        if (p.is_name("if")) {
          p.take();
          n->filter = p.expression();
        }
        if (p.is_name("recursive")) syntax(seg.line, "recursive loops are not supported");
        p.expect_end();
        n->body = parse_body({"else", "endfor"}, depth + 1);
        if (i_ >= s_.size()) syntax(seg.line, "for without endfor");
        if (head(s_[i_]) == "else") {
          i_++;
          n->else_body = parse_body({"endfor"}, depth + 1);
          if (i_ >= s_.size()) syntax(seg.line, "for without endfor");
        }
        i_++;
      } else if (h == "set") {
        n->kind = Node::Set;
        std::string target = p.expect_name();
        if (p.is_op(".")) {
          p.take();
          target += "." + p.expect_name();
        }
        n->targets.push_back(target);
        if (!p.is_op("=")) syntax(seg.line, "block assignments ({% set x %}...{% endset %}) are not supported");
        p.take();
        n->expr = p.expression();
        p.expect_end();
      } else if (h == "break" || h == "continue") {
        n->kind = h == "break" ? Node::Break : Node::Continue;
        p.expect_end();
      } else {
        syntax(seg.line, "unsupported or unexpected tag '" + h + "'");
      }
      body.push_back(n);
    }
    if (!stops.empty()) syntax(s_.empty() ? 0 : s_.back().line, "missing {% " + stops.back() + " %}");
    return body;
  }

  std::vector<Segment> s_;
  size_t i_ = 0;
  int max_depth_;
};

// ---------------------------------------------------------------- evaluator
struct LoopSignal {
  bool brk = false, cont = false;
};

// What one JSON node counts for in the work count, beside its string bytes: about what it occupies (its
// slot, its header, an object entry's key), so the work bound also bounds the memory values hold.
constexpr uint64_t kNodeBytes = 64;
constexpr uint64_t kScalarBytes = 16;  // a number, bool or null: a slot, no allocation

// The first occurrence of needle in hay at or after `from` (npos if none), in linear time: glibc's memmem is
// the two-way algorithm, where std::string::find compares at every position (quadratic on hostile input).
size_t find_sub(std::string_view hay, std::string_view needle, size_t from = 0) {
  if (from > hay.size()) return std::string::npos;
  if (needle.empty()) return from;
  const void *p = memmem(hay.data() + from, hay.size() - from, needle.data(), needle.size());
  return p ? size_t(static_cast<const char *>(p) - hay.data()) : std::string::npos;
}

class Renderer {
 public:
  Renderer(const Limits &lim, const json &context, const std::atomic<int> *cancel)
      : lim_(lim), context_(context), cancel_(cancel) {}
  // A deque: pushing a scope never moves the others, so values borrowed from them stay valid.
  std::deque<std::map<std::string, json>> scopes;
  std::string out;

  void step() {
    if (++steps_ > lim_.max_steps) runtime_error("the template ran too long (step limit)");
    if (cancel_ && cancel_->load(std::memory_order_relaxed)) fail(DSRT_ERR_CANCELLED, "chat template: rendering was cancelled");
  }
  // Bytes copied, produced or scanned: their total bounds a render's time and the memory its values hold,
  // where the step count alone does not (one step may copy 16 MB).
  void charge(uint64_t bytes) {
    work_ += bytes;
    if (work_ > lim_.max_work)
      failf(DSRT_ERR_FORMAT, "chat template: the template did too much work (work limit: ", lim_.max_work,
            " bytes copied, produced or scanned)");
  }
  // Before making a string of n bytes.
  void will_make(size_t n, const char *what) {
    if (n > lim_.max_string) too_long(what, lim_.max_string);
    charge(n);
  }
  void emit(std::string_view s) {
    if (out.size() + s.size() > lim_.max_output)
      runtime_error("the rendered prompt exceeds the output size limit (" + std::to_string(lim_.max_output) + " bytes)");
    charge(s.size());
    out += s;
  }
  void emit_value(const Value &v) {
    if (v.undefined) return;
    if (v.j().is_string()) return emit(v.j().get_ref<const std::string &>());
    std::string s;
    repr_into(v.j(), s, lim_.max_output);
    emit(s);
  }

  // One walk over a value (charged: the walk is work too): its work count and its nesting.
  struct Measure {
    uint64_t cost = 0;
    int depth = 0;
  };
  Measure measure(const json &v) {
    Measure m;
    std::vector<std::pair<const json *, int>> todo{{&v, 0}};
    while (!todo.empty()) {
      auto [j, d] = todo.back();
      todo.pop_back();
      m.cost += j->is_primitive() && !j->is_string() ? kScalarBytes : kNodeBytes;
      if (j->is_string()) {
        m.cost += j->get_ref<const std::string &>().size();
      } else if (j->is_array()) {
        m.depth = std::max(m.depth, d + 1);
        for (const json &c : *j) todo.push_back({&c, d + 1});
      } else if (j->is_object()) {
        m.depth = std::max(m.depth, d + 1);
        for (auto it = j->begin(); it != j->end(); ++it) {
          m.cost += it.key().size();
          todo.push_back({&it.value(), d + 1});
        }
      }
    }
    charge(m.cost);
    return m;
  }
  // A copy of x that will sit `wrap` levels inside a new container: charged, and refused past the values'
  // nesting bound, so nothing recursive (copy, ==, tojson) ever walks deeper than Limits::max_value_depth.
  json copy(const json &x, int wrap = 0) {
    const Measure m = measure(x);
    if (m.depth + wrap > lim_.max_value_depth)
      runtime_error("a value nests deeper than the limit (" + std::to_string(lim_.max_value_depth) + " levels)");
    return x;
  }
  // v's JSON to keep: moved out when v owns it (already paid for), copied when borrowed.
  json take(Value &&v, int wrap = 0) {
    if (v.undefined) return json();
    if (v.ref) return copy(*v.ref, wrap);
    if (wrap && v.own.is_structured()) {
      const Measure m = measure(v.own);
      if (m.depth + wrap > lim_.max_value_depth)
        runtime_error("a value nests deeper than the limit (" + std::to_string(lim_.max_value_depth) + " levels)");
    }
    return std::move(v.own);
  }
  // A child of parent: borrowed when parent is, moved out when parent is owned (and about to die).
  static Value sub(Value &&parent, const json &child) {
    if (parent.ref) return Value::borrow(child);
    return {std::move(const_cast<json &>(child))};
  }
  // Jinja's str(v), viewed: a string's own bytes, or repr written into holder.
  std::string_view text_of(const Value &v, std::string &holder) {
    if (v.undefined) return {};
    if (v.j().is_string()) return v.j().get_ref<const std::string &>();
    repr_into(v.j(), holder, lim_.max_string);
    charge(holder.size());
    return holder;
  }
  std::string to_str(const Value &v) {
    std::string holder;
    std::string_view t = text_of(v, holder);
    if (t.data() == holder.data()) return holder;
    will_make(t.size(), "a string");
    return std::string(t);
  }
  void charge_compare(const json &x, const json &y) {
    if (x.is_string() && y.is_string())
      charge(std::min(x.get_ref<const std::string &>().size(), y.get_ref<const std::string &>().size()) + 1);
    else if (x.is_structured() && x.type() == y.type())
      measure(x);
    else
      charge(1);
  }

  // Variables the template set (innermost scope first), then the caller's context, read in place.
  const json *lookup(const std::string &n) {
    if (json *v = lookup_set(n)) return v;
    if (context_.is_object()) {
      charge(context_.size());
      auto it = context_.find(n);
      if (it != context_.end()) return &*it;
    }
    return nullptr;
  }
  json *lookup_set(const std::string &n) {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
      auto f = it->find(n);
      if (f != it->end()) return &f->second;
    }
    return nullptr;
  }

  void run(const Body &b, LoopSignal &sig, int depth) {
    if (depth > lim_.max_depth) runtime_error("blocks nested too deeply");
    for (const NodeP &n : b) {
      step();
      switch (n->kind) {
        case Node::Text: emit(n->text); break;
        case Node::Output: emit_value(eval(*n->expr, 0)); break;
        case Node::If: {
          bool done = false;
          for (auto &[cond, body] : n->branches)
            if (truthy(eval(*cond, 0))) {
              run(body, sig, depth + 1);
              done = true;
              break;
            }
          if (!done) run(n->else_body, sig, depth + 1);
          break;
        }
        case Node::For: run_for(*n, depth); break;
        case Node::Set: {
          const std::string &t = n->targets[0];
          size_t dot = t.find('.');
          if (dot == std::string::npos) {
            json v = take(eval(*n->expr, 0));  // a copy before the old value is replaced: `set x = x`
            scopes.back()[t] = std::move(v);
          } else {
            json v = take(eval(*n->expr, 0), 1);  // `set ns.a = ns` copies ns before ns changes
            json *ns = lookup_set(t.substr(0, dot));
            if (!ns || !ns->is_object() || !ns->contains("__namespace__"))
              runtime_error("cannot set an attribute of '" + t.substr(0, dot) + "': not a namespace");
            (*ns)[t.substr(dot + 1)] = std::move(v);
          }
          break;
        }
        case Node::Break: sig.brk = true; return;
        case Node::Continue: sig.cont = true; return;
      }
      if (sig.brk || sig.cont) return;
    }
  }

  void run_for(const Node &n, int depth) {
    std::vector<json> items;
    {
      Value it = eval(*n.expr, 0);
      const json &j = it.j();
      if (it.undefined || j.is_null()) {
      } else if (j.is_array()) {
        if (it.ref) measure(j);  // copied: the body may reassign the variable being iterated
        items.reserve(j.size());
        for (const json &x : j) items.push_back(it.ref ? x : std::move(const_cast<json &>(x)));
      } else if (j.is_object()) {
        for (auto k = j.begin(); k != j.end(); ++k)
          if (k.key() != "__namespace__") {
            charge(kNodeBytes + k.key().size());
            items.push_back(k.key());
          }
      } else if (j.is_string()) {
        const std::string &s = j.get_ref<const std::string &>();
        charge(uint64_t(s.size()) * kNodeBytes);  // a value per character
        for (size_t i = 0; i < s.size();) {       // by character
          size_t l = 1;
          uint8_t c = uint8_t(s[i]);
          if (c >= 0xf0) l = 4;
          else if (c >= 0xe0) l = 3;
          else if (c >= 0xc0) l = 2;
          items.push_back(s.substr(i, l));
          i += l;
        }
      } else {
        runtime_error("cannot iterate over " + py_repr(j));
      }
    }
    // `for x in xs if cond` filters before loop.* is computed, as Jinja2 does.
    if (n.filter) {
      size_t kept = 0;
      for (size_t i = 0; i < items.size(); i++) {
        step();
        scopes.emplace_back();
        bind(n, items[i]);
        bool ok = truthy(eval(*n.filter, 0));
        scopes.pop_back();
        if (ok && kept != i) items[kept] = std::move(items[i]);
        kept += ok;
      }
      items.resize(kept);
    }
    if (items.empty()) {
      LoopSignal s;
      run(n.else_body, s, depth + 1);
      return;
    }
    const size_t len = items.size();
    for (size_t i = 0; i < len; i++) {
      step();
      scopes.emplace_back();
      bind(n, items[i]);
      json loop = json::object();
      loop["index"] = i + 1;
      loop["index0"] = i;
      loop["first"] = i == 0;
      loop["last"] = i + 1 == len;
      loop["length"] = len;
      loop["revindex"] = len - i;
      loop["revindex0"] = len - i - 1;
      loop["previtem"] = i ? copy(items[i - 1], 1) : json();
      loop["nextitem"] = i + 1 < len ? copy(items[i + 1], 1) : json();
      scopes.back()["loop"] = std::move(loop);
      LoopSignal sig;
      run(n.body, sig, depth + 1);
      scopes.pop_back();
      if (sig.brk) break;
    }
  }

  void bind(const Node &n, const json &x) {
    if (n.targets.size() == 1) {
      scopes.back()[n.targets[0]] = copy(x);
      return;
    }
    if (!x.is_array() || x.size() != n.targets.size()) runtime_error("cannot unpack " + py_repr(x));
    for (size_t k = 0; k < n.targets.size(); k++) scopes.back()[n.targets[k]] = copy(x[k]);
  }

  // Python's ints do not overflow; ours are int64 and become floats past that range, never wrap (UB).
  static json py_int(__int128 r) {
    if (r >= INT64_MIN && r <= INT64_MAX) return json(int64_t(r));
    return json(double(r));
  }

  static int64_t as_int(const Value &v, const char *what) {
    if (v.j().is_number_integer()) return v.j().get<int64_t>();
    if (v.j().is_boolean()) return v.j().get<bool>();
    runtime_error(std::string(what) + " must be an integer, got " + (v.undefined ? "undefined" : py_repr(v.j())));
  }

  Value attr(Value &&obj, const std::string &name) {
    if (obj.undefined) runtime_error("'" + name + "' of an undefined value");
    const json &j = obj.j();
    if (!j.is_object()) return Value::undef();
    charge(j.size());  // an ordered object is searched key by key
    auto it = j.find(name);
    return it == j.end() ? Value::undef() : sub(std::move(obj), *it);
  }
  Value item(Value &&obj, const Value &key) {
    if (obj.undefined) runtime_error("subscript of an undefined value");
    const json &j = obj.j(), &k = key.j();
    if (j.is_object() && k.is_string()) return attr(std::move(obj), k.get_ref<const std::string &>());
    if ((j.is_array() || j.is_string()) && k.is_number_integer()) {
      int64_t i = k.get<int64_t>(), n = j.is_array() ? int64_t(j.size()) : int64_t(j.get_ref<const std::string &>().size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undef();
      if (j.is_array()) return sub(std::move(obj), j[size_t(i)]);
      return {json(std::string(1, j.get_ref<const std::string &>()[size_t(i)]))};
    }
    return Value::undef();
  }

  Value eval(const Expr &e, int depth) {
    if (depth > lim_.max_depth) runtime_error("expression nested too deeply");
    step();
    const int d = depth + 1;
    switch (e.kind) {
      case Expr::Lit: return Value::borrow(e.lit);
      case Expr::Var: {
        const json *v = lookup(e.name);
        return v ? Value::borrow(*v) : Value::undef();
      }
      case Expr::Attr: return attr(eval(*e.args[0], d), e.name);
      case Expr::Item: {
        Value obj = eval(*e.args[0], d);
        Value key = eval(*e.args[1], d);
        return item(std::move(obj), key);
      }
      case Expr::Slice: return slice(e, d);
      case Expr::Call: return call(e, d);
      case Expr::Filter: return filter(e, d);
      case Expr::Test: {
        bool r = test(e, d);
        return {json(e.negated ? !r : r)};
      }
      case Expr::Not: return {json(!truthy(eval(*e.args[0], d)))};
      case Expr::Neg: {
        Value v = eval(*e.args[0], d);
        const json &j = v.j();
        if (j.is_number_integer()) return {py_int(-__int128(j.get<int64_t>()))};
        if (j.is_number()) return {json(-j.get<double>())};
        runtime_error("cannot negate " + py_repr(j));
      }
      case Expr::Cond: {
        if (truthy(eval(*e.args[1], d))) return eval(*e.args[0], d);
        return e.args[2] ? eval(*e.args[2], d) : Value::undef();
      }
      case Expr::List: {
        json l = json::array();
        for (auto &a : e.args) l.push_back(take(eval(*a, d), 1));
        return {std::move(l)};
      }
      case Expr::Dict: {
        json m = json::object();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], d);
          if (!key.j().is_string()) runtime_error("dict keys must be strings");
          charge(key.j().get_ref<const std::string &>().size());
          m[key.j().get_ref<const std::string &>()] = take(eval(*e.args[k + 1], d), 1);
        }
        return {std::move(m)};
      }
      case Expr::Bin: return binary(e, d);
    }
    runtime_error("bad expression");
  }

  Value slice(const Expr &e, int d) {
    Value obj = eval(*e.args[0], d);
    const json &j = obj.j();
    auto opt = [&](int k, int64_t def) { return e.args[size_t(k)] ? as_int(eval(*e.args[size_t(k)], d), "slice index") : def; };
    int64_t step = opt(3, 1);
    if (step == 0) runtime_error("slice step cannot be zero");
    // Calls push(first, count) for each run of consecutive indices: one run when step is 1 (a substring
    // is copied at once), one index per run otherwise.
    auto do_slice = [&](int64_t n, auto &&push) {
      int64_t lo = opt(1, step > 0 ? 0 : n - 1), hi = opt(2, step > 0 ? n : -n - 1);
      auto norm = [&](int64_t v, bool is_hi) {
        if (v < 0) v += n;
        if (step > 0) return std::clamp<int64_t>(v, 0, n);
        return std::clamp<int64_t>(v, is_hi ? -1 : -1, n - 1);
      };
      lo = e.args[1] ? norm(lo, false) : lo;
      hi = e.args[2] ? norm(hi, true) : (step > 0 ? n : -1);
      if (step == 1) {
        if (lo < hi) push(lo, hi - lo);
        return;
      }
      for (__int128 i = lo; step > 0 ? i < hi : i > hi; i += step) push(int64_t(i), int64_t(1));
    };
    if (j.is_array()) {
      json out = json::array();
      do_slice(int64_t(j.size()), [&](int64_t first, int64_t count) {
        for (int64_t i = first; i < first + count; i++) out.push_back(copy(j[size_t(i)]));
      });
      return {std::move(out)};
    }
    if (j.is_string()) {
      const std::string &s = j.get_ref<const std::string &>();
      std::string out;
      do_slice(int64_t(s.size()), [&](int64_t first, int64_t count) { out.append(s, size_t(first), size_t(count)); });
      charge(out.size());
      return {json(std::move(out))};
    }
    runtime_error("cannot slice " + py_repr(j));
  }

  // s * n, the size checked before anything is made (a count of 2^63 costs nothing).
  Value repeat(const std::string &s, int64_t n) {
    if (n <= 0 || s.empty()) return {json("")};
    if (uint64_t(n) > lim_.max_string / s.size()) too_long("string repetition", lim_.max_string);
    will_make(s.size() * size_t(n), "string repetition");
    std::string r;
    r.reserve(s.size() * size_t(n));
    for (int64_t k = 0; k < n; k++) r += s;
    return {json(std::move(r))};
  }

  Value binary(const Expr &e, int d) {
    const std::string &op = e.name;
    if (op == "and") {
      Value a = eval(*e.args[0], d);
      return truthy(a) ? eval(*e.args[1], d) : std::move(a);
    }
    if (op == "or") {
      Value a = eval(*e.args[0], d);
      return truthy(a) ? std::move(a) : eval(*e.args[1], d);
    }
    Value a = eval(*e.args[0], d), b = eval(*e.args[1], d);
    const json &x = a.j(), &y = b.j();
    if (op == "~") {
      std::string ha, hb;
      std::string_view sa = text_of(a, ha), sb = text_of(b, hb);
      will_make(sa.size() + sb.size(), "'~'");
      std::string r;
      r.reserve(sa.size() + sb.size());
      r.append(sa).append(sb);
      return {json(std::move(r))};
    }
    if (op == "==" || op == "!=") {
      charge_compare(x, y);
      const bool eq = !a.undefined && !b.undefined ? x == y : a.undefined == b.undefined;
      return {json(op == "==" ? eq : !eq)};
    }
    if (op == "in" || op == "not in") {
      bool r = false;
      if (y.is_string() && x.is_string()) {
        const std::string &hay = y.get_ref<const std::string &>(), &needle = x.get_ref<const std::string &>();
        charge(hay.size() + needle.size());
        r = find_sub(hay, needle) != std::string::npos;
      } else if (y.is_array()) {
        measure(y);
        r = std::find(y.begin(), y.end(), x) != y.end();
      } else if (y.is_object() && x.is_string()) {
        charge(y.size());
        r = y.contains(x.get_ref<const std::string &>());
      } else if (!b.undefined && !y.is_null()) {
        runtime_error("'in' needs a string, list or mapping on its right");
      } else {
        runtime_error("'in' over an undefined value");
      }
      return {json(op == "in" ? r : !r)};
    }
    if (a.undefined || b.undefined) runtime_error("operator '" + op + "' on an undefined value");
    if (op == "+") {
      if (x.is_string() && y.is_string()) {
        const std::string &p = x.get_ref<const std::string &>(), &q = y.get_ref<const std::string &>();
        will_make(p.size() + q.size(), "'+'");
        std::string r;
        r.reserve(p.size() + q.size());
        r.append(p).append(q);
        return {json(std::move(r))};
      }
      if (x.is_array() && y.is_array()) {
        if (x.size() + y.size() > lim_.max_items) runtime_error("a list exceeds the item limit (" + std::to_string(lim_.max_items) + ")");
        json r = take(std::move(a));
        if (b.ref) {
          measure(y);
          for (const json &v : y) r.push_back(v);
        } else {
          for (json &v : b.own) r.push_back(std::move(v));
        }
        return {std::move(r)};
      }
    }
    if (op == "*" && x.is_string() && y.is_number_integer()) return repeat(x.get_ref<const std::string &>(), y.get<int64_t>());
    if (op == "*" && x.is_number_integer() && y.is_string()) return repeat(y.get_ref<const std::string &>(), x.get<int64_t>());
    if (x.is_number() && y.is_number()) {
      const bool ints = x.is_number_integer() && y.is_number_integer();
      const double p = x.get<double>(), q = y.get<double>();
      if (op == "<") return {json(p < q)};
      if (op == ">") return {json(p > q)};
      if (op == "<=") return {json(p <= q)};
      if (op == ">=") return {json(p >= q)};
      if (ints) {
        const __int128 pi = x.get<int64_t>(), qi = y.get<int64_t>();
        if (op == "+") return {py_int(pi + qi)};
        if (op == "-") return {py_int(pi - qi)};
        if (op == "*") return {py_int(pi * qi)};
        if (op == "//" || op == "%") {
          if (qi == 0) runtime_error("division by zero");
          const __int128 rem = ((pi % qi) + qi) % qi;  // Python: the remainder takes the divisor's sign
          return {py_int(op == "%" ? rem : (pi - rem) / qi)};
        }
      }
      if (op == "+") return {json(p + q)};
      if (op == "-") return {json(p - q)};
      if (op == "*") return {json(p * q)};
      if (q == 0 && (op == "/" || op == "//" || op == "%")) runtime_error("division by zero");
      if (op == "/") return {json(p / q)};
      if (op == "//") return {json(std::floor(p / q))};
      if (op == "%") return {json(p - q * std::floor(p / q))};
    }
    if (x.is_string() && y.is_string()) {
      const auto &p = x.get_ref<const std::string &>(), &q = y.get_ref<const std::string &>();
      charge_compare(x, y);
      if (op == "<") return {json(p < q)};
      if (op == ">") return {json(p > q)};
      if (op == "<=") return {json(p <= q)};
      if (op == ">=") return {json(p >= q)};
    }
    runtime_error("unsupported operands for '" + op + "': " + py_repr(x) + " and " + py_repr(y));
  }

  std::vector<Value> args_of(const Expr &e, size_t first, int d) {
    std::vector<Value> v;
    for (size_t k = first; k < e.args.size(); k++) v.push_back(eval(*e.args[k], d));
    return v;
  }
  Value kwarg(const Expr &e, const std::string &name, int d) {
    for (auto &[k, v] : e.kwargs)
      if (k == name) return eval(*v, d);
    return Value::undef();
  }

  std::string strip(std::string_view s, std::string_view chars, bool left, bool right) {
    bool strip_it[256] = {};  // a table: `chars` may be long
    for (unsigned char c : chars) strip_it[c] = true;
    size_t a = 0, b = s.size();
    if (left)
      while (a < b && strip_it[uint8_t(s[a])]) a++;
    if (right)
      while (b > a && strip_it[uint8_t(s[b - 1])]) b--;
    charge(chars.size() + (s.size() - (b - a)));
    will_make(b - a, "strip's result");
    return std::string(s.substr(a, b - a));
  }
  std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
    charge(s.size() + from.size());
    if (from.empty()) {
      will_make(s.size(), "replace's result");
      return std::string(s);
    }
    std::string r;
    size_t i = 0;
    for (size_t j; (j = find_sub(s, from, i)) != std::string::npos; i = j + from.size()) {
      if (r.size() + (j - i) + to.size() > lim_.max_string) too_long("replace's result", lim_.max_string);
      r.append(s.substr(i, j - i)).append(to);
    }
    if (r.size() + (s.size() - i) > lim_.max_string) too_long("replace's result", lim_.max_string);
    r.append(s.substr(i));
    charge(r.size());
    return r;
  }
  std::string join(const json &list, std::string_view sep) {
    std::string r;
    for (size_t k = 0; k < list.size(); k++) {
      std::string holder;
      std::string_view piece = text_of(Value::borrow(list[k]), holder);
      if (r.size() + (k ? sep.size() : 0) + piece.size() > lim_.max_string) too_long("join's result", lim_.max_string);
      if (k) r.append(sep);
      r.append(piece);
      charge(kNodeBytes);
    }
    charge(r.size());
    return r;
  }
  std::string upper_lower(std::string_view s, bool upper) {
    will_make(s.size(), "a string");
    std::string r(s);
    for (auto &c : r) c = char(upper ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
    return r;
  }
  std::string title_case(std::string_view s, bool title) {
    will_make(s.size(), "a string");
    std::string r(s);
    bool start = true;
    for (auto &c : r) {
      c = char(start ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
      start = title ? !std::isalpha(uint8_t(c)) : false;
    }
    return r;
  }
  // The current local time formatted; the buffer grows until the result fits (never a truncated or
  // unterminated buffer), up to the string size limit.
  std::string strftime_now(std::string fmt) {
    fmt.resize(std::strlen(fmt.c_str()));  // strftime reads up to a NUL
    fmt += '|';  // a sentinel: strftime returning 0 then always means "does not fit", never "empty"
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    for (size_t cap = 256;; cap *= 4) {
      if (cap / 4 > lim_.max_string) too_long("strftime_now's result", lim_.max_string);
      charge(cap);
      std::string buf(cap, '\0');
      const size_t n = std::strftime(buf.data(), cap, fmt.c_str(), &tm);
      if (n > 0) {
        buf.resize(n - 1);
        if (buf.size() > lim_.max_string) too_long("strftime_now's result", lim_.max_string);
        return buf;
      }
    }
  }

  Value call(const Expr &e, int d) {
    const Expr &callee = *e.args[0];
    std::vector<Value> a = args_of(e, 1, d);
    auto arg_str = [&](size_t k, const char *def) -> std::string_view {
      if (k < a.size() && a[k].j().is_string()) return a[k].j().get_ref<const std::string &>();
      if (k < a.size() && !a[k].undefined && !a[k].j().is_null()) runtime_error("expected a string argument");
      return def;
    };
    if (callee.kind == Expr::Var) {
      const std::string &f = callee.name;
      if (f == "namespace" || f == "dict") {
        json ns = json::object();
        for (auto &[k, v] : e.kwargs) ns[k] = take(eval(*v, d), 1);
        if (f == "namespace") ns["__namespace__"] = true;
        return {std::move(ns)};
      }
      if (f == "range") {
        int64_t lo = 0, hi = 0, st = 1;
        if (a.size() == 1) hi = as_int(a[0], "range");
        if (a.size() >= 2) lo = as_int(a[0], "range"), hi = as_int(a[1], "range");
        if (a.size() == 3) st = as_int(a[2], "range");
        if (st == 0) runtime_error("range step cannot be zero");
        json l = json::array();
        for (__int128 i = lo; st > 0 ? i < hi : i > hi; i += st) {
          step();
          if (l.size() >= lim_.max_items) runtime_error("a list exceeds the item limit (" + std::to_string(lim_.max_items) + ")");
          charge(kScalarBytes);
          l.push_back(int64_t(i));
        }
        return {std::move(l)};
      }
      if (f == "raise_exception") runtime_error("raise_exception: " + (a.empty() ? std::string() : to_str(a[0])));
      if (f == "strftime_now") return {json(strftime_now(std::string(arg_str(0, "%Y-%m-%d"))))};
      runtime_error("unknown function '" + f + "'");
    }
    if (callee.kind != Expr::Attr) runtime_error("only functions and methods can be called");
    Value obj = eval(*callee.args[0], d);
    const json &oj = obj.j();
    const std::string &m = callee.name;
    if (obj.undefined) runtime_error("method '" + m + "' of an undefined value");
    if (oj.is_string()) {
      const std::string &s = oj.get_ref<const std::string &>();
      if (m == "strip" || m == "lstrip" || m == "rstrip") return {json(strip(s, arg_str(0, " \t\n\r\f\v"), m != "rstrip", m != "lstrip"))};
      if (m == "upper" || m == "lower") return {json(upper_lower(s, m == "upper"))};
      if (m == "startswith" || m == "endswith") {
        std::string_view p = arg_str(0, "");
        charge(p.size());
        bool r = m == "startswith" ? std::string_view(s).substr(0, p.size()) == p
                                   : s.size() >= p.size() && std::string_view(s).substr(s.size() - p.size()) == p;
        return {json(r)};
      }
      if (m == "split" || m == "rsplit") {
        json parts = json::array();
        auto add = [&](std::string_view part) {
          if (parts.size() >= lim_.max_items) runtime_error("a list exceeds the item limit (" + std::to_string(lim_.max_items) + ")");
          charge(kNodeBytes + part.size());
          parts.push_back(std::string(part));
        };
        charge(s.size());
        int64_t maxsplit = a.size() > 1 ? as_int(a[1], "maxsplit") : -1;
        if (a.empty() || a[0].j().is_null()) {  // split on runs of whitespace
          size_t i = 0;
          while (i < s.size()) {
            while (i < s.size() && std::isspace(uint8_t(s[i]))) i++;
            if (i >= s.size()) break;
            size_t j = i;
            while (j < s.size() && !std::isspace(uint8_t(s[j]))) j++;
            add(std::string_view(s).substr(i, j - i));
            i = j;
          }
          return {std::move(parts)};
        }
        std::string_view sep = arg_str(0, "");
        if (sep.empty()) runtime_error("empty separator");
        if (m == "split") {
          size_t i = 0;
          for (int64_t n = 0; maxsplit < 0 || n < maxsplit; n++) {
            size_t j = find_sub(s, sep, i);
            if (j == std::string::npos) break;
            add(std::string_view(s).substr(i, j - i));
            i = j + sep.size();
          }
          add(std::string_view(s).substr(i));
        } else {  // from the right: a forward search over the reversed strings (linear, as split's)
          charge(s.size() + sep.size());
          const std::string rs(s.rbegin(), s.rend()), rsep(sep.rbegin(), sep.rend());
          std::vector<std::string_view> rev;
          size_t i = 0;  // in rs
          for (int64_t n = 0; maxsplit < 0 || n < maxsplit; n++) {
            size_t j = find_sub(rs, rsep, i);
            if (j == std::string::npos) break;
            rev.push_back(std::string_view(s).substr(s.size() - j, j - i));
            i = j + sep.size();
          }
          rev.push_back(std::string_view(s).substr(0, s.size() - i));
          for (auto it = rev.rbegin(); it != rev.rend(); ++it) add(*it);
        }
        return {std::move(parts)};
      }
      if (m == "replace") return {json(replace_all(s, arg_str(0, ""), arg_str(1, "")))};
      if (m == "find") {
        charge(s.size());
        size_t p = find_sub(s, arg_str(0, ""));
        return {json(p == std::string::npos ? int64_t(-1) : int64_t(p))};
      }
      if (m == "count") {
        std::string_view sub = arg_str(0, "");
        charge(s.size());
        int64_t n = 0;
        if (!sub.empty())
          for (size_t p = find_sub(s, sub); p != std::string::npos; p = find_sub(s, sub, p + sub.size())) n++;
        return {json(n)};
      }
      if (m == "title" || m == "capitalize") return {json(title_case(s, m == "title"))};
      if (m == "join") {
        if (a.empty() || !a[0].j().is_array()) runtime_error("join needs a list");
        return {json(join(a[0].j(), s))};
      }
    } else if (oj.is_object()) {
      if (m == "items") {
        json l = json::array();
        for (auto it = oj.begin(); it != oj.end(); ++it)
          if (it.key() != "__namespace__") l.push_back(json::array({copy(json(it.key())), copy(it.value(), 2)}));
        return {std::move(l)};
      }
      if (m == "keys" || m == "values") {
        json l = json::array();
        for (auto it = oj.begin(); it != oj.end(); ++it)
          if (it.key() != "__namespace__") l.push_back(m == "keys" ? copy(json(it.key())) : copy(it.value(), 1));
        return {std::move(l)};
      }
      if (m == "get") {
        if (a.empty() || !a[0].j().is_string()) runtime_error("get needs a string key");
        charge(oj.size());
        auto it = oj.find(a[0].j().get_ref<const std::string &>());
        if (it != oj.end()) return sub(std::move(obj), *it);
        return a.size() > 1 ? std::move(a[1]) : Value{json()};
      }
    } else if (oj.is_array()) {
      static const json none;
      const json &needle = a.empty() ? none : a[0].j();  // read in place, as every argument
      if (m == "index") {
        measure(oj);
        auto it = std::find(oj.begin(), oj.end(), needle);
        if (it == oj.end()) runtime_error("index: value not in list");
        return {json(int64_t(it - oj.begin()))};
      }
      if (m == "count") {
        measure(oj);
        return {json(int64_t(std::count(oj.begin(), oj.end(), needle)))};
      }
    }
    runtime_error("unknown method '" + m + "' of " + py_repr(oj).substr(0, 40));
  }

  Value filter(const Expr &e, int d) {
    Value v = eval(*e.args[0], d);
    std::vector<Value> a = args_of(e, 1, d);
    const std::string &f = e.name;
    const json &j = v.j();
    if (f == "default" || f == "d") {
      bool boolean = (a.size() > 1 && truthy(a[1])) || truthy(kwarg(e, "boolean", d));
      if (v.undefined || (boolean && !truthy(v))) return a.empty() ? Value{json("")} : std::move(a[0]);
      return v;
    }
    if (f == "tojson") {
      Value ind = a.empty() ? kwarg(e, "indent", d) : std::move(a[0]);
      int64_t indent = ind.j().is_number_integer() ? ind.j().get<int64_t>() : -1;
      if (indent < 0) indent = -1;
      if (indent > int64_t(lim_.max_string)) too_long("tojson's result", lim_.max_string);
      measure(j);
      std::string s;
      dumps(v.undefined ? json() : j, indent, 0, s, lim_.max_string);
      charge(s.size());
      return {json(std::move(s))};
    }
    if (v.undefined && f != "string" && f != "length" && f != "count")
      runtime_error("filter '" + f + "' on an undefined value");
    if (f == "safe" || f == "e" || f == "escape" || f == "forceescape") return v;  // autoescape is off
    if (f == "string") return {json(to_str(v))};
    std::string holder;
    if (f == "trim") {
      std::string chars_holder;
      std::string_view chars = a.empty() ? std::string_view(" \t\n\r\f\v") : text_of(a[0], chars_holder);
      return {json(strip(text_of(v, holder), chars, true, true))};
    }
    if (f == "upper" || f == "lower") return {json(upper_lower(text_of(v, holder), f == "upper"))};
    if (f == "length" || f == "count") {
      if (v.undefined) return {json(0)};
      if (j.is_string()) {  // characters, not bytes
        charge(j.get_ref<const std::string &>().size());
        int64_t n = 0;
        for (unsigned char c : j.get_ref<const std::string &>()) n += (c & 0xc0) != 0x80;
        return {json(n)};
      }
      if (j.is_array()) return {json(int64_t(j.size()))};
      if (j.is_object()) {
        charge(j.size());
        return {json(int64_t(j.size()) - int64_t(j.contains("__namespace__")))};
      }
      runtime_error("length of " + py_repr(j));
    }
    if (f == "first" || f == "last") {
      if (j.is_array()) return j.empty() ? Value::undef() : sub(std::move(v), f == "first" ? j.front() : j.back());
      if (j.is_string() && !j.get_ref<const std::string &>().empty()) {
        const std::string &s = j.get_ref<const std::string &>();
        return {json(std::string(1, f == "first" ? s.front() : s.back()))};
      }
      return Value::undef();
    }
    if (f == "join") {
      if (!j.is_array()) runtime_error("join needs a list");
      std::string sep_holder;
      return {json(join(j, a.empty() ? std::string_view() : text_of(a[0], sep_holder)))};
    }
    if (f == "list") {
      if (j.is_array()) return v;
      json l = json::array();
      if (j.is_object()) {
        for (auto it = j.begin(); it != j.end(); ++it) l.push_back(copy(json(it.key())));
      } else if (j.is_string()) {
        const std::string &s = j.get_ref<const std::string &>();
        if (s.size() > lim_.max_items) runtime_error("a list exceeds the item limit (" + std::to_string(lim_.max_items) + ")");
        charge(uint64_t(s.size()) * kNodeBytes);
        for (char c : s) l.push_back(std::string(1, c));
      }
      return {std::move(l)};
    }
    if (f == "items") {
      json l = json::array();
      if (j.is_object())
        for (auto it = j.begin(); it != j.end(); ++it) l.push_back(json::array({copy(json(it.key())), copy(it.value(), 2)}));
      return {std::move(l)};
    }
    if (f == "int") {
      if (j.is_number_integer()) return v;
      if (j.is_number()) {
        const double x = std::trunc(j.get<double>());
        if (std::isnan(x)) runtime_error("cannot convert NaN to an integer");
        return {x >= -9.2e18 && x <= 9.2e18 ? json(int64_t(x)) : json(x)};
      }
      if (j.is_string()) {
        charge(j.get_ref<const std::string &>().size());
        try {
          return {json(int64_t(std::stoll(j.get<std::string>())))};
        } catch (const std::exception &) {
          return {json(0)};
        }
      }
      return {json(0)};
    }
    if (f == "float") {
      if (j.is_number()) return {json(j.get<double>())};
      return {json(0.0)};
    }
    if (f == "abs" && j.is_number())
      return {j.is_number_integer() ? py_int(j.get<int64_t>() < 0 ? -__int128(j.get<int64_t>()) : __int128(j.get<int64_t>()))
                                    : json(std::fabs(j.get<double>()))};
    if (f == "reverse") {
      if (j.is_array()) {
        json r = json::array();
        for (auto it = j.rbegin(); it != j.rend(); ++it) r.push_back(copy(*it));
        return {std::move(r)};
      }
      std::string_view s = text_of(v, holder);
      will_make(s.size(), "a string");
      return {json(std::string(s.rbegin(), s.rend()))};
    }
    if (f == "replace") {
      if (a.size() < 2) runtime_error("replace needs two arguments");
      std::string from_holder, to_holder;
      return {json(replace_all(text_of(v, holder), text_of(a[0], from_holder), text_of(a[1], to_holder)))};
    }
    if (f == "capitalize" || f == "title") return {json(title_case(text_of(v, holder), f == "title"))};
    runtime_error("unknown filter '" + f + "'");
  }

  bool test(const Expr &e, int d) {
    Value v = eval(*e.args[0], d);
    const json &j = v.j();
    const std::string &t = e.name;
    if (t == "defined") return !v.undefined;
    if (t == "undefined") return v.undefined;
    if (t == "none") return !v.undefined && j.is_null();
    if (t == "string") return !v.undefined && j.is_string();
    if (t == "number") return !v.undefined && j.is_number();
    if (t == "integer") return !v.undefined && j.is_number_integer();
    if (t == "float") return !v.undefined && j.is_number_float();
    if (t == "boolean") return !v.undefined && j.is_boolean();
    if (t == "true") return !v.undefined && j.is_boolean() && j.get<bool>();
    if (t == "false") return !v.undefined && j.is_boolean() && !j.get<bool>();
    if (t == "mapping") return !v.undefined && j.is_object();
    if (t == "sequence" || t == "iterable") return !v.undefined && (j.is_array() || j.is_string() || j.is_object());
    if (t == "callable") return false;
    if (t == "odd" || t == "even") return j.is_number_integer() && (j.get<int64_t>() % 2 != 0) == (t == "odd");
    std::vector<Value> a = args_of(e, 1, d);
    if (t == "eq" || t == "equalto" || t == "sameas" || t == "==") {
      if (a.empty() || v.undefined) return false;
      charge_compare(j, a[0].j());
      return j == a[0].j();
    }
    if (t == "ne") {
      if (a.empty()) return true;
      charge_compare(j, a[0].j());
      return j != a[0].j();
    }
    if (t == "in") {
      if (a.empty() || !a[0].j().is_array()) return false;
      measure(a[0].j());
      return std::find(a[0].j().begin(), a[0].j().end(), j) != a[0].j().end();
    }
    if (t == "divisibleby") {
      int64_t q = a.empty() ? 0 : as_int(a[0], "divisibleby");
      return q != 0 && j.is_number_integer() && __int128(j.get<int64_t>()) % q == 0;
    }
    runtime_error("unknown test '" + t + "'");
  }

 private:
  const Limits &lim_;
  const json &context_;
  const std::atomic<int> *cancel_;
  uint64_t steps_ = 0, work_ = 0;
};

}  // namespace

Template::Template(const std::string &source, Limits limits) : limits_(limits) {
  // The recursive parts (parser, evaluator, destructors, value walks) get a few hundred bytes of stack per
  // level: past these caps no thread's stack is safe, whatever the caller asks.
  limits_.max_depth = std::clamp(limits_.max_depth, 1, kMaxTemplateDepth);
  limits_.max_value_depth = std::clamp(limits_.max_value_depth, 1, kMaxTemplateValueDepth);
  Builder b(lex(source), limits_.max_depth);
  root_ = std::make_shared<Node>();
  root_->kind = Node::If;
  root_->branches.push_back({nullptr, b.parse_all()});
}

Template::~Template() = default;

std::string Template::render(const json &context, const std::atomic<int> *cancel) const {
  if (json_value_depth(context, limits_.max_value_depth) > limits_.max_value_depth)
    failf(DSRT_ERR_INVALID_ARGUMENT, "chat template: the variables nest deeper than ", limits_.max_value_depth, " levels");
  Renderer r(limits_, context, cancel);
  r.scopes.emplace_back();  // the template's own top-level `set`s; the context is read in place beneath them
  LoopSignal sig;
  r.run(root_->branches[0].second, sig, 0);
  return std::move(r.out);
}

std::string python_json_dumps(const json &v, int indent) {
  if (json_value_depth(v, kMaxTemplateValueDepth) > kMaxTemplateValueDepth)
    failf(DSRT_ERR_INVALID_ARGUMENT, "JSON value nests deeper than ", kMaxTemplateValueDepth, " levels");
  std::string s;
  dumps(v, indent, 0, s);
  return s;
}

}  // namespace dsrt::jinja
