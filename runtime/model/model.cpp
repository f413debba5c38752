#include "model/model.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/memory.h"
#include "core/sha256.h"
#include "core/status.h"

namespace dsrt {

namespace {
struct ProgressCtx {
  const LoadOptions *opt;
  int stage;
};
bool forward_progress(uint64_t done, uint64_t total, void *user) {
  auto *c = static_cast<ProgressCtx *>(user);
  if (c->opt->cancel && c->opt->cancel->load(std::memory_order_relaxed)) return false;
  return !c->opt->progress || c->opt->progress(c->stage, done, total, c->opt->user);
}
void check_cancel(const LoadOptions &opt) {
  if (opt.cancel && opt.cancel->load(std::memory_order_relaxed)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
}

std::atomic<int64_t> g_live_models{0};
}  // namespace

void report_load_progress(const LoadOptions &opt, int stage, uint64_t done, uint64_t total) {
  ProgressCtx pc{&opt, stage};
  if (!forward_progress(done, total, &pc)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
}

Model::Model() { g_live_models.fetch_add(1); }
Model::~Model() {
  // Members (mappings, tables) are destroyed after this body: release what they free, too.
  ckpt.reset();
  if (g_live_models.fetch_sub(1) == 1) release_host_memory();
}

void load_generation_defaults(const std::string &dir, GenerationDefaults &g) {
  const std::string path = dir + "/generation_config.json";
  if (!file_exists(path)) return;
  const nlohmann::json j = read_json_file(path, kGenerationConfigFileMax);
  auto num = [&](const char *k, float lo, float hi, float *out) {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) return false;
    if (!it->is_number() || !(it->get<double>() >= lo && it->get<double>() <= hi))
      failf(DSRT_ERR_FORMAT, path, ": ", k, " must be a number in [", lo, ", ", hi, "]");
    *out = it->get<float>();
    return true;
  };
  g.has_temperature = num("temperature", 0.0f, 100.0f, &g.temperature);
  g.has_top_p = num("top_p", 0.0f, 1.0f, &g.top_p);
  float k = 0;
  if ((g.has_top_k = num("top_k", 0.0f, 1e9f, &k))) g.top_k = int32_t(k);
  if (auto it = j.find("do_sample"); it != j.end() && it->is_boolean()) g.do_sample = it->get<bool>();
}

int64_t default_kv_tokens(const ModelConfig &c) { return std::min<int64_t>(c.max_position_embeddings, 16384); }

KvCacheSpec kv_pool_spec(const ModelConfig &c, const ModelWeights &w, DType dtype, int64_t max_tokens) {
  if (max_tokens <= 0) max_tokens = default_kv_tokens(c);
  KvCacheSpec s;
  s.n_layers = c.num_hidden_layers + int64_t(w.mtp.size());  // MTP layers get their own slots
  s.width = c.kv_cache_width();
  s.dtype = dtype;
  s.max_pages = max_tokens / kPageTokens + (max_tokens % kPageTokens != 0);
  return s;
}

Placement plan_placement(const ModelConfig &c, const ModelWeights &w, const std::vector<Device> &devices,
                         uint64_t device_memory, double device_fraction) {
  if (devices.empty()) return Placement::plan(w, devices, 0);
  if (device_memory == 0 && !(device_fraction > 0)) {
    const uint64_t reserve = uint64_t(1) << 30;  // scratch, KV pool, cuBLASLt workspace, CUDA's own needs
    const uint64_t free_b = device_free_memory(devices[0]);
    return Placement::plan(w, devices, free_b > reserve ? free_b - reserve : 0);
  }
  const uint64_t budget =
      device_fraction > 0 ? uint64_t(device_fraction * double(device_free_memory(devices[0]))) : device_memory;
  // The engine checks its pool against this reserve (Engine::init), so a dtype of its own would be caught.
  return Placement::plan(w, devices, budget, kv_pool_spec(c, w, DType::BF16).pool_bytes());
}

std::shared_ptr<Model> Model::load(const std::string &dir, const LoadOptions &opt) {
  std::shared_ptr<Model> m = begin_load(dir, opt);
  if (!opt.config_only) m->load_weights(opt);
  load_generation_defaults(dir, m->gen_defaults);
  m->finish_load(opt);
  return m;
}

// Stages: config.json, shards, validate, text files (tokenizer, generation config: read by the caller between
// load_weights and finish_load). Cancel and progress are consulted between them; every file is checked to be
// regular and capped in size before it is read.
std::shared_ptr<Model> Model::begin_load(const std::string &dir, const LoadOptions &opt) {
  auto m = std::make_shared<Model>();
  m->dir = dir;
  check_cancel(opt);
  const std::string cfg_path = dir + "/config.json";
  m->config_json = read_text_file(cfg_path, kConfigFileMax);
  m->cfg = parse_model_config(m->config_json, cfg_path);
  report_load_progress(opt, 0, 1, 1);
  return m;
}

void Model::load_weights(const LoadOptions &opt) {
  ProgressCtx pc{&opt, 1};
  ckpt = std::make_unique<Checkpoint>(dir, forward_progress, &pc, opt.shard_access);
  pc.stage = 2;
  BindOptions bo;
  bo.load_mtp = opt.load_mtp;
  bo.validate_scales = opt.validate_scales;
  bo.progress = forward_progress;
  bo.user = &pc;
  bind_weights(cfg, *ckpt, bo, w);
}

void Model::finish_load(const LoadOptions &opt) {
  Sha256 fp;
  fp.update(config_json.data(), config_json.size());
  if (!ckpt) {  // config_only
    has_weights = false;
    fingerprint = fp.hex_digest();
    return;
  }

  const ModelConfig &c = cfg;
  rope.inv_freq = c.rope_inv_freq();
  rope.attn_factor = c.rope_attention_factor();
  mla = {c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank,
         c.softmax_scale()};
  router = {c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.scoring_func,
            c.topk_method,      c.norm_topk_prob,      c.routed_scaling_factor};
  for (auto &[name, t] : ckpt->all()) {
    std::string d = name + "|" + dtype_name(t->dtype);
    for (int64_t x : t->shape) {
      d += '|';  // not "|" + std::to_string(x): GCC 12 warns falsely (-Wrestrict, its bug 105329) on that form
      d += std::to_string(x);
    }
    fp.update(d.data(), d.size());
    fp.update(t->data, std::min<uint64_t>(t->nbytes, 16));
  }
  fingerprint = fp.hex_digest();
  placement = plan_placement(c, w, opt.devices, opt.device_memory, opt.device_memory_fraction);
  experts_compute = opt.experts_compute;
  if (experts_compute == ExpertCompute::AllOnCpu && !placement.devices.empty()) {  // the GPU keeps no routed expert
    const uint64_t kv = placement.devices[0].kv_pool;
    placement = Placement::plan(w, opt.devices, placement.devices[0].non_expert + kv, kv);
  }
  for (const Weight *wt : w.all) {
    bool mtp = false;
    for (const LayerWeights &L : w.mtp)
      if (wt->info->name.rfind(layer_prefix(c, L.index), 0) == 0) mtp = true;
    if (!mtp) n_params += uint64_t(wt->rows * wt->cols);
  }
}

}  // namespace dsrt
