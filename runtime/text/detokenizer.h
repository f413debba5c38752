// Incremental detokenizer: token ids in, text out in complete UTF-8 pieces. It holds back the bytes of an
// unfinished character and any text that could be the start of a stop string until that is resolved; at
// the end, flush() emits what is held (bytes that never formed a character become U+FFFD).
// The concatenation of every piece and the flush equals utf8_sanitize(decode(all tokens)), stop strings aside.
#pragma once
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace dsrt {

class Detokenizer {
 public:
  Detokenizer(const Tokenizer &t, bool skip_special, std::vector<std::string> stop_strings = {});
  // Text that is final after this token ("" if none). After a stop string completes, returns the text
  // before it, stopped() turns true and later calls return "". An id outside the vocabulary is
  // DSRT_ERR_INVALID_ARGUMENT (Tokenizer::check_id) and changes nothing.
  const std::string &push(int32_t token);
  const std::string &flush();
  bool stopped() const { return stopped_; }
  const std::string &stop_string() const { return matched_stop_; }

 private:
  void release(bool final);
  const Tokenizer &tok_;
  bool skip_special_;
  std::vector<std::string> stops_;
  std::string bytes_;  // undecoded bytes (an unfinished character)
  std::string held_;   // valid text not yet emitted (a possible stop-string prefix)
  std::string out_;
  bool at_start_ = true, stopped_ = false;
  std::string matched_stop_;
};

}  // namespace dsrt
