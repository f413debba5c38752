// `dsrt serve`: an OpenAI-compatible HTTP server over dsrt's public C API (include/dsrt.h only) and
// cpp-httplib. Each request is one dsrt session of one shared engine, which batches the sessions' steps.
// Also the reference sample of a server embedding dsrt. docs/server.md describes the endpoints.
#pragma once
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>

namespace dsrt::serve {

struct Options {
  std::string model_dir;
  std::string model_name;          // the id clients send as "model"; default: the directory's name
  std::string host = "127.0.0.1";  // loopback unless asked
  int port = 8080;                 // 0: an ephemeral port (Server::bind returns it)
  int backend = 0;                 // DSRT_BACKEND_*
  int threads = 0;                 // CPU threads of the model; 0 = all
  int max_sessions = 16;           // concurrent generating requests; more get 429 with Retry-After
  int ctx = 0;                     // per-request context (prompt + completion); 0 = min(KV pool, n_ctx_train)
  int kv_tokens = 0;               // the engine's KV pool in tokens; 0 = the engine's default
  int max_batch_tokens = 0;        // the engine's per-step token budget; 0 = its default
  std::string api_key;             // non-empty: "Authorization: Bearer KEY" required (not on /health)
  size_t max_body_bytes = size_t(8) << 20;  // larger bodies get 413
  bool no_mmap = false;
  bool log_requests = true;        // one line per request on stderr
};

// The value of an integer option within [lo, hi], or std::invalid_argument naming the option (serve, bench-serve).
long long option_integer(const std::string &opt, const std::string &v, long long lo, long long hi);
// Options from the arguments after `dsrt serve`. Throws std::invalid_argument naming the bad option.
Options parse_options(int argc, char **argv);
const char *usage_text();

class Server {
 public:
  // Loads the model and creates the engine; throws std::runtime_error with dsrt's message.
  explicit Server(const Options &o);
  ~Server();
  Server(const Server &) = delete;
  Server &operator=(const Server &) = delete;

  int bind();     // binds host:port; returns the port (the ephemeral one for port 0); throws on failure
  bool listen();  // serves until stop(); returns false if the server could not run
  void stop();    // cancels every running generation and makes listen() return; any thread
  bool is_running() const;      // listen() is accepting connections
  int active_sessions() const;  // requests holding a session now
  const std::string &model_name() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsrt::serve

// `dsrt serve ARGS...` (argv[0] is the first option, not the program): returns the exit status.
int dsrt_serve_command(int argc, char **argv);
// Runs the server of already-parsed options until SIGINT/SIGTERM: returns the exit status (`dsrt serve`).
int run_serve(const dsrt::serve::Options &o);
