// Session: one conversation (tokens, KV pages, last logits, random stream) and its generation turns. Its
// token state is guarded by the engine's lock; the engine's step thread evaluates its pending tokens while
// the session's own thread waits for them (Engine::eval).
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "core/memory.h"
#include "core/status.h"
#include "engine/kv_pages.h"
#include "engine/sampler.h"
#include "text/detokenizer.h"

namespace dsrt {

class Engine;

// One generation turn's settings.
struct GenParams {
  SamplingParams sampling;
  int32_t max_new_tokens = 256;  // 0: until the context is full
  bool ignore_eos = false;
  std::vector<int32_t> stop_tokens;
  std::vector<std::string> stop_strings;
  bool skip_special = true;  // text leaves out control tokens (BOS, EOS, role markers)
  bool has_seed = false;
  uint64_t seed = 0;
  const std::atomic<int> *cancel = nullptr;
};

enum class Finish { None = 0, Eos = 1, StopString = 2, StopToken = 3, Length = 4, Cancelled = 5, ContextFull = 6, Error = 7 };

struct Event {
  bool done = false;
  int32_t token = -1;  // the token this event emits (-1 on DONE without a token)
  std::string text;    // complete UTF-8 delta
  Finish finish = Finish::None;
  dsrt_status status = DSRT_OK;  // Finish::Error
  std::string error;
};

struct SessionStats {
  int64_t n_tokens = 0, n_pending = 0, n_pages = 0;
  uint64_t n_evaluated = 0;
  int64_t prompt_tokens = 0;   // tokens prefilled for the last turn
  int64_t reused_tokens = 0;   // tokens of the last chat render already in the cache
  int64_t generated_tokens = 0;  // in the last turn
  double ttft_seconds = 0.0;     // last turn: start to first token
  double decode_tokens_per_second = 0.0;  // last turn, after the first token
  int64_t mtp_drafted = 0, mtp_accepted = 0;  // last turn: MTP drafts verified, and kept
  int64_t cached_tokens = 0;  // since the last turn started: pending tokens taken from the prefix cache
};

class Session {
 public:
  Session(std::shared_ptr<Engine> e, int64_t max_ctx, bool logits_all, uint64_t seed);
  ~Session();

  void append(const int32_t *tokens, size_t n);
  // The tokenizer's prompt encoding (its BOS rule when add_special) appended.
  void append_text(std::string_view text, bool parse_special, bool add_special);
  // Adds chat messages (JSON array of {role, content, ...}) to the conversation, renders the whole
  // conversation with the model's chat template and appends only what differs from the cache.
  void append_chat(const std::string &messages_json, const std::string &tools_json, bool add_generation_prompt);
  // Waits until the engine's step thread has evaluated every pending token (DSRT_ERR_CANCELLED when a
  // cancel flag is set first, keeping what was evaluated).
  void eval(const std::atomic<int> *cancel);
  void truncate(size_t n_keep);
  void reset();
  int32_t sample(float temperature);
  std::shared_ptr<Session> fork();
  // Log-softmax of the raw logits row the last sampled token (next() or sample()) was drawn from, copied when
  // it was sampled (before bias, penalties, temperature and truncation): that token's logprob, and the n_top
  // most likely tokens (descending, ties to the lower id) into top. DSRT_ERR_BAD_STATE before any sample.
  float token_logprobs(size_t n_top, int32_t *token, std::vector<std::pair<int32_t, float>> &top) const;
  // Whether samples keep their logits row for token_logprobs (a copy of n_vocab floats each; off by default).
  void keep_logprobs(bool keep) { keep_logprobs_ = keep; }

  // Generation turns: start() then next() until an event is done; cancel() from any thread.
  void start(const GenParams &p);
  Event next();
  void cancel();
  bool turn_active() const;

  // State blob: magic, version, model fingerprint, tokens, messages, random state, latent KV.
  std::string save_state() const;
  void load_state(const std::string &blob);

  // Views, valid until the caller's next call on this session (copies while tokens are pending: a step may
  // commit them at any time). Mid-turn, MTP drafts not decided on yet are left
  // out: the tokens end at the last emitted one in the cache, and the logits are that position's (first row).
  struct LogitsView {
    const float *data;
    int64_t rows;
  };
  LogitsView logits_view();
  std::span<const int32_t> tokens_view();
  int64_t vocab() const;
  SessionStats stats() const;

 private:
  friend class Engine;
  friend class StepRunner;
  Event finish_turn(Finish why, int32_t token);
  int32_t sample_next(bool &accepted);  // next()'s draw after the step
  void drop_drafts();  // unverified drafts leave the cache (engine lock held)
  void forget_mtp_after(int64_t n_keep);  // the cache is cut to n_keep tokens (engine lock held)
  void replace_tail(const std::vector<int32_t> &want);  // keep the common prefix, append the rest
  bool cancel_requested() const;  // any of the turn's, the eval's or the session's own cancel flags
  // The prefix cache (engine lock held, on the step thread, the session not in flight):
  // At the start of a pending run: the cached full pages that continue the session's tokens with its pending
  // ones replace their prefill (at least one pending token is left to evaluate, for the logits; three under the
  // automatic attention form). Returns the tokens taken.
  // With data-parallel attention, before a session holding nothing reserves `pages`: of the regions that have
  // them, the one with its longest cached prefix (engine lock held).
  void prefer_cached_region(int64_t pages);
  int64_t adopt_cached_prefix();
  std::vector<int32_t> tokens_and_pending() const;  // the sequence the prefix cache is matched against
  // Before a step writes positions from `from` on: every page of the table from there that another holder
  // shares is replaced by a fresh page, listed in copies (the old page stays held until the step commits).
  // false (nothing changed) when the pool has no room for the copies.
  bool make_writable(int64_t from, std::vector<PageCopy> &copies);
  // After a step: the full pages whose contents are final go to the prefix cache.
  void publish_pages();

