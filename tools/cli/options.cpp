#include "options.h"

#include <climits>
#include <cmath>
#include <cstdio>
#include <map>
#include <thread>

namespace dsrt::cli {

void check(dsrt_status st) {
  if (st != DSRT_OK) throw Fail{std::string(dsrt_status_string(st)) + ": " + dsrt_last_error()};
}

int cpu_count() {
  const unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

namespace {

// One of the names in m, turned into its value; the error names the choices.
template <typename T>
CLI::Validator choice(const std::map<std::string, T> &m) {
  std::string names;
  for (const auto &[k, v] : m) names += (names.empty() ? "" : ", ") + k;
  return CLI::Validator(
      [m, names](std::string &s) -> std::string {
        const auto it = m.find(s);
        if (it == m.end()) return "\"" + s + "\" is not one of " + names;
        s = std::to_string(it->second);
        return "";
      },
      "", "choice");
}

}  // namespace

CLI::Option *add_backend_option(CLI::App &app, int &backend) {
  return app.add_option("--backend", backend, "auto (a GPU when one is usable), cpu or cuda")
      ->transform(choice<int>({{"auto", DSRT_BACKEND_AUTO}, {"cpu", DSRT_BACKEND_CPU}, {"cuda", DSRT_BACKEND_CUDA}}))
      ->option_text("auto|cpu|cuda (default auto)");
}

CLI::Option *add_threads_option(CLI::App &app, int &threads) {
  return app
      .add_option("-t,--threads", threads,
                  "CPU threads; 0: all " + std::to_string(cpu_count()) + " of this machine (more are capped to that)")
      ->check(CLI::Range(0, 1 << 20))
      ->default_str("0");
}

void add_model_options(CLI::App &app, ModelOptions &o, bool positional) {
  auto *m = app.add_option("-m,--model", o.model, "checkpoint directory (config.json, safetensors index + shards)")
                ->check(CLI::ExistingDirectory);
  if (positional) {
    auto *p = app.add_option("model_dir", o.model, "the checkpoint directory, as -m")->check(CLI::ExistingDirectory);
    m->excludes(p);
  } else {
    m->required();
  }
  add_threads_option(app, o.threads);
  add_backend_option(app, o.backend);
  add_gpu_memory_option(app, o.gpu_memory,
                        "GPU memory the weights and the KV pool may take: bytes (K/M/G/T suffixes) or a share (0, 1] of "
                        "the free memory. The non-expert weights and a KV pool of min(max_position_embeddings, 16384) "
                        "tokens (--ctx may not exceed it) come first; routed experts that do not fit the rest stay in "
                        "host memory (expert offload). Default: the weights take what is free, less 1 GiB, and the KV "
                        "pool what they leave");
  app.add_flag_callback("--experts-on-cpu", [&o] { o.experts_compute = DSRT_EXPERTS_ON_CPU; },
                        "compute every routed expert on the CPU from host memory; the GPU holds none (as llama.cpp's "
                        "-ot exps=CPU)");
  app.add_flag_callback("--cold-experts-on-cpu", [&o] { o.experts_compute = DSRT_EXPERTS_COLD_ON_CPU; },
                        "expert offload: each step, the routed experts missing from the GPU's cache go to the GPU over "
                        "PCIe or to the CPU, whichever a cost model of the measured rates says finishes sooner");
  app.add_flag("--no-mmap", o.no_mmap,
               "copy the weights into memory at load instead of mapping the shards (use it when the checkpoint's "
               "files may change while dsrt runs; costs RAM and load time)");
  app.add_flag("-q,--quiet", o.quiet, "no progress display (it shows only on a terminal anyway)");
}

void add_gpu_memory_option(CLI::App &app, GpuMemory &g, const std::string &help) {
  app.add_option_function<std::string>(
         "--gpu-memory",
         [&g](const std::string &v) {
           size_t used = 0;
           double x = 0;
           try {
             x = std::stod(v, &used);
           } catch (const std::exception &) {
             throw CLI::ValidationError("--gpu-memory", "\"" + v + "\" is not a number of bytes or a fraction");
           }
           const std::string unit = v.substr(used);
           const int shift = unit.empty() ? 0 : unit == "K" || unit == "k" ? 10 : unit == "M" ? 20 : unit == "G" ? 30 : unit == "T" ? 40 : -1;
           if (shift < 0) throw CLI::ValidationError("--gpu-memory", "unknown unit \"" + unit + "\" (K, M, G or T)");
           if (!(x > 0)) throw CLI::ValidationError("--gpu-memory", "must be more than 0");
           g = {};
           if (unit.empty() && x <= 1.0) g.fraction = float(x);
           else g.bytes = uint64_t(std::ldexp(x, shift));
         },
         help)
      ->option_text("BYTES|FRACTION");
}

void add_engine_options(CLI::App &app, EngineOptions &o) {
  app.add_option("--max-batch-tokens", o.max_batch_tokens, "tokens in one forward step (the prefill chunk)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--precision", o.precision, "GEMM activations: fp8 (GEMMs of >= 8 rows, W8A8) or fp32; auto = fp8 on a GPU, fp32 on the CPU")
      ->transform(choice<int>({{"auto", DSRT_PRECISION_AUTO}, {"fp32", DSRT_PRECISION_FP32}, {"fp8", DSRT_PRECISION_FP8}}))
      ->option_text("auto|fp32|fp8 (default auto)");
  app.add_option("--attention", o.attention, "MLA form: auto, naive or absorbed")
      ->transform(choice<int>(
          {{"auto", DSRT_ATTENTION_AUTO}, {"naive", DSRT_ATTENTION_NAIVE}, {"absorbed", DSRT_ATTENTION_ABSORBED}}))
      ->option_text("auto|naive|absorbed (default auto)");
  app.add_option("--kv-memory-fraction", o.kv_memory_fraction,
                 "size the KV pool as this share of the free (device) memory after the weights; 0: by token count")
      ->check(CLI::Range(0.0, 1.0))
      ->default_str("0");
  auto *mtp = app.add_flag("--mtp", o.mtp,
                           "speculative decoding with the checkpoint's MTP module (same output, fewer steps); refused "
                           "when the model has none");
  app.add_option("--mtp-drafts", o.mtp_drafts, "with --mtp: tokens drafted per step")
      ->check(CLI::Range(1, 4))
      ->capture_default_str()
      ->needs(mtp);
  app.add_option("--tp", o.tp, "tensor-parallel ranks (in-process on the CPU backend)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--ep", o.ep, "expert-parallel ranks (in-process on the CPU backend)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_flag("--dp-attention", o.dp_attention,
               "data-parallel attention: each of the --ep ranks runs attention on its own sessions and keeps only "
               "their cache; MoE layers exchange the routed rows (with --tp 1)");
}

void add_gen_options(CLI::App &app, GenOptions &o, const std::string &n_help) {
  app.add_option_function<int>("-n,--max-tokens", [&o](const int &v) { o.max_tokens = v; }, n_help)
      ->check(CLI::Range(0, INT32_MAX))
      ->type_name("N");
  app.add_option("-c,--ctx", o.ctx, "context (KV capacity) in tokens, prompt + reply; 0: the engine's default, "
                                    "min(max_position_embeddings, 16384)")
      ->check(CLI::Range(0, 1 << 30))
      ->default_str("0");
  app.add_option_function<float>("--temperature", [&o](const float &v) { o.temperature = v; },
                                 "sampling temperature; 0: greedy (default: the model's generation_config.json, else 0)")
      ->check(CLI::Range(0.0, 100.0))
      ->type_name("T");
  app.add_option_function<float>("--top-p", [&o](const float &v) { o.top_p = v; },
                                 "nucleus sampling mass (default: the model's, else 1)")
      ->check(CLI::Range(0.0, 1.0))
      ->type_name("P");
  app.add_option_function<int>("--top-k", [&o](const int &v) { o.top_k = v; }, "sample among the K likeliest; 0: all")
      ->check(CLI::Range(0, INT32_MAX))
      ->type_name("K");
  app.add_option_function<float>("--min-p", [&o](const float &v) { o.min_p = v; },
                                 "drop tokens below this share of the likeliest's probability (default 0)")
      ->check(CLI::Range(0.0, 1.0))
      ->type_name("P");
  app.add_option_function<uint64_t>("--seed", [&o](const uint64_t &v) { o.seed = v; },
                                    "random seed of the sampler (default 0)")
      ->type_name("S");
  app.add_option("--stop", o.stop, "stop when the text contains STRING (repeatable)")
      ->type_name("STRING")
      ->default_str("")
      ->allow_extra_args(false);
  app.add_flag("-v,--verbose", o.verbose, "after each reply: prompt and generated tokens, tokens/s of each");
}

dsrt_model_params model_params(const ModelOptions &o) {
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.backend = o.backend;
  mp.n_threads = o.threads;
  if (o.threads > cpu_count()) {
    if (!o.quiet) std::fprintf(stderr, "dsrt: --threads %d is more than this machine's %d; using %d\n", o.threads, cpu_count(), cpu_count());
    mp.n_threads = cpu_count();
  }
  mp.device_memory = o.gpu_memory.bytes;
  mp.device_memory_fraction = o.gpu_memory.fraction;
  mp.experts_compute = o.experts_compute;
  mp.use_mmap = o.no_mmap ? 0 : 1;
  return mp;
}

dsrt_engine_params engine_params(const EngineOptions &o, int max_tokens) {
  dsrt_engine_params ep;
  dsrt_engine_params_init(&ep, sizeof ep);
  ep.max_tokens = max_tokens;
  ep.max_batch_tokens = o.max_batch_tokens;
  ep.attention = o.attention;
  ep.precision = o.precision;
  ep.kv_memory_fraction = o.kv_memory_fraction;
  ep.mtp_drafts = o.mtp ? o.mtp_drafts : 0;
  ep.tp = o.tp;
  ep.ep = o.ep;
  ep.dp_attention = o.dp_attention ? 1 : 0;
  return ep;
}

void apply_gen(const GenOptions &o, dsrt_gen_params &p, std::vector<const char *> &stops) {
  stops.clear();
  for (const auto &s : o.stop) stops.push_back(s.c_str());
  if (!stops.empty()) {
    p.stop_strings = stops.data();
    p.n_stop_strings = stops.size();
  }
  if (o.max_tokens) p.max_new_tokens = *o.max_tokens;
  if (o.temperature) p.temperature = *o.temperature;
  if (o.top_p) p.top_p = *o.top_p;
  if (o.top_k) p.top_k = *o.top_k;
  if (o.min_p) p.min_p = *o.min_p;
  if (o.seed) {
    p.has_seed = 1;
    p.seed = *o.seed;
  }
}

void check_mtp(const EngineOptions &o, const dsrt_model *m) {
  if (!o.mtp) return;
  dsrt_model_info info;
  info.struct_size = sizeof info;
  check(dsrt_model_info_get(m, &info));
  if (info.n_mtp_layers == 0) throw Usage{"--mtp: this checkpoint has no MTP layer (num_nextn_predict_layers 0, or its tensors are absent)"};
}

}  // namespace dsrt::cli
