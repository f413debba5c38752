// Token sampling from one row of logits. Deterministic for a given seed on every platform.
#pragma once
#include <cstdint>

namespace dsrt {

// xoshiro256** seeded through splitmix64: a small, portable generator (std::mt19937's distributions are
// not bitwise portable across standard libraries).
class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { reseed(seed); }
  void reseed(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1) with 53 random bits

 private:
  uint64_t s_[4];
};

// Greedy (temperature <= 0): argmax, ties to the lowest id. Otherwise an exact categorical draw from
// softmax(logits / temperature), computed in double.
int32_t sample_token(const float *logits, int64_t n_vocab, float temperature, Rng &rng);

}  // namespace dsrt
