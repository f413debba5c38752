// `dsrt serve` and `dsrt bench-serve` (tools/serve): their options declared here with the shared ones.
#include <cstdlib>
#include <memory>

#include "bench_serve.h"
#include "commands.h"
#include "options.h"
#include "server.h"

namespace dsrt::cli {

void add_serve_commands(CLI::App &app, int &rc) {
  {
    auto o = std::make_shared<serve::Options>();
    if (const char *k = std::getenv("DSRT_API_KEY")) o->api_key = k;
    auto *cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (docs/server.md)");
    cmd->footer("POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics\n"
                "(Prometheus). Every request is a session of one engine (batched together). Sampling options come\n"
                "with each request.");
    cmd->add_option("-m,--model", o->model_dir, "checkpoint directory")->required()->check(CLI::ExistingDirectory);
    cmd->add_option("--model-name", o->model_name, "the model id of /v1/models and requests (default: the directory's name)");
    cmd->add_option("--host", o->host, "address to bind (0.0.0.0 for every interface)");
    cmd->add_option("--port", o->port, "TCP port; 0 picks a free one")->check(CLI::Range(0, 65535));
    cmd->add_option("--api-key", o->api_key, "require 'Authorization: Bearer KEY' (also DSRT_API_KEY); /health is open")
        ->default_str("");
    cmd->add_option("--max-sessions", o->max_sessions, "concurrent generating requests; more get 429 + Retry-After")
        ->check(CLI::Range(1, 4096));
    cmd->add_option("-c,--ctx", o->ctx, "context per request, prompt + completion; 0: the KV pool, at most "
                                        "max_position_embeddings")
        ->check(CLI::Range(0, INT32_MAX));
    cmd->add_option("--kv-tokens", o->kv_tokens, "KV pool over all requests in tokens; 0: the engine's default")
        ->check(CLI::Range(0, INT32_MAX));
    cmd->add_option("--max-batch-tokens", o->max_batch_tokens, "tokens in one forward step; 0: the engine's default")
        ->check(CLI::Range(0, INT32_MAX));
    add_threads_option(*cmd, o->threads);
    add_backend_option(*cmd, o->backend);
    cmd->add_option("--max-body-bytes", o->max_body_bytes, "larger request bodies get 413")
        ->check(CLI::Range(1024.0, double(1ull << 34)));
    cmd->add_flag("--no-mmap", o->no_mmap, "copy the weights into memory instead of mapping the shards");
    auto quiet = std::make_shared<bool>(false);
    cmd->add_flag("-q,--quiet", *quiet, "no per-request log line on stderr");
    cmd->callback([o, quiet, &rc] {
      o->log_requests = !*quiet;
      o->threads = std::min(o->threads, cpu_count());
      rc = run_serve(*o);
    });
  }
  {
    auto o = std::make_shared<serve::BenchServeOptions>();
    auto *cmd = app.add_subcommand("bench-serve", "load-test an in-process `dsrt serve`: requests/s, TTFT, ITL");
    cmd->footer("Starts `dsrt serve` in this process on a loopback port; --clients threads send streaming chat\n"
                "completions (ignore_eos, so each reply is -n tokens), --requests in all, one at a time per client.\n"
                "Prints requests/s, output tokens/s, and the p50/p90/p99 of time to first token, inter-token latency and\n"
                "time per output token.");
    cmd->add_option("-m,--model", o->model_dir, "checkpoint directory")->required()->check(CLI::ExistingDirectory);
    cmd->add_option("--clients", o->clients, "concurrent streaming clients")->check(CLI::Range(1, 1024));
    cmd->add_option("--requests", o->requests, "requests in all; 0: 4 per client")->check(CLI::Range(0, 1000000));
    cmd->add_option("-n,--max-tokens", o->max_tokens, "tokens per reply")->check(CLI::Range(1, 1 << 20));
    cmd->add_option("--prompt-words", o->prompt_words, "words in each user message")->check(CLI::Range(1, 1 << 20));
    cmd->add_option("--temperature", o->temperature, "sampling temperature")->check(CLI::Range(0.0, 2.0));
    add_threads_option(*cmd, o->threads);
    add_backend_option(*cmd, o->backend);
    cmd->add_option("--kv-tokens", o->kv_tokens, "the server's KV pool in tokens; 0: the engine's default")
        ->check(CLI::Range(0, INT32_MAX));
    cmd->add_option("-c,--ctx", o->ctx, "the server's context per request; 0: its default")->check(CLI::Range(0, INT32_MAX));
    cmd->callback([o, &rc] {
      if (o->requests == 0) o->requests = 4 * o->clients;
      o->threads = std::min(o->threads, cpu_count());
      rc = run_bench_serve_command(*o);
    });
  }
}

}  // namespace dsrt::cli
