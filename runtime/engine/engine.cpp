#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <thread>

#include "core/log.h"
#include "core/status.h"
#include "dist/host_staged_communicator.h"
#include "dist/process_group.h"
#if DSRT_WITH_CUDA
#include "dist/nccl_communicator.h"
#endif
#include "engine/step_runner.h"

namespace dsrt {

namespace {
// No vocabulary given: no tokenizer, generation ends at the config's EOS ids.
std::shared_ptr<const Vocabulary> or_config_only(std::shared_ptr<const Vocabulary> vocab, const Model &m) {
  return vocab ? std::move(vocab) : Vocabulary::make(m.dir, nullptr, m.cfg.vocab_size, m.cfg.eos_token_ids);
}
}  // namespace

Engine::Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Vocabulary> vocab, const EngineOptions &opt)
    : model_(std::move(model)), vocab_(or_config_only(std::move(vocab), *model_)), opt_(opt) {
  const bool dp = opt_.dist.world > 1 ? opt_.dist.dp_attention : opt_.dp_attention;
  if (dp && opt_.mtp_drafts > 0 && !model_->w.mtp.empty())  // (before any rank joins)
    fail(DSRT_ERR_UNSUPPORTED, "MTP drafts with data-parallel attention (a session's hidden states stay on its rank): "
         "turn one of them off");
  if (dp && std::max(1, opt_.dist.world) * std::max(1, opt_.tp) * std::max(1, opt_.ep) == 1)
    log(LogLevel::Warn, "dsrt: data-parallel attention with one rank does nothing (give the ranks with ep)");
  if (opt_.dist.world > 1) {  // rank 0 of ranks in several processes
    const DistSpec &d = opt_.dist;
    if (d.rank != 0)
      failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", d.rank, " of ", d.world, " is a follower: it runs a worker "
            "(dsrt worker, dsrt_worker_run), not an engine");
    opt_.tp = d.tp;
    opt_.ep = d.ep;
    opt_.dp_attention = d.dp_attention;
    Mapping{d.world, 0, d.tp, d.ep, d.dp_attention}.check_divides(model_->cfg);  // before joining: the followers check the same
    check_gpu_split(opt_.backend_kind, *model_, d.tp, d.ep);
    ProcessRank me = join_as_process(*model_, d, opt_.backend_kind, opt_.backend);
    ranks_ = std::make_unique<RankGroup>(*model_, std::move(me.comm), std::move(me.backend), d.dp_attention);
    init();
    return;
  }
  const int world = std::max(1, opt_.tp) * std::max(1, opt_.ep);
  Mapping{world, 0, std::max(1, opt_.tp), std::max(1, opt_.ep), opt_.dp_attention}.validate();
  const bool gpus = opt_.backend_kind != BackendKind::Cpu && world > 1;
  RankGroup::MakeComms comms;
  if (gpus) {
    check_gpu_split(opt_.backend_kind, *model_, opt_.tp, opt_.ep);
#if DSRT_WITH_CUDA
    // A GPU per rank, opt.device .. opt.device + world - 1, each rank driven by its own thread; NCCL between them.
    std::string why;
    const int n = cuda_devices(&why);
    if (opt_.backend.device + world > n)
      failf(DSRT_ERR_INVALID_ARGUMENT, "tp ", opt_.tp, " x ep ", opt_.ep, " ranks on GPUs ", opt_.backend.device, "..",
            opt_.backend.device + world - 1, " but this machine has ", n, " GPUs", n ? "" : ": ", why);
    const int64_t timeout = dist_timeout_ms(opt_.dist.timeout_ms);
    if (nccl_or_host_staged(std::to_string(world) + " in-process GPU ranks"))
      comms = [&, timeout](const std::vector<Backend *> &bes) { return make_nccl_local_group(opt_.tp, opt_.ep, bes, timeout); };
    else  // correct, and slow: every collective goes through host memory
      comms = [&](const std::vector<Backend *> &bes) { return make_host_staged_local_group(opt_.tp, opt_.ep, bes); };
#else
    fail(DSRT_ERR_UNSUPPORTED, "ranks on several GPUs need a build of dsrt with CUDA (and NCCL at run time)");
#endif
  }
  ranks_ = std::make_unique<RankGroup>(*model_, opt_.tp, opt_.ep, [&](int rank) {
    BackendOptions bo = opt_.backend;
    if (gpus) bo.device += rank;
    else if (world > 1) {  // the machine's threads shared among the ranks
      const int all = bo.n_threads > 0 ? bo.n_threads : int(std::max(1u, std::thread::hardware_concurrency()));
      bo.n_threads = std::max(1, all / world);
    }
    return make_backend(opt_.backend_kind, bo);
  }, comms, opt_.dp_attention);
  init();
}

