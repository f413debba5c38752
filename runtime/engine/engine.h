// Engine: the latent KV page pool and the forward steps that batch every session's pending tokens.
// Session: one conversation (tokens, KV pages, last logits, random stream) and its generation turns.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/memory.h"
#include "core/status.h"
#include "engine/sampler.h"
#include "model/deepseek_v3.h"
#include "model/model.h"
#include "text/detokenizer.h"

namespace dsrt {

struct EngineOptions {
  int64_t max_tokens = 0;  // KV capacity over all sessions; 0 = min(n_ctx_train, 16384)
  int64_t max_batch_tokens = 512;
  double kv_memory_fraction = 0;  // > 0: the KV pool takes this share of the backend's free memory (after
                                  // the weights), overriding max_tokens
  AttentionPolicy attention = AttentionPolicy::Auto;
  // Speculative decoding with the checkpoint's MTP module (spec §6): during a generation turn each step
  // verifies up to this many drafted tokens after the sampled one (drafts after the first chain the module
  // on its own normed output). The output is the same as without (a draft is kept only when the token sampled
  // from the main model equals it); ignored when the model has no MTP layer.
  int mtp_drafts = 0;
  // Tests only: replaces the MTP module's draft (its argmax), given the sequence so far (cached tokens and
  // the sampled one), to drive acceptance and rejection on purpose. The MTP module still runs.
  std::function<int32_t(const std::vector<int32_t> &sequence, int32_t mtp_draft)> mtp_draft_override;
  BackendOptions backend;
};

struct EngineStats {
  int64_t n_sessions = 0, pages_used = 0, pages_total = 0;
  uint64_t n_steps = 0, n_tokens = 0, max_batch_seqs = 0;
  uint64_t mtp_drafted = 0, mtp_accepted = 0;
  double forward_seconds = 0.0;
};

class Session;

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  Engine(std::shared_ptr<const Model> model, std::unique_ptr<Backend> backend, const EngineOptions &opt);
  ~Engine();

  const Model &model() const { return *model_; }
  const EngineOptions &options() const { return opt_; }
  int64_t capacity_tokens() const { return n_pages_ * kPageTokens; }
  bool mtp_enabled() const { return mtp_; }

  std::shared_ptr<Session> create_session(int64_t max_ctx, bool logits_all, uint64_t seed);
  // One forward step over the pending tokens of all sessions; returns the tokens processed.
  int64_t step();
  // Steps until `s` has nothing pending; checks each cancel flag before each step.
  void eval(Session &s, const std::atomic<int> *cancel, const std::atomic<int> *cancel2 = nullptr);
  EngineStats stats() const;
  // Per-op times of the backend (Backend::set_profiling / op_times).
  void set_profiling(bool on);
  std::vector<OpTime> op_times();

 private:
  friend class Session;
  int64_t step_locked();
  bool ensure_pages(Session &s, int64_t n_tokens);  // false: pool exhausted
  void release_pages(Session &s, int64_t keep_tokens);
  void detach(Session *s);
  // MTP: drafts for the sessions in `drafting` (their own backend step), and the MTP cache rows of a finished
  // main step (its normed hidden states).
  void mtp_draft(const std::vector<std::pair<Session *, int64_t>> &drafting);  // (session, drafts wanted)
  void mtp_catch_up(const Batch &b, const std::vector<Session *> &in_batch, Tensor hidden);

  std::shared_ptr<const Model> model_;
  std::unique_ptr<Backend> backend_;
  EngineOptions opt_;
  int64_t n_pages_ = 0;
  bool mtp_ = false;
  mutable std::mutex mu_;  // guards everything below and every session's token state
  std::vector<int32_t> free_pages_;
  std::vector<Session *> sessions_;
  EngineStats stats_;
};

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
};

class Session {
 public:
  Session(std::shared_ptr<Engine> e, int64_t max_ctx, bool logits_all, uint64_t seed);
  ~Session();

  void append(const int32_t *tokens, size_t n);
  void append_text(std::string_view text, bool parse_special, bool add_bos);
  // Adds chat messages (JSON array of {role, content, ...}) to the conversation, renders the whole
  // conversation with the model's chat template and appends only what differs from the cache.
  void append_chat(const std::string &messages_json, const std::string &tools_json, bool add_generation_prompt);
  void eval(const std::atomic<int> *cancel) { engine_->eval(*this, cancel, &cancel_flag_); }
  void truncate(size_t n_keep);
  void reset();
  int32_t sample(float temperature);
  std::shared_ptr<Session> fork();

  // Generation turns: start() then next() until an event is done; cancel() from any thread.
  void start(const GenParams &p);
  Event next();
  void cancel() { cancel_flag_.store(1, std::memory_order_relaxed); }
  bool turn_active() const { return turn_active_; }

  // State blob: magic, version, model fingerprint, tokens, messages, random state, latent KV.
  std::string save_state() const;
  void load_state(const std::string &blob);

  // Views, valid until the caller's next call on this session: a step run by another thread commits this
  // session's pending tokens (and their logits) whenever it has some, so then they are copies. Mid-turn, MTP drafts not decided on yet are left out: the tokens end at the last emitted
  // one in the cache, and the logits are that position's (the first row).
  struct LogitsView {
    const float *data;
    int64_t rows;
  };
  LogitsView logits_view();
  std::span<const int32_t> tokens_view();
  int64_t vocab() const { return engine_->model().cfg.vocab_size; }
  SessionStats stats() const;

 private:
  friend class Engine;
  Event finish_turn(Finish why, int32_t token);
  void drop_drafts();  // unverified drafts leave the cache (engine lock held)
  void forget_mtp_after(int64_t n_keep);  // the cache is cut to n_keep tokens (engine lock held)
  void replace_tail(const std::vector<int32_t> &want);  // keep the common prefix, append the rest

  std::shared_ptr<Engine> engine_;
  int64_t max_ctx_;
  bool logits_all_;
  Rng rng_;
  std::vector<int32_t> tokens_;   // in the cache
  std::vector<int32_t> pending_;  // appended, not yet evaluated
  bool pending_started_ = false;  // a step took part of the pending run (logits_all accumulates)
  std::vector<int32_t> pages_;
  HostVec<float> logits_;
  int64_t logits_rows_ = 0;
  dsrt_status failed_ = DSRT_OK;  // set by a step that could not run this session
  std::string failed_msg_;
  uint64_t n_evaluated_ = 0;

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
