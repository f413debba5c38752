#include "core/status.h"

namespace dsrt {

void fail(dsrt_status code, std::string msg) { throw Error(code, std::move(msg)); }
std::string to_piece(const std::string &s) { return s; }
std::string to_piece(const char *s) { return s ? s : "(null)"; }
std::string to_piece(std::string_view s) { return std::string(s); }

}  // namespace dsrt