Engine::Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Vocabulary> vocab,
               std::unique_ptr<Backend> backend, const EngineOptions &opt)
    : model_(std::move(model)), vocab_(or_config_only(std::move(vocab), *model_)), opt_(opt) {
  opt_.tp = opt_.ep = 1;
  opt_.dp_attention = false;
  ranks_ = std::make_unique<RankGroup>(*model_, 1, 1, [&](int) { return std::move(backend); });
  init();
}

void Engine::init() {
  const ModelConfig &c = model_->cfg;
  mtp_ = opt_.mtp_drafts > 0 && !model_->w.mtp.empty();
  const bool dp = opt_.dp_attention && world() > 1;  // (MTP drafts refused with it at construction)
  // The weights first (the MTP layer's only when drafts are on): on a GPU they take the device memory the KV
  // pool is then sized from. They go into the model's store for the device, shared with its other engines.
  // Routed experts the placement left in host memory are read there (expert offload); then the routed experts
  // it put on the device are mapped in host memory too: they are the GPU expert cache's initial contents,
  // which the cache may give up for others.
  std::vector<const Weight *> used, in_host, cached;
  const Placement &pl = model_->placement;
  for (const Weight *w : model_->w.all) {
    const bool mtp = pl.part.at(size_t(w->id)) == Placement::Part::Mtp;
    if (!w->data || (mtp && !mtp_)) continue;
    const bool host = !pl.devices.empty() && pl.where.at(size_t(w->id)) < 0;
    (host ? in_host : used).push_back(w);
    if (!host && pl.part.at(size_t(w->id)) == Placement::Part::RoutedExpert) cached.push_back(w);
  }
  if (!in_host.empty()) in_host.insert(in_host.end(), cached.begin(), cached.end());
  if (world() == 1) {
    backend().prepare_weights(model_->device_weights, used, in_host);
  } else {  // each rank its shard only (a rank in another process prepares its own: RankGroup::kv_init)
    if (!in_host.empty())
      fail(DSRT_ERR_UNSUPPORTED, "expert offload (a device budget below the model) runs on one rank; with tensor or "
           "expert parallelism each GPU holds its shard whole: load the model without a device budget");
    ranks_->for_each_rank([&](Backend &be, const ModelShard &shard) {
      be.prepare_weights(model_->device_weights, shard.weights(mtp_), {});
    });
  }
  // Under a device budget the placement kept the bytes of a default-sized KV pool (model.h, plan_placement):
  // the pool is sized within them, and larger is an error rather than memory taken from the routed experts.
  const uint64_t kv_reserved = pl.devices.empty() ? 0 : pl.devices[0].kv_pool;
  const DType kv_dtype = backend().default_kv_dtype();
  if (opt_.kv_memory_fraction > 0) {  // a share of the reserve, or of what the backend has free now, in whole pages
    const double page_bytes = double(kv_pool_spec(c, model_->w, kv_dtype, kPageTokens).page_bytes());
    const double avail = kv_reserved ? double(kv_reserved) : double(backend().available_memory());
    if (avail <= 0) fail(DSRT_ERR_UNSUPPORTED, "this backend cannot report its free memory: set max_tokens instead");
    const int64_t pages = int64_t(opt_.kv_memory_fraction * avail / page_bytes);
    if (pages < 1)
      failf(DSRT_ERR_OUT_OF_MEMORY, "kv_memory_fraction ", opt_.kv_memory_fraction, " of ", int64_t(avail) >> 20,
            kv_reserved ? " MiB kept for the KV pool" : " MiB free", " is less than one 64-token KV page (",
            int64_t(page_bytes) >> 10, " KiB)");
    opt_.max_tokens = std::min<int64_t>(pages, int64_t(1) << 30) * kPageTokens;
  }
  if (opt_.max_tokens <= 0) opt_.max_tokens = default_kv_tokens(c);
  if (opt_.max_batch_tokens <= 0) opt_.max_batch_tokens = 512;
  const KvCacheSpec spec = kv_pool_spec(c, model_->w, kv_dtype, opt_.max_tokens);
  const int64_t n_pages = spec.max_pages;
  if (n_pages > (int64_t(1) << 30)) failf(DSRT_ERR_INVALID_ARGUMENT, "max_tokens ", opt_.max_tokens, " is too large");
  if (kv_reserved && spec.pool_bytes() > kv_reserved)
    failf(DSRT_ERR_OUT_OF_MEMORY, "a KV pool of ", opt_.max_tokens, " tokens needs ", (spec.pool_bytes() + 1023) >> 10,
          " KiB of ", pl.devices[0].device.str(), " memory, more than the ", kv_reserved >> 10, " KiB (",
          default_kv_tokens(c), " tokens) the device budget kept for it at load (dsrt_model_params.device_memory, "
          "--gpu-memory)");
  ranks_->kv_init(spec, mtp_);
  // With data-parallel attention every rank has a device pool of n_pages for its own sessions; the engine's page
  // ids cover them side by side (a region per rank, Batch::rank_pages).
  rank_pages_ = dp ? n_pages : 0;
  if (dp && n_pages * world() > INT32_MAX)
    failf(DSRT_ERR_INVALID_ARGUMENT, "max_tokens ", opt_.max_tokens, " per rank is too large for ", world(), " ranks");
  pool_ = std::make_unique<KvPagePool>(dp ? n_pages * world() : n_pages, opt_.prefix_cache_pages, dp ? world() : 1);
  // Sampling on the device: one rank in this process (the several-rank path keeps the host sampler), a backend
  // with a sampling kernel.
  const char *ds = std::getenv("DSRT_DEVICE_SAMPLING");
  device_sampling_ = opt_.device_sampling && !(ds && std::string(ds) == "0") && world() == 1 && !ranks_->remote() &&
                     backend().samples_on_device();
  const char *ra = std::getenv("DSRT_RUN_AHEAD");
  run_ahead_ = device_sampling_ && !mtp_ && opt_.run_ahead && !(ra && std::string(ra) == "0");
  stats_.pages_total = pool_->total();
  loop_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  if (loop_.joinable()) loop_.join();
}

