#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

#include "core/status.h"

namespace dsrt {

// NaN or +inf in a logits row means the forward went wrong (bad weights, an overflow): any token drawn from
// it would be emitted with DSRT_OK. -inf is a mask and allowed. `x < INFINITY` is false for both.
[[noreturn]] static void non_finite_logit(int64_t id, double x) {
  failf(DSRT_ERR_INTERNAL, "the model produced non-finite logits (", std::isnan(x) ? "NaN" : "+inf", " at token id ", id, ")");
}

// A logit that bias or penalties made NaN or +inf (callers outside the C API, which checks bias values).
[[noreturn]] static void non_finite_adjusted(int64_t id, double x) {
  failf(DSRT_ERR_INVALID_ARGUMENT, "logit bias or penalties made token id ", id, "'s logit ", x, ": bias must be finite or -inf");
}

// Every id masked: a sampler that emitted token 0 here would invent output. any_raw_finite tells whether
// the model or the caller's bias and bans took the last candidate away.
[[noreturn]] static void nothing_to_sample(bool any_raw_finite) {
  if (!any_raw_finite) fail(DSRT_ERR_INTERNAL, "the model produced no finite logit: no token can be sampled");
  fail(DSRT_ERR_INVALID_ARGUMENT, "logit bias and bans leave no token to sample (every logit is -inf)");
}

static uint64_t splitmix64(uint64_t &x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void Rng::reseed(uint64_t seed) {
  for (auto &v : s_) v = splitmix64(seed);
}

uint64_t Rng::next() {
  auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  const uint64_t result = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return double(next() >> 11) * 0x1.0p-53; }
void Rng::state(uint64_t out[4]) const { std::copy(s_, s_ + 4, out); }
void Rng::set_state(const uint64_t in[4]) { std::copy(in, in + 4, s_); }

// The ids whose logit bias, penalties or bans change, with their adjusted values (bans: -inf); every other
// id keeps its logit. Shared by the full distribution and the greedy fast path, so both agree exactly.
static std::vector<std::pair<int32_t, double>> adjusted_logits(const float *logits, int64_t n, const SamplingParams &p,
                                                               const int32_t *hist, size_t n_hist,
                                                               const std::vector<int32_t> &banned) {
  std::vector<std::pair<int32_t, double>> touched;
  std::unordered_map<int32_t, size_t> where;
  auto adjust = [&](int32_t id) -> double & {
    auto [it, fresh] = where.try_emplace(id, touched.size());
    if (fresh) touched.push_back({id, double(logits[id])});
    return touched[it->second].second;
  };
  for (auto [id, b] : p.logit_bias) {
    if (id < 0 || id >= n) failf(DSRT_ERR_INVALID_ARGUMENT, "logit bias names token id ", id, ", outside the vocabulary [0, ", n, ")");
    adjust(id) += b;
  }
  if (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
    size_t from = p.penalty_window > 0 && n_hist > size_t(p.penalty_window) ? n_hist - size_t(p.penalty_window) : 0;
    std::unordered_map<int32_t, int> count;
    for (size_t i = from; i < n_hist; i++) count[hist[i]]++;
    for (auto [id, c] : count) {
      if (id < 0 || id >= n) continue;
      double &v = adjust(id);
      if (p.repetition_penalty != 1.0f) v = v > 0 ? v / p.repetition_penalty : v * p.repetition_penalty;
      v -= double(p.presence_penalty) + double(p.frequency_penalty) * c;
    }
  }
  for (int32_t id : banned)
    if (id >= 0 && id < n) adjust(id) = -INFINITY;
  return touched;
}

std::vector<double> sampling_distribution(const float *logits, int64_t n, const SamplingParams &p,
                                          const int32_t *hist, size_t n_hist, const std::vector<int32_t> &banned) {
  std::vector<double> l(logits, logits + n);
  bool any_raw_finite = false;
  for (int64_t i = 0; i < n; i++) {
    if (!(l[size_t(i)] < INFINITY)) non_finite_logit(i, l[size_t(i)]);
    any_raw_finite = any_raw_finite || l[size_t(i)] > -INFINITY;
  }
  for (auto [id, v] : adjusted_logits(logits, n, p, hist, n_hist, banned)) {
    if (!(v < INFINITY)) non_finite_adjusted(id, v);
    l[size_t(id)] = v;
  }
  std::vector<double> prob(size_t(n), 0.0);
  int64_t best = int64_t(std::max_element(l.begin(), l.end()) - l.begin());  // ties: the lowest id
  if (n == 0 || l[size_t(best)] == -INFINITY) nothing_to_sample(any_raw_finite);
  if (!(p.temperature > 0.0f)) {
    prob[size_t(best)] = 1.0;
    return prob;
  }
  // Candidates ordered by logit (then id), truncated by top-k.
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  size_t k = p.top_k > 0 ? std::min<size_t>(size_t(p.top_k), size_t(n)) : size_t(n);
  auto by_logit = [&](int32_t a, int32_t b) { return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b); };
  std::partial_sort(order.begin(), order.begin() + long(k), order.end(), by_logit);
  order.resize(k);
  while (!order.empty() && !std::isfinite(l[size_t(order.back())])) order.pop_back();
  const double mx = l[size_t(order[0])];
  std::vector<double> q(order.size());
  double z = 0;
  for (size_t i = 0; i < order.size(); i++) z += q[i] = std::exp((l[size_t(order[i])] - mx) / double(p.temperature));
  for (auto &v : q) v /= z;
  size_t keep = q.size();
  if (p.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
    double acc = 0;
    for (size_t i = 0; i < q.size(); i++) {
      acc += q[i];
      if (acc >= double(p.top_p)) {
        keep = i + 1;
        break;
      }
    }
  }
  if (p.min_p > 0.0f) {
    const double floor = double(p.min_p) * q[0];
    size_t m = 0;
    while (m < keep && q[m] >= floor) m++;
    keep = std::max<size_t>(m, 1);
  }
  double zk = 0;
  for (size_t i = 0; i < keep; i++) zk += q[i];
  for (size_t i = 0; i < keep; i++) prob[size_t(order[i])] = q[i] / zk;
  return prob;
}

static int32_t draw(const std::vector<double> &prob, double u) {
  double acc = 0;
  int32_t last = -1;
  for (size_t i = 0; i < prob.size(); i++) {
    if (prob[i] <= 0) continue;
    acc += prob[i];
    last = int32_t(i);
    if (u < acc) return int32_t(i);
  }
  return last;  // rounding left u just past the total
}

// The first id holding the largest logit, and whether any logit is +inf or NaN, in one pass over 16
// independent lanes (a single running maximum is one long dependency chain: ~150 us over V3's 129,280
// logits on a 2-core box, ~60 us this way). Strictly greater keeps each lane's first occurrence; the lowest
// index among the lanes that reach the maximum is the first overall.
static int64_t raw_argmax(const float *l, int64_t n, bool &bad) {
  constexpr int L = 16;
  float m[L];
  int64_t at[L];
  uint32_t b[L];
  for (int j = 0; j < L; j++) m[j] = -INFINITY, at[j] = -1, b[j] = 0;
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; j++) {
      const float v = l[i + j];
      b[j] |= !(v < INFINITY);
      const bool up = v > m[j];
      m[j] = up ? v : m[j];
      at[j] = up ? i + j : at[j];
    }
  for (int64_t k = i; k < n; k++) {  // the tail: lane k - i
    const float v = l[k];
    const int j = int(k - i);
    b[j] |= !(v < INFINITY);
    if (v > m[j]) m[j] = v, at[j] = k;
  }
  int64_t best = -1;
  float bv = -INFINITY;
  uint32_t any_bad = 0;
  for (int j = 0; j < L; j++) {
    any_bad |= b[j];
    if (at[j] >= 0 && (m[j] > bv || (m[j] == bv && at[j] < best))) bv = m[j], best = at[j];
  }
  bad = any_bad != 0;
  return best;  // -1: every logit is -inf
}

