// One progress display for model loads and long prefills: a line on stderr redrawn in place (stage, percent,
// rate), only when stderr is a terminal and not --quiet.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace dsrt::cli {

class Progress {
 public:
  explicit Progress(bool quiet);
  ~Progress();
  bool enabled() const { return enabled_; }
  // `what` of `total` `unit`s, `done` so far; the rate counts from the first update of this `what`.
  void update(const std::string &what, uint64_t done, uint64_t total, const char *unit);
  void finish();  // ends the line (if one was drawn)
  // A dsrt_progress_fn for dsrt_model_params (user_data: this Progress).
  static int32_t load_callback(int32_t stage, uint64_t done, uint64_t total, void *user);

 private:
  bool enabled_;
  bool drawn_ = false;
  std::string what_;
  int last_percent_ = -1;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace dsrt::cli
