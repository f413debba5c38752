#include "engine/sampler.h"

#include <cmath>
#include <vector>

namespace dsrt {

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

int32_t sample_token(const float *logits, int64_t n, float temperature, Rng &rng) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; i++)
    if (logits[i] > logits[best]) best = i;
  if (!(temperature > 0.0f)) return int32_t(best);
  std::vector<double> p(static_cast<size_t>(n));
  const double inv_t = 1.0 / double(temperature), mx = double(logits[best]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; i++) sum += (p[size_t(i)] = std::exp((double(logits[i]) - mx) * inv_t));
  const double u = rng.uniform() * sum;
  double acc = 0.0;
  int64_t last_nonzero = best;
  for (int64_t i = 0; i < n; i++) {
    if (p[size_t(i)] <= 0.0) continue;
    acc += p[size_t(i)];
    last_nonzero = i;
    if (u < acc) return int32_t(i);
  }
  return int32_t(last_nonzero);  // rounding left u just past the total
}

}  // namespace dsrt