std::shared_ptr<Session> Engine::create_session(int64_t max_ctx, bool logits_all, uint64_t seed) {
  if (max_ctx <= 0) max_ctx = session_capacity_tokens();
  max_ctx = std::min<int64_t>(max_ctx, session_capacity_tokens());
  auto s = std::make_shared<Session>(shared_from_this(), max_ctx, logits_all, seed);
  std::lock_guard lk(mu_);
  sessions_.push_back(s.get());
  return s;
}

void Engine::detach(Session *s) {
  std::unique_lock lk(mu_);
  wait_idle(lk, *s);
  release_pages(*s, 0);
  pool_->unreserve(s->kv_);
  sessions_.erase(std::remove(sessions_.begin(), sessions_.end(), s), sessions_.end());
  expect_.erase(std::remove(expect_.begin(), expect_.end(), s), expect_.end());
}

bool Engine::ensure_pages(Session &s, int64_t n_tokens) { return pool_->grow(s.kv_, n_tokens); }

void Engine::release_pages(Session &s, int64_t keep_tokens) { pool_->shrink(s.kv_, keep_tokens); }

void Engine::return_turn_pages(Session &s, int64_t keep_tokens) {
  const int64_t before = int64_t(s.kv_.pages.size());
  pool_->shrink(s.kv_, keep_tokens);
  if (s.turn_active_) pool_->reserve(s.kv_, before - int64_t(s.kv_.pages.size()));
}

