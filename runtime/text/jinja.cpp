// Jinja-subset interpreter (see jinja.h). Structure: a lexer that cuts the source into text and tags and
// applies whitespace control (trim_blocks, lstrip_blocks, '-' markers); a recursive-descent parser with
// Jinja2's operator precedence; a tree-walking evaluator over JSON values with an explicit "undefined".
#include "text/jinja.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <map>

#include "core/status.h"

namespace dsrt::jinja {

using json = Json;

namespace {

[[noreturn]] void syntax(int line, const std::string &msg) {
  failf(DSRT_ERR_FORMAT, "chat template line ", line, ": ", msg);
}
[[noreturn]] void runtime_error(const std::string &msg) { failf(DSRT_ERR_FORMAT, "chat template: ", msg); }

// ---------------------------------------------------------------- values
struct Value {
  json j;
  bool undefined = false;
  static Value undef() { return {json(), true}; }
};

bool truthy(const Value &v) {
  if (v.undefined) return false;
  const json &j = v.j;
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

std::string py_repr(const json &j);
std::string to_str(const Value &v) {
  if (v.undefined) return "";
  const json &j = v.j;
  if (j.is_string()) return j.get<std::string>();
  return py_repr(j);
}
std::string py_repr(const json &j) {
  if (j.is_null()) return "None";
  if (j.is_boolean()) return j.get<bool>() ? "True" : "False";
  if (j.is_number_integer()) return std::to_string(j.get<int64_t>());
  if (j.is_number_unsigned()) return std::to_string(j.get<uint64_t>());
  if (j.is_number_float()) return py_float(j.get<double>());
  if (j.is_string()) return py_str_literal(j.get<std::string>());
  std::string out;
  if (j.is_array()) {
    out = "[";
    for (size_t i = 0; i < j.size(); i++) out += (i ? ", " : "") + py_repr(j[i]);
    return out + "]";
  }
  out = "{";
  bool first = true;
  for (auto it = j.begin(); it != j.end(); ++it) {
    out += (first ? "" : ", ") + py_str_literal(it.key()) + ": " + py_repr(it.value());
    first = false;
  }
  return out + "}";
}

void dumps(const json &j, int indent, int level, std::string &out) {
  auto nl = [&](int lv) {
    if (indent < 0) return;
    out += '\n';
    out.append(size_t(indent * lv), ' ');
  };
  if (j.is_string()) {
    const std::string &s = j.get_ref<const std::string &>();
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
      dumps(j[i], indent, level + 1, out);
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
      dumps(json(it.key()), indent, level + 1, out);
      out += ": ";
      dumps(it.value(), indent, level + 1, out);
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

std::vector<Token> tokenize(const std::string &src, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < src.size()) {
    char c = src[i];
    if (std::isspace(uint8_t(c))) {
      i++;
      continue;
    }
    if (std::isalpha(uint8_t(c)) || c == '_') {
      size_t j = i;
      while (j < src.size() && (std::isalnum(uint8_t(src[j])) || src[j] == '_')) j++;
      out.push_back({Tk::Name, src.substr(i, j - i)});
      i = j;
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
      out.push_back(t);
      i = j;
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
      out.push_back({Tk::Str, s});
      i = j + 1;
    } else {
      static const char *ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "(", ")",
                                  "[", "]", "{", "}", ",", ".", ":", "|", "="};
      bool found = false;
      for (const char *op : ops) {
        size_t n = std::strlen(op);
        if (src.compare(i, n, op) == 0) {
          out.push_back({Tk::Op, op});
          i += n;
          found = true;
          break;
        }
      }
      if (!found) syntax(line, std::string("unexpected character '") + c + "'");
    }
  }
  out.push_back({Tk::End, ""});
  return out;
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
  Parser(std::vector<Token> t, int line) : t_(std::move(t)), line_(line) {}
  const Token &peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_op(const char *op, size_t k = 0) const { return peek(k).kind == Tk::Op && peek(k).s == op; }
  bool is_name(const char *n, size_t k = 0) const { return peek(k).kind == Tk::Name && peek(k).s == n; }
  Token take() { return t_[std::min(p_++, t_.size() - 1)]; }
  void expect_op(const char *op) {
    if (!is_op(op)) syntax(line_, std::string("expected '") + op + "', found '" + peek().s + "'");
    p_++;
  }
  std::string expect_name() {
    if (peek().kind != Tk::Name) syntax(line_, "expected a name, found '" + peek().s + "'");
    return take().s;
  }
  bool at_end() const { return peek().kind == Tk::End; }
  void expect_end() {
    if (!at_end()) syntax(line_, "unexpected '" + peek().s + "'");
  }

  ExprP make(Expr::Kind k) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line_;
    return e;
  }

  ExprP expression(int depth = 0) {
    if (depth > 100) syntax(line_, "expression nested too deeply");
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
      return c;
    }
    return e;
  }
  ExprP bin(const std::string &op, ExprP a, ExprP b) {
    auto e = make(Expr::Bin);
    e->name = op;
    e->args = {a, b};
    return e;
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
      take();
      auto e = make(Expr::Not);
      e->args = {not_expr(d + 1)};
      return e;
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
      take();
      auto e = make(Expr::Neg);
      e->args = {unary(d + 1)};
      return e;
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
        e = a;
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
          e = s;
        } else {
          auto it = make(Expr::Item);
          it->args = {e, lo};
          e = it;
        }
        expect_op("]");
      } else if (is_op("(")) {
        auto c = make(Expr::Call);
        c->args = {e};
        call_args(*c, d);
        e = c;
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
        e = f;
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
        e = t;
      } else {
        return e;
      }
    }
  }
  ExprP primary(int d) {
    const Token &t = peek();
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
        e = l;
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
      return l;
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
      return m;
    }
    syntax(line_, "unexpected '" + t.s + "'");
  }

 private:
  std::vector<Token> t_;
  size_t p_ = 0;
  int line_;
};

