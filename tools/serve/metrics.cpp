#include "metrics.h"

#include <cstdio>

namespace dsrt::serve {

namespace {
std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}
}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) i++;
  counts_[i]++;
  sum_ += v;
  n_++;
}

void Histogram::render(std::string &out, const std::string &name) const {
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); i++) {
    cum += counts_[i];
    out += name + "_bucket{le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  cum += counts_.back();
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(cum) + "\n";
  out += name + "_sum " + num(sum_) + "\n";
  out += name + "_count " + std::to_string(n_) + "\n";
}

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      duration_({0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}) {}

void Metrics::request(const std::string &endpoint, int status) {
  std::lock_guard lk(mu_);
  requests_[{endpoint, status}]++;
}
void Metrics::rejected() {
  std::lock_guard lk(mu_);
  rejected_++;
}
void Metrics::cancelled() {
  std::lock_guard lk(mu_);
  cancelled_++;
}
void Metrics::tokens(int64_t prompt, int64_t completion) {
  std::lock_guard lk(mu_);
  prompt_tokens_ += uint64_t(prompt);
  completion_tokens_ += uint64_t(completion);
}
void Metrics::ttft(double s) {
  std::lock_guard lk(mu_);
  ttft_.observe(s);
}
void Metrics::inter_token(double s) {
  std::lock_guard lk(mu_);
  itl_.observe(s);
}
void Metrics::duration(double s) {
  std::lock_guard lk(mu_);
  duration_.observe(s);
}

std::string Metrics::render(const Gauges &g) const {
  std::lock_guard lk(mu_);
  std::string o;
  auto head = [&](const char *name, const char *type, const char *help) {
    o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  };
  head("dsrt_requests_total", "counter", "HTTP requests by endpoint and status code.");
  for (const auto &[k, v] : requests_)
    o += "dsrt_requests_total{endpoint=\"" + k.first + "\",status=\"" + std::to_string(k.second) + "\"} " + std::to_string(v) + "\n";
  head("dsrt_requests_rejected_total", "counter", "Requests refused with 429 because --max-sessions were busy.");
  o += "dsrt_requests_rejected_total " + std::to_string(rejected_) + "\n";
  head("dsrt_requests_cancelled_total", "counter", "Generations cancelled because the client went away.");
  o += "dsrt_requests_cancelled_total " + std::to_string(cancelled_) + "\n";
  head("dsrt_prompt_tokens_total", "counter", "Prompt tokens prefilled.");
  o += "dsrt_prompt_tokens_total " + std::to_string(prompt_tokens_) + "\n";
  head("dsrt_generation_tokens_total", "counter", "Tokens generated.");
  o += "dsrt_generation_tokens_total " + std::to_string(completion_tokens_) + "\n";
  head("dsrt_time_to_first_token_seconds", "histogram", "Request arrival to first generated token.");
  ttft_.render(o, "dsrt_time_to_first_token_seconds");
  head("dsrt_inter_token_latency_seconds", "histogram", "Time between consecutive generated tokens of a request.");
  itl_.render(o, "dsrt_inter_token_latency_seconds");
  head("dsrt_request_duration_seconds", "histogram", "Generation requests, arrival to last byte.");
  duration_.render(o, "dsrt_request_duration_seconds");
  head("dsrt_active_sessions", "gauge", "Requests generating now (each one session of the engine).");
  o += "dsrt_active_sessions " + std::to_string(g.active_sessions) + "\n";
  head("dsrt_max_sessions", "gauge", "--max-sessions: more concurrent requests get 429.");
  o += "dsrt_max_sessions " + std::to_string(g.max_sessions) + "\n";
  head("dsrt_queue_length", "gauge", "Requests waiting for a session (always 0: over the limit is refused, not queued).");
  o += "dsrt_queue_length " + std::to_string(g.queue_length) + "\n";
  head("dsrt_kv_pages_used", "gauge", "KV cache pages in use.");
  o += "dsrt_kv_pages_used " + std::to_string(g.kv_pages_used) + "\n";
  head("dsrt_kv_pages_total", "gauge", "KV cache pages in the pool.");
  o += "dsrt_kv_pages_total " + std::to_string(g.kv_pages_total) + "\n";
  head("dsrt_kv_page_tokens", "gauge", "Tokens per KV page.");
  o += "dsrt_kv_page_tokens " + std::to_string(g.kv_page_tokens) + "\n";
  head("dsrt_kv_usage_ratio", "gauge", "Share of the KV pool in use.");
  o += "dsrt_kv_usage_ratio " + num(g.kv_pages_total ? double(g.kv_pages_used) / double(g.kv_pages_total) : 0.0) + "\n";
  head("dsrt_engine_steps_total", "counter", "Forward steps run by the engine.");
  o += "dsrt_engine_steps_total " + std::to_string(g.engine_steps) + "\n";
  head("dsrt_engine_tokens_total", "counter", "Tokens through the forward.");
  o += "dsrt_engine_tokens_total " + std::to_string(g.engine_tokens) + "\n";
  head("dsrt_engine_max_batch_sequences", "gauge", "Most sequences seen in one forward step.");
  o += "dsrt_engine_max_batch_sequences " + std::to_string(g.max_batch_seqs) + "\n";
  head("dsrt_engine_forward_seconds_total", "counter", "Wall time spent in forward steps.");
  o += "dsrt_engine_forward_seconds_total " + num(g.forward_seconds) + "\n";
  head("dsrt_prefix_cache_hits_total", "counter", "Prompts that started from the prefix cache's pages.");
  o += "dsrt_prefix_cache_hits_total " + std::to_string(g.prefix_hits) + "\n";
  head("dsrt_prefix_cache_tokens_total", "counter", "Prompt tokens served from the prefix cache, not prefilled.");
  o += "dsrt_prefix_cache_tokens_total " + std::to_string(g.prefix_tokens) + "\n";
  head("dsrt_prefix_cache_pages", "gauge", "KV pages held by the prefix cache (some also in use by sessions).");
  o += "dsrt_prefix_cache_pages " + std::to_string(g.prefix_pages) + "\n";
  return o;
}

}  // namespace dsrt::serve
