// `dsrt bench-serve`: load test of `dsrt serve`. Starts the server in this process on an ephemeral loopback
// port, then N client threads send streaming chat completions over HTTP (cpp-httplib's client, as any
// client would) and time every SSE chunk: requests/s, output tokens/s, time to first token and inter-token
// latency percentiles. Written against include/dsrt.h and the server's own interface only.
#include "bench_serve.h"

#include <httplib.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dsrt.h"
#include "openai_json.h"
#include "server.h"

namespace dsrt::serve {

namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

// One streamed request's timings.
struct RequestTiming {
  bool ok = false;
  std::string error;
  double ttft_ms = 0;             // request sent -> first chunk with content
  std::vector<double> itl_ms;     // between successive content chunks
  double total_ms = 0;
  int64_t completion_tokens = 0;  // from the usage chunk
  int64_t prompt_tokens = 0;
  int64_t content_chunks = 0;
};

RequestTiming stream_one(const std::string &host, int port, const std::string &body) {
  RequestTiming t;
  httplib::Client c(host, port);
  c.set_read_timeout(600, 0);
  c.set_write_timeout(60, 0);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.set_header("Content-Type", "application/json");
  req.body = body;
  std::string buf;
  bool done = false;
  const Clock::time_point start = Clock::now();
  Clock::time_point last{};
  req.content_receiver = [&](const char *data, size_t len, uint64_t, uint64_t) {
    buf.append(data, len);
    const Clock::time_point now = Clock::now();
    size_t end;
    while ((end = buf.find("\n\n")) != std::string::npos) {
      std::string ev = buf.substr(0, end);
      buf.erase(0, end + 2);
      if (ev.rfind("data: ", 0) != 0) continue;
      ev.erase(0, 6);
      if (ev == "[DONE]") {
        done = true;
        continue;
      }
      const json j = json::parse(ev, nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("error")) {
        t.error = dump(j["error"]);
        continue;
      }
      if (j.contains("usage") && j["usage"].is_object()) {
        t.completion_tokens = j["usage"].value("completion_tokens", int64_t(0));
        t.prompt_tokens = j["usage"].value("prompt_tokens", int64_t(0));
      }
      if (!j.contains("choices") || j["choices"].empty()) continue;
      const json &d = j["choices"][0]["delta"];
      const bool has_text = (d.contains("content") && d["content"].is_string() && !d["content"].get<std::string>().empty()) ||
                            (d.contains("reasoning_content") && d["reasoning_content"].is_string());
      if (!has_text) continue;
      if (t.content_chunks++ == 0) t.ttft_ms = ms_between(start, now);
      else t.itl_ms.push_back(ms_between(last, now));
      last = now;
    }
    return true;
  };
  auto res = c.send(req);
  t.total_ms = ms_between(start, Clock::now());
  if (!res) {
    t.error = "HTTP error " + httplib::to_string(res.error());
  } else if (res->status != 200) {
    t.error = "HTTP " + std::to_string(res->status) + " " + res->body;
  } else if (!done && t.error.empty()) {
    t.error = "the stream ended without [DONE]";
  }
  t.ok = t.error.empty() && t.content_chunks > 0;
  if (t.error.empty() && t.content_chunks == 0) t.error = "no content";
  return t;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * double(v.size() - 1);  // linear interpolation between closest ranks
  const size_t lo = size_t(std::floor(rank)), hi = size_t(std::ceil(rank));
  return v[lo] + (v[hi] - v[lo]) * (rank - double(lo));
}

}  // namespace

const char *bench_serve_usage() {
  return "usage: dsrt bench-serve --model DIR [--clients 8] [--requests N] [--max-tokens 32] [--prompt-words 32]\n"
         "                        [--threads N] [--backend auto|cpu|cuda] [--kv-tokens N] [--ctx N] [--temperature 0.8]\n"
         "Starts `dsrt serve` in this process on a loopback port; --clients threads send streaming chat completions\n"
         "(ignore_eos, so each reply is --max-tokens tokens), --requests in all (default 4 per client), one at a time per\n"
         "client. Prints requests/s, output tokens/s, and the percentiles (p50/p90/p99) of time to first token (request\n"
         "sent -> first content chunk), inter-token latency (between content chunks; a chunk may carry several tokens\n"
         "when text is held back) and time per output token ((request - first token) / (tokens - 1), per request).\n";
}

