#include "model/model.h"

#include <sys/stat.h>

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

// The tokenizer file the loader will use (the order of Tokenizer::load_files), or "" when none.
std::string tokenizer_file(const std::string &dir) {
  for (const char *f : {"/tokenizer.json", "/tiktoken.model", "/tokenizer.model"})
    if (file_exists(dir + f)) return dir + f;
  return "";
}
}  // namespace

Model::Model() { g_live_models.fetch_add(1); }
Model::~Model() {
  // Members (mappings, tokenizer, tables) are destroyed after this body: release what they free, too.
  ckpt.reset();
  tokenizer.reset();
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

const Tokenizer &Model::tok() const {
  if (!tokenizer)
    failf(DSRT_ERR_UNSUPPORTED, dir, " has no tokenizer files (tokenizer.json, tiktoken.model or tokenizer.model): "
                                      "use token ids, or add the checkpoint's tokenizer files");
  return *tokenizer;
}

std::vector<int32_t> Model::eog_ids() const {
  std::vector<int32_t> ids;
  for (int64_t e : cfg.eos_token_ids)
    if (e >= 0 && e < cfg.vocab_size) ids.push_back(int32_t(e));
  if (tokenizer)
    for (int32_t i = 0; i < tokenizer->n_tokens(); i++)
      if (tokenizer->attr(i) & kTokenEog) ids.push_back(i);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

std::shared_ptr<Model> Model::load(const std::string &dir, const LoadOptions &opt) {
  auto m = std::make_shared<Model>();
  m->dir = dir;
  // Stages: config.json, shards, validate, text files (tokenizer, generation config). Cancel and progress
  // are consulted between them; every file is checked to be regular and capped in size before it is read.
  ProgressCtx pc{&opt, 0};
  check_cancel(opt);
  const std::string cfg_path = dir + "/config.json";
  m->config_json = read_text_file(cfg_path, kConfigFileMax);
  m->cfg = parse_model_config(m->config_json, cfg_path);
  if (!forward_progress(1, 1, &pc)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  if (!opt.tokenizer_only) {
    // Shapes before the tokenizer: its per-id tables are sized by vocab_size, which must first agree with
    // the embedding table that the shards actually hold (a vocab_size of 1e8 cost 3.67 GB before the
    // shape check rejected it).
    pc.stage = 1;
    m->ckpt = std::make_unique<Checkpoint>(dir, forward_progress, &pc, opt.shard_access);
    pc.stage = 2;
    BindOptions bo;
    bo.load_mtp = opt.load_mtp;
    bo.validate_scales = opt.validate_scales;
    bo.progress = forward_progress;
    bo.user = &pc;
    bind_weights(m->cfg, *m->ckpt, bo, m->w);
  } else if (const std::string tf = tokenizer_file(dir); !tf.empty()) {
    struct stat st;
    const int64_t bytes = ::stat(tf.c_str(), &st) == 0 ? int64_t(st.st_size) : 0;
    if (m->cfg.vocab_size > bytes + kTokenizerOnlyPaddingMax)
      failf(DSRT_ERR_FORMAT, cfg_path, ": vocab_size ", m->cfg.vocab_size, " is more than ", tf, " (", bytes,
            " bytes) can define plus ", kTokenizerOnlyPaddingMax, " padding ids");
  }
  pc.stage = 3;
  if (!forward_progress(0, 2, &pc)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  m->tokenizer = Tokenizer::load(dir, m->cfg.vocab_size);
  if (m->tokenizer)
    for (int32_t i = 0; i < int32_t(m->cfg.vocab_size); i++)
      if (m->tokenizer->attr(i) & kTokenUnused) m->unused_ids.push_back(i);
  if (m->tokenizer && m->tokenizer->n_tokens() > m->cfg.vocab_size)
    failf(DSRT_ERR_FORMAT, dir, ": the tokenizer has ", m->tokenizer->n_tokens(), " tokens, more than vocab_size ",
          m->cfg.vocab_size);
  if (!forward_progress(1, 2, &pc)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  load_generation_defaults(dir, m->gen_defaults);
  if (!forward_progress(2, 2, &pc)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  Sha256 fp;
  fp.update(m->config_json.data(), m->config_json.size());
  if (opt.tokenizer_only) {
    if (!m->tokenizer) failf(DSRT_ERR_IO, dir, ": a tokenizer-only load needs tokenizer.json, tiktoken.model or tokenizer.model");
    m->has_weights = false;
    m->fingerprint = fp.hex_digest();
    return m;
  }

  const ModelConfig &c = m->cfg;
  m->rope.inv_freq = c.rope_inv_freq();
  m->rope.attn_factor = c.rope_attention_factor();
  m->mla = {c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank,
            c.softmax_scale()};
  m->router = {c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.scoring_func,
               c.topk_method,      c.norm_topk_prob,      c.routed_scaling_factor};
  for (auto &[name, t] : m->ckpt->all()) {
    std::string d = name + "|" + dtype_name(t->dtype);
    for (int64_t x : t->shape) d += "|" + std::to_string(x);
    fp.update(d.data(), d.size());
    fp.update(t->data, std::min<uint64_t>(t->nbytes, 16));
  }
  m->fingerprint = fp.hex_digest();
  uint64_t budget = opt.device_memory;
  if (!opt.devices.empty() && budget == 0) {
    const uint64_t reserve = uint64_t(1) << 30;  // scratch, KV pool, cuBLASLt workspace, CUDA's own needs
    const uint64_t free_b = device_free_memory(opt.devices[0]);
    budget = free_b > reserve ? free_b - reserve : 0;
  }
  m->placement = Placement::plan(m->w, opt.devices, budget);
  for (const Weight *wt : m->w.all) {
    bool mtp = false;
    for (const LayerWeights &L : m->w.mtp)
      if (wt->info->name.rfind(layer_prefix(c, L.index), 0) == 0) mtp = true;
    if (!mtp) m->n_params += uint64_t(wt->rows * wt->cols);
  }
  return m;
}

}  // namespace dsrt
