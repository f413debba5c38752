// UTF-8 helpers shared by the tokenizers and the incremental decoder.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsrt {

// Length of the valid UTF-8 sequence at s[i], or 0 if none starts there (overlong forms, surrogates and
// code points past U+10FFFF are invalid, as in Rust's and Python's strings).
size_t utf8_len_at(std::string_view s, size_t i);

// Decodes bytes to valid UTF-8: every byte that does not start a valid sequence becomes U+FFFD. Unless
// `final`, a trailing sequence that could still complete is left unconsumed. Returns bytes consumed.
size_t utf8_sanitize(std::string_view bytes, bool final, std::string *out);

inline constexpr const char *kReplacementChar = "\xef\xbf\xbd";

}  // namespace dsrt
