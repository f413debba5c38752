// `dsrt bench`: prefill and decode speed, each beside its roofline.
#include <algorithm>
#include <mutex>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backend/cpu/host_bandwidth.h"
#include "core/thread_pool.h"
#include "backend/backend.h"
#include "bench_comm.h"
#include "bench_ops.h"
#include "commands.h"
#include "core/dtype.h"
#include "core/file.h"
#include "core/json.h"
#include "inspect.h"
#include "load.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace dsrt::cli {

namespace {

struct BenchOptions {
  ModelOptions model;
  EngineOptions engine;
  std::string prompts, batches, ctxs;  // lists; empty: the defaults
  int gen = 32;
  float temperature = 0;  // decode: greedy, or sampled (a random model's greedy tokens repeat, and so do its experts)
  bool profile = false;
  bool ops = false, sweep = false;  // --ops: the GEMV kernels alone (bench_ops.cpp)
  int rows = 1;
  bool comm = false;  // --comm: NCCL's collectives alone (bench_comm.cpp)
  int gpus = 0;
};

std::vector<int> int_list(const std::string &k, const std::string &given, const std::string &def) {
  std::vector<int> v;
  std::string s = given.empty() ? def : given, part;
  std::stringstream ss(s);
  while (std::getline(ss, part, ',')) {
    char *end = nullptr;
    long n = std::strtol(part.c_str(), &end, 10);
    if (part.empty() || *end || n < 1 || n > 1000000) throw Usage{k + " expects positive integers like 1,8,32, got \"" + s + "\""};
    v.push_back(int(n));
  }
  return v;
}

// Bytes that must move per decode step and FLOPs per token, from the checkpoint (MTP is not run).
struct StepCost {
  double dense_bytes = 0, expert_bytes = 0;  // per step: all non-expert weights; all routed experts
  double flops_per_token = 0;                // 2 x weights touched per token (embedding rows excluded)
  double kv_bytes_per_token = 0;             // latent cache read per context token per step (pool dtype)
  // Attention FLOPs of one (query token, key token) pair over all layers in the absorbed form: per head the
  // scores q_lat . c_kv + q_pe . k_pe (dc + dr) and the output P . c_kv (dc), a multiply and an add each.
  double attn_flops_per_pair = 0;
  int64_t n_experts = 0, top_k = 0;
  // Routed experts a batch of b tokens touches, if routing were uniform: E (1 - (1 - K/E)^b).
  double experts_touched(int b) const {
    if (!n_experts) return 0;
    return double(n_experts) * (1.0 - std::pow(1.0 - double(top_k) / double(n_experts), b));
  }
  double step_bytes(int batch, int ctx) const {
    const double per_expert = n_experts ? expert_bytes / double(n_experts) : 0.0;
    return dense_bytes + experts_touched(batch) * per_expert + double(batch) * ctx * kv_bytes_per_token;
  }
};

StepCost step_cost(const std::string &dir, size_t kv_elem_bytes) {
  using namespace dsrt;
  ModelConfig c = parse_model_config(read_text_file(dir + "/config.json", kConfigFileMax), dir);
  Checkpoint ck(dir);
  StepCost sc;
  sc.n_experts = c.n_routed_experts;
  sc.top_k = c.num_experts_per_tok;
  double expert_params = 0;
  for (auto &[name, t] : ck.all()) {
    if (layer_of(name) >= c.num_hidden_layers) continue;           // MTP is not run by decode
    if (name.find("embed_tokens") != std::string::npos) continue;  // one row per token
    if (name.find("weight_scale_inv") != std::string::npos || name.find("norm") != std::string::npos) {
      sc.dense_bytes += double(t->nbytes);
      continue;
    }
    const double params = double(t->nbytes) / double(dtype_size(t->dtype));
    if (name.find(".mlp.experts.") != std::string::npos) {
      sc.expert_bytes += double(t->nbytes);
      expert_params += params;
    } else {
      sc.dense_bytes += double(t->nbytes);
      sc.flops_per_token += 2.0 * params;
    }
  }
  if (sc.n_experts) sc.flops_per_token += 2.0 * expert_params * double(sc.top_k) / double(sc.n_experts);
  sc.kv_bytes_per_token = double(c.num_hidden_layers * c.kv_cache_width()) * double(kv_elem_bytes);
  sc.attn_flops_per_pair = 2.0 * double(c.num_hidden_layers * c.num_attention_heads) *
                           double(2 * c.kv_lora_rank + c.qk_rope_head_dim);
  return sc;
}

double host_dram_bandwidth() {  // every core reading (what the CPU expert path streams against)
  dsrt::ThreadPool pool(0);
  return dsrt::host_read_bandwidth(pool);
}

double host_copy_bandwidth() {  // bytes read + written per second for a large memcpy on one thread
  const size_t n = size_t(256) << 20;
  std::vector<char> a(n, 1), b(n, 0);
  double best = 0;
  for (int r = 0; r < 3; r++) {
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), n);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * double(n) / s);
  }
  return best;
}