  std::shared_ptr<Engine> engine_;
  int64_t max_ctx_;
  bool logits_all_;
  Rng rng_;
  std::vector<int32_t> tokens_;   // in the cache
  std::vector<int32_t> pending_;  // appended, not yet evaluated
  bool pending_started_ = false;  // a step took part of the pending run (logits_all accumulates)
  int64_t run_start_ = 0;         // tokens_.size() when the pending run started (a failed run goes back here)
  PageHolding kv_;
  int64_t published_ = 0;  // full pages already offered to the prefix cache
  HostVec<float> logits_;
  int64_t logits_rows_ = 0;
  // The last step's logits of this session stayed on the device: its generation turn's next token was sampled
  // there (StepRunner, EngineOptions::device_sampling) and presampled_ holds that draw, which next() takes in
  // place of sampling logits_ (then empty): the token, or the sampler's error, and the random stream after it.
  // Valid while rng_ is still at rng_before (checked) and no newer step gave the session logits.
  struct Presample {
    bool valid = false;
    int32_t token = -1;
    dsrt_status status = DSRT_OK;
    std::string error;
    uint64_t rng_before[4] = {}, rng_after[4] = {};
  };
  bool logits_on_device_ = false;
  Presample presampled_;
  // Run-ahead (device sampling, no MTP): the commit of the step that sampled the turn's next token on the
  // device puts the token in pending_ itself (StepRunner::run_ahead), so the next step need not wait for this
  // session's thread to come back and append it; next() then takes the token from here. At most one: the
  // step after leaves its draw in presampled_ until next() has taken this one. A turn that ends without
  // taking it (cancelled, a stop string) undoes it in finish_turn: the token leaves pending_ or the cache, and
  // the random stream goes back to rng_before.
  struct Ahead {
    bool valid = false;
    int32_t token = -1;
    uint64_t rng_before[4] = {};
  };
  Ahead ahead_;
  // The turn ends at the token next() took last (a stop string, max_new_tokens): no step runs ahead any more
  // (engine lock; set by next(), cleared by start()).
  bool stopping_ = false;
  // Engine::eval calls waiting for every pending token (not next()'s): no step runs ahead meanwhile, it would
  // only be retracted when they return (engine lock).
  int plain_evals_ = 0;
  void retract_ahead();
  // The last step sampled the cache's last token's successor on the device and that draw is not going to be
  // taken (the turn ended, or a new one starts): the token goes back to pending, so the next evaluation gets its
  // logits. Engine lock held, session idle.
  void repend_device_logits();
  // lock_idle, then retract_ahead: what every call that reads or changes the session's tokens starts with.
  std::unique_lock<std::mutex> lock_settled();
  int64_t ahead_in_cache() const { return ahead_.valid && pending_.empty() ? 1 : 0; }
  // The views and stats of the session as without run-ahead: its tokens, pending tokens and pages leave the
  // token a step ran ahead with out (engine lock held).
  int64_t visible_tokens() const { return int64_t(tokens_.size() - drafts_.size()) - ahead_in_cache(); }
  int64_t visible_pages() const;
  int64_t turn_taken_ = 0;  // tokens next() has taken in this turn (the engine lock: run-ahead reads it)
  dsrt_status failed_ = DSRT_OK;  // set by a step that could not run this session
  std::string failed_msg_;
  uint64_t n_evaluated_ = 0;

  // Scheduling (engine lock): waiters wanting this session's pending tokens evaluated; a step holds it.
  int demand_ = 0;
  bool in_flight_ = false;
  const std::atomic<int> *eval_cancel_ = nullptr;

  // MTP: the cache layer holds positions [0, mtp_pos_); mtp_hidden_ holds the main model's normed hidden
  // states of positions mtp_pos_ .. tokens_.size()-1 (a step's last row, or all rows of a verify step), still
  // waiting for the token that follows them. drafts_: the unverified drafts at the end of tokens_ (next()
  // decides on them one by one, the logits rows of the verify step still in logits_).
  int64_t mtp_pos_ = 0;
  std::vector<float> mtp_hidden_;
  std::vector<int32_t> drafts_;
  std::vector<float> logits_snapshot_;   // logits_view()
  std::vector<int32_t> tokens_snapshot_;  // tokens_view()
  bool sampled_pending_ = false;  // pending_ is the one token next() sampled
  // The last sampled token and the raw logits row it was drawn from (token_logprobs); only this session's
  // own thread touches them, so no step can replace them underneath.
  std::atomic<bool> keep_logprobs_{false};
  int32_t sampled_token_ = -1;
  std::vector<float> sampled_row_;
  void keep_sampled(const float *row, int32_t tok);

  // Chat and generation.
  nlohmann::ordered_json messages_ = nlohmann::ordered_json::array();
  std::string tools_json_;
  bool turn_active_ = false;
  GenParams gp_;
  std::unique_ptr<Detokenizer> detok_;
  std::vector<int32_t> banned_, eog_;
  Finish finish_pending_ = Finish::None;
  int32_t n_generated_ = 0;
  std::string reply_;
  std::atomic<int> cancel_flag_{0};
  std::chrono::steady_clock::time_point turn_start_, first_token_;
  SessionStats last_;
};

}  // namespace dsrt
