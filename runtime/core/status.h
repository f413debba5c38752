// Errors inside the runtime are exceptions of type dsrt::Error carrying a dsrt_status code; the C API
// (runtime/api) is the only place that turns them into status codes and thread-local text.
#pragma once
#include <stdexcept>
#include <string>

#include "dsrt.h"

namespace dsrt {

class Error : public std::runtime_error {
 public:
  Error(dsrt_status code, std::string msg) : std::runtime_error(std::move(msg)), code_(code) {}
  dsrt_status code() const { return code_; }

 private:
  dsrt_status code_;
};

[[noreturn]] void fail(dsrt_status code, std::string msg);

std::string to_piece(const std::string &s);
std::string to_piece(const char *s);
std::string to_piece(std::string_view s);
template <class T>
  requires std::is_arithmetic_v<T>
std::string to_piece(T v) {
  return std::to_string(v);
}


// Concatenates its arguments into one message: failf(DSRT_ERR_FORMAT, "tensor ", name, " has ...").
template <class... A>
[[noreturn]] void failf(dsrt_status code, const A &...parts) {
  std::string s;
  ((s += to_piece(parts)), ...);
  fail(code, std::move(s));
}

}  // namespace dsrt