// The engine's per-op times since profiling was turned on, divided by `steps` ("per decode step"), or the
// totals with steps = 0 (a whole prefill).
// Returns each op's total ms.
std::map<std::string, double> print_op_table(dsrt_engine *e, int steps, bool gpu) {
  char *json = nullptr;
  check(dsrt_engine_profile_json(e, &json));
  const auto j = dsrt::parse_json_sorted(json, "the engine profile", DSRT_ERR_FORMAT);
  dsrt_free(json);
  double total = 0;
  for (const auto &r : j) total += r["ms"].get<double>();
  const int div = steps > 0 ? steps : 1;
  std::printf("  per-op time %s (%s):\n  %-36s %8s %10s %7s\n", steps > 0 ? "per decode step" : "of the whole prefill",
              gpu ? "CUDA events" : "wall clock", "op", "calls", steps > 0 ? "us/step" : "ms", "share");
  for (const auto &r : j)
    std::printf("  %-36s %8lld %10.1f %6.1f%%\n", r["op"].get<std::string>().c_str(),
                (long long)(r["calls"].get<int64_t>() / div), (steps > 0 ? 1e3 : 1.0) * r["ms"].get<double>() / div,
                100.0 * r["ms"].get<double>() / total);
  std::printf("  %-36s %8s %10.1f\n", "sum", "", (steps > 0 ? 1e3 : 1.0) * total / div);
  std::map<std::string, double> ms;
  for (const auto &r : j) ms[r["op"].get<std::string>()] += r["ms"].get<double>();
  return ms;
}

// The tensor-core attention kernel's rate from a profile (when it ran): `flops` of attention and `bytes` of
// latent cache per step (or per prefill), against the copy bandwidth `bw`.
void print_attention_rate(const std::map<std::string, double> &ms, double flops, double bytes, double bw, int steps) {
  auto it = ms.find("mla_attend");
  if (it == ms.end() || it->second <= 0) return;
  const double s = it->second / std::max(steps, 1) * 1e-3;
  std::printf("  mla_attend: %.3f ms for %.3f TFLOP = %.1f TFLOP/s; %.1f MB of latent cache = %.0f GB/s (%.1f%% of the copy "
              "rate)\n",
              s * 1e3, flops / 1e12, flops / s / 1e12, bytes / 1e6, bytes / s / 1e9, 100.0 * bytes / s / bw);
}

