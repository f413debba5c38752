#include "progress.h"

#include <unistd.h>

#include <cstdio>

namespace dsrt::cli {

Progress::Progress(bool quiet) : enabled_(!quiet && isatty(2)) {}

Progress::~Progress() { finish(); }

void Progress::update(const std::string &what, uint64_t done, uint64_t total, const char *unit) {
  if (!enabled_ || total == 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (what != what_) {
    what_ = what;
    start_ = now;
    last_percent_ = -1;
  }
  const int percent = int(100 * (done < total ? done : total) / total);
  // Redraw when the percentage moves, at most ten times a second (and always at 100%).
  if (percent == last_percent_ || (percent < 100 && now - last_draw_ < std::chrono::milliseconds(100))) return;
  last_percent_ = percent;
  last_draw_ = now;
  const double secs = std::chrono::duration<double>(now - start_).count();
  const int width = 24, filled = width * percent / 100;
  std::fprintf(stderr, "\r\033[K%-18s [%.*s%*s] %3d%%", what.c_str(), filled, "########################", width - filled, "",
               percent);
  if (secs > 0.05) std::fprintf(stderr, "  %.0f %s/s", double(done) / secs, unit);
  std::fflush(stderr);
  drawn_ = true;
}

void Progress::finish() {
  if (drawn_) {
    std::fputs("\r\033[K", stderr);  // the line goes: what follows (the reply, a summary) starts clean
    std::fflush(stderr);
  }
  drawn_ = false;
  what_.clear();
}

int32_t Progress::load_callback(int32_t stage, uint64_t done, uint64_t total, void *user) {
  auto *p = static_cast<Progress *>(user);
  static const char *names[] = {"loading config", "mapping shards", "loading weights", "loading tokenizer"};
  static const char *units[] = {"files", "shards", "tensors", "files"};
  if (stage >= 0 && stage <= 3) p->update(names[stage], done, total, units[stage]);
  return 0;
}

}  // namespace dsrt::cli
