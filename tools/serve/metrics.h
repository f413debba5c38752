// Prometheus text-format metrics of `dsrt serve`: request counters by endpoint and status, tokens in and
// out, time-to-first-token, inter-token latency and request-duration histograms. Thread-safe.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dsrt::serve {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);  // caller holds the Metrics lock
  void render(std::string &out, const std::string &name) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last = +Inf
  double sum_ = 0;
  uint64_t n_ = 0;
};

// Gauges read at scrape time (engine and server state).
struct Gauges {
  int64_t active_sessions = 0, max_sessions = 0, queue_length = 0;
  int64_t kv_pages_used = 0, kv_pages_total = 0, kv_page_tokens = 0;
  uint64_t engine_steps = 0, engine_tokens = 0, max_batch_seqs = 0;
  double forward_seconds = 0;
  uint64_t prefix_hits = 0, prefix_tokens = 0;
  int64_t prefix_pages = 0;
};

class Metrics {
 public:
  Metrics();
  void request(const std::string &endpoint, int status);
  void rejected();  // 429 for --max-sessions
  void cancelled();  // client went away mid-generation
  void tokens(int64_t prompt, int64_t completion);
  void ttft(double seconds);
  void inter_token(double seconds);
  void duration(double seconds);
  std::string render(const Gauges &g) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  uint64_t rejected_ = 0, cancelled_ = 0, prompt_tokens_ = 0, completion_tokens_ = 0;
  Histogram ttft_, itl_, duration_;
};

}  // namespace dsrt::serve
