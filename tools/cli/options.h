// The `dsrt` command line: the options that several subcommands share, each declared once (CLI11), and the
// C API parameter structs they fill. Adding an option to every command that loads a model is one field in
// ModelOptions or EngineOptions and one line in add_model_options / add_engine_options.
// Uses the public C API only (dsrt_chat links it against libdsrt.so).
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dsrt.h"

namespace dsrt::cli {

// A failure while running (exit status 1).
struct Fail {
  std::string msg;
};
// A bad command line that the parser could not see (a combination of options): exit status 2, like CLI11's
// own rejections.
struct Usage {
  std::string msg;
};

void check(dsrt_status st);  // throws Fail with dsrt's message
int cpu_count();             // hardware threads of this machine

// --gpu-memory BYTES|FRACTION: bytes (suffixes K, M, G, T: powers of 1024) or a share (0, 1] of the device's
// free memory at load.
struct GpuMemory {
  uint64_t bytes = 0;
  float fraction = 0;
};
// Adds --gpu-memory to a command (help text: what the budget bounds).
void add_gpu_memory_option(CLI::App &app, GpuMemory &g, const std::string &help);

// How a model is loaded: every command that loads one.
struct ModelOptions {
  std::string model;
  int threads = 0;
  int backend = DSRT_BACKEND_AUTO;
  GpuMemory gpu_memory;
  int experts_compute = DSRT_EXPERTS_GPU;
  bool no_mmap = false;
  bool quiet = false;  // no progress display
};
// The engine: every command that runs the model.
struct EngineOptions {
  int max_batch_tokens = 512;
  int precision = DSRT_PRECISION_AUTO;
  int attention = DSRT_ATTENTION_AUTO;
  float kv_memory_fraction = 0;
  bool mtp = false;
  int mtp_drafts = 1;
  int tp = 1, ep = 1;
  bool dp_attention = false;
};
// Generation: generate --prompt and chat (and the token-id form of generate, which refuses what it cannot use).
struct GenOptions {
  std::optional<int> max_tokens;  // -n; the command's default when unset
  int ctx = 0;                    // KV capacity in tokens; 0: the engine's default
  std::optional<float> temperature, top_p, min_p;
  std::optional<int> top_k;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool verbose = false;  // a summary (tokens, tokens/s) after each reply
};

// `positional`: the model directory may also be given as the first positional argument (dsrt chat DIR).
void add_model_options(CLI::App &app, ModelOptions &o, bool positional = false);
void add_engine_options(CLI::App &app, EngineOptions &o);
// n_help: what -n means for this command, with its default.
void add_gen_options(CLI::App &app, GenOptions &o, const std::string &n_help);
// Options of a command that takes only --backend / --threads / --gpu-memory subsets (inspect, serve) use these.
CLI::Option *add_backend_option(CLI::App &app, int &backend);
CLI::Option *add_threads_option(CLI::App &app, int &threads);

// The parameter structs, filled from the options (progress and cancel left to the caller).
dsrt_model_params model_params(const ModelOptions &o);
dsrt_engine_params engine_params(const EngineOptions &o, int max_tokens);
// Applies the generation options over p (which dsrt_gen_params_init filled with the model's defaults).
// `stops` holds the stop-string pointers p refers to.
void apply_gen(const GenOptions &o, dsrt_gen_params &p, std::vector<const char *> &stops);
// Refuses --mtp when the model has no MTP layer (it would run silently without it).
void check_mtp(const EngineOptions &o, const dsrt_model *m);

}  // namespace dsrt::cli
