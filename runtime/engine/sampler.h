// Token sampling from one row of logits: logit bias, repetition/presence/frequency penalties over a window
// of recent tokens, temperature, top-k, top-p, min-p, then an exact categorical draw from a seeded,
// portable generator. Greedy when temperature is 0.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace dsrt {

// xoshiro256** seeded through splitmix64: small and portable (std::mt19937's distributions are not
// bitwise portable across standard libraries).
class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { reseed(seed); }
  void reseed(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1) with 53 random bits
  void state(uint64_t out[4]) const;
  void set_state(const uint64_t in[4]);

 private:
  uint64_t s_[4];
};

struct SamplingParams {
  float temperature = 0.0f;        // 0: greedy
  int32_t top_k = 0;               // 0: off
  float top_p = 1.0f;              // 1: off
  float min_p = 0.0f;              // 0: off (keep tokens with p >= min_p * p_max)
  float repetition_penalty = 1.0f; // 1: off (positive logits divided, negative multiplied)
  float presence_penalty = 0.0f;   // subtracted once from tokens seen in the window
  float frequency_penalty = 0.0f;  // subtracted per occurrence in the window
  int32_t penalty_window = 64;     // tokens of history the penalties look at (0: all)
  std::vector<std::pair<int32_t, float>> logit_bias;
};

// The distribution the sampler draws from (after bias, penalties, masks, temperature and truncation), as
// probabilities over the vocabulary; for greedy, a one-hot vector. `banned` ids (EOS under ignore_eos, ids
// with no token) get probability 0. Exposed so tests can check each sampler exactly.
// Errors (both functions), never a token: a NaN or +inf logit is DSRT_ERR_INTERNAL naming the first such id
// (-inf is a mask); a logit-bias id outside [0, n_vocab) and bias + bans that leave every logit at -inf are
// DSRT_ERR_INVALID_ARGUMENT (DSRT_ERR_INTERNAL when the model's own logits were all -inf).
std::vector<double> sampling_distribution(const float *logits, int64_t n_vocab, const SamplingParams &p,
                                          const int32_t *history, size_t n_history, const std::vector<int32_t> &banned);

int32_t sample_token(const float *logits, int64_t n_vocab, const SamplingParams &p, const int32_t *history,
                     size_t n_history, const std::vector<int32_t> &banned, Rng &rng);

// sample_token with the draw's uniform given: what sample_token(..., rng) returns when rng.uniform() would return
// u (greedy ignores u; errors as above, thrown before the draw). sample_token draws u only once the distribution
// stands, so a caller that draws u from a copy of the rng and commits the copy only on success consumes the
// stream exactly as sample_token does. Backend::sample_rows' default, and the reference of its device versions.
int32_t sample_token_with(const float *logits, int64_t n_vocab, const SamplingParams &p, const int32_t *history,
                          size_t n_history, const std::vector<int32_t> &banned, double u);

// What logit bias, penalties and bans do to one row, as data a device kernel applies (the sampler's own
// adjustment, written out): each touched id once, with its bias terms (added in order, in double), how often it
// occurs in the penalty window (0: no penalty; set only when a penalty is on), and whether it is banned (-inf,
// last). Every other id keeps its logit. valid = false when a bias id lies outside [0, n_vocab) (the sampler
// then fails with DSRT_ERR_INVALID_ARGUMENT: run it for the text).
struct SamplingAdjust {
  int32_t id = 0, count = 0, banned = 0, bias0 = 0, n_bias = 0;  // bias terms: bias[bias0 .. bias0 + n_bias)
};
struct SamplingAdjustments {
  std::vector<SamplingAdjust> ids;
  std::vector<float> bias;
  bool valid = true;
};
SamplingAdjustments sampling_adjustments(int64_t n_vocab, const SamplingParams &p, const int32_t *history,
                                         size_t n_history, const std::vector<int32_t> &banned);

// Plain greedy/temperature draw (the v0 session sampler).
int32_t sample_token(const float *logits, int64_t n_vocab, float temperature, Rng &rng);

}  // namespace dsrt