int run_bench(const BenchOptions &a) {
  using namespace dsrt;
  if (a.ops) {
    tools::BenchOpsOptions o;
    o.rows = a.rows;
    o.sweep = a.sweep;
    o.cpu = a.model.backend == DSRT_BACKEND_CPU;
    o.threads = a.model.threads;
    return tools::bench_ops(o);
  }
  if (a.comm) {
    tools::BenchCommOptions o;
    o.world = a.gpus;
    return tools::bench_comm(o);
  }
  if (a.model.model.empty()) throw Usage{"--model is required (or --ops or --comm, which need no model)"};
  // Defaults: the GPU table (prefill 512 and 4096, decode at batch 1 to 128) on a GPU, a quick run on
  // the CPU reference.
  const int be = a.model.backend;
  const bool on_gpu = be == DSRT_BACKEND_CUDA || (be == DSRT_BACKEND_AUTO && cuda_devices(nullptr) > 0);
  const std::vector<int> prompts = int_list("--prompt", a.prompts, on_gpu ? "512,4096" : "64"),
                         batches = int_list("--batch", a.batches, on_gpu ? "1,8,32,128" : "1");
  const std::vector<int> ctxs = int_list("--ctx", a.ctxs, "128");
  const int gen = a.gen;
  if (*std::min_element(ctxs.begin(), ctxs.end()) < 1) throw Usage{"--ctx must be >= 1"};
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int max_prompt = *std::max_element(prompts.begin(), prompts.end());
  const int max_ctx = *std::max_element(ctxs.begin(), ctxs.end());
  Loaded l;
  auto pages = [](int tokens) { return (tokens + 63) / 64 * 64; };  // the KV pool hands out 64-token pages
  // The decode sessions of a batch are forks of one prefilled context (each holds its own copy of the cache,
  // so a step reads B contexts' latents as B independent chats would), plus that context while forking.
  load(a.model, a.engine, l, std::max(pages(max_prompt), (max_batch + 1) * pages(max_ctx + gen + 1)));
  dsrt_model_info info;
  info.struct_size = sizeof info;
  check(dsrt_model_info_get(l.model, &info));
  const bool gpu = info.backend == DSRT_BACKEND_CUDA;
  const std::string &dir = a.model.model;
  // The engine's latent pool takes its backend's default dtype (Backend::default_kv_dtype): BF16 on a GPU.
  const StepCost sc = step_cost(dir, dsrt::dtype_size(gpu ? dsrt::DType::BF16 : dsrt::DType::F32));
  const double bw = gpu ? device_copy_bandwidth(0) : host_copy_bandwidth();
  std::printf("model %s: %s weights, backend %s\n", dir.c_str(), info.weights_format ? "FP8" : "BF16", gpu ? "cuda" : "cpu");
  std::printf("copy bandwidth (%s, read + write): %.1f GB/s\n", gpu ? "device memcpy" : "one thread memcpy", bw / 1e9);
  // The prefill roofline's denominator: cuBLASLt's block-scaled FP8 GEMM on a V3 shape (4096 x 7168 x 7168).
  const double fp8_rate = gpu ? fp8_gemm_tflops(0, 4096, 7168, 7168) : 0.0;
  if (gpu)
    std::printf("FP8 GEMM rate (%s, 4096 x 7168 x 7168, activation quantisation included): %.0f TFLOP/s\n",
                cublaslt_status().c_str(), fp8_rate);
  std::printf("per token: %.2f GFLOP (2 x weights touched); per step at batch 1: %.1f MB of weights\n",
              sc.flops_per_token / 1e9, sc.step_bytes(1, 0) / 1e6);
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto secs = [&](auto t0) { return std::chrono::duration<double>(now() - t0).count(); };
  auto tokens = [&](int n, int salt) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int i = 0; i < n; i++) t[size_t(i)] = int32_t((int64_t(i) * 7919 + 13 + salt * 104729) % info.n_vocab);
    return t;
  };
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);

  // A new session holding `t`, evaluated (one sequence, chunked by the engine's max_batch_tokens); *dt: the
  // seconds the evaluation took.
  auto prefilled = [&](const std::vector<int32_t> &t, double *dt) {
    dsrt_session *s = nullptr;
    check(dsrt_session_create(l.engine, &sp, &s));
    check(dsrt_session_append_tokens(s, t.data(), t.size()));
    auto t0 = now();
    check(dsrt_session_eval(s, nullptr));
    *dt = secs(t0);
    return s;
  };
  const bool profile = a.profile;
  for (int P : prompts) {
    const auto t = tokens(P, 0);
    double dt = 0, dt2 = 0;
    dsrt_session_free(prefilled(t, &dt));
    const double flops = sc.flops_per_token * P;
    const double attn = sc.attn_flops_per_pair * double(P) * double(P + 1) / 2.0;
    std::printf("prefill %5d tokens: %8.3f s = %9.1f tokens/s, %7.2f TFLOP/s (weights only; attention adds %.2f TFLOP)", P,
                dt, P / dt, flops / dt / 1e12, attn / 1e12);
    if (fp8_rate > 0)
      std::printf("; roofline %.3f s at the FP8 GEMM rate: %.1f%% of it", flops / (fp8_rate * 1e12),
                  100.0 * flops / (fp8_rate * 1e12) / dt);
    std::printf("\n");
    if (profile) {  // the same prompt again, timed op by op (the timing events cost a little speed)
      check(dsrt_engine_set_profiling(l.engine, 1));
      dsrt_session_free(prefilled(t, &dt2));
      print_attention_rate(print_op_table(l.engine, 0, gpu), attn, sc.kv_bytes_per_token * double(P) * double(P + 1) / 2.0, bw, 1);
      check(dsrt_engine_set_profiling(l.engine, 0));
    }
  }

  for (int ctx : ctxs) {
    // One context prefilled once (timed: a prompt of ctx tokens), forked for every decoding session.
    double dt = 0;
    dsrt_session *base = prefilled(tokens(ctx, 1), &dt);
    std::printf("context %d: prefilled in %.3f s = %.1f tokens/s\n", ctx, dt, ctx / dt);
    for (int B : batches) {
      std::vector<dsrt_session *> ss(static_cast<size_t>(B));
      for (int i = 0; i < B; i++) check(dsrt_session_fork(base, &ss[size_t(i)]));
      // Each session decodes through a generation turn (dsrt_session_start/next: greedy, EOS ignored), the
      // serving path, on which a GPU engine samples on the device and copies no logits; one thread per session
      // pulls its events while the engine runs every session's token in the same step.
      dsrt_gen_params gp;
      dsrt_gen_params_init(&gp, sizeof gp, l.model);
      gp.temperature = a.temperature;
      gp.ignore_eos = 1;
      auto turns = [&](int n) {  // n decode steps of the whole batch; returns their wall time
        gp.max_new_tokens = n;
        for (size_t i = 0; i < ss.size(); i++) {  // (sampled: each session its own stream, from one seed per run)
          gp.has_seed = a.temperature > 0;
          gp.seed = 1234 + i;
          check(dsrt_session_start(ss[i], &gp));
        }
        std::mutex mu;
        std::string failure;  // the first turn that did not generate its n tokens (the figures would lie)
        std::vector<std::thread> pullers;
        const auto t0 = now();
        for (auto *s : ss)
          pullers.emplace_back([s, n, &mu, &failure] {
            dsrt_event ev;
            ev.struct_size = sizeof ev;
            std::string why;
            for (;;) {
              if (dsrt_session_next(s, &ev) != DSRT_OK) {
                why = dsrt_last_error();
                break;
              }
              if (ev.type != DSRT_EVENT_DONE) continue;
              if (ev.finish_reason != DSRT_FINISH_LENGTH || ev.n_generated != n)
                why = "finish reason " + std::to_string(ev.finish_reason) + " after " + std::to_string(ev.n_generated) +
                      " of " + std::to_string(n) + " tokens" +
                      (ev.finish_reason == DSRT_FINISH_ERROR ? std::string(": ") + dsrt_last_error() : std::string());
              break;
            }
            std::lock_guard lk(mu);
            if (!why.empty() && failure.empty()) failure = why;
          });
        for (auto &t : pullers) t.join();
        const double dt = secs(t0);
        if (!failure.empty()) throw Fail{"a decode turn ended early: " + failure};
        return dt;
      };
      for (size_t i = 0; i < ss.size(); i++) {  // one new token each: the turns begin with a decode step
        const int32_t t = int32_t((i * 7919 + 17) % size_t(info.n_vocab));
        check(dsrt_session_append_tokens(ss[i], &t, 1));
      }
      // Warm-up: first-use uploads and allocations; the step's CUDA graph is captured at the second step, and
      // the device time of a step is read at the next one's start.
      turns(3);
      if (profile) check(dsrt_engine_set_profiling(l.engine, 1));
      auto engine_stats = [&] {
        dsrt_engine_stats st;
        st.struct_size = sizeof st;
        check(dsrt_engine_stats_get(l.engine, &st));
        return st;
      };
      const dsrt_engine_stats st0 = engine_stats();
      const double steps = gen - 3, dt = turns(gen - 3);
      const dsrt_engine_stats st1 = engine_stats();  // device time lags a step: the window is shifted by one
      const double gpu = (st1.device_seconds - st0.device_seconds) / steps;
      if (gpu > 0)
        std::printf("  batch %d ctx %d step %.3f ms: GPU time %.3f ms/step; host overhead (step - GPU) %.1f us/step; "
                    "graph segments replayed %llu, captured %llu\n",
                    B, ctx, 1e3 * dt / steps, 1e3 * gpu, 1e6 * (dt / steps - gpu),
                    (unsigned long long)(st1.graph_replays - st0.graph_replays),
                    (unsigned long long)(st1.graph_captures - st0.graph_captures));
      const double bytes = sc.step_bytes(B, ctx + gen / 2), roof = bw / bytes, rate = steps / dt;
      std::printf("decode batch %4d ctx %6d: %8.2f steps/s = %9.1f tokens/s; roofline %.1f MB/step (latent cache %.1f MB) "
                  "/ %.0f GB/s = %.1f steps/s; %5.1f%% of it\n",
                  B, ctx, rate, rate * B, bytes / 1e6, (bytes - sc.step_bytes(B, 0)) / 1e6, bw / 1e9, roof,
                  100.0 * rate / roof);
      const double lookups = double(st1.expert_hits + st1.expert_misses - st0.expert_hits - st0.expert_misses);
      const double on_cpu = double(st1.experts_on_cpu - st0.experts_on_cpu);
      if (on_cpu > 0) {
        static const double dram = host_dram_bandwidth();
        const double b = double(st1.expert_bytes_cpu - st0.expert_bytes_cpu) / steps;
        std::printf("  experts on the CPU: %.1f per step, %.1f MB/step = %.1f GB/s of %.1f GB/s measured DRAM read rate (%.1f%%)\n",
                    on_cpu / steps, b / 1e6, b * rate / 1e9, dram / 1e9, 100.0 * b * rate / dram);
      }
      if (lookups > 0) {  // expert offload: what the GPU expert cache did, against the offload roofline
        const double moved = double(st1.expert_bytes_copied + st1.expert_bytes_read_in_host - st0.expert_bytes_copied -
                                    st0.expert_bytes_read_in_host) / steps;
        static const double pcie = host_to_device_bandwidth(0);
        const double t_roof = std::max(bytes / bw, moved / pcie);
        std::printf("  expert offload: hit rate %.1f%% (%.1f experts looked up per step), %.1f MB/step over PCIe "
                    "(%.1f copied into slots) = %.1f GB/s of %.1f GB/s measured host->device; offload roofline "
                    "max(%.1f MB / copy rate, PCIe bytes / host rate) = %.3f ms/step: %.1f%% of it\n",
                    100.0 * double(st1.expert_hits - st0.expert_hits) / lookups, lookups / steps, moved / 1e6,
                    double(st1.expert_bytes_copied - st0.expert_bytes_copied) / steps / 1e6, moved * rate / 1e9,
                    pcie / 1e9, bytes / 1e6, 1e3 * t_roof, 100.0 * t_roof * rate);
      }
      if (profile) {
        print_attention_rate(print_op_table(l.engine, int(steps), gpu),
                             sc.attn_flops_per_pair * double(B) * double(ctx + gen / 2),
                             sc.kv_bytes_per_token * double(B) * double(ctx + gen / 2), bw, int(steps));
        check(dsrt_engine_set_profiling(l.engine, 0));
      }
      for (auto *s : ss) dsrt_session_free(s);
    }
    dsrt_session_free(base);
  }
  return 0;
}

}  // namespace

