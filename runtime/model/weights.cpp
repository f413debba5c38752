#include "model/weights.h"

#include <cmath>
#include <cstring>
#include <set>

#include "core/status.h"

namespace dsrt {

Weight Weight::rows_part(int64_t r0, int64_t n) const {
  if (r0 == 0 && n == rows) return *this;
  Weight v = *this;
  v.ld = ld ? ld : cols;
  v.row0 = row0 + r0;
  v.rows = n;
  v.part = true;
  return v;
}

Weight Weight::cols_part(int64_t c0, int64_t n) const {
  if (c0 == 0 && n == cols) return *this;
  Weight v = *this;
  v.ld = ld ? ld : cols;
  v.col0 = col0 + c0;
  v.cols = n;
  v.part = true;
  return v;
}

void Weight::dequant_row(int64_t r, int64_t c0, int64_t n, float *out) const {
  r += row0;  // from here on, coordinates in the whole tensor
  c0 += col0;
  const int64_t off = r * (ld ? ld : cols) + c0;
  switch (dtype) {
    case DType::F8_E4M3: {
      const uint8_t *w = data + off;
      const float *srow = scale + (r / 128) * scale_cols;
      int64_t j = 0;
      while (j < n) {
        int64_t c = c0 + j, blk_end = std::min<int64_t>(n, j + (128 - c % 128));
        const float s = srow[c / 128];
        for (; j < blk_end; j++) out[j] = kFp8E4m3ToF32[w[j]] * s;
      }
      break;
    }
    case DType::BF16: {
      const uint16_t *w = reinterpret_cast<const uint16_t *>(data) + off;
      for (int64_t j = 0; j < n; j++) out[j] = bf16_to_f32(w[j]);
      break;
    }
    case DType::F16: {
      const uint16_t *w = reinterpret_cast<const uint16_t *>(data) + off;
      for (int64_t j = 0; j < n; j++) out[j] = f16_to_f32(w[j]);
      break;
    }
    case DType::F32: {
      const float *w = reinterpret_cast<const float *>(data) + off;
      for (int64_t j = 0; j < n; j++) out[j] = w[j];
      break;
    }
    default: break;  // bind_weights admits no other dtype
  }
}

const std::string &Weight::name() const {
  static const std::string unnamed = "(unnamed)";
  return info ? info->name : unnamed;
}

float Weight::at(int64_t i) const {
  float v;
  dequant_row(0, i, 1, &v);
  return v;
}

void for_each_weight(const LayerWeights &L, const std::function<void(const Weight &)> &fn) {
  for (const Weight *w : {&L.input_norm, &L.post_norm, &L.q_a, &L.q_a_norm, &L.q_b, &L.q, &L.kv_a, &L.kv_a_norm, &L.kv_b,
                          &L.o, &L.router, &L.router_bias, &L.mtp_embed, &L.enorm, &L.hnorm, &L.eh_proj, &L.head_norm,
                          &L.head, &L.dense.gate, &L.dense.up, &L.dense.down, &L.shared.gate, &L.shared.up, &L.shared.down})
    fn(*w);
  for (const FfnWeights &e : L.experts) {
    fn(e.gate);
    fn(e.up);
    fn(e.down);
  }
}

std::string fp8_block_cut(const Weight &w) {
  if (w.dtype != DType::F8_E4M3 || (w.row0 % 128 == 0 && w.col0 % 128 == 0)) return "";
  const bool rows = w.row0 % 128 != 0;
  const int64_t a = rows ? w.row0 : w.col0, n = rows ? w.rows : w.cols;
  return w.name() + ": " + (rows ? "rows [" : "columns [") + std::to_string(a) + ", " + std::to_string(a + n) +
         ") start inside a 128-" + (rows ? "row" : "column") + " FP8 scale block";
}

PackedWeight pack_weight(const Weight &w) {
  if (const std::string cut = fp8_block_cut(w); !cut.empty())
    fail(DSRT_ERR_UNSUPPORTED, cut + ": a device copy of this part would need two scales per block (choose a split "
                               "that cuts FP8 weights at multiples of 128)");
  PackedWeight p;
  const size_t es = dtype_size(w.dtype), row_bytes = size_t(w.cols) * es;
  const int64_t ld = w.ld ? w.ld : w.cols;
  p.data.resize(size_t(w.rows) * row_bytes);
  for (int64_t r = 0; r < w.rows; r++)
    std::memcpy(p.data.data() + size_t(r) * row_bytes, w.data + (size_t((w.row0 + r) * ld + w.col0)) * es, row_bytes);
  if (w.dtype == DType::F8_E4M3) {
    const int64_t brows = (w.rows + 127) / 128, b0 = w.row0 / 128, c0 = w.col0 / 128;
    p.scale_cols = (w.cols + 127) / 128;
    p.scale.resize(size_t(brows * p.scale_cols));
    for (int64_t r = 0; r < brows; r++)
      std::memcpy(p.scale.data() + r * p.scale_cols, w.scale + (b0 + r) * w.scale_cols + c0,
                  size_t(p.scale_cols) * sizeof(float));
  }
  return p;
}

std::string layer_prefix(const ModelConfig &cfg, int64_t layer) {
  return cfg.tensor_prefix + "model.layers." + std::to_string(layer) + ".";
}

namespace {

enum class Kind { Linear, Vector, Table, Bias };

struct Binder {
  const ModelConfig &cfg;
  const Checkpoint &ckpt;
  const BindOptions &opt;
  ModelWeights &mw;
  std::set<std::string> used;
  uint64_t done = 0, total = 0;

