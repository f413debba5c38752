#include "text/utf8.h"

namespace dsrt {

size_t utf8_len_at(std::string_view s, size_t i) {
  const uint8_t c = uint8_t(s[i]);
  const size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return 0;
  for (size_t k = 1; k < len; k++)
    if ((uint8_t(s[i + k]) & 0xc0) != 0x80) return 0;
  if (len == 1) return 1;
  uint32_t cp = c & (0x7f >> len);
  for (size_t k = 1; k < len; k++) cp = cp << 6 | (uint8_t(s[i + k]) & 0x3f);
  if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
      (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return len;
}

// True if s[i..] is a proper prefix of some multi-byte sequence (more bytes could make it valid).
static bool could_complete(std::string_view s, size_t i) {
  const uint8_t c = uint8_t(s[i]);
  const size_t len = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || s.size() - i >= len) return false;
  for (size_t k = i + 1; k < s.size(); k++)
    if ((uint8_t(s[k]) & 0xc0) != 0x80) return false;
  return true;
}

size_t utf8_sanitize(std::string_view b, bool final, std::string *out) {
  size_t i = 0;
  while (i < b.size()) {
    size_t len = utf8_len_at(b, i);
    if (len) {
      out->append(b.substr(i, len));
      i += len;
    } else if (!final && could_complete(b, i)) {
      break;
    } else {
      *out += kReplacementChar;
      i++;
    }
  }
  return i;
}

}  // namespace dsrt
