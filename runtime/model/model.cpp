#include "model/model.h"

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
}  // namespace

std::shared_ptr<Model> Model::load(const std::string &dir, const LoadOptions &opt) {
  auto m = std::make_shared<Model>();
  m->dir = dir;
  ProgressCtx pc{&opt, 0};
  const std::string cfg_path = dir + "/config.json";
  m->config_json = read_text_file(cfg_path);
  m->cfg = parse_model_config(m->config_json, cfg_path);
  if (!forward_progress(1, 1, &pc)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  pc.stage = 1;
  m->ckpt = std::make_unique<Checkpoint>(dir, forward_progress, &pc);
  pc.stage = 2;
  BindOptions bo;
  bo.load_mtp = opt.load_mtp;
  bo.validate_scales = opt.validate_scales;
  bo.progress = forward_progress;
  bo.user = &pc;
  bind_weights(m->cfg, *m->ckpt, bo, m->w);

  const ModelConfig &c = m->cfg;
  m->rope.inv_freq = c.rope_inv_freq();
  m->rope.attn_factor = c.rope_attention_factor();
  m->mla = {c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank,
            c.softmax_scale()};
  m->router = {c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.scoring_func,
               c.topk_method,      c.norm_topk_prob,      c.routed_scaling_factor};
  for (const Weight *wt : m->w.all) {
    bool mtp = false;
    for (const LayerWeights &L : m->w.mtp)
      if (wt->info->name.rfind(layer_prefix(c, L.index), 0) == 0) mtp = true;
    if (!mtp) m->n_params += uint64_t(wt->rows * wt->cols);
  }
  return m;
}

}  // namespace dsrt
