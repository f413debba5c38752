#include "backend/cpu/host_experts.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "backend/cpu/cpu_kernels.h"
#include "core/dtype.h"
#include "core/status.h"

namespace dsrt {
namespace {

constexpr int64_t kBlockRows = 16;   // output rows per work item, as the CPU backend splits FP8 products
constexpr int64_t kBatchRows = 512;  // (token, expert) rows whose activations are held at once (bounds scratch in prefill)
constexpr int64_t kSumCols = 1024;   // columns of a token per work item of the weighted sum

int64_t blocks(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows; }

template <class V>
void grow(V &v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

// The index i with prefix[i] <= k < prefix[i + 1] (prefix ascending, prefix[0] = 0).
size_t find(const std::vector<int64_t> &prefix, int64_t k) {
  return size_t(std::upper_bound(prefix.begin(), prefix.end(), k) - prefix.begin() - 1);
}

void check_shapes(const FfnWeights &f, int64_t H, int32_t e) {
  const int64_t I = f.gate.rows;
  if (f.gate.cols != H || f.up.rows != I || f.up.cols != H || f.down.rows != H || f.down.cols != I)
    failf(DSRT_ERR_INTERNAL, "host experts: expert ", e, " gate [", f.gate.rows, ",", f.gate.cols, "] up [", f.up.rows, ",",
          f.up.cols, "] down [", f.down.rows, ",", f.down.cols, "] for hidden ", H);
}

}  // namespace

HostExperts::HostExperts(int n_threads) : pool_(n_threads) {}

int64_t HostExperts::weight_bytes(const FfnWeights &f) {
  int64_t b = 0;
  for (const Weight *m : {&f.gate, &f.up, &f.down})
    if (*m) b += m->rows * m->cols * int64_t(dtype_size(m->dtype));
  return b;
}

double HostExperts::measure_flops() {
  constexpr int64_t H = 7168, I = 256, E = 8, T = 64;
  std::vector<uint8_t> bytes(size_t(E * 3 * H * I));
  uint64_t r = 0x9e3779b97f4a7c15ull;
  for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
    r ^= r << 13, r ^= r >> 7, r ^= r << 17;
    const uint64_t v = r & 0xf7f7f7f7f7f7f7f7ull;  // exponent <= 14 of 15: never the NaN code
    std::memcpy(&bytes[i], &v, 8);
  }
  const std::vector<float> scale(size_t((H / 128) * ((I + 127) / 128)), 1e-3f);  // enough for either orientation
  auto weight = [&](int64_t e, int m, int64_t rows, int64_t cols) {
    Weight w;
    w.dtype = DType::F8_E4M3;
    w.rows = rows;
    w.cols = cols;
    w.data = bytes.data() + (e * 3 + m) * H * I;
    w.scale = scale.data();
    w.scale_cols = (cols + 127) / 128;
    return w;
  };
  std::vector<FfnWeights> experts(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) experts[size_t(e)] = {weight(e, 0, I, H), weight(e, 1, I, H), weight(e, 2, H, I)};
  std::vector<float> x(size_t(T * H)), w(size_t(T * E), 0.125f), out(size_t(T * H));
  std::vector<int32_t> ids(size_t(T * E));
  for (size_t i = 0; i < x.size(); i++) x[i] = 0.01f * float(i % 17) - 0.08f;
  for (size_t i = 0; i < ids.size(); i++) ids[i] = int32_t(i % E);
  double best = 1e30;
  for (int round = 0; round < 4; round++) {  // the first warms caches and scratch
    const auto t0 = std::chrono::steady_clock::now();
    run(x.data(), T, H, ids.data(), w.data(), E, experts, nullptr, false, out.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (round > 0) best = std::min(best, s);
  }
  return 2.0 * double(E * T * 3 * H * I) / best;
}

void HostExperts::run(const float *x, int64_t T, int64_t H, const int32_t *ids, const float *w, int64_t K,
                      const std::vector<FfnWeights> &experts, const uint8_t *on_cpu, bool fp8_activations, float *out) {
  const int64_t E = int64_t(experts.size());
  auto chosen = [&](int32_t e) { return experts[size_t(e)].gate && (!on_cpu || on_cpu[e]); };
  // (token, expert) slots grouped by expert, each expert's tokens ascending.
  start_.assign(size_t(E + 1), 0);
  for (int64_t i = 0; i < T * K; i++) {
    if (ids[i] < 0 || ids[i] >= E) failf(DSRT_ERR_INTERNAL, "router chose expert ", ids[i]);
    if (chosen(ids[i])) start_[size_t(ids[i]) + 1]++;
  }
  for (int64_t e = 0; e < E; e++) start_[size_t(e + 1)] += start_[size_t(e)];
  grow(slot_tok_, start_[size_t(E)]);
  grow(slot_w_, start_[size_t(E)]);
  cursor_.assign(start_.begin(), start_.end() - 1);
  for (int64_t t = 0; t < T; t++)
    for (int64_t k = 0; k < K; k++) {
      const int32_t e = ids[t * K + k];
      if (!chosen(e)) continue;
      const int64_t s = cursor_[size_t(e)]++;
      slot_tok_[size_t(s)] = int32_t(t);
      slot_w_[size_t(s)] = w[t * K + k];
    }
  pool_.parallel_for(T * H, 1 << 14, [&](int64_t a, int64_t b) { std::fill(out + a, out + b, 0.0f); });

  // Whether x takes FP8 activations follows the experts' dtype and the step's size, never the choice of experts,
  // so that complementary choices add up to the whole (the CPU backend asks any present expert).
  const Weight *any = nullptr;
  for (const FfnWeights &f : experts)
    if (f.gate && !any) any = &f.gate;
  const bool quantise_x = any && cpu::takes_fp8_activations(fp8_activations, T, *any);

  // Batches of pieces in ascending expert order: each token's experts are still added in ascending id.
  last_bytes_ = 0;
  pieces_.clear();
  row_start_.assign(1, 0);
  int64_t hsz = 0;
  auto flush = [&] {
    if (!pieces_.empty()) run_batch(x, T, H, experts, quantise_x, fp8_activations, hsz, out);
    pieces_.clear();
    row_start_.assign(1, 0);
    hsz = 0;
  };
  for (int32_t e = 0; e < int32_t(E); e++) {
    const int64_t s0 = start_[size_t(e)], s1 = start_[size_t(e) + 1];
    if (s0 == s1) continue;
    check_shapes(experts[size_t(e)], H, e);
    last_bytes_ += weight_bytes(experts[size_t(e)]);
    for (int64_t s = s0; s < s1; s += kBatchRows) {
      const int64_t n = std::min(kBatchRows, s1 - s);
      if (row_start_.back() + n > kBatchRows) flush();
      pieces_.push_back({e, s, n, hsz});
      row_start_.push_back(row_start_.back() + n);
      hsz += n * experts[size_t(e)].gate.rows;
    }
  }
  flush();
}

void HostExperts::run_batch(const float *x, int64_t T, int64_t H, const std::vector<FfnWeights> &experts, bool quantise_x,
                            bool fp8_activations, int64_t hsz, float *out) {
  const std::vector<Piece> &p = pieces_;
  const int64_t rows = row_start_.back();
  // The slot of row r of the batch, and the prefix sums of the work items: gate/up blocks (of I_e rows each
  // expert), down blocks (of H rows).
  auto slot = [&](int64_t r, size_t i) { return p[i].slot0 + r - row_start_[i]; };
  up_items_.assign(1, 0);
  down_items_.assign(1, 0);
  for (const Piece &q : p) {
    up_items_.push_back(up_items_.back() + blocks(experts[size_t(q.e)].gate.rows));
    down_items_.push_back(down_items_.back() + blocks(H));
  }
  grow(xs_, rows * H);
  grow(ys_, rows * H);
  grow(hs_, hsz);
  grow(us_, hsz);

  // Inputs: each row its token's x (rounded to FP8 activations row by row, as the GPU quantises a token).
  pool_.parallel_for(rows, 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; r++) {
      const float *src = x + int64_t(slot_tok_[size_t(slot(r, find(row_start_, r)))]) * H;
      if (quantise_x)
        cpu::round_rows_to_fp8(src, 1, H, xs_.data() + r * H);
      else
        std::memcpy(xs_.data() + r * H, src, size_t(H) * sizeof(float));
    }
  });
  // gate and up, 16 rows of each per item, and the SwiGLU of those columns.
  pool_.parallel_for(up_items_.back(), 1, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; it++) {
      const size_t i = find(up_items_, it);
      const FfnWeights &f = experts[size_t(p[i].e)];
      const int64_t I = f.gate.rows, n = p[i].n, r0 = (it - up_items_[i]) * kBlockRows, r1 = std::min(I, r0 + kBlockRows);
      const float *xp = xs_.data() + row_start_[i] * H;
      float *g = hs_.data() + p[i].h0, *u = us_.data() + p[i].h0;
      cpu::matmul_rows(f.gate, xp, n, H, g, I, r0, r1);
      cpu::matmul_rows(f.up, xp, n, H, u, I, r0, r1);
      for (int64_t t = 0; t < n; t++)
        for (int64_t c = r0; c < r1; c++) g[t * I + c] = cpu::silu_mul(g[t * I + c], u[t * I + c]);
    }
  });
  // The SwiGLU output rounded to FP8 activations where the down product takes them.
  pool_.parallel_for(rows, 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; r++) {
      const size_t i = find(row_start_, r);
      const Weight &down = experts[size_t(p[i].e)].down;
      if (!cpu::takes_fp8_activations(fp8_activations, T, down)) continue;
      float *h = hs_.data() + p[i].h0 + (r - row_start_[i]) * down.cols;
      cpu::round_rows_to_fp8(h, 1, down.cols, h);
    }
  });
  // down, 16 rows per item.
  pool_.parallel_for(down_items_.back(), 1, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; it++) {
      const size_t i = find(down_items_, it);
      const Weight &down = experts[size_t(p[i].e)].down;
      const int64_t r0 = (it - down_items_[i]) * kBlockRows, r1 = std::min(H, r0 + kBlockRows);
      cpu::matmul_rows(down, hs_.data() + p[i].h0, p[i].n, down.cols, ys_.data() + row_start_[i] * H, H, r0, r1);
    }
  });

  // The weighted sum: each token's rows in piece order (ascending expert), by a counting sort over tokens.
  tok_start_.assign(size_t(T + 1), 0);
  for (size_t i = 0; i < p.size(); i++)
    for (int64_t j = 0; j < p[i].n; j++) tok_start_[size_t(slot_tok_[size_t(p[i].slot0 + j)]) + 1]++;
  toks_.clear();
  for (int64_t t = 0; t < T; t++) {
    if (tok_start_[size_t(t + 1)]) toks_.push_back(int32_t(t));
    tok_start_[size_t(t + 1)] += tok_start_[size_t(t)];
  }
  grow(tok_row_, rows);
  cursor_.assign(tok_start_.begin(), tok_start_.end() - 1);
  for (size_t i = 0; i < p.size(); i++)
    for (int64_t j = 0; j < p[i].n; j++)
      tok_row_[size_t(cursor_[size_t(slot_tok_[size_t(p[i].slot0 + j)])]++)] = row_start_[i] + j;
  const int64_t n_chunks = (H + kSumCols - 1) / kSumCols;
  pool_.parallel_for(int64_t(toks_.size()) * n_chunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; it++) {
      const int64_t t = toks_[size_t(it / n_chunks)], c0 = (it % n_chunks) * kSumCols, c1 = std::min(H, c0 + kSumCols);
      for (int64_t j = tok_start_[size_t(t)]; j < tok_start_[size_t(t + 1)]; j++) {
        const int64_t r = tok_row_[size_t(j)];
        const float wt = slot_w_[size_t(slot(r, find(row_start_, r)))];
        cpu::axpy(wt, ys_.data() + r * H + c0, out + t * H + c0, c1 - c0);
      }
    }
  });
}

}  // namespace dsrt
