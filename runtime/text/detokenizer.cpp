#include "text/detokenizer.h"

#include "text/utf8.h"

namespace dsrt {

Detokenizer::Detokenizer(const Tokenizer &t, bool skip_special, std::vector<std::string> stop_strings)
    : tok_(t), skip_special_(skip_special) {
  for (auto &s : stop_strings)
    if (!s.empty()) stops_.push_back(std::move(s));
}

const std::string &Detokenizer::push(int32_t token) {
  tok_.check_id(token);
  out_.clear();
  if (stopped_) return out_;
  const uint8_t a = tok_.attr(token);
  if (!(skip_special_ && (a & kTokenControl))) bytes_ += tok_.token_bytes(token);
  release(false);
  return out_;
}

const std::string &Detokenizer::flush() {
  out_.clear();
  if (!stopped_) release(true);
  if (!stopped_) {
    out_ += held_;
    held_.clear();
  }
  return out_;
}

void Detokenizer::release(bool final) {
  size_t used = utf8_sanitize(bytes_, final, &held_);
  bytes_.erase(0, used);
  if (at_start_ && !held_.empty()) {
    if (tok_.strip_leading_space() && held_[0] == ' ') held_.erase(0, 1);
    at_start_ = held_.empty();
  }
  // A complete stop string: emit what precedes the earliest one and stop.
  size_t first = std::string::npos;
  for (auto &s : stops_) {
    size_t p = held_.find(s);
    if (p < first) {
      first = p;
      matched_stop_ = s;
    }
  }
  if (first != std::string::npos) {
    out_ += held_.substr(0, first);
    held_.clear();
    bytes_.clear();
    stopped_ = true;
    return;
  }
  // Hold back the longest tail of held_ that is a prefix of a stop string.
  size_t keep = 0;
  for (auto &s : stops_)
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; k--)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  out_ += held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
}

}  // namespace dsrt