// Greedy without building the distribution (the common decode case; 129k-entry vocabularies made the
// full path cost ~1 ms a token): the few ids that bias, penalties or bans touch get their adjusted value
// exactly as sampling_distribution computes it, every other id competes with its raw logit.
static int32_t greedy_token(const float *logits, int64_t n, const SamplingParams &p, const int32_t *hist, size_t n_hist,
                            const std::vector<int32_t> &banned) {
  const auto touched = adjusted_logits(logits, n, p, hist, n_hist, banned);
  std::vector<int32_t> skip;  // the touched ids, sorted: they compete with their adjusted values below
  for (auto &t : touched) skip.push_back(t.first);
  std::sort(skip.begin(), skip.end());
  auto skipped = [&](int64_t i) { return std::binary_search(skip.begin(), skip.end(), int32_t(i)); };
  bool bad = false;
  const int64_t top = raw_argmax(logits, n, bad);
  if (bad)
    for (int64_t i = 0; i < n; i++)
      if (!(logits[i] < INFINITY)) non_finite_logit(i, double(logits[i]));
  const bool any_raw_finite = top >= 0;
  int64_t best = -1;
  double bv = -INFINITY;
  if (top >= 0 && !skipped(top)) {
    best = top;
    bv = double(logits[top]);
  } else {  // the raw maximum is touched (or all are -inf): the best of the others, ties to the lowest id
    for (int64_t i = 0; i < n; i++) {
      const double v = double(logits[i]);
      if (skipped(i)) continue;
      if (v > bv || (best < 0 && v == bv)) {
        best = i;
        bv = v;
      }
    }
  }
  for (auto &[id, v] : touched) {
    if (!(v < INFINITY)) non_finite_adjusted(id, v);
    if (v > bv || (v == bv && (best < 0 || id < best))) {
      best = id;
      bv = v;
    }
  }
  if (best < 0 || bv == -INFINITY) nothing_to_sample(any_raw_finite);
  return int32_t(best);
}

