// Engine: the latent KV page pool, the ranks that run the forward, and the step thread that batches every
// session's pending tokens (continuous batching). App threads enqueue work and wait for the step they need;
// the engine lock is never held across a forward.
//
//   dsrt_session_next -> Session::next -> Session::eval -> Engine::eval (waits on done_cv_)
//   step thread: Engine::loop -> StepRunner::plan (locked: decode rows, then prefill chunks, pages)
//     -> StepRunner::run (unlocked: MTP drafts, RankGroup::forward -> forward() on every rank -> Backend ops
//        -> kernels, MTP catch-up) -> StepRunner::commit (locked: tokens, logits) -> done_cv_.notify_all
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "engine/kv_pages.h"
#include "engine/ranks.h"
#include "engine/session.h"
#include "model/deepseek_v3.h"
#include "model/model.h"
#include "text/vocabulary.h"

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
  // Tensor and expert parallelism (dist/mapping.h): tp * ep ranks, in-process ranks unless `dist` says the
  // ranks are processes. On the CUDA backend each in-process rank has a GPU, backend.device + rank, and a
  // thread, with NCCL between them.
  int tp = 1, ep = 1;
  // Data-parallel attention (dist/mapping.h; tp 1, ep = the ranks): each rank runs attention, the dense
  // layers and the head whole on its own sessions, whose latent cache it alone keeps, and the MoE layers send
  // only the routed rows between ranks. The KV pool is then max_tokens (or kv_memory_fraction) per rank, and
  // a session's context at most one rank's pool. For batches of many sessions; no MTP drafts.
  bool dp_attention = false;
  // Ranks in several processes (docs/engine.md, "Ranks in several processes"): world > 1 makes this engine
  // rank 0 (resolved with resolve_dist_spec; tp x ep from here), which serves the rendezvous at
  // dist.coordinator and sends every step to the followers (run_follower_process): over Gloo on the CPU,
  // over NCCL (with Gloo for the steps' bytes) on the CUDA backend, a GPU per process (local_device_index).
  DistSpec dist;
  // The prefix cache (kv_pages.h): the most pages it may hold; -1: as many as the pool has (cached pages nobody
  // holds are evicted when a session needs pages), 0: off.
  int64_t prefix_cache_pages = -1;
  BackendKind backend_kind = BackendKind::Cpu;
  BackendOptions backend;
  // Generation turns' tokens sampled where the logits are (Backend::sample_rows) when the backend can
  // (samples_on_device) and the engine has one rank: only the ids come back, and a turn's logits rows stay on the
  // device (Session::logits_view). The same tokens as the host sampler (engine/sampler.h) with the same draws.
  // false (or DSRT_DEVICE_SAMPLING=0): every step's logits rows to the host, sampled there.
  bool device_sampling = true;
  // With device sampling (and no MTP): a step's commit appends the turn's next token itself (Session::ahead_),
  // so the next step need not wait for the session's thread. The same tokens either way. false (or
  // DSRT_RUN_AHEAD=0): next() appends every token.
  bool run_ahead = true;
  // How long the step thread holds the next step for sessions that sample on the host (their thread takes the
  // logits and appends its token), so that a decode row rides with a prefill chunk instead of a step behind
  // it. Bounded: a thread that does not come back in time waits for the step after.
  int decode_wait_ms = 5;
};

