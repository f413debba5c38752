// `dsrt bench-serve`: N concurrent streaming clients on loopback against an in-process `dsrt serve`.
#pragma once
#include <cstdint>
#include <string>

namespace dsrt::serve {

struct BenchServeOptions {
  std::string model_dir;
  int clients = 8;         // concurrent streaming clients (the server's --max-sessions is twice this)
  int requests = 0;        // in all; 0 = 4 per client
  int max_tokens = 32;     // per reply (ignore_eos: exactly this many)
  int prompt_words = 32;   // words in each (distinct) user message
  double temperature = 0.8;
  int threads = 0;         // the model's CPU threads; 0 = all
  int backend = 0;         // DSRT_BACKEND_*
  int kv_tokens = 0;       // the server's --kv-tokens (0: the engine's default)
  int ctx = 0;             // the server's --ctx (0: its default)
};

struct BenchServeResult {
  int completed = 0, failed = 0;
  std::string first_error;
  double wall_seconds = 0;
  double requests_per_second = 0, output_tokens_per_second = 0;
  int64_t completion_tokens = 0, prompt_tokens = 0, n_itl = 0;
  double ttft_ms[3] = {0, 0, 0};     // p50, p90, p99
  double itl_ms[3] = {0, 0, 0};      // between chunks with text
  double tpot_ms[3] = {0, 0, 0};     // per request: (latency - TTFT) / (completion tokens - 1)
  double latency_ms[3] = {0, 0, 0};  // whole request
  int64_t engine_steps = 0, engine_tokens = 0, engine_max_batch = 0;  // from /metrics (warm-up included)
  double forward_seconds = 0;
};

const char *bench_serve_usage();
// Throws std::invalid_argument naming the bad option.
BenchServeOptions parse_bench_serve_options(int argc, char **argv);
// Runs the load; throws std::runtime_error when the server cannot start or the warm-up request fails.
BenchServeResult run_bench_serve(const BenchServeOptions &o);

}  // namespace dsrt::serve

// `dsrt bench-serve ARGS...` (argv[0] is the first option): returns the exit status.
int dsrt_bench_serve_command(int argc, char **argv);
// Runs and reports the load of already-parsed options: returns the exit status.
int run_bench_serve_command(const dsrt::serve::BenchServeOptions &o);