void Engine::wait_idle(std::unique_lock<std::mutex> &lk, const Session &s) {
  done_cv_.wait(lk, [&] { return !s.in_flight_; });
}

std::unique_lock<std::mutex> Engine::lock_idle(const Session &s) {
  std::unique_lock lk(mu_);
  wait_idle(lk, s);
  return lk;
}

bool Engine::runnable(const Session &s) const {
  return !s.pending_.empty() && s.failed_ == DSRT_OK && !s.in_flight_ && !s.cancel_requested();
}

// A step runs when someone waits for one; it then takes every session with pending tokens (design.md §4:
// every session of an engine goes through the same step).
bool Engine::has_work() const {
  return std::any_of(sessions_.begin(), sessions_.end(),
                     [&](const Session *s) {
                       return runnable(*s) && (s->demand_ > 0 || step_requests_ > 0 || s->ahead_.valid);
                     });
}

// The step thread: backend jobs of app threads first, then one step at a time over every runnable session.
void Engine::loop() {
  std::unique_lock lk(mu_);
  for (;;) {
    work_cv_.wait(lk, [&] { return stop_ || !jobs_.empty() || has_work(); });
    if (stop_) return;
    if (!jobs_.empty()) {
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lk.unlock();
      job();  // reports through its own state (run_between_steps)
      lk.lock();
      done_cv_.notify_all();
      continue;
    }
    StepRunner step(*this);
    if (step.plan()) {
      stepping_ = true;
      lk.unlock();
      step.run();
      lk.lock();
      last_step_tokens_ = step.commit();
      stepping_ = false;
      steps_done_++;
      step_requests_ = 0;  // every Engine::step() caller waiting now has its step (this one)
      done_cv_.notify_all();
      // Decode rows first: sessions that just got their logits in a generation turn are given the moment their
      // thread takes to sample, so the next step carries their token rather than leaving them a step behind
      // a prefill. Bounded: a thread that does not come back in time waits for the step after.
      expect_ = step.sampling_sessions();
      if (!expect_.empty() && has_work())
        work_cv_.wait_for(lk, std::chrono::milliseconds(opt_.decode_wait_ms), [&] {
          return stop_ || std::all_of(expect_.begin(), expect_.end(), [](const Session *s) {
                   return !s->pending_.empty() || !s->turn_active_ || s->failed_ != DSRT_OK;
                 });
        });
      expect_.clear();
      continue;
    }
    // Nothing could run although has_work() said so: the pending sessions are short of pages and nobody
    // waits for them but an Engine::step() caller, which gets "no step" now. The loop then waits a little
    // (pages come back with other sessions' progress) instead of planning the same nothing at once again.
    empty_plans_++;
    step_requests_ = 0;  // answered: "no step" (a caller's request must not run a step once it has returned)
    done_cv_.notify_all();
    work_cv_.wait_for(lk, std::chrono::milliseconds(5), [&] { return stop_ || !jobs_.empty(); });
  }
}

void Engine::run_between_steps(const std::function<void()> &fn) {
  struct Job {
    bool done = false;
    std::exception_ptr error;
  };
  auto job = std::make_shared<Job>();
  std::unique_lock lk(mu_);
  jobs_.push_back([job, &fn] {
    try {
      fn();
    } catch (...) {
      job->error = std::current_exception();
    }
    job->done = true;  // read under the engine lock, which the loop takes before notifying
  });
  work_cv_.notify_one();
  done_cv_.wait(lk, [&] { return job->done; });
  if (job->error) std::rethrow_exception(job->error);
}