struct EngineStats {
  int64_t n_sessions = 0, pages_used = 0, pages_total = 0;
  uint64_t n_steps = 0, n_tokens = 0, max_batch_seqs = 0;
  uint64_t mtp_drafted = 0, mtp_accepted = 0;
  uint64_t tokens_run_ahead = 0;  // turn tokens a step's commit appended for the session's thread (Session::ahead_)
  uint64_t tokens_retracted = 0;  // of those, the ones the turn did not take (Session::retract_ahead)
  double forward_seconds = 0.0;
  BackendCounters backend;  // rank 0's
  // The prefix cache: pending runs that started from cached pages, the tokens those pages held (not prefilled),
  // and the pages the cache holds now (some also held by sessions).
  uint64_t prefix_hits = 0, prefix_tokens = 0;
  int64_t pages_cached = 0, prefix_cache_limit = -1;
};

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  // vocab: the model's text side (engine/load.h loads both), which sessions tokenize, detokenize and stop
  // with. Null: no tokenizer (token ids only; generation ends at the config's EOS ids).
  Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Vocabulary> vocab, const EngineOptions &opt);
  // One rank on a backend made by the caller (tests and tools).
  Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Vocabulary> vocab, std::unique_ptr<Backend> backend,
         const EngineOptions &opt);
  ~Engine();

  const Model &model() const { return *model_; }
  const Vocabulary &vocab() const { return *vocab_; }
  const EngineOptions &options() const { return opt_; }
  int64_t capacity_tokens() const { return pool_->total() * kPageTokens; }
  // The longest context one session can have: the pool, or one rank's pool with data-parallel attention.
  int64_t session_capacity_tokens() const { return (rank_pages_ ? rank_pages_ : pool_->total()) * kPageTokens; }
  bool mtp_enabled() const { return mtp_; }
  bool device_sampling() const { return device_sampling_; }  // EngineOptions::device_sampling, in effect
  int world() const { return ranks_->world(); }

  std::shared_ptr<Session> create_session(int64_t max_ctx, bool logits_all, uint64_t seed);
  // Asks the step thread for one step over the pending tokens of every session and waits for it; returns
  // the tokens it processed (0 when nothing was pending).
  int64_t step();
  // Waits until `s` has nothing pending (its tokens go into the steps of the step thread); DSRT_ERR_CANCELLED
  // when a cancel flag is set first. Throws the session's step failure (its pending run rolled back).
  // take_ahead: a turn's next() waiting for its token, which may come from a step that ran ahead (returns
  // then, the step that evaluates it may still run); otherwise until every pending token is evaluated.
  void eval(Session &s, const std::atomic<int> *cancel, const std::atomic<int> *cancel2 = nullptr,
            bool take_ahead = false);
  EngineStats stats() const;
  // The prefix cache's size limit (EngineOptions::prefix_cache_pages); 0 turns it off and frees the cached
  // pages no session holds.
  void set_prefix_cache(int64_t max_pages);
  // Per-op times of the backend (Backend::set_profiling / op_times), rank 0.
  void set_profiling(bool on);
  std::vector<OpTime> op_times();
  // Steps run so far (tests: sessions served per step).
  uint64_t steps_done() const;

 private:
  friend class Session;
  friend class StepRunner;
  void init();
  void loop();
  // Runs fn on the step thread between steps and waits for it (backend work asked for by app threads:
  // page copies, state save/restore). Rethrows what fn throws.
  void run_between_steps(const std::function<void()> &fn);
  bool runnable(const Session &s) const;  // a step may take its pending tokens (engine lock held)
  bool has_work() const;                  // a step should run now (engine lock held)
  void wait_idle(std::unique_lock<std::mutex> &lk, const Session &s);  // until no step holds s
  // The engine lock, taken once no step holds s: what a session's own calls change its token state under.
  std::unique_lock<std::mutex> lock_idle(const Session &s);
  bool ensure_pages(Session &s, int64_t n_tokens);  // false: pool exhausted (lock held)
  void release_pages(Session &s, int64_t keep_tokens);
  // As release_pages, for positions the session's active turn will evaluate again (a retracted token ahead, a
  // failed step): the pages dropped go back into the turn's reservation, as they came out of it when grown, so
  // the turn keeps the admission it had (run-ahead off never took them).
  void return_turn_pages(Session &s, int64_t keep_tokens);
  void detach(Session *s);
  Backend &backend() { return ranks_->leader(); }

  std::shared_ptr<const Model> model_;
  std::shared_ptr<const Vocabulary> vocab_;  // never null
  EngineOptions opt_;
  std::unique_ptr<RankGroup> ranks_;
  std::unique_ptr<KvPagePool> pool_;
  bool mtp_ = false;
  int64_t rank_pages_ = 0;  // data-parallel attention: pages of each rank's pool (Batch::rank_pages), else 0
  bool device_sampling_ = false;
  bool run_ahead_ = false;  // EngineOptions::run_ahead, in effect

  mutable std::mutex mu_;  // guards everything below and every session's token state
  std::condition_variable work_cv_;  // the step thread waits for work
  std::condition_variable done_cv_;  // app threads wait for steps
  std::vector<Session *> sessions_;
  EngineStats stats_;
  uint64_t steps_done_ = 0;
  uint64_t empty_plans_ = 0;  // plans that found nothing to run although has_work() said so (Engine::loop)
  int64_t last_step_tokens_ = 0;
  int step_requests_ = 0;  // Engine::step() callers not answered yet (a step or "no step" answers them all)
  bool stepping_ = false;  // a step is between plan and commit  // Engine::step() callers waiting: every pending session is runnable
  std::deque<std::function<void()>> jobs_;
  std::vector<Session *> expect_;  // sessions about to sample after the last step (Engine::loop)
  bool stop_ = false;
  std::thread loop_;
};

}  // namespace dsrt
