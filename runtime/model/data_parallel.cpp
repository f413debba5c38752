#include "model/data_parallel.h"

#include <algorithm>

#include "core/status.h"

namespace dsrt {

RankBatch rank_batch(const Batch &b, const std::vector<int32_t> &logit_rows, int rank, int world) {
  const int64_t P = b.rank_pages;
  if (P <= 0) fail(DSRT_ERR_INTERNAL, "data-parallel attention: the step does not say which rank holds which pages");
  // The rank of every step row (-1 outside every sequence) and its row on that rank.
  std::vector<int32_t> owner(size_t(b.n_tokens()), -1), local(size_t(b.n_tokens()), -1);
  std::vector<int32_t> rows_on(size_t(world), 0);
  RankBatch r;  // (its page ids are the rank's own: r.batch.rank_pages stays 0)
  for (const SeqSlice &s : b.seqs) {
    const int32_t *pages = b.pages_of(s);
    const int32_t home = s.n_pages > 0 ? b.rank_of(pages[0]) : 0;
    for (int32_t k = 0; k < s.n_pages; k++)  // (Step::check refuses this before any rank runs the step)
      if (pages[k] < 0 || b.rank_of(pages[k]) != home)
        failf(DSRT_ERR_INTERNAL, "data-parallel attention: a sequence's pages lie on ranks ", home, " and ", b.rank_of(pages[k]));
    if (home >= world)
      failf(DSRT_ERR_INTERNAL, "data-parallel attention: page ", pages[0], " lies past the pools of ", world, " ranks");
    for (int32_t i = 0; i < s.n_new; i++) {
      owner[size_t(s.row0 + i)] = int32_t(home);
      local[size_t(s.row0 + i)] = rows_on[size_t(home)]++;
    }
    if (home != rank) continue;
    std::vector<int32_t> mine(pages, pages + s.n_pages);
    for (int32_t &p : mine) p -= int32_t(home * P);
    r.batch.add_seq(s.n_new, s.n_past, mine.data(), s.n_pages);
    for (int32_t i = 0; i < s.n_new; i++) {
      r.batch.tokens.push_back(b.tokens[size_t(s.row0 + i)]);
      r.batch.positions.push_back(b.positions[size_t(s.row0 + i)]);
    }
  }
  r.logit_counts.assign(size_t(world), 0);
  for (int32_t row : logit_rows) {
    const int32_t o = owner[size_t(row)];
    if (o < 0) failf(DSRT_ERR_INTERNAL, "data-parallel attention: logit row ", row, " belongs to no sequence");
    if (o == rank) r.logit_rows.push_back(local[size_t(row)]);
    r.logit_counts[size_t(o)]++;
  }
  std::vector<int32_t> next(size_t(world), 0);
  for (int k = 1; k < world; k++) next[size_t(k)] = next[size_t(k - 1)] + int32_t(r.logit_counts[size_t(k - 1)]);
  for (int32_t row : logit_rows) r.logit_order.push_back(next[size_t(owner[size_t(row)])]++);
  return r;
}

ExpertDispatch plan_dispatch(const int32_t *ids, int64_t T, int64_t K, int64_t n_experts, const Mapping &m) {
  const int W = m.world;
  ExpertDispatch d;
  d.send_counts.assign(size_t(W), 0);
  // dest[t]: the ranks token t goes to, ascending.
  std::vector<std::vector<int32_t>> dest{size_t(T)};
  for (int64_t t = 0; t < T; t++) {
    std::vector<int32_t> &to = dest[size_t(t)];
    for (int64_t k = 0; k < K; k++) {
      const int32_t e = ids[t * K + k];
      if (e < 0 || e >= n_experts) failf(DSRT_ERR_INTERNAL, "MoE dispatch: expert id ", e, " of ", n_experts);
      to.push_back(int32_t(m.expert_owner(e, n_experts)));
    }
    std::sort(to.begin(), to.end());
    to.erase(std::unique(to.begin(), to.end()), to.end());
  }
  size_t most = 0;
  for (const auto &to : dest) most = std::max(most, to.size());
  // The j-th destination of token t, in the order rows are sent (rank-major).
  std::vector<std::vector<int32_t>> slot{size_t(T)};
  for (int r = 0; r < W; r++)
    for (int64_t t = 0; t < T; t++)
      if (std::binary_search(dest[size_t(t)].begin(), dest[size_t(t)].end(), r)) {
        slot[size_t(t)].push_back(int32_t(d.send_rows.size()));
        d.send_rows.push_back(int32_t(t));
        d.send_counts[size_t(r)]++;
      }
  const int32_t zero = int32_t(d.send_rows.size());
  d.combine.assign(most, std::vector<int32_t>(size_t(T), zero));
  for (int64_t t = 0; t < T; t++)
    for (size_t j = 0; j < slot[size_t(t)].size(); j++) d.combine[j][size_t(t)] = slot[size_t(t)][j];
  return d;
}

namespace {
using Group = Communicator::Group;

// Every rank's row counts, and whether its experts take FP8 activations: counts[s][r] rows go from rank s to
// rank r; counts[s][W] is 1 when rank s's moe_experts quantises its rows to FP8 given kFp8ActivationMinRows of
// them. Gathered to every rank, so that all decide the rows' format alike.
std::vector<std::vector<int64_t>> exchange_counts(Backend &be, Communicator &comm, const std::vector<int64_t> &send,
                                                  bool takes_fp8) {
  const int64_t W = int64_t(send.size());
  std::vector<int32_t> mine(send.begin(), send.end()), all(size_t(W * (W + 1)));
  mine.push_back(takes_fp8 ? 1 : 0);
  Tensor s = be.alloc(1, W + 1, DType::I32), r = be.alloc(1, W * (W + 1), DType::I32);
  be.from_host(s, mine.data());
  comm.all_gather_cols(s, r, Group::World);
  be.to_host(r, reinterpret_cast<float *>(all.data()));
  comm.check();  // (counts from an aborted exchange would size the buffers below)
  std::vector<std::vector<int64_t>> counts(static_cast<size_t>(W));
  for (int64_t q = 0; q < W; q++) counts[size_t(q)].assign(all.begin() + q * (W + 1), all.begin() + (q + 1) * (W + 1));
  return counts;
}
}  // namespace

Tensor gather_logit_rows(Backend &be, Communicator &comm, const RankBatch &r, Tensor mine) {
  const size_t W = r.logit_counts.size();
  const bool root = comm.mapping().rank == 0;
  std::vector<int64_t> to(W, 0), from(W, 0);
  to[0] = mine.rows;
  int64_t n = 0;
  if (root) from = r.logit_counts;
  for (int64_t k : from) n += k;
  Tensor gathered = be.alloc(n, mine.cols);
  comm.all_to_all_v(mine, to, gathered, from, Group::World);
  if (!root || n == 0) return gathered;
  Tensor ordered = be.alloc(n, mine.cols);
  be.gather_rows(gathered, r.logit_order, ordered);
  return ordered;
}

RoutedRows dispatch_routed_rows(Backend &be, Communicator &comm, const Mapping &m, Tensor x, Tensor ids, Tensor weights,
                                const std::vector<FfnWeights> &experts) {
  const int64_t T = x.rows, H = x.cols, K = ids.cols, W = m.world;
  std::vector<int32_t> ids_h(size_t(T * K));
  std::vector<float> wts_h(size_t(T * K));
  if (T) {
    be.to_host(ids, reinterpret_cast<float *>(ids_h.data()));
    be.to_host(weights, wts_h.data());
  }
  RoutedRows r;
  r.plan = plan_dispatch(ids_h.data(), T, K, int64_t(experts.size()), m);
  const auto counts = exchange_counts(be, comm, r.plan.send_counts, be.moe_takes_fp8(experts, kFp8ActivationMinRows, K));
  // FP8 when every rank's experts take FP8 and every rank that gets rows gets at least kFp8ActivationMinRows
  // (the bound at which moe_experts quantises: it then rounds the rows as they arrive, bit for bit).
  r.fp8 = H % 128 == 0;
  for (int64_t q = 0; q < W; q++) {
    int64_t in = 0;
    for (int64_t s = 0; s < W; s++) in += counts[size_t(s)][size_t(q)];
    if (!counts[size_t(q)][size_t(W)] || (in > 0 && in < kFp8ActivationMinRows)) r.fp8 = false;
  }
  r.from.resize(size_t(W));
  for (int64_t s = 0; s < W; s++) r.from[size_t(s)] = counts[size_t(s)][size_t(m.rank)];
  const int64_t n_out = int64_t(r.plan.send_rows.size());
  int64_t n_in = 0;
  for (int64_t n : r.from) n_in += n;
  Tensor send = be.alloc(n_out, H), send_ids = be.alloc(n_out, K, DType::I32), send_wts = be.alloc(n_out, K);
  if (n_out) {
    be.gather_rows(x, r.plan.send_rows, send);
    std::vector<int32_t> si;
    std::vector<float> sw;
    for (int32_t t : r.plan.send_rows) {  // each row's whole routing: its other ranks' experts are skipped there
      si.insert(si.end(), ids_h.begin() + t * K, ids_h.begin() + (t + 1) * K);
      sw.insert(sw.end(), wts_h.begin() + t * K, wts_h.begin() + (t + 1) * K);
    }
    be.from_host(send_ids, si.data());
    be.from_host(send_wts, sw.data());
  }
  r.x = be.alloc(n_in, H);
  r.ids = be.alloc(n_in, K, DType::I32);
  r.weights = be.alloc(n_in, K);
  if (r.fp8) {  // e4m3 rows and their scales: 1 + 4 / 128 bytes a value instead of 4
    Tensor q = be.alloc(n_out, H, DType::F8_E4M3), qs = be.alloc(n_out, H / 128);
    Tensor rq = be.alloc(n_in, H, DType::F8_E4M3), rs = be.alloc(n_in, H / 128);
    if (n_out) be.quantize_fp8_rows(send, q, qs);
    comm.all_to_all_v(q, r.plan.send_counts, rq, r.from, Group::World);
    comm.all_to_all_v(qs, r.plan.send_counts, rs, r.from, Group::World);
    if (n_in) be.dequantize_fp8_rows(rq, rs, r.x);
  } else {
    comm.all_to_all_v(send, r.plan.send_counts, r.x, r.from, Group::World);
  }
  comm.all_to_all_v(send_ids, r.plan.send_counts, r.ids, r.from, Group::World);
  comm.all_to_all_v(send_wts, r.plan.send_counts, r.weights, r.from, Group::World);
  return r;
}

Tensor combine_routed_rows(Backend &be, Communicator &comm, const RoutedRows &r, Tensor partial, int64_t T) {
  const int64_t H = partial.cols, n_out = int64_t(r.plan.send_rows.size());
  Tensor back = be.alloc(n_out + 1, H);  // the partial sums in send order, then a zero row
  comm.all_to_all_v(partial, r.from, back, r.plan.send_counts, Group::World);
  be.from_host(back.rows_view(n_out, 1), std::vector<float>(size_t(H), 0.0f).data());
  Tensor y = be.alloc(T, H);
  for (size_t j = 0; j < r.plan.combine.size(); j++) {  // y = sum over j of the rows' j-th partial sums
    Tensor part_j = j == 0 ? y : be.alloc(T, H);
    be.gather_rows(back, r.plan.combine[j], part_j);
    if (j > 0) be.add(y, part_j);
  }
  return y;
}

}  // namespace dsrt