// Statements: builds the tree from the segment list.
class Builder {
 public:
  explicit Builder(std::vector<Segment> segs) : s_(std::move(segs)) {}

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
        Parser p(tokenize(seg.body, seg.line), seg.line);
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
      Parser p(tokenize(rest(seg), seg.line), seg.line);
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
          Parser p2(tokenize(rest(s_[i_]), s_[i_].line), s_[i_].line);
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
};

// ---------------------------------------------------------------- evaluator
struct LoopSignal {
  bool brk = false, cont = false;
};

class Renderer {
 public:
  Renderer(const Limits &lim) : lim_(lim) {}
  std::vector<std::map<std::string, json>> scopes;
  std::string out;

  void step() {
    if (++steps_ > lim_.max_steps) runtime_error("the template ran too long (step limit)");
  }
  void emit(const std::string &s) {
    out += s;
    if (out.size() > lim_.max_output) runtime_error("the rendered prompt exceeds the output size limit");
  }

  json *lookup(const std::string &n) {
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
        case Node::Output: emit(to_str(eval(*n->expr, 0))); break;
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
          json v = eval(*n->expr, 0).j;
          const std::string &t = n->targets[0];
          size_t dot = t.find('.');
          if (dot == std::string::npos) {
            scopes.back()[t] = std::move(v);
          } else {
            json *ns = lookup(t.substr(0, dot));
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
    Value it = eval(*n.expr, 0);
    json items = json::array();
    if (it.undefined || it.j.is_null()) {
      items = json::array();
    } else if (it.j.is_array()) {
      items = it.j;
    } else if (it.j.is_object()) {
      for (auto k = it.j.begin(); k != it.j.end(); ++k)
        if (k.key() != "__namespace__") items.push_back(k.key());
    } else if (it.j.is_string()) {
      const std::string &s = it.j.get_ref<const std::string &>();
      for (size_t i = 0; i < s.size();) {  // by character
        size_t l = 1;
        uint8_t c = uint8_t(s[i]);
        if (c >= 0xf0) l = 4;
        else if (c >= 0xe0) l = 3;
        else if (c >= 0xc0) l = 2;
        items.push_back(s.substr(i, l));
        i += l;
      }
    } else {
      runtime_error("cannot iterate over " + py_repr(it.j));
    }
    // `for x in xs if cond` filters before loop.* is computed, as Jinja2 does.
    std::vector<json> kept;
    for (auto &x : items) {
      if (n.filter) {
        scopes.emplace_back();
        bind(n, x);
        bool ok = truthy(eval(*n.filter, 0));
        scopes.pop_back();
        if (!ok) continue;
      }
      kept.push_back(x);
    }
    if (kept.empty()) {
      LoopSignal s;
      run(n.else_body, s, depth + 1);
      return;
    }
    for (size_t i = 0; i < kept.size(); i++) {
      step();
      scopes.emplace_back();
      bind(n, kept[i]);
      const size_t len = kept.size();
      scopes.back()["loop"] = {{"index", i + 1},       {"index0", i},
                               {"first", i == 0},      {"last", i + 1 == len},
                               {"length", len},        {"revindex", len - i},
                               {"revindex0", len - i - 1}, {"previtem", i ? kept[i - 1] : json()},
                               {"nextitem", i + 1 < len ? kept[i + 1] : json()}};
      LoopSignal sig;
      run(n.body, sig, depth + 1);
      scopes.pop_back();
      if (sig.brk) break;
    }
  }

  void bind(const Node &n, const json &x) {
    if (n.targets.size() == 1) {
      scopes.back()[n.targets[0]] = x;
      return;
    }
    if (!x.is_array() || x.size() != n.targets.size()) runtime_error("cannot unpack " + py_repr(x));
    for (size_t k = 0; k < n.targets.size(); k++) scopes.back()[n.targets[k]] = x[k];
  }

  // Python's ints do not overflow; ours are int64 and become floats past that range, never wrap (UB).
  static json py_int(__int128 r) {
    if (r >= INT64_MIN && r <= INT64_MAX) return json(int64_t(r));
    return json(double(r));
  }

  static int64_t as_int(const Value &v, const char *what) {
    if (v.j.is_number_integer()) return v.j.get<int64_t>();
    if (v.j.is_boolean()) return v.j.get<bool>();
    runtime_error(std::string(what) + " must be an integer, got " + (v.undefined ? "undefined" : py_repr(v.j)));
  }

  Value attr(const Value &obj, const std::string &name) {
    if (obj.undefined) runtime_error("'" + name + "' of an undefined value");
    if (obj.j.is_object()) {
      auto it = obj.j.find(name);
      return it == obj.j.end() ? Value::undef() : Value{*it};
    }
    return Value::undef();
  }
  Value item(const Value &obj, const Value &key) {
    if (obj.undefined) runtime_error("subscript of an undefined value");
    if (obj.j.is_object() && key.j.is_string()) return attr(obj, key.j.get<std::string>());
    if ((obj.j.is_array() || obj.j.is_string()) && key.j.is_number_integer()) {
      int64_t i = key.j.get<int64_t>(), n = obj.j.is_array() ? int64_t(obj.j.size()) : int64_t(obj.j.get_ref<const std::string &>().size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undef();
      return obj.j.is_array() ? Value{obj.j[size_t(i)]} : Value{std::string(1, obj.j.get_ref<const std::string &>()[size_t(i)])};
    }
    return Value::undef();
  }

  Value eval(const Expr &e, int depth) {
    if (depth > lim_.max_depth) runtime_error("expression nested too deeply");
    step();
    const int d = depth + 1;
    switch (e.kind) {
      case Expr::Lit: return {e.lit};
      case Expr::Var: {
        json *v = lookup(e.name);
        return v ? Value{*v} : Value::undef();
      }
      case Expr::Attr: return attr(eval(*e.args[0], d), e.name);
      case Expr::Item: return item(eval(*e.args[0], d), eval(*e.args[1], d));
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
        if (v.j.is_number_integer()) return {py_int(-__int128(v.j.get<int64_t>()))};
        if (v.j.is_number()) return {json(-v.j.get<double>())};
        runtime_error("cannot negate " + py_repr(v.j));
      }
      case Expr::Cond: {
        if (truthy(eval(*e.args[1], d))) return eval(*e.args[0], d);
        return e.args[2] ? eval(*e.args[2], d) : Value::undef();
      }
      case Expr::List: {
        json l = json::array();
        for (auto &a : e.args) l.push_back(eval(*a, d).j);
        return {l};
      }
      case Expr::Dict: {
        json m = json::object();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], d);
          if (!key.j.is_string()) runtime_error("dict keys must be strings");
          m[key.j.get<std::string>()] = eval(*e.args[k + 1], d).j;
        }
        return {m};
      }
      case Expr::Bin: return binary(e, d);
    }
    runtime_error("bad expression");
  }

  Value slice(const Expr &e, int d) {
    Value obj = eval(*e.args[0], d);
    auto opt = [&](int k, int64_t def) { return e.args[size_t(k)] ? as_int(eval(*e.args[size_t(k)], d), "slice index") : def; };
    int64_t step = opt(3, 1);
    if (step == 0) runtime_error("slice step cannot be zero");
    auto do_slice = [&](int64_t n, auto &&push) {
      int64_t lo = opt(1, step > 0 ? 0 : n - 1), hi = opt(2, step > 0 ? n : -n - 1);
      auto norm = [&](int64_t v, bool is_hi) {
        if (v < 0) v += n;
        if (step > 0) return std::clamp<int64_t>(v, 0, n);
        return std::clamp<int64_t>(v, is_hi ? -1 : -1, n - 1);
      };
      lo = e.args[1] ? norm(lo, false) : lo;
      hi = e.args[2] ? norm(hi, true) : (step > 0 ? n : -1);
      for (__int128 i = lo; step > 0 ? i < hi : i > hi; i += step) push(int64_t(i));
    };
    if (obj.j.is_array()) {
      json out = json::array();
      do_slice(int64_t(obj.j.size()), [&](int64_t i) { out.push_back(obj.j[size_t(i)]); });
      return {out};
    }
    if (obj.j.is_string()) {
      const std::string &s = obj.j.get_ref<const std::string &>();
      std::string out;
      do_slice(int64_t(s.size()), [&](int64_t i) { out += s[size_t(i)]; });
      return {out};
    }
    runtime_error("cannot slice " + py_repr(obj.j));
  }

  Value binary(const Expr &e, int d) {
    const std::string &op = e.name;
    if (op == "and") {
      Value a = eval(*e.args[0], d);
      return truthy(a) ? eval(*e.args[1], d) : a;
    }
    if (op == "or") {
      Value a = eval(*e.args[0], d);
      return truthy(a) ? a : eval(*e.args[1], d);
    }
    Value a = eval(*e.args[0], d), b = eval(*e.args[1], d);
    if (op == "~") return {json(to_str(a) + to_str(b))};
    if (op == "==") return {json(!a.undefined && !b.undefined ? a.j == b.j : a.undefined == b.undefined)};
    if (op == "!=") return {json(!(!a.undefined && !b.undefined ? a.j == b.j : a.undefined == b.undefined))};
    if (op == "in" || op == "not in") {
      bool r = false;
      if (b.j.is_string() && a.j.is_string())
        r = b.j.get_ref<const std::string &>().find(a.j.get_ref<const std::string &>()) != std::string::npos;
      else if (b.j.is_array())
        r = std::find(b.j.begin(), b.j.end(), a.j) != b.j.end();
      else if (b.j.is_object() && a.j.is_string())
        r = b.j.contains(a.j.get<std::string>());
      else if (!b.undefined && !b.j.is_null())
        runtime_error("'in' needs a string, list or mapping on its right");
      else
        runtime_error("'in' over an undefined value");
      return {json(op == "in" ? r : !r)};
    }
    if (a.undefined || b.undefined) runtime_error("operator '" + op + "' on an undefined value");
    if (op == "+") {
      if (a.j.is_string() && b.j.is_string()) return {json(a.j.get<std::string>() + b.j.get<std::string>())};
      if (a.j.is_array() && b.j.is_array()) {
        json r = a.j;
        for (auto &x : b.j) r.push_back(x);
        return {r};
      }
    }
    if (op == "*" && a.j.is_string() && b.j.is_number_integer()) {
      std::string r;
      for (int64_t k = 0; k < b.j.get<int64_t>(); k++) {
        r += a.j.get<std::string>();
        if (r.size() > lim_.max_output) runtime_error("string repetition exceeds the output limit");
      }
      return {json(r)};
    }
    if (a.j.is_number() && b.j.is_number()) {
      const bool ints = a.j.is_number_integer() && b.j.is_number_integer();
      const double x = a.j.get<double>(), y = b.j.get<double>();
      if (op == "<") return {json(x < y)};
      if (op == ">") return {json(x > y)};
      if (op == "<=") return {json(x <= y)};
      if (op == ">=") return {json(x >= y)};
      if (ints) {
        const __int128 p = a.j.get<int64_t>(), q = b.j.get<int64_t>();
        if (op == "+") return {py_int(p + q)};
        if (op == "-") return {py_int(p - q)};
        if (op == "*") return {py_int(p * q)};
        if (op == "//" || op == "%") {
          if (q == 0) runtime_error("division by zero");
          const __int128 rem = ((p % q) + q) % q;  // Python: the remainder takes the divisor's sign
          return {py_int(op == "%" ? rem : (p - rem) / q)};
        }
      }
      if (op == "+") return {json(x + y)};
      if (op == "-") return {json(x - y)};
      if (op == "*") return {json(x * y)};
      if (y == 0 && (op == "/" || op == "//" || op == "%")) runtime_error("division by zero");
      if (op == "/") return {json(x / y)};
      if (op == "//") return {json(std::floor(x / y))};
      if (op == "%") return {json(x - y * std::floor(x / y))};
    }
    if (a.j.is_string() && b.j.is_string()) {
      const auto &x = a.j.get_ref<const std::string &>(), &y = b.j.get_ref<const std::string &>();
      if (op == "<") return {json(x < y)};
      if (op == ">") return {json(x > y)};
      if (op == "<=") return {json(x <= y)};
      if (op == ">=") return {json(x >= y)};
    }
    runtime_error("unsupported operands for '" + op + "': " + py_repr(a.j) + " and " + py_repr(b.j));
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

  static std::string strip(const std::string &s, const std::string &chars, bool left, bool right) {
    size_t a = 0, b = s.size();
    if (left)
      while (a < b && chars.find(s[a]) != std::string::npos) a++;
    if (right)
      while (b > a && chars.find(s[b - 1]) != std::string::npos) b--;
    return s.substr(a, b - a);
  }

  Value call(const Expr &e, int d) {
    const Expr &callee = *e.args[0];
    std::vector<Value> a = args_of(e, 1, d);
    auto arg_str = [&](size_t k, const char *def) -> std::string {
      if (k < a.size() && a[k].j.is_string()) return a[k].j.get<std::string>();
      if (k < a.size() && !a[k].undefined && !a[k].j.is_null()) runtime_error("expected a string argument");
      return def;
    };
    if (callee.kind == Expr::Var) {
      const std::string &f = callee.name;
      if (f == "namespace" || f == "dict") {
        json ns = json::object();
        for (auto &[k, v] : e.kwargs) ns[k] = eval(*v, d).j;
        if (f == "namespace") ns["__namespace__"] = true;
        return {ns};
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
          l.push_back(int64_t(i));
        }
        return {l};
      }
      if (f == "raise_exception") runtime_error("raise_exception: " + (a.empty() ? std::string() : to_str(a[0])));
      if (f == "strftime_now") {
        char buf[256];
        std::time_t t = std::time(nullptr);
        std::tm tm{};
        localtime_r(&t, &tm);
        std::strftime(buf, sizeof buf, arg_str(0, "%Y-%m-%d").c_str(), &tm);
        return {json(std::string(buf))};
      }
      runtime_error("unknown function '" + f + "'");
    }
    if (callee.kind != Expr::Attr) runtime_error("only functions and methods can be called");
    Value obj = eval(*callee.args[0], d);
    const std::string &m = callee.name;
    if (obj.undefined) runtime_error("method '" + m + "' of an undefined value");
    if (obj.j.is_string()) {
      const std::string s = obj.j.get<std::string>();
      if (m == "strip" || m == "lstrip" || m == "rstrip") return {json(strip(s, arg_str(0, " \t\n\r\f\v"), m != "rstrip", m != "lstrip"))};
      if (m == "upper" || m == "lower") {
        std::string r = s;
        for (auto &c : r) c = char(m == "upper" ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
        return {json(r)};
      }
      if (m == "startswith" || m == "endswith") {
        std::string p = arg_str(0, "");
        bool r = m == "startswith" ? s.rfind(p, 0) == 0 : s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
        return {json(r)};
      }
      if (m == "split" || m == "rsplit") {
        json parts = json::array();
        int64_t maxsplit = a.size() > 1 ? as_int(a[1], "maxsplit") : -1;
        if (a.empty() || a[0].j.is_null()) {  // split on runs of whitespace
          size_t i = 0;
          while (i < s.size()) {
            while (i < s.size() && std::isspace(uint8_t(s[i]))) i++;
            if (i >= s.size()) break;
            size_t j = i;
            while (j < s.size() && !std::isspace(uint8_t(s[j]))) j++;
            parts.push_back(s.substr(i, j - i));
            i = j;
          }
          return {parts};
        }
        std::string sep = arg_str(0, "");
        if (sep.empty()) runtime_error("empty separator");
        if (m == "split") {
          size_t i = 0;
          for (int64_t n = 0; maxsplit < 0 || n < maxsplit; n++) {
            size_t j = s.find(sep, i);
            if (j == std::string::npos) break;
            parts.push_back(s.substr(i, j - i));
            i = j + sep.size();
          }
          parts.push_back(s.substr(i));
        } else {
          std::vector<std::string> rev;
          size_t end = s.size();
          for (int64_t n = 0; maxsplit < 0 || n < maxsplit; n++) {
            if (end < sep.size()) break;
            size_t j = s.rfind(sep, end - sep.size());
            if (j == std::string::npos) break;
            rev.push_back(s.substr(j + sep.size(), end - j - sep.size()));
            end = j;
          }
          rev.push_back(s.substr(0, end));
          for (auto it = rev.rbegin(); it != rev.rend(); ++it) parts.push_back(*it);
        }
        return {parts};
      }
      if (m == "replace") {
        std::string from = arg_str(0, ""), to = arg_str(1, ""), r;
        if (from.empty()) return {json(s)};
        size_t i = 0;
        for (size_t j; (j = s.find(from, i)) != std::string::npos; i = j + from.size()) r += s.substr(i, j - i) + to;
        r += s.substr(i);
        if (r.size() > lim_.max_output) runtime_error("replace result exceeds the output limit");
        return {json(r)};
      }
      if (m == "find") {
        size_t p = s.find(arg_str(0, ""));
        return {json(p == std::string::npos ? int64_t(-1) : int64_t(p))};
      }
      if (m == "count") {
        std::string sub = arg_str(0, "");
        int64_t n = 0;
        if (!sub.empty())
          for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) n++;
        return {json(n)};
      }
      if (m == "title" || m == "capitalize") {
        std::string r = s;
        bool start = true;
        for (auto &c : r) {
          if (m == "capitalize") {
            c = char(start ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
            start = false;
          } else {
            c = char(start ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
            start = !std::isalpha(uint8_t(c));
          }
        }
        return {json(r)};
      }
      if (m == "join") {
        if (a.empty() || !a[0].j.is_array()) runtime_error("join needs a list");
        std::string r;
        for (size_t k = 0; k < a[0].j.size(); k++) r += (k ? s : "") + to_str({a[0].j[k]});
        return {json(r)};
      }
    } else if (obj.j.is_object()) {
      if (m == "items") {
        json l = json::array();
        for (auto it = obj.j.begin(); it != obj.j.end(); ++it)
          if (it.key() != "__namespace__") l.push_back({it.key(), it.value()});
        return {l};
      }
      if (m == "keys" || m == "values") {
        json l = json::array();
        for (auto it = obj.j.begin(); it != obj.j.end(); ++it)
          if (it.key() != "__namespace__") l.push_back(m == "keys" ? json(it.key()) : it.value());
        return {l};
      }
      if (m == "get") {
        if (a.empty() || !a[0].j.is_string()) runtime_error("get needs a string key");
        auto it = obj.j.find(a[0].j.get<std::string>());
        if (it != obj.j.end()) return {*it};
        return a.size() > 1 ? a[1] : Value{json()};
      }
    } else if (obj.j.is_array()) {
      if (m == "index") {
        auto it = std::find(obj.j.begin(), obj.j.end(), a.empty() ? json() : a[0].j);
        if (it == obj.j.end()) runtime_error("index: value not in list");
        return {json(int64_t(it - obj.j.begin()))};
      }
      if (m == "count") return {json(int64_t(std::count(obj.j.begin(), obj.j.end(), a.empty() ? json() : a[0].j)))};
    }
    runtime_error("unknown method '" + m + "' of " + py_repr(obj.j).substr(0, 40));
  }

  Value filter(const Expr &e, int d) {
    Value v = eval(*e.args[0], d);
    std::vector<Value> a = args_of(e, 1, d);
    const std::string &f = e.name;
    if (f == "default" || f == "d") {
      bool boolean = (a.size() > 1 && truthy(a[1])) || truthy(kwarg(e, "boolean", d));
      if (v.undefined || (boolean && !truthy(v))) return a.empty() ? Value{json("")} : a[0];
      return v;
    }
    if (f == "tojson") {
      Value ind = a.empty() ? kwarg(e, "indent", d) : a[0];
      std::string s;
      dumps(v.undefined ? json() : v.j, ind.j.is_number_integer() ? int(ind.j.get<int64_t>()) : -1, 0, s);
      return {json(s)};
    }
    if (v.undefined && f != "string" && f != "length" && f != "count")
      runtime_error("filter '" + f + "' on an undefined value");
    if (f == "safe" || f == "e" || f == "escape" || f == "forceescape") return v;  // autoescape is off
    if (f == "string") return {json(to_str(v))};
    if (f == "trim") return {json(strip(to_str(v), a.empty() ? " \t\n\r\f\v" : to_str(a[0]), true, true))};
    if (f == "upper" || f == "lower") {
      std::string r = to_str(v);
      for (auto &c : r) c = char(f == "upper" ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
      return {json(r)};
    }
    if (f == "length" || f == "count") {
      if (v.undefined) return {json(0)};
      if (v.j.is_string()) {  // characters, not bytes
        int64_t n = 0;
        for (unsigned char c : v.j.get_ref<const std::string &>()) n += (c & 0xc0) != 0x80;
        return {json(n)};
      }
      if (v.j.is_array() || v.j.is_object()) return {json(int64_t(v.j.size()) - int64_t(v.j.contains("__namespace__")))};
      runtime_error("length of " + py_repr(v.j));
    }
    if (f == "first" || f == "last") {
      if (v.j.is_array()) return v.j.empty() ? Value::undef() : Value{f == "first" ? v.j.front() : v.j.back()};
      if (v.j.is_string() && !v.j.get_ref<const std::string &>().empty()) {
        const std::string &s = v.j.get_ref<const std::string &>();
        return {json(std::string(1, f == "first" ? s.front() : s.back()))};
      }
      return Value::undef();
    }
    if (f == "join") {
      std::string sep = a.empty() ? "" : to_str(a[0]), r;
      if (!v.j.is_array()) runtime_error("join needs a list");
      for (size_t k = 0; k < v.j.size(); k++) r += (k ? sep : "") + to_str({v.j[k]});
      return {json(r)};
    }
    if (f == "list") {
      if (v.j.is_array()) return v;
      json l = json::array();
      if (v.j.is_object())
        for (auto it = v.j.begin(); it != v.j.end(); ++it) l.push_back(it.key());
      else if (v.j.is_string())
        for (char c : v.j.get<std::string>()) l.push_back(std::string(1, c));
      return {l};
    }
    if (f == "items") {
      json l = json::array();
      if (v.j.is_object())
        for (auto it = v.j.begin(); it != v.j.end(); ++it) l.push_back({it.key(), it.value()});
      return {l};
    }
    if (f == "int") {
      if (v.j.is_number_integer()) return v;
      if (v.j.is_number()) {
        const double x = std::trunc(v.j.get<double>());
        if (std::isnan(x)) runtime_error("cannot convert NaN to an integer");
        return {x >= -9.2e18 && x <= 9.2e18 ? json(int64_t(x)) : json(x)};
      }
      if (v.j.is_string()) try {
          return {json(int64_t(std::stoll(v.j.get<std::string>())))};
        } catch (const std::exception &) {
          return {json(0)};
        }
      return {json(0)};
    }
    if (f == "float") {
      if (v.j.is_number()) return {json(v.j.get<double>())};
      return {json(0.0)};
    }
    if (f == "abs" && v.j.is_number()) return {v.j.is_number_integer() ? py_int(v.j.get<int64_t>() < 0 ? -__int128(v.j.get<int64_t>()) : __int128(v.j.get<int64_t>())) : json(std::fabs(v.j.get<double>()))};
    if (f == "reverse") {
      if (v.j.is_array()) return {json(json::array_t(v.j.rbegin(), v.j.rend()))};
      std::string s = to_str(v);
      return {json(std::string(s.rbegin(), s.rend()))};
    }
    if (f == "replace") {
      if (a.size() < 2) runtime_error("replace needs two arguments");
      std::string s = to_str(v), from = to_str(a[0]), to = to_str(a[1]), r;
      if (from.empty()) return {json(s)};
      size_t i = 0;
      for (size_t j; (j = s.find(from, i)) != std::string::npos; i = j + from.size()) r += s.substr(i, j - i) + to;
      return {json(r + s.substr(i))};
    }
    if (f == "capitalize" || f == "title") {
      std::string r = to_str(v);
      bool start = true;
      for (auto &c : r) {
        c = char(start ? std::toupper(uint8_t(c)) : std::tolower(uint8_t(c)));
        start = f == "title" ? !std::isalpha(uint8_t(c)) : false;
      }
      return {json(r)};
    }
    runtime_error("unknown filter '" + f + "'");
  }

  bool test(const Expr &e, int d) {
    Value v = eval(*e.args[0], d);
    const std::string &t = e.name;
    if (t == "defined") return !v.undefined;
    if (t == "undefined") return v.undefined;
    if (t == "none") return !v.undefined && v.j.is_null();
    if (t == "string") return !v.undefined && v.j.is_string();
    if (t == "number") return !v.undefined && v.j.is_number();
    if (t == "integer") return !v.undefined && v.j.is_number_integer();
    if (t == "float") return !v.undefined && v.j.is_number_float();
    if (t == "boolean") return !v.undefined && v.j.is_boolean();
    if (t == "true") return !v.undefined && v.j.is_boolean() && v.j.get<bool>();
    if (t == "false") return !v.undefined && v.j.is_boolean() && !v.j.get<bool>();
    if (t == "mapping") return !v.undefined && v.j.is_object();
    if (t == "sequence" || t == "iterable") return !v.undefined && (v.j.is_array() || v.j.is_string() || v.j.is_object());
    if (t == "callable") return false;
    if (t == "odd" || t == "even") return v.j.is_number_integer() && (v.j.get<int64_t>() % 2 != 0) == (t == "odd");
    std::vector<Value> a = args_of(e, 1, d);
    if (t == "eq" || t == "equalto" || t == "sameas" || t == "==") return !a.empty() && !v.undefined && v.j == a[0].j;
    if (t == "ne") return a.empty() || v.j != a[0].j;
    if (t == "in") return !a.empty() && a[0].j.is_array() && std::find(a[0].j.begin(), a[0].j.end(), v.j) != a[0].j.end();
    if (t == "divisibleby") {
      int64_t q = a.empty() ? 0 : as_int(a[0], "divisibleby");
      return q != 0 && v.j.is_number_integer() && __int128(v.j.get<int64_t>()) % q == 0;
    }
    runtime_error("unknown test '" + t + "'");
  }

 private:
  Limits lim_;
  uint64_t steps_ = 0;
};

}  // namespace

Template::Template(const std::string &source, Limits limits) : limits_(limits) {
  Builder b(lex(source));
  root_ = std::make_shared<Node>();
  root_->kind = Node::If;
  root_->branches.push_back({nullptr, b.parse_all()});
}

Template::~Template() = default;

std::string Template::render(const json &context) const {
  Renderer r(limits_);
  r.scopes.emplace_back();
  if (context.is_object())
    for (auto it = context.begin(); it != context.end(); ++it) r.scopes.back()[it.key()] = it.value();
  r.scopes.emplace_back();  // the template's own top-level `set`s
  LoopSignal sig;
  r.run(root_->branches[0].second, sig, 0);
  return r.out;
}

std::string python_json_dumps(const json &v, int indent) {
  std::string s;
  dumps(v, indent, 0, s);
  return s;
}

}  // namespace dsrt::jinja