void add_bench(CLI::App &app, int &rc) {
  auto o = std::make_shared<BenchOptions>();
  auto *cmd = app.add_subcommand("bench", "prefill and decode speed beside the roofline");
  cmd->footer(
      "Prefill tokens/s for each prompt length (one sequence) and decode tokens/s for each batch (sessions of each\n"
      "--ctx tokens, forks of one prefilled context, decoding --gen steps together), each beside its roofline: bytes\n"
      "that must move per step (weights touched + latent cache read) over the measured copy bandwidth (device memory\n"
      "on a GPU, one CPU thread's memcpy on the CPU). --profile adds a per-op time table for each batch size.\n"
      "--ops (GPU, no model): every weight-streaming kernel of a DeepSeek-V3 decode step on V3's shapes, GB/s against\n"
      "the copy rate; --sweep also times each cut of the GEMV kernel (K slices x rows per warp). --ops --backend cpu:\n"
      "the CPU backend's FP8 kernels on the same shapes against the host's measured DRAM read rate.\n"
      "--comm (GPUs, no model): NCCL's collectives on V3's shapes between --gpus GPUs (default all; one is a world of\n"
      "one), each queued back to back as a step queues it and with the host waiting for each, in us per call.");
  add_model_options(*cmd, o->model);
  auto *model_opt = cmd->get_option("--model");
  model_opt->required(false);  // (but for --ops and --comm: checked in run_bench)
  cmd->add_option("--prompt", o->prompts, "prompt lengths to prefill (default 512,4096 on a GPU, 64 on the CPU)")
      ->type_name("N,N,...");
  cmd->add_option("--batch", o->batches, "decode batch sizes (default 1,8,32,128 on a GPU, 1 on the CPU)")
      ->type_name("N,N,...");
  cmd->add_option("--ctx", o->ctxs, "context lengths the decode batches run at (default 128)")->type_name("N,N,...");
  cmd->add_option("--gen", o->gen, "decode steps per batch (the first three are warm-up)")->check(CLI::Range(4, 1 << 20));
  cmd->add_option("--temperature", o->temperature,
                  "decode by sampling at this temperature (default 0: greedy); a random checkpoint's greedy tokens "
                  "repeat, and so do the experts they route to (expert offload's hit rates)")
      ->check(CLI::Range(0.0, 100.0));
  cmd->add_flag("--profile", o->profile, "a per-op time table for each prefill and batch");
  auto *ops = cmd->add_flag("--ops", o->ops, "the GEMV kernels on V3's decode shapes (GPU, or the CPU's with --backend cpu; no model)");
  ops->excludes(model_opt);
  cmd->add_flag("--sweep", o->sweep, "with --ops: every cut of the GEMV kernel")->needs(ops);
  cmd->add_option("--rows", o->rows, "with --ops: activation rows (the decode batch)")->check(CLI::Range(1, 8))->needs(ops)->capture_default_str();
  auto *comm = cmd->add_flag("--comm", o->comm,
                             "NCCL's collectives on V3's shapes between this machine's GPUs, queued and host-waited (no model)");
  comm->excludes(model_opt)->excludes(ops);
  cmd->add_option("--gpus", o->gpus, "with --comm: GPUs, a rank each (default: all)")->check(CLI::Range(1, 64))->needs(comm);
  add_engine_options(*cmd, o->engine);
  cmd->callback([o, &rc] { rc = run_bench(*o); });
}

}  // namespace dsrt::cli