BenchServeOptions parse_bench_serve_options(int argc, char **argv) {
  BenchServeOptions o;
  const auto integer = option_integer;
  for (int i = 0; i < argc; i++) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") o.model_dir = value();
    else if (a == "--clients") o.clients = int(integer(a, value(), 1, 1024));
    else if (a == "--requests") o.requests = int(integer(a, value(), 1, 1000000));
    else if (a == "--max-tokens") o.max_tokens = int(integer(a, value(), 1, 1 << 20));
    else if (a == "--prompt-words") o.prompt_words = int(integer(a, value(), 1, 1 << 20));
    else if (a == "--threads") o.threads = int(integer(a, value(), 0, 65536));
    else if (a == "--kv-tokens") o.kv_tokens = int(integer(a, value(), 1, INT32_MAX));
    else if (a == "--ctx") o.ctx = int(integer(a, value(), 1, INT32_MAX));
    else if (a == "--temperature") {
      const std::string v = value();
      char *end = nullptr;
      o.temperature = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || !(o.temperature >= 0 && o.temperature <= 2)) throw std::invalid_argument("--temperature expects a number in [0, 2]");
    } else if (a == "--backend") {
      const std::string b = value();
      if (b == "auto") o.backend = DSRT_BACKEND_AUTO;
      else if (b == "cpu") o.backend = DSRT_BACKEND_CPU;
      else if (b == "cuda") o.backend = DSRT_BACKEND_CUDA;
      else throw std::invalid_argument("--backend must be auto, cpu or cuda, not \"" + b + "\"");
    } else {
      throw std::invalid_argument("unknown option \"" + a + "\" (dsrt bench-serve --help)");
    }
  }
  if (o.model_dir.empty()) throw std::invalid_argument("missing --model");
  if (o.requests == 0) o.requests = 4 * o.clients;
  return o;
}

BenchServeResult run_bench_serve(const BenchServeOptions &o) {
  Options so;
  so.model_dir = o.model_dir;
  so.model_name = "bench";
  so.host = "127.0.0.1";
  so.port = 0;
  so.backend = o.backend;
  so.threads = o.threads;
  // Twice the clients: a client may send its next request the moment it reads [DONE], a little before the
  // server's worker has released the finished request's slot; the clients alone bound the concurrency.
  so.max_sessions = 2 * o.clients;
  so.kv_tokens = o.kv_tokens;
  so.ctx = o.ctx;
  so.log_requests = false;
  Server srv(so);
  const int port = srv.bind();
  std::thread listener([&srv] { srv.listen(); });
  while (!srv.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(2));

  // A different prompt per request (so no two requests are one computation), of about prompt_words words.
  static const char *words[] = {"the", "weather", "river", "stone", "music", "garden", "window", "market",
                                "engine", "winter", "letter", "forest", "bridge", "silver", "candle", "harbor"};
  auto body = [&](int r) {
    std::string prompt = "Request " + std::to_string(r) + ":";
    for (int w = 0; w < o.prompt_words; w++) prompt += std::string(" ") + words[(size_t(r) * 7 + size_t(w) * 3) % 16];
    json b = {{"model", "bench"},
              {"messages", json::array({{{"role", "user"}, {"content", prompt}}})},
              {"max_tokens", o.max_tokens},
              {"temperature", o.temperature},
              {"seed", r},
              {"ignore_eos", true},
              {"stream", true},
              {"stream_options", {{"include_usage", true}}}};
    return b.dump();
  };
  // Warm-up: one request alone (page faults of the weights, allocator pools), not counted.
  RequestTiming warm = stream_one("127.0.0.1", port, body(o.requests));
  if (!warm.ok) {
    srv.stop();
    listener.join();
    throw std::runtime_error("warm-up request failed: " + warm.error);
  }

  std::vector<RequestTiming> all(size_t(o.requests));
  std::atomic<int> next{0};
  const Clock::time_point t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < o.clients; c++)
    clients.emplace_back([&] {
      for (int r; (r = next.fetch_add(1)) < o.requests;) all[size_t(r)] = stream_one("127.0.0.1", port, body(r));
    });
  for (auto &t : clients) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  // The engine's side from /metrics (counters since the server started, the warm-up included).
  BenchServeResult res;
  {
    httplib::Client c("127.0.0.1", port);
    if (auto m = c.Get("/metrics"); m && m->status == 200) {
      auto value = [&](const std::string &name) {
        const std::string key = "\n" + name + " ";
        const size_t at = m->body.find(key);
        return at == std::string::npos ? 0.0 : std::strtod(m->body.c_str() + at + key.size(), nullptr);
      };
      res.engine_steps = int64_t(value("dsrt_engine_steps_total"));
      res.engine_tokens = int64_t(value("dsrt_engine_tokens_total"));
      res.engine_max_batch = int64_t(value("dsrt_engine_max_batch_sequences"));
      res.forward_seconds = value("dsrt_engine_forward_seconds_total");
    }
  }
  srv.stop();
  listener.join();

  res.wall_seconds = wall;
  std::vector<double> ttft, itl, total, tpot;
  for (const auto &t : all) {
    if (!t.ok) {
      res.failed++;
      if (res.first_error.empty()) res.first_error = t.error;
      continue;
    }
    res.completed++;
    res.completion_tokens += t.completion_tokens;
    res.prompt_tokens += t.prompt_tokens;
    ttft.push_back(t.ttft_ms);
    total.push_back(t.total_ms);
    if (t.completion_tokens > 1) tpot.push_back((t.total_ms - t.ttft_ms) / double(t.completion_tokens - 1));
    itl.insert(itl.end(), t.itl_ms.begin(), t.itl_ms.end());
  }
  res.requests_per_second = double(res.completed) / wall;
  res.output_tokens_per_second = double(res.completion_tokens) / wall;
  for (int i = 0; i < 3; i++) {
    const double p = i == 0 ? 50 : i == 1 ? 90 : 99;
    res.ttft_ms[i] = percentile(ttft, p);
    res.itl_ms[i] = percentile(itl, p);
    res.latency_ms[i] = percentile(total, p);
    res.tpot_ms[i] = percentile(tpot, p);
  }
  res.n_itl = int64_t(itl.size());
  return res;
}

}  // namespace dsrt::serve