int32_t sample_token(const float *logits, int64_t n, const SamplingParams &p, const int32_t *hist, size_t n_hist,
                     const std::vector<int32_t> &banned, Rng &rng) {
  if (!(p.temperature > 0.0f)) return greedy_token(logits, n, p, hist, n_hist, banned);
  std::vector<double> prob = sampling_distribution(logits, n, p, hist, n_hist, banned);
  return draw(prob, rng.uniform());  // drawn only once the distribution stands (errors consume nothing)
}

int32_t sample_token_with(const float *logits, int64_t n, const SamplingParams &p, const int32_t *hist, size_t n_hist,
                          const std::vector<int32_t> &banned, double u) {
  if (!(p.temperature > 0.0f)) return greedy_token(logits, n, p, hist, n_hist, banned);
  return draw(sampling_distribution(logits, n, p, hist, n_hist, banned), u);
}

SamplingAdjustments sampling_adjustments(int64_t n, const SamplingParams &p, const int32_t *hist, size_t n_hist,
                                         const std::vector<int32_t> &banned) {
  SamplingAdjustments a;
  std::unordered_map<int32_t, size_t> where;
  auto at = [&](int32_t id) -> SamplingAdjust & {
    auto [it, fresh] = where.try_emplace(id, a.ids.size());
    if (fresh) a.ids.push_back({id, 0, 0, 0, 0});
    return a.ids[it->second];
  };
  // Bias terms grouped by id, each id's in their order in logit_bias (the sampler adds them in that order).
  std::vector<std::vector<float>> terms;
  for (auto [id, b] : p.logit_bias) {
    if (id < 0 || id >= n) {
      a.valid = false;
      continue;
    }
    const size_t k = size_t(&at(id) - a.ids.data());
    if (terms.size() <= k) terms.resize(k + 1);
    terms[k].push_back(b);
  }
  if (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
    size_t from = p.penalty_window > 0 && n_hist > size_t(p.penalty_window) ? n_hist - size_t(p.penalty_window) : 0;
    for (size_t i = from; i < n_hist; i++)
      if (hist[i] >= 0 && hist[i] < n) at(hist[i]).count++;
  }
  for (int32_t id : banned)
    if (id >= 0 && id < n) at(id).banned = 1;
  for (size_t k = 0; k < a.ids.size(); k++) {
    a.ids[k].bias0 = int32_t(a.bias.size());
    if (k < terms.size()) a.bias.insert(a.bias.end(), terms[k].begin(), terms[k].end());
    a.ids[k].n_bias = int32_t(a.bias.size()) - a.ids[k].bias0;
  }
  return a;
}

int32_t sample_token(const float *logits, int64_t n, float temperature, Rng &rng) {
  SamplingParams p;
  p.temperature = temperature;
  return sample_token(logits, n, p, nullptr, 0, {}, rng);
}

}  // namespace dsrt
