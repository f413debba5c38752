// The whole model math in one place. Shapes per token: H hidden, nh heads, dn/dr/dv head dims, dc latent.
#include "model/deepseek_v3.h"

namespace dsrt {
namespace {

Tensor linear(Backend &be, Tensor x, const Weight &w) {
  Tensor y = be.alloc(x.rows, w.rows);
  be.linear(x, w, y);
  return y;
}

// SwiGLU: down(silu(gate x) * up x)
Tensor ffn(Backend &be, Tensor x, const FfnWeights &f) {
  Tensor g = linear(be, x, f.gate), u = linear(be, x, f.up);
  be.silu_mul(g, u, g);
  return linear(be, g, f.down);
}

// MLA (spec §3.3-3.9): queries from q_a/q_b (or q_proj), the latent c_kv + k_pe of the new tokens into the
// paged cache, attention over the cache, o_proj.
Tensor attention(const Model &m, Backend &be, const LayerWeights &L, Tensor x, const Batch &b,
                 AttentionPolicy policy) {
  const ModelConfig &c = m.cfg;
  const int64_t nh = c.num_attention_heads, qk = c.qk_head_dim();
  Tensor q;
  if (L.q_a) {
    Tensor cq = linear(be, x, L.q_a);
    be.rms_norm(cq, L.q_a_norm, c.rms_norm_eps, cq);
    q = linear(be, cq, L.q_b);
  } else {
    q = linear(be, x, L.q);
  }
  be.rope(q, nh, qk, c.qk_nope_head_dim, m.rope, b);
  Tensor kv = linear(be, x, L.kv_a);
  be.mla_cache_write(L.index, kv, L.kv_a_norm, c.rms_norm_eps, m.rope, b);

  Tensor o = be.alloc(x.rows, nh * c.v_head_dim);
  if (policy == AttentionPolicy::Auto) {
    // Prefill chunks decompress the latents (fewer FLOPs per key); decode steps use the absorbed form, also
    // for two tokens (MTP verification: the same numbers per row as plain decode).
    Batch naive = b, absorbed = b;
    naive.seqs.clear();
    absorbed.seqs.clear();
    for (const SeqSlice &s : b.seqs) (s.n_new > 2 ? naive : absorbed).seqs.push_back(s);
    if (!naive.seqs.empty()) be.mla_attention(L.index, q, L.kv_b, m.mla, naive, AttnForm::Naive, o);
    if (!absorbed.seqs.empty()) be.mla_attention(L.index, q, L.kv_b, m.mla, absorbed, AttnForm::Absorbed, o);
  } else {
    be.mla_attention(L.index, q, L.kv_b, m.mla, b,
                     policy == AttentionPolicy::Naive ? AttnForm::Naive : AttnForm::Absorbed, o);
  }
  return linear(be, o, L.o);
}

// DeepSeekMoE (spec §4): routed experts weighted by the router, plus the shared experts.
Tensor moe(const Model &m, Backend &be, const LayerWeights &L, Tensor x) {
  const int64_t K = m.cfg.num_experts_per_tok;
  Tensor ids = be.alloc(x.rows, K, DType::I32), wts = be.alloc(x.rows, K);
  be.moe_route(x, L.router, L.router_bias, m.router, ids, wts);
  Tensor y = be.alloc(x.rows, x.cols);
  be.moe_experts(x, L.experts, ids, wts, y);
  if (L.shared.gate) be.add(y, ffn(be, x, L.shared));
  return y;
}

// One decoder layer: pre-norm MLA and FFN (dense or MoE) blocks, each added to the residual stream h.
void decoder_layer(const Model &m, Backend &be, const LayerWeights &L, Tensor h, const Batch &b,
                   AttentionPolicy policy) {
  const ModelConfig &c = m.cfg;
  const uint64_t mark = be.scratch_mark();  // a layer's temporaries die with it
  Tensor xn = be.alloc(h.rows, h.cols);
  be.rms_norm(h, L.input_norm, c.rms_norm_eps, xn);
  be.add(h, attention(m, be, L, xn, b, policy));
  be.rms_norm(h, L.post_norm, c.rms_norm_eps, xn);
  be.add(h, L.moe ? moe(m, be, L, xn) : ffn(be, xn, L.dense));
  be.scratch_release(mark);
}

// head(norm(x[rows])) to the host; returns norm(x[rows])
Tensor logits_of_rows(Backend &be, Tensor x, const std::vector<int32_t> &rows, const Weight *norm, float eps,
                      const Weight &head, float *out) {
  Tensor sel = be.alloc(int64_t(rows.size()), x.cols);
  be.gather_rows(x, rows, sel);
  if (norm) be.rms_norm(sel, *norm, eps, sel);
  be.to_host(linear(be, sel, head), out);
  return sel;
}

}  // namespace

void forward(const Model &m, Backend &be, const Batch &b, const std::vector<int32_t> &logit_rows,
             AttentionPolicy policy, float *logits_out, Tensor *hidden_out) {
  const ModelConfig &c = m.cfg;
  be.begin_step();
  Tensor h = be.alloc(b.n_tokens(), c.hidden_size);
  be.embed(m.w.embed, b, h);
  for (const LayerWeights &L : m.w.layers) decoder_layer(m, be, L, h, b, policy);
  if (hidden_out) {  // every row's final hidden state, normed: what the MTP module reads
    be.rms_norm(h, m.w.norm, c.rms_norm_eps, h);
    *hidden_out = h;
    if (!logit_rows.empty()) logits_of_rows(be, h, logit_rows, nullptr, c.rms_norm_eps, m.w.head, logits_out);
    return;
  }
  if (!logit_rows.empty()) logits_of_rows(be, h, logit_rows, &m.w.norm, c.rms_norm_eps, m.w.head, logits_out);
}

// MTP (spec §6): z = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]), one decoder layer with its own cache
// layer, logits = head(head_norm(.)). The concatenation is a row interleave: rows e_0, h_0, e_1, h_1, ... of
// an [2T, H] tensor are the rows of [T, 2H].
void mtp_forward(const Model &m, Backend &be, const Batch &b, Tensor hidden, const std::vector<int32_t> &logit_rows,
                 AttentionPolicy policy, float *logits_out, Tensor *normed_out) {
  const ModelConfig &c = m.cfg;
  const LayerWeights &L = m.w.mtp.at(0);
  const int64_t T = b.n_tokens(), H = c.hidden_size;
  Tensor stacked = be.alloc(2 * T, H);
  Tensor e = stacked.rows_view(0, T), hn = stacked.rows_view(T, T);
  be.embed(L.mtp_embed, b, e);
  be.rms_norm(e, L.enorm, c.rms_norm_eps, e);
  be.rms_norm(hidden, L.hnorm, c.rms_norm_eps, hn);
  std::vector<int32_t> interleave(size_t(2 * T));
  for (int64_t t = 0; t < T; t++) {
    interleave[size_t(2 * t)] = int32_t(t);
    interleave[size_t(2 * t + 1)] = int32_t(T + t);
  }
  Tensor cat = be.alloc(2 * T, H);
  be.gather_rows(stacked, interleave, cat);
  Tensor h = linear(be, Tensor{cat.data, cat.dtype, T, 2 * H}, L.eh_proj);
  decoder_layer(m, be, L, h, b, policy);
  if (logit_rows.empty()) return;
  Tensor normed = logits_of_rows(be, h, logit_rows, &L.head_norm, c.rms_norm_eps, L.head, logits_out);
  if (normed_out) *normed_out = normed;
}

}  // namespace dsrt