int dsrt_bench_serve_command(int argc, char **argv) {
  using namespace dsrt::serve;
  for (int i = 0; i < argc; i++)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::fputs(bench_serve_usage(), stdout);
      return 0;
    }
  try {
    return run_bench_serve_command(parse_bench_serve_options(argc, argv));
  } catch (const std::exception &e) {
    std::fprintf(stderr, "dsrt bench-serve: %s\n", e.what());
    return 1;
  }
}

int run_bench_serve_command(const dsrt::serve::BenchServeOptions &o) {
  using namespace dsrt::serve;
  try {
    signal(SIGPIPE, SIG_IGN);
    const BenchServeResult r = run_bench_serve(o);
    std::printf("dsrt bench-serve: %s (dsrt %s)\n", o.model_dir.c_str(), dsrt_version_string());
    std::printf("  %d clients, %d requests (%d completed, %d failed), %d tokens each, %.0f prompt tokens on average, "
                "temperature %.2f\n",
                o.clients, o.requests, r.completed, r.failed, o.max_tokens,
                r.completed ? double(r.prompt_tokens) / r.completed : 0.0, o.temperature);
    std::printf("  wall %.2f s: %.2f requests/s, %.1f output tokens/s\n", r.wall_seconds, r.requests_per_second,
                r.output_tokens_per_second);
    std::printf("  %-26s %9s %9s %9s\n", "", "p50", "p90", "p99");
    std::printf("  %-26s %9.1f %9.1f %9.1f\n", "time to first token (ms)", r.ttft_ms[0], r.ttft_ms[1], r.ttft_ms[2]);
    std::printf("  %-26s %9.2f %9.2f %9.2f\n", "inter-token latency (ms)", r.itl_ms[0], r.itl_ms[1], r.itl_ms[2]);
    std::printf("  %-26s %9.2f %9.2f %9.2f\n", "time per output token (ms)", r.tpot_ms[0], r.tpot_ms[1], r.tpot_ms[2]);
    std::printf("  %-26s %9.1f %9.1f %9.1f\n", "request latency (ms)", r.latency_ms[0], r.latency_ms[1], r.latency_ms[2]);
    if (r.engine_steps > 0)
      std::printf("  engine (warm-up included): %lld steps, %.1f tokens/step, at most %lld sequences in a step, forward "
                  "%.2f s\n",
                  (long long)r.engine_steps, double(r.engine_tokens) / double(r.engine_steps), (long long)r.engine_max_batch,
                  r.forward_seconds);
    std::fflush(stdout);
    if (r.failed) std::fprintf(stderr, "dsrt bench-serve: %d requests failed; first: %s\n", r.failed, r.first_error.c_str());
    return r.failed ? 1 : 0;
  } catch (const std::exception &e) {
    std::fprintf(stderr, "dsrt bench-serve: %s\n", e.what());
    return 1;
  }
}
