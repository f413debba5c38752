#include "model/shard.h"

namespace dsrt {
namespace {

// Column-parallel: the rows of W (its outputs) are split; row-parallel: its columns (inputs).
Weight out_part(const Weight &w, Range r) { return w ? w.rows_part(r.begin, r.size()) : w; }
Weight in_part(const Weight &w, Range r) { return w ? w.cols_part(r.begin, r.size()) : w; }

// SwiGLU split along its intermediate dimension: gate/up column-parallel, down row-parallel.
FfnWeights ffn_part(const FfnWeights &f, Range inter) {
  return {out_part(f.gate, inter), out_part(f.up, inter), in_part(f.down, inter)};
}

LayerWeights layer_part(const LayerWeights &L, const ModelConfig &c, const Mapping &map) {
  LayerWeights s = L;
  const Range heads = map.heads(c.num_attention_heads);
  const int64_t qk = c.qk_head_dim(), kvw = c.qk_nope_head_dim + c.v_head_dim;
  s.q_b = out_part(L.q_b, {heads.begin * qk, heads.end * qk});
  s.q = out_part(L.q, {heads.begin * qk, heads.end * qk});
  s.kv_b = out_part(L.kv_b, {heads.begin * kvw, heads.end * kvw});
  s.o = in_part(L.o, {heads.begin * c.v_head_dim, heads.end * c.v_head_dim});
  if (!L.moe) {
    if (L.dense.gate) s.dense = ffn_part(L.dense, map.columns(L.dense.gate.rows));
  } else {
    const Range mine = map.experts(int64_t(L.experts.size()));
    for (size_t e = 0; e < L.experts.size(); e++)
      s.experts[e] = mine.contains(int64_t(e)) ? ffn_part(L.experts[e], map.columns(L.experts[e].gate.rows)) : FfnWeights{};
    // The shared experts run in the first expert group only: their partial sums join the routed ones in the
    // world all-reduce, which would count them once per group otherwise. With data-parallel attention every
    // rank runs them whole on its own tokens.
    s.shared = L.shared.gate && (map.ep_rank() == 0 || map.dp_attention) ? ffn_part(L.shared, map.columns(L.shared.gate.rows)) : FfnWeights{};
  }
  if (L.is_mtp && L.head) s.head = out_part(L.head, map.columns(L.head.rows));
  return s;
}

}  // namespace

ModelShard ModelShard::bind(const Model &m, const Mapping &map) {
  const ModelConfig &c = m.cfg;
  map.check_divides(c);
  ModelShard s;
  s.model = &m;
  s.map = map;
  s.embed = m.w.embed;
  s.norm = m.w.norm;
  s.vocab = map.columns(m.w.head.rows);
  s.head = out_part(m.w.head, s.vocab);
  for (const LayerWeights &L : m.w.layers) s.layers.push_back(layer_part(L, c, map));
  for (const LayerWeights &L : m.w.mtp) s.mtp.push_back(layer_part(L, c, map));
  s.mla = m.mla;
  s.mla.n_heads = map.heads(c.num_attention_heads).size();
  s.experts = map.experts(c.n_routed_experts);
  return s;
}

std::vector<const Weight *> ModelShard::weights(bool with_mtp) const {
  std::vector<const Weight *> v;
  auto add = [&](const Weight &w) {
    if (w) v.push_back(&w);
  };
  auto add_layer = [&](const LayerWeights &L) { for_each_weight(L, add); };
  add(embed);
  add(norm);
  add(head);
  for (const LayerWeights &L : layers) add_layer(L);
  if (with_mtp)
    for (const LayerWeights &L : mtp) add_layer(L);
  return v;
}

std::string ModelShard::fp8_block_cut() const {
  for (const Weight *w : weights(true))
    if (std::string cut = dsrt::fp8_block_cut(*w); !cut.empty()) return cut;
  return "";
}

}  // namespace dsrt
