#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/status.h"

namespace dsrt {

Engine::Engine(std::shared_ptr<const Model> model, std::unique_ptr<Backend> backend, const EngineOptions &opt)
    : model_(std::move(model)), backend_(std::move(backend)), opt_(opt) {
  const ModelConfig &c = model_->cfg;
  if (opt_.max_tokens <= 0) opt_.max_tokens = std::min<int64_t>(c.max_position_embeddings, 16384);
  if (opt_.max_batch_tokens <= 0) opt_.max_batch_tokens = 512;
  n_pages_ = (opt_.max_tokens + kPageTokens - 1) / kPageTokens;
  if (n_pages_ > (int64_t(1) << 30)) failf(DSRT_ERR_INVALID_ARGUMENT, "max_tokens ", opt_.max_tokens, " is too large");
  KvCacheSpec spec;
  spec.n_layers = c.num_hidden_layers + int64_t(model_->w.mtp.size());  // MTP layers get their own slots
  spec.width = c.kv_cache_width();
  spec.max_pages = n_pages_;
  backend_->kv_init(spec);
  free_pages_.resize(size_t(n_pages_));
  for (int64_t i = 0; i < n_pages_; i++) free_pages_[size_t(i)] = int32_t(n_pages_ - 1 - i);  // pop_back gives 0 first
  stats_.pages_total = n_pages_;
}

Engine::~Engine() = default;

std::shared_ptr<Session> Engine::create_session(int64_t max_ctx, bool logits_all, uint64_t seed) {
  if (max_ctx <= 0) max_ctx = capacity_tokens();
  max_ctx = std::min<int64_t>(max_ctx, capacity_tokens());
  auto s = std::make_shared<Session>(shared_from_this(), max_ctx, logits_all, seed);
  std::lock_guard lk(mu_);
  sessions_.push_back(s.get());
  return s;
}

void Engine::detach(Session *s) {
  std::lock_guard lk(mu_);
  release_pages(*s, 0);
  sessions_.erase(std::remove(sessions_.begin(), sessions_.end(), s), sessions_.end());
}

bool Engine::ensure_pages(Session &s, int64_t n_tokens) {
  const size_t need = size_t((n_tokens + kPageTokens - 1) / kPageTokens);
  if (need <= s.pages_.size()) return true;
  if (need - s.pages_.size() > free_pages_.size()) return false;
  while (s.pages_.size() < need) {
    s.pages_.push_back(free_pages_.back());
    free_pages_.pop_back();
  }
  return true;
}

void Engine::release_pages(Session &s, int64_t keep_tokens) {
  const size_t keep = size_t((keep_tokens + kPageTokens - 1) / kPageTokens);
  while (s.pages_.size() > keep) {
    free_pages_.push_back(s.pages_.back());
    s.pages_.pop_back();
  }
}

int64_t Engine::step() {
  std::lock_guard lk(mu_);
  return step_locked();
}

int64_t Engine::step_locked() {
  Batch b;
  std::vector<Session *> in_batch;
  std::vector<int32_t> logit_rows;
  std::vector<std::pair<int64_t, int64_t>> rows_of;  // per session in the batch: first logit row, count
  int64_t budget = opt_.max_batch_tokens;
  for (Session *s : sessions_) {
    if (s->pending_.empty() || s->failed_ != DSRT_OK || budget == 0) continue;
    const int64_t n_past = int64_t(s->tokens_.size());
    const int64_t n = std::min<int64_t>(int64_t(s->pending_.size()), budget);
    if (!ensure_pages(*s, n_past + n)) {
      s->failed_ = DSRT_ERR_CONTEXT_FULL;
      s->failed_msg_ = "the engine's KV pool is full (" + std::to_string(capacity_tokens()) +
                       " tokens over all sessions); free or truncate sessions, or raise max_tokens";
      continue;
    }
    SeqSlice sl;
    sl.row0 = int32_t(b.tokens.size());
    sl.n_new = int32_t(n);
    sl.n_past = int32_t(n_past);
    sl.pages = s->pages_.data();
    sl.n_pages = int32_t(s->pages_.size());
    b.seqs.push_back(sl);
    for (int64_t i = 0; i < n; i++) {
      b.tokens.push_back(s->pending_[size_t(i)]);
      b.positions.push_back(int32_t(n_past + i));
    }
    const bool completes = n == int64_t(s->pending_.size());
    const int64_t first = int64_t(logit_rows.size());
    if (s->logits_all_) {
      for (int64_t i = 0; i < n; i++) logit_rows.push_back(sl.row0 + int32_t(i));
    } else if (completes) {
      logit_rows.push_back(sl.row0 + int32_t(n - 1));
    }
    rows_of.push_back({first, int64_t(logit_rows.size()) - first});
    in_batch.push_back(s);
    budget -= n;
  }
  if (in_batch.empty()) return 0;

  const int64_t V = model_->cfg.vocab_size;
  HostVec<float> logits(logit_rows.size() * size_t(V));
  auto t0 = std::chrono::steady_clock::now();
  forward(*model_, *backend_, b, logit_rows, opt_.attention, logits.data());
  stats_.forward_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Commit: tokens move from pending to the cache; logits land in their sessions.
  for (size_t k = 0; k < in_batch.size(); k++) {
    Session &s = *in_batch[k];
    const int64_t n = b.seqs[k].n_new;
    if (!s.pending_started_) {  // the first chunk of a pending run starts a new logits set
      s.logits_.clear();
      s.logits_rows_ = 0;
    }
    s.tokens_.insert(s.tokens_.end(), s.pending_.begin(), s.pending_.begin() + n);
    s.pending_.erase(s.pending_.begin(), s.pending_.begin() + n);
    s.pending_started_ = !s.pending_.empty();
    s.n_evaluated_ += uint64_t(n);
    auto [first, count] = rows_of[k];
    if (count > 0) {
      if (!s.logits_all_) {
        s.logits_.clear();
        s.logits_rows_ = 0;
      }
      const float *src = logits.data() + size_t(first * V);
      s.logits_.insert(s.logits_.end(), src, src + count * V);
      s.logits_rows_ += count;
    }
  }
  stats_.n_steps++;
  stats_.n_tokens += uint64_t(b.n_tokens());
  stats_.max_batch_seqs = std::max<uint64_t>(stats_.max_batch_seqs, in_batch.size());
  return b.n_tokens();
}

void Engine::eval(Session &s, const std::atomic<int> *cancel) {
  std::lock_guard lk(mu_);
  for (;;) {
    if (s.failed_ != DSRT_OK) {
      dsrt_status code = s.failed_;
      std::string msg = s.failed_msg_;
      s.failed_ = DSRT_OK;
      s.pending_.clear();
      s.pending_started_ = false;
      release_pages(s, int64_t(s.tokens_.size()));
      fail(code, msg);
    }
    if (s.pending_.empty()) return;
    if (cancel && cancel->load(std::memory_order_relaxed)) fail(DSRT_ERR_CANCELLED, "evaluation cancelled");
    step_locked();
  }
}

EngineStats Engine::stats() const {
  std::lock_guard lk(mu_);
  EngineStats s = stats_;
  s.n_sessions = int64_t(sessions_.size());
  s.pages_used = n_pages_ - int64_t(free_pages_.size());
  return s;
}

Session::Session(std::shared_ptr<Engine> e, int64_t max_ctx, bool logits_all, uint64_t seed)
    : engine_(std::move(e)), max_ctx_(max_ctx), logits_all_(logits_all), rng_(seed) {}

Session::~Session() { engine_->detach(this); }

void Session::append(const int32_t *tokens, size_t n) {
  const int64_t V = engine_->model().cfg.vocab_size;
  for (size_t i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= V)
      failf(DSRT_ERR_INVALID_ARGUMENT, "token id ", tokens[i], " at index ", i, " is outside the vocabulary [0, ", V, ")");
  std::lock_guard lk(engine_->mu_);
  if (int64_t(tokens_.size() + pending_.size() + n) > max_ctx_)
    failf(DSRT_ERR_CONTEXT_FULL, "appending ", n, " tokens to ", tokens_.size() + pending_.size(),
          " exceeds the session's context of ", max_ctx_, " tokens");
  pending_.insert(pending_.end(), tokens, tokens + n);
}

void Session::truncate(size_t n_keep) {
  std::lock_guard lk(engine_->mu_);
  if (n_keep > tokens_.size())
    failf(DSRT_ERR_INVALID_ARGUMENT, "truncate to ", n_keep, " tokens, but the session holds ", tokens_.size());
  tokens_.resize(n_keep);
  pending_.clear();
  pending_started_ = false;
  failed_ = DSRT_OK;
  logits_.clear();
  logits_rows_ = 0;
  engine_->release_pages(*this, int64_t(n_keep));
}

int32_t Session::sample(float temperature) {
  if (logits_rows_ == 0) fail(DSRT_ERR_BAD_STATE, "no logits: evaluate the session's pending tokens first");
  const int64_t V = engine_->model().cfg.vocab_size;
  return sample_token(logits_.data() + size_t((logits_rows_ - 1) * V), V, temperature, rng_);
}

Session::Stats Session::stats() const {
  std::lock_guard lk(engine_->mu_);
  return {int64_t(tokens_.size()), int64_t(pending_.size()), int64_t(pages_.size()), n_evaluated_};
}

}  // namespace dsrt
