// Engine: the latent KV page pool and the forward steps that batch every session's pending tokens.
// Session: one sequence (its tokens, pages, last logits, random stream).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "core/memory.h"
#include "core/status.h"
#include "engine/sampler.h"
#include "model/deepseek_v3.h"
#include "model/model.h"

namespace dsrt {

struct EngineOptions {
  int64_t max_tokens = 0;        // KV capacity over all sessions; 0 = min(n_ctx_train, 16384)
  int64_t max_batch_tokens = 512;
  AttentionPolicy attention = AttentionPolicy::Auto;
  BackendOptions backend;
};

struct EngineStats {
  int64_t n_sessions = 0, pages_used = 0, pages_total = 0;
  uint64_t n_steps = 0, n_tokens = 0, max_batch_seqs = 0;
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

  std::shared_ptr<Session> create_session(int64_t max_ctx, bool logits_all, uint64_t seed);
  // One forward step over the pending tokens of all sessions; returns the tokens processed.
  int64_t step();
  // Steps until `s` has nothing pending; checks `cancel` before each step.
  void eval(Session &s, const std::atomic<int> *cancel);
  EngineStats stats() const;

 private:
  friend class Session;
  int64_t step_locked();
  bool ensure_pages(Session &s, int64_t n_tokens);  // false: pool exhausted
  void release_pages(Session &s, int64_t keep_tokens);
  void detach(Session *s);

  std::shared_ptr<const Model> model_;
  std::unique_ptr<Backend> backend_;
  EngineOptions opt_;
  int64_t n_pages_ = 0;
  mutable std::mutex mu_;  // guards everything below and every session's token state
  std::vector<int32_t> free_pages_;
  std::vector<Session *> sessions_;
  EngineStats stats_;
};

class Session {
 public:
  Session(std::shared_ptr<Engine> e, int64_t max_ctx, bool logits_all, uint64_t seed);
  ~Session();

  void append(const int32_t *tokens, size_t n);
  void eval(const std::atomic<int> *cancel) { engine_->eval(*this, cancel); }
  void truncate(size_t n_keep);
  void reset() { truncate(0); }
  int32_t sample(float temperature);

  // Views; valid until the next mutating call.
  const HostVec<float> &logits() const { return logits_; }
  int64_t logits_rows() const { return logits_rows_; }
  const std::vector<int32_t> &tokens() const { return tokens_; }

  struct Stats {
    int64_t n_tokens, n_pending, n_pages;
    uint64_t n_evaluated;
  };
  Stats stats() const;

 private:
  friend class Engine;
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
};

}  // namespace dsrt
