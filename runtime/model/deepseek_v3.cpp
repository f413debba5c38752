// The whole model math in one place. Shapes per token: H hidden, nh heads, dn/dr/dv head dims, dc latent.
// With tensor/expert parallelism (dist/mapping.h) each rank runs this on its shard: nh and the FFN columns
// are its share, and the lines marked "comm" join the ranks' partial results. With data-parallel attention
// each rank runs its own sequences (model/data_parallel.h) and its MoE layers exchange the routed rows.
#include "model/deepseek_v3.h"

#include "core/status.h"
#include "model/data_parallel.h"

namespace dsrt {
namespace {

using Group = Communicator::Group;

struct Pass {
  const ModelShard &m;
  Backend &be;
  Communicator &comm;
  AttentionPolicy policy;
};

Tensor linear(Backend &be, Tensor x, const Weight &w) {
  Tensor y = be.alloc(x.rows, w.rows);
  be.linear(x, w, y);
  return y;
}

// SwiGLU: down(silu(gate x) * up x); with a split intermediate dimension, a partial sum.
Tensor ffn(Backend &be, Tensor x, const FfnWeights &f) {
  Tensor g = linear(be, x, f.gate), u = linear(be, x, f.up);
  be.silu_mul(g, u, g);
  return linear(be, g, f.down);
}

// MLA (spec §3.3-3.9): queries from q_a/q_b (or q_proj), the latent c_kv + k_pe of the new tokens into the
// paged cache, attention over the cache, o_proj.
Tensor attention(const Pass &p, const LayerWeights &L, Tensor x, const Batch &b) {
  const ModelConfig &c = p.m.cfg();
  Backend &be = p.be;
  const int64_t nh = p.m.mla.n_heads, qk = c.qk_head_dim();
  Tensor q;
  if (L.q_a) {
    Tensor cq = linear(be, x, L.q_a);
    be.rms_norm(cq, L.q_a_norm, c.rms_norm_eps, cq);
    q = linear(be, cq, L.q_b);
  } else {
    q = linear(be, x, L.q);
  }
  be.rope(q, nh, qk, c.qk_nope_head_dim, p.m.model->rope, b);
  Tensor kv = linear(be, x, L.kv_a);
  be.mla_cache_write(L.index, kv, L.kv_a_norm, c.rms_norm_eps, p.m.model->rope, b);

  Tensor o = be.alloc(x.rows, nh * c.v_head_dim);
  if (p.policy == AttentionPolicy::Auto) {
    // Prefill chunks decompress the latents (fewer FLOPs per key); decode steps use the absorbed form, also
    // for two tokens (MTP verification: the same numbers per row as plain decode).
    std::vector<SeqSlice> naive, absorbed;
    for (const SeqSlice &s : b.seqs) (s.n_new > 2 ? naive : absorbed).push_back(s);
    if (!naive.empty()) be.mla_attention(L.index, q, L.kv_b, p.m.mla, b.with_seqs(naive), AttnForm::Naive, o);
    if (!absorbed.empty()) be.mla_attention(L.index, q, L.kv_b, p.m.mla, b.with_seqs(absorbed), AttnForm::Absorbed, o);
  } else {
    be.mla_attention(L.index, q, L.kv_b, p.m.mla, b,
                     p.policy == AttentionPolicy::Naive ? AttnForm::Naive : AttnForm::Absorbed, o);
  }
  Tensor y = linear(be, o, L.o);
  p.comm.all_reduce_sum(y, Group::Tensor);  // comm: o_proj is row-parallel over the heads
  return y;
}

// DeepSeekMoE (spec §4): routed experts weighted by the router, plus the shared experts.
Tensor moe(const Pass &p, const LayerWeights &L, Tensor x) {
  Backend &be = p.be;
  const int64_t K = p.m.cfg().num_experts_per_tok;
  Tensor ids = be.alloc(x.rows, K, DType::I32), wts = be.alloc(x.rows, K);
  be.moe_route(x, L.router, L.router_bias, p.m.model->router, ids, wts);
  // dispatch: every rank holds every token, so it runs its own experts on the rows routed to them
  Tensor y = be.alloc(x.rows, x.cols);
  be.moe_experts(x, L.experts, ids, wts, y);
  if (L.shared.gate) be.add(y, ffn(be, x, L.shared));
  p.comm.all_reduce_sum(y, Group::World);  // comm: combine the experts' (and shared experts') partial sums
  return y;
}

// DeepSeekMoE with data-parallel attention: this rank routes its own rows, sends each to the ranks owning its
// routed experts (which sum their experts' weighted outputs, skipping the others), and adds up the partial
// sums that come back; the shared experts run here, whole.
Tensor moe_dispatched(const Pass &p, const LayerWeights &L, Tensor x) {
  Backend &be = p.be;
  const ModelConfig &c = p.m.cfg();
  const int64_t K = c.num_experts_per_tok;
  Tensor ids = be.alloc(x.rows, K, DType::I32), wts = be.alloc(x.rows, K);
  if (x.rows) be.moe_route(x, L.router, L.router_bias, p.m.model->router, ids, wts);
  const RoutedRows in = dispatch_routed_rows(be, p.comm, p.m.map, x, ids, wts, L.experts);  // comm: dispatch
  Tensor partial = be.alloc(in.x.rows, x.cols);
  if (in.x.rows) be.moe_experts(in.x, L.experts, in.ids, in.weights, partial);
  Tensor y = combine_routed_rows(be, p.comm, in, partial, x.rows);  // comm: combine, the partial sums come back
  if (x.rows && L.shared.gate) be.add(y, ffn(be, x, L.shared));
  return y;
}

Tensor dense_ffn(const Pass &p, const LayerWeights &L, Tensor x) {
  Tensor y = ffn(p.be, x, L.dense);
  p.comm.all_reduce_sum(y, Group::Tensor);  // comm: down_proj is row-parallel over the intermediate columns
  return y;
}

// One decoder layer: pre-norm MLA and FFN (dense or MoE) blocks, each added to the residual stream h.
void decoder_layer(const Pass &p, const LayerWeights &L, Tensor h, const Batch &b) {
  const ModelConfig &c = p.m.cfg();
  Backend &be = p.be;
  const uint64_t mark = be.scratch_mark();  // a layer's temporaries die with it
  const bool dp = p.m.map.attention_data_parallel();
  if (h.rows == 0) {  // data-parallel attention, no sequence on this rank this step: it still serves its experts
    if (L.moe && dp) moe_dispatched(p, L, h);
    be.scratch_release(mark);
    return;
  }
  Tensor xn = be.alloc(h.rows, h.cols);
  be.rms_norm(h, L.input_norm, c.rms_norm_eps, xn);
  be.add(h, attention(p, L, xn, b));
  be.rms_norm(h, L.post_norm, c.rms_norm_eps, xn);
  be.add(h, !L.moe ? dense_ffn(p, L, xn) : dp ? moe_dispatched(p, L, xn) : moe(p, L, xn));
  be.scratch_release(mark);
}

// head(norm(x[rows])) to the host (when out is not null); returns norm(x[rows]).
Tensor logits_of_rows(const Pass &p, Tensor x, const std::vector<int32_t> &rows, const Weight *norm,
                      const Weight &head, float *out, Tensor *logits_out = nullptr) {
  Backend &be = p.be;
  const int64_t R = int64_t(rows.size());
  Tensor sel = be.alloc(R, x.cols);
  be.gather_rows(x, rows, sel);
  if (norm) be.rms_norm(sel, *norm, p.m.cfg().rms_norm_eps, sel);
  Tensor logits = linear(be, sel, head);
  if (p.m.vocab.size() != p.m.cfg().vocab_size) {
    Tensor all = be.alloc(R, p.m.cfg().vocab_size);
    p.comm.all_gather_cols(logits, all, Group::Tensor);  // comm: the head is vocabulary-parallel
    logits = all;
  }
  if (out) be.to_host(logits, out);
  if (logits_out) *logits_out = logits;
  return sel;
}

}  // namespace

void forward(const ModelShard &m, Backend &be, Communicator &comm, const Batch &b,
             const std::vector<int32_t> &logit_rows, AttentionPolicy policy, float *logits_out, Tensor *hidden_out,
             Tensor *logits_tensor_out) {
  const ModelConfig &c = m.cfg();
  const Pass p{m, be, comm, policy};
  be.begin_step();
  if (m.map.attention_data_parallel()) {
    if (hidden_out || logits_tensor_out)
      fail(DSRT_ERR_UNSUPPORTED, "data-parallel attention keeps no hidden states or device logits for the caller");
    const RankBatch r = rank_batch(b, logit_rows, m.map.rank, m.map.world);  // this rank's sequences
    Tensor h = be.alloc(r.batch.n_tokens(), c.hidden_size);
    if (h.rows) be.embed(m.embed, r.batch, h);
    for (const LayerWeights &L : m.layers) decoder_layer(p, L, h, r.batch);
    Tensor mine = be.alloc(0, c.vocab_size);
    if (!r.logit_rows.empty()) logits_of_rows(p, h, r.logit_rows, &m.norm, m.head, nullptr, &mine);
    Tensor all = gather_logit_rows(be, comm, r, mine);  // comm: the ranks' logit rows to rank 0, in the step's order
    if (all.rows && logits_out) be.to_host(all, logits_out);
    return;
  }
  Tensor h = be.alloc(b.n_tokens(), c.hidden_size);
  be.embed(m.embed, b, h);
  for (const LayerWeights &L : m.layers) decoder_layer(p, L, h, b);
  if (hidden_out) {  // every row's final hidden state, normed: what the MTP module reads
    be.rms_norm(h, m.norm, c.rms_norm_eps, h);
    *hidden_out = h;
    if (!logit_rows.empty()) logits_of_rows(p, h, logit_rows, nullptr, m.head, logits_out, logits_tensor_out);
    return;
  }
  if (!logit_rows.empty()) logits_of_rows(p, h, logit_rows, &m.norm, m.head, logits_out, logits_tensor_out);
}

// MTP (spec §6): z = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]), one decoder layer with its own cache
// layer, logits = head(head_norm(.)). The concatenation is a row interleave: rows e_0, h_0, e_1, h_1, ... of
// an [2T, H] tensor are the rows of [T, 2H].
void mtp_forward(const ModelShard &m, Backend &be, Communicator &comm, const Batch &b, Tensor hidden,
                 const std::vector<int32_t> &logit_rows, AttentionPolicy policy, float *logits_out, Tensor *normed_out) {
  const ModelConfig &c = m.cfg();
  const Pass p{m, be, comm, policy};
  if (m.map.attention_data_parallel()) fail(DSRT_ERR_UNSUPPORTED, "MTP drafts with data-parallel attention");
  const LayerWeights &L = m.mtp.at(0);
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
  Tensor h = linear(be, cat.reshaped(T, 2 * H), L.eh_proj);
  decoder_layer(p, L, h, b);
  if (logit_rows.empty()) return;
  Tensor normed = logits_of_rows(p, h, logit_rows, &L.head_norm, L.head, logits_out);
  if (normed_out) *normed_out = normed;
}

void forward(const Model &m, Backend &be, const Batch &b, const std::vector<int32_t> &logit_rows,
             AttentionPolicy policy, float *logits_out, Tensor *hidden_out) {
  auto comm = make_single_communicator();
  forward(ModelShard::bind(m, {}), be, *comm, b, logit_rows, policy, logits_out, hidden_out);
}

void mtp_forward(const Model &m, Backend &be, const Batch &b, Tensor hidden, const std::vector<int32_t> &logit_rows,
                 AttentionPolicy policy, float *logits_out, Tensor *normed_out) {
  auto comm = make_single_communicator();
  mtp_forward(ModelShard::bind(m, {}), be, *comm, b, hidden, logit_rows, policy, logits_out, normed_out);
}

}  // namespace dsrt