int64_t Engine::step() {
  std::unique_lock lk(mu_);
  step_requests_++;
  const uint64_t before = steps_done_, empty_before = empty_plans_;
  work_cv_.notify_one();
  // The step this call asked for, or the one in flight when there is nothing else to run, or none when
  // nothing pending can run (short of pages).
  done_cv_.wait(lk, [&] {
    return steps_done_ > before || (!stepping_ && !has_work()) || (!stepping_ && empty_plans_ > empty_before);
  });
  if (steps_done_ == before && empty_plans_ == empty_before) step_requests_--;  // (nothing to run: not answered)
  return steps_done_ > before ? last_step_tokens_ : 0;
}

void Engine::eval(Session &s, const std::atomic<int> *cancel, const std::atomic<int> *cancel2, bool take_ahead) {
  std::unique_lock lk(mu_);
  auto cancelled = [&] {
    return (cancel && cancel->load(std::memory_order_relaxed)) || (cancel2 && cancel2->load(std::memory_order_relaxed));
  };
  s.demand_++;
  s.eval_cancel_ = cancel;
  if (!take_ahead) s.plain_evals_++;  // (no step runs ahead while this waits: StepRunner::run_ahead)
  struct Leave {
    Session &s;
    bool plain;
    ~Leave() {
      s.demand_--;
      if (plain) s.plain_evals_--;
      s.eval_cancel_ = nullptr;
    }
  } leave{s, !take_ahead};
  work_cv_.notify_one();
  for (;;) {
    // A step ran ahead with the turn's next token (Session::ahead_): next() takes it now, while the step that
    // evaluates it may be running.
    if (take_ahead && s.ahead_.valid) return;
    if (!take_ahead && s.ahead_.valid && !s.in_flight_) s.retract_ahead();  // (not this call's to evaluate)
    if (!s.in_flight_) {
      if (s.failed_ != DSRT_OK) {
        // The run of pending tokens this step belonged to is rolled back whole: the session is as it was
        // before they were appended, so the same input can be sent again.
        const dsrt_status code = s.failed_;
        const std::string msg = s.failed_msg_;
        s.failed_ = DSRT_OK;
        s.pending_.clear();
        s.sampled_pending_ = false;
        if (s.pending_started_ && int64_t(s.tokens_.size()) > s.run_start_) {
          s.forget_mtp_after(s.run_start_);
          s.tokens_.resize(size_t(s.run_start_));
          s.published_ = std::min<int64_t>(s.published_, s.run_start_ / kPageTokens);
          s.logits_.clear();
          s.logits_rows_ = 0;
          s.logits_on_device_ = false;
          s.presampled_ = {};
        }
        s.pending_started_ = false;
        release_pages(s, int64_t(s.tokens_.size()));
        fail(code, msg);
      }
      if (s.pending_.empty()) return;
      if (cancelled()) fail(DSRT_ERR_CANCELLED, "evaluation cancelled");
    }
    // Cancel flags are plain atomics set by other threads: look at them every few milliseconds.
    done_cv_.wait_for(lk, std::chrono::milliseconds(5));
  }
}

EngineStats Engine::stats() const {
  std::lock_guard lk(mu_);
  EngineStats s = stats_;
  s.n_sessions = int64_t(sessions_.size());
  s.pages_used = pool_->used();
  s.pages_cached = pool_->cached();
  s.prefix_cache_limit = pool_->cache_limit();
  return s;
}

void Engine::set_prefix_cache(int64_t max_pages) {
  std::lock_guard lk(mu_);  // between steps: a step's plan and commit take the lock
  pool_->set_cache_limit(max_pages);
}

uint64_t Engine::steps_done() const {
  std::lock_guard lk(mu_);
  return steps_done_;
}

void Engine::set_profiling(bool on) {
  run_between_steps([&] { backend().set_profiling(on); });
}

std::vector<OpTime> Engine::op_times() {
  std::vector<OpTime> t;
  run_between_steps([&] { t = backend().op_times(); });
  return t;
}

}  // namespace dsrt