  std::string where(const TensorInfo *t) const { return *t->file + ": tensor " + t->name; }

  std::string shape_str(const std::vector<int64_t> &s) const {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
  }

  void bind(Weight &w, const std::string &name, Kind kind, int64_t rows, int64_t cols) {
    const TensorInfo *t = ckpt.find(name);
    if (!t) failf(DSRT_ERR_FORMAT, "tensor ", name, " is missing from the checkpoint (the config implies it)");
    used.insert(name);
    std::vector<int64_t> want = (kind == Kind::Vector || kind == Kind::Bias) ? std::vector<int64_t>{rows}
                                                                               : std::vector<int64_t>{rows, cols};
    if (t->shape != want)
      failf(DSRT_ERR_FORMAT, where(t), " has shape ", shape_str(t->shape), ", the config implies ", shape_str(want));
    bool ok = false;
    switch (t->dtype) {
      case DType::F8_E4M3: ok = kind == Kind::Linear; break;
      case DType::BF16:
      case DType::F16:
      case DType::F32: ok = true; break;
      default: ok = false;
    }
    if (!ok) failf(DSRT_ERR_FORMAT, where(t), " has dtype ", dtype_name(t->dtype), ", not allowed for this tensor");
    w.info = t;
    w.dtype = t->dtype;
    w.rows = rows;
    w.cols = (kind == Kind::Vector || kind == Kind::Bias) ? 1 : cols;
    w.data = t->data;
    mw.bytes += t->nbytes;
    if (t->dtype == DType::F8_E4M3) {
      mw.fp8 = true;
      const std::string sname = name + "_scale_inv";
      const TensorInfo *s = ckpt.find(sname);
      if (!s) failf(DSRT_ERR_FORMAT, where(t), " is FP8 but its scale tensor ", sname, " is missing");
      used.insert(sname);
      std::vector<int64_t> sw = {(rows + 127) / 128, (cols + 127) / 128};
      if (s->shape != sw)
        failf(DSRT_ERR_FORMAT, where(s), " has shape ", shape_str(s->shape), ", FP8 weight ", name, " ",
              shape_str(t->shape), " needs ", shape_str(sw));
      if (s->dtype != DType::F32) failf(DSRT_ERR_FORMAT, where(s), " has dtype ", dtype_name(s->dtype), ", must be F32");
      if (reinterpret_cast<uintptr_t>(s->data) % alignof(float))
        failf(DSRT_ERR_UNSUPPORTED, where(s), " is not 4-byte aligned in its file");
      w.scale = reinterpret_cast<const float *>(s->data);
      w.scale_cols = sw[1];
      done++;  // the scale tensor is one of the checkpoint's tensors that progress counts
      mw.bytes += s->nbytes;
      if (opt.validate_scales) {
        const int64_t n = sw[0] * sw[1];
        for (int64_t i = 0; i < n; i++) {
          float v = w.scale[i];
          if (!std::isfinite(v) || v <= 0.0f)
            failf(DSRT_ERR_FORMAT, where(s), " block [", i / sw[1], ", ", i % sw[1], "] is ", std::to_string(v),
                  " (scales must be finite and > 0)");
        }
      }
    } else if (reinterpret_cast<uintptr_t>(t->data) % dtype_size(t->dtype)) {
      failf(DSRT_ERR_UNSUPPORTED, where(t), " is not aligned to its element size in its file");
    }
    mw.all.push_back(&w);
    if (opt.progress && !opt.progress(++done, total, opt.user)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  }

  void ffn(FfnWeights &f, const std::string &p, int64_t inter) {
    const int64_t H = cfg.hidden_size;
    bind(f.gate, p + "gate_proj.weight", Kind::Linear, inter, H);
    bind(f.up, p + "up_proj.weight", Kind::Linear, inter, H);
    bind(f.down, p + "down_proj.weight", Kind::Linear, H, inter);
  }

  void layer(LayerWeights &L, int64_t idx, bool mtp) {
    const int64_t H = cfg.hidden_size, nh = cfg.num_attention_heads;
    const std::string p = layer_prefix(cfg, idx);
    L.index = idx;
    L.is_mtp = mtp;
    bind(L.input_norm, p + "input_layernorm.weight", Kind::Vector, H, 1);
    bind(L.post_norm, p + "post_attention_layernorm.weight", Kind::Vector, H, 1);
    const std::string a = p + "self_attn.";
    if (cfg.q_lora_rank > 0) {
      bind(L.q_a, a + "q_a_proj.weight", Kind::Linear, cfg.q_lora_rank, H);
      bind(L.q_a_norm, a + "q_a_layernorm.weight", Kind::Vector, cfg.q_lora_rank, 1);
      bind(L.q_b, a + "q_b_proj.weight", Kind::Linear, nh * cfg.qk_head_dim(), cfg.q_lora_rank);
    } else {
      bind(L.q, a + "q_proj.weight", Kind::Linear, nh * cfg.qk_head_dim(), H);
    }
    bind(L.kv_a, a + "kv_a_proj_with_mqa.weight", Kind::Linear, cfg.kv_cache_width(), H);
    bind(L.kv_a_norm, a + "kv_a_layernorm.weight", Kind::Vector, cfg.kv_lora_rank, 1);
    bind(L.kv_b, a + "kv_b_proj.weight", Kind::Linear, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank);
    bind(L.o, a + "o_proj.weight", Kind::Linear, H, nh * cfg.v_head_dim);
    L.moe = cfg.is_moe_layer(idx);
    const std::string m = p + "mlp.";
    if (L.moe) {
      bind(L.router, m + "gate.weight", Kind::Linear, cfg.n_routed_experts, H);
      if (L.router.dtype == DType::F8_E4M3) failf(DSRT_ERR_FORMAT, where(L.router.info), " must not be FP8");
      if (cfg.has_router_bias()) bind(L.router_bias, m + "gate.e_score_correction_bias", Kind::Bias, cfg.n_routed_experts, 1);
      L.experts.resize(size_t(cfg.n_routed_experts));
      for (int64_t e = 0; e < cfg.n_routed_experts; e++)
        ffn(L.experts[size_t(e)], m + "experts." + std::to_string(e) + ".", cfg.moe_intermediate_size);
      if (cfg.n_shared_experts > 0) ffn(L.shared, m + "shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts);
    } else {
      ffn(L.dense, m, cfg.intermediate_size);
    }
    if (mtp) {
      bind(L.mtp_embed, p + "embed_tokens.weight", Kind::Table, cfg.vocab_size, H);
      bind(L.enorm, p + "enorm.weight", Kind::Vector, H, 1);
      bind(L.hnorm, p + "hnorm.weight", Kind::Vector, H, 1);
      bind(L.eh_proj, p + "eh_proj.weight", Kind::Linear, H, 2 * H);
      bind(L.head_norm, p + "shared_head.norm.weight", Kind::Vector, H, 1);
      bind(L.head, p + "shared_head.head.weight", Kind::Table, cfg.vocab_size, H);
    }
  }
};

}  // namespace

void bind_weights(const ModelConfig &cfg, const Checkpoint &ckpt, const BindOptions &opt, ModelWeights &mw) {
  Binder b{cfg, ckpt, opt, mw, {}, 0, 0};
  b.total = ckpt.all().size();
  const int64_t H = cfg.hidden_size;
  const std::string top = cfg.tensor_prefix;
  b.bind(mw.embed, top + "model.embed_tokens.weight", Kind::Table, cfg.vocab_size, H);
  b.bind(mw.norm, top + "model.norm.weight", Kind::Vector, H, 1);
  mw.layers.resize(size_t(cfg.num_hidden_layers));
  for (int64_t l = 0; l < cfg.num_hidden_layers; l++) b.layer(mw.layers[size_t(l)], l, false);
  if (cfg.tie_word_embeddings && !ckpt.find(top + "lm_head.weight")) {
    mw.head = mw.embed;
  } else {
    b.bind(mw.head, top + "lm_head.weight", Kind::Table, cfg.vocab_size, H);
  }
  mw.mtp.reserve(size_t(cfg.num_nextn_predict_layers));  // Weight pointers in mw.all must stay valid
  // MTP layers: loaded when present (and wanted); a checkpoint may omit them even if the config counts them.
  for (int64_t j = 0; j < cfg.num_nextn_predict_layers; j++) {
    int64_t idx = cfg.num_hidden_layers + j;
    const std::string p = layer_prefix(cfg, idx);
    bool present = ckpt.find(p + "eh_proj.weight") != nullptr;
    if (!present || !opt.load_mtp) {
      if (present) {  // skipped on purpose: its tensors are known, not "unknown"
        for (auto &[name, _] : ckpt.all())
          if (name.rfind(p, 0) == 0) b.used.insert(name);
      }
      continue;
    }
    mw.mtp.emplace_back();
    b.layer(mw.mtp.back(), idx, true);
  }
  for (auto &[name, _] : ckpt.all())
    if (!b.used.count(name)) mw.unknown.push_back(name);
  for (size_t i = 0; i < mw.all.size(); i++) mw.all[i]->id = int32_t(i);
  // Skipped MTP layers and unknown tensors are not bound: the stage still ends at total.
  if (opt.progress && b.done < b.total && !opt.progress(b.total, b.total, opt.user))
    fail(DSRT_ERR_CANCELLED, "model load cancelled");
}

}  // namespace dsrt
