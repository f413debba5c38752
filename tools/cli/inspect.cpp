// `dsrt inspect`: describes and validates a checkpoint without loading it; --placement: where the weights would go.
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "commands.h"
#include "core/file.h"
#include "core/status.h"
#include "dist/mapping.h"
#include "inspect.h"
#include "model/config.h"
#include "model/model.h"
#include "model/placement.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "options.h"

namespace dsrt::cli {

namespace {

struct InspectOptions {
  std::string model;
  bool no_mmap = false, placement = false;
  int backend = DSRT_BACKEND_AUTO;
  GpuMemory gpu_memory;
  int tp = 1, ep = 1;
};

}  // namespace

// The layer index in "model.layers.L.xxx" (any prefix), or -1.
long long layer_of(const std::string &name) {
  size_t lp = name.find("model.layers.");
  return lp == std::string::npos ? -1 : std::atoll(name.c_str() + lp + 13);
}

std::string human(double b) {
  const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    i++;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", b, u[i]);
  return buf;
}

// Where the weights would go (model/placement.h) for --backend and --gpu-memory, and each rank's share for
// --tp/--ep (dist/mapping.h).
void print_placement(const InspectOptions &a, const dsrt::ModelConfig &c, const dsrt::ModelWeights &w) {
  using namespace dsrt;
  std::vector<Device> devices;
  const int backend = a.backend;
  std::string why;
  if (backend == DSRT_BACKEND_CUDA || (backend == DSRT_BACKEND_AUTO && cuda_devices(&why) > 0)) devices.push_back(Device::cuda(0));
  Mapping shape;
  shape.tp = a.tp;
  shape.ep = a.ep;
  shape.world = shape.tp * shape.ep;
  std::printf("placement   %s\n", devices.empty() ? "host memory (CPU backend)" : devices[0].str().c_str());
  try {
    std::printf("%s", plan_placement(c, w, devices, a.gpu_memory.bytes, a.gpu_memory.fraction).str().c_str());
  } catch (const Error &e) {
    std::printf("  does not fit: %s\n", e.what());
  }
  try {
    shape.check_divides(c);
  } catch (const Error &e) {
    std::printf("ranks       %s\n", e.what());
    return;
  }
  std::printf("ranks       tp %d x ep %d\n", shape.tp, shape.ep);
  for (int r = 0; r < shape.world; r++) {
    Mapping m = shape;
    m.rank = r;
    const Range h = m.heads(c.num_attention_heads), e = m.experts(c.n_routed_experts), v = m.columns(c.vocab_size);
    std::printf("  rank %d: heads [%lld, %lld), routed experts [%lld, %lld), vocabulary rows [%lld, %lld)%s\n", r,
                (long long)h.begin, (long long)h.end, (long long)e.begin, (long long)e.end, (long long)v.begin,
                (long long)v.end, m.ep_rank() == 0 && c.n_shared_experts ? ", shared experts" : "");
  }
}

int run_inspect(const InspectOptions &a) {
  using namespace dsrt;
  const std::string &dir = a.model;
  ModelConfig c = parse_model_config(read_text_file(dir + "/config.json", kConfigFileMax), dir + "/config.json");
  std::printf("config      %s/config.json (model_type %s)\n", dir.c_str(), c.model_type.c_str());
  std::printf("  layers %lld (dense %lld, MoE %lld), MTP %lld, hidden %lld, heads %lld, vocab %lld\n",
              (long long)c.num_hidden_layers, (long long)std::min(c.first_k_dense_replace, c.num_hidden_layers),
              (long long)(c.n_routed_experts ? c.num_hidden_layers - std::min(c.first_k_dense_replace, c.num_hidden_layers) : 0),
              (long long)c.num_nextn_predict_layers, (long long)c.hidden_size, (long long)c.num_attention_heads,
              (long long)c.vocab_size);
  std::printf("  MLA: q_lora %lld, kv_lora %lld, nope %lld, rope %lld, v %lld; softmax scale %.8f\n",
              (long long)c.q_lora_rank, (long long)c.kv_lora_rank, (long long)c.qk_nope_head_dim,
              (long long)c.qk_rope_head_dim, (long long)c.v_head_dim, c.softmax_scale());
  if (c.n_routed_experts)
    std::printf("  MoE: %lld experts (%lld per token, %lld groups pick %lld), %lld shared, inter %lld, scale %.3f, %s%s\n",
                (long long)c.n_routed_experts, (long long)c.num_experts_per_tok, (long long)c.n_group,
                (long long)c.topk_group, (long long)c.n_shared_experts, (long long)c.moe_intermediate_size,
                c.routed_scaling_factor, c.scoring_func == ScoringFunc::Sigmoid ? "sigmoid" : "softmax",
                c.norm_topk_prob ? ", normalised" : "");
  std::printf("  RoPE: theta %g%s", c.rope.theta, c.rope.yarn ? ", YaRN" : "\n");
  if (c.rope.yarn)
    std::printf(" factor %g over %lld, beta %g/%g, mscale %g/%g\n", c.rope.factor, (long long)c.rope.original_max_position,
                c.rope.beta_fast, c.rope.beta_slow, c.rope.mscale, c.rope.mscale_all_dim);
  std::printf("  weights: %s\n", c.fp8 ? "FP8 e4m3, 128x128 block scales" : "unquantised");
  Checkpoint ck(dir, nullptr, nullptr, a.no_mmap ? ShardAccess::Copy : ShardAccess::Map);
  std::map<std::string, std::pair<uint64_t, uint64_t>> by_dtype;  // count, bytes
  std::map<std::string, uint64_t> by_part;
  for (auto &[name, t] : ck.all()) {
    auto &d = by_dtype[dtype_name(t->dtype)];
    d.first++;
    d.second += t->nbytes;
    std::string part = "other";
    const long long layer = layer_of(name);
    if (layer >= c.num_hidden_layers)
      part = "MTP";
    else if (name.find(".mlp.experts.") != std::string::npos)
      part = "routed experts";
    else if (name.find(".mlp.shared_experts.") != std::string::npos)
      part = "shared experts";
    else if (name.find(".mlp.gate.") != std::string::npos)
      part = "router";
    else if (name.find(".mlp.") != std::string::npos)
      part = "dense FFN";
    else if (name.find(".self_attn.") != std::string::npos || name.find("layernorm") != std::string::npos)
      part = "attention + norms";
    else if (name.find("embed_tokens") != std::string::npos || name.find("lm_head") != std::string::npos ||
             name.find("model.norm") != std::string::npos)
      part = "embeddings/head";
    by_part[part] += t->nbytes;
  }
  std::printf("checkpoint  %zu shards, %zu tensors, %s\n", ck.n_shards(), ck.all().size(), human(double(ck.total_bytes())).c_str());
  for (auto &[d, v] : by_dtype) std::printf("  %-8s %8llu tensors  %s\n", d.c_str(), (unsigned long long)v.first, human(double(v.second)).c_str());
  std::printf("bytes by part\n");
  for (auto &[p, b] : by_part) std::printf("  %-18s %s\n", p.c_str(), human(double(b)).c_str());
  ModelWeights w;
  BindOptions bo;
  try {
    bind_weights(c, ck, bo, w);
  } catch (const Error &e) {
    std::printf("validation  FAILED: %s\n", e.what());
    return 1;
  }
  for (auto &u : w.unknown) std::printf("unknown     %s\n", u.c_str());
  std::printf("validation  OK: %zu tensors bound (%zu MTP layers), %zu unknown\n", w.all.size(), w.mtp.size(), w.unknown.size());
  if (a.placement) print_placement(a, c, w);
  return 0;
}


void add_inspect(CLI::App &app, int &rc) {
  auto o = std::make_shared<InspectOptions>();
  auto *cmd = app.add_subcommand("inspect", "describe and validate a checkpoint");
  cmd->footer("Config summary, tensor count by dtype, bytes by part, unknown tensors, validation result;\n"
              "--placement: where the weights go (device, budget, bytes by part) and each rank's share.");
  cmd->add_option("-m,--model", o->model, "checkpoint directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_flag("--no-mmap", o->no_mmap, "read the shards into memory instead of mapping them");
  auto *pl = cmd->add_flag("--placement", o->placement, "where the weights would go, and each rank's share");
  add_backend_option(*cmd, o->backend)->needs(pl);
  add_gpu_memory_option(*cmd, o->gpu_memory, "with --placement: GPU memory the weights and the KV pool may take, bytes (K/M/G/T) or a share of the free memory");
  cmd->get_option("--gpu-memory")->needs(pl);
  cmd->add_option("--tp", o->tp, "with --placement: tensor-parallel ranks")->check(CLI::Range(1, 256))->needs(pl);
  cmd->add_option("--ep", o->ep, "with --placement: expert-parallel ranks")->check(CLI::Range(1, 256))->needs(pl);
  cmd->callback([o, &rc] { rc = run_inspect(*o); });
}

}  // namespace dsrt::cli
