// A session's own calls: appending, truncating, forking, and the turn state machine (start, next, finish).
// Token state changes under the engine lock, and only while no step holds the session (Engine::lock_idle).
#include "engine/session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "core/status.h"
#include "engine/engine.h"

namespace dsrt {

Session::Session(std::shared_ptr<Engine> e, int64_t max_ctx, bool logits_all, uint64_t seed)
    : engine_(std::move(e)), max_ctx_(max_ctx), logits_all_(logits_all), rng_(seed) {}

Session::~Session() { engine_->detach(this); }

int64_t Session::vocab() const { return engine_->model().cfg.vocab_size; }

void Session::eval(const std::atomic<int> *cancel) {
  lock_settled();  // (a token a step ran ahead with in a turn is not this call's to evaluate)
  engine_->eval(*this, cancel, &cancel_flag_, /*take_ahead=*/false);
  lock_settled();
}

std::unique_lock<std::mutex> Session::lock_settled() {
  auto lk = engine_->lock_idle(*this);
  retract_ahead();
  return lk;
}

// The token a step ran ahead with (ahead_), not taken by the turn, goes back to being the draw it was, so that
// the session is exactly as it would be without run-ahead: out of pending_ (or, when a step evaluated it, out
// of the cache, and its successor's draw goes), presampled_ = its draw, the random stream back to before it,
// the last token's logits on the device (the draw consumed them). A step that failed on it fails nobody: the
// turn's next() appends the token again and waits for its step as before. Engine lock held, session idle.
void Session::retract_ahead() {
  if (!ahead_.valid) return;
  Presample ps;
  ps.valid = true;
  ps.token = ahead_.token;
  std::copy(ahead_.rng_before, ahead_.rng_before + 4, ps.rng_before);
  rng_.state(ps.rng_after);
  if (!pending_.empty()) {  // not evaluated (or its step failed): the only pending token (appends retract first)
    pending_.pop_back();
    sampled_pending_ = false;
    pending_started_ = false;
    failed_ = DSRT_OK;
    failed_msg_.clear();
  } else {  // evaluated (never published: publish_pages leaves it out), never counted as the session's
    tokens_.pop_back();
    published_ = std::min<int64_t>(published_, int64_t(tokens_.size()) / kPageTokens);
    engine_->return_turn_pages(*this, int64_t(tokens_.size()));
    if (n_evaluated_ > 0) n_evaluated_--;
  }
  rng_.set_state(ahead_.rng_before);
  presampled_ = std::move(ps);
  logits_.clear();
  logits_rows_ = 0;
  logits_on_device_ = true;
  ahead_ = {};
  engine_->stats_.tokens_retracted++;
}

void Session::cancel() {
  cancel_flag_.store(1, std::memory_order_relaxed);
  engine_->done_cv_.notify_all();  // a waiting eval looks at the flag now
}

bool Session::turn_active() const {
  std::lock_guard lk(engine_->mu_);
  return turn_active_;
}

bool Session::cancel_requested() const {
  auto set = [](const std::atomic<int> *f) { return f && f->load(std::memory_order_relaxed); };
  return set(&cancel_flag_) || set(eval_cancel_) || (turn_active_ && set(gp_.cancel));
}

void Session::append(const int32_t *tokens, size_t n) {
  const int64_t V = engine_->model().cfg.vocab_size;
  for (size_t i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= V)
      failf(DSRT_ERR_INVALID_ARGUMENT, "token id ", tokens[i], " at index ", i, " is outside the vocabulary [0, ", V, ")");
  auto lk = lock_settled();
  if (int64_t(tokens_.size() + pending_.size() + n) > max_ctx_)
    failf(DSRT_ERR_CONTEXT_FULL, "appending ", n, " tokens to ", tokens_.size() + pending_.size(),
          " exceeds the session's context of ", max_ctx_, " tokens");
  pending_.insert(pending_.end(), tokens, tokens + n);
}

void Session::append_text(std::string_view text, bool parse_special, bool add_special) {
  // The tokenizer's one prompt path (BOS by its add_bos_token rule), as dsrt_tokenize: the two never disagree.
  const std::vector<int32_t> ids = engine_->vocab().tok().encode_prompt(text, add_special, parse_special, &cancel_flag_);
  append(ids.data(), ids.size());
}

void Session::reset() {
  truncate(0);
  auto lk = lock_settled();  // the step thread reads turn_active_
  messages_ = nlohmann::ordered_json::array();
  turn_active_ = false;
  engine_->pool_->unreserve(kv_);
}

std::shared_ptr<Session> Session::fork() {
  auto s = engine_->create_session(max_ctx_, logits_all_, 0);
  // The new session shares every page (no copy): whichever of the two writes into a shared page first takes
  // a copy of it then (StepRunner, copy-on-write).
  auto lk = lock_settled();
  drop_drafts();
  engine_->pool_->share(kv_, s->kv_, KvPagePool::pages_for(int64_t(tokens_.size())));
  s->published_ = published_;
  s->tokens_ = tokens_;
  s->pending_ = pending_;
  s->logits_ = logits_;
  s->logits_rows_ = logits_rows_;
  s->logits_on_device_ = logits_on_device_;
  s->mtp_pos_ = mtp_pos_;
  s->mtp_hidden_ = mtp_hidden_;
  s->messages_ = messages_;
  s->tools_json_ = tools_json_;
  uint64_t st[4];
  rng_.state(st);
  s->rng_.set_state(st);
  return s;
}

void Session::start(const GenParams &p) {
  const Model &m = engine_->model();
  if (!m.has_weights) fail(DSRT_ERR_UNSUPPORTED, "the model was loaded for its tokenizer only");
  {
    std::lock_guard lk(engine_->mu_);
    if (tokens_.empty() && pending_.empty()) fail(DSRT_ERR_BAD_STATE, "nothing to generate from: append a prompt first");
    last_.prompt_tokens = int64_t(pending_.size()) - (ahead_.valid && !pending_.empty() ? 1 : 0);  // (start mid-turn)
    last_.cached_tokens = 0;
  }
  if (p.max_new_tokens < 0) fail(DSRT_ERR_INVALID_ARGUMENT, "max_new_tokens must be >= 0");
  const Vocabulary &v = engine_->vocab();
  if (!p.stop_strings.empty() && !v.tokenizer) v.tok();  // throws the no-tokenizer error
  {
    auto lk = lock_settled();
    gp_ = p;
    drop_drafts();
    // A turn before this one (not finished: start() mid-turn, or a fork of one) left the last token's logits
    // on the device with the draw it will not take: that token goes back to pending, as in finish_turn.
    repend_device_logits();
    stopping_ = false;
    last_.mtp_drafted = last_.mtp_accepted = 0;
    turn_active_ = true;  // under the lock: the step thread reads it (drafting, cancel)
    // Admission: the pages this turn may fill are reserved now (as far as the pool has them unreserved), so a
    // session that starts later cannot take them and end this turn early.
    const int64_t room = p.max_new_tokens > 0 ? p.max_new_tokens + engine_->opt_.mtp_drafts : max_ctx_;
    const int64_t want = std::min<int64_t>(max_ctx_, int64_t(tokens_.size() + pending_.size()) + room);
    // Pages it holds that others share (a fork's, a truncation into a cached page) are copied before it writes
    // into them: one more page each.
    int64_t first_written = int64_t(tokens_.size());
    if (engine_->mtp_) first_written = std::min(first_written, mtp_pos_);
    const int64_t copies = engine_->pool_->shared_from(kv_, size_t(first_written / kPageTokens));
    engine_->pool_->unreserve(kv_);
    prefer_cached_region(KvPagePool::pages_for(want) + copies);
    engine_->pool_->reserve(kv_, KvPagePool::pages_for(want) - int64_t(kv_.pages.size()) + copies);
    // The random stream and the bans under the lock too: a step samples this turn's tokens on the device from
    // copies it takes at plan (StepRunner).
    if (p.has_seed) rng_.reseed(p.seed);
    presampled_ = {};
    ahead_ = {};
    turn_taken_ = 0;
    eog_ = v.eog_ids;
    banned_ = v.unused_ids;
    if (p.ignore_eos) banned_.insert(banned_.end(), eog_.begin(), eog_.end());
  }
  detok_.reset();
  if (v.tokenizer) detok_ = std::make_unique<Detokenizer>(*v.tokenizer, p.skip_special, p.stop_strings);
  finish_pending_ = Finish::None;
  n_generated_ = 0;
  reply_.clear();
  cancel_flag_.store(0);
  turn_start_ = std::chrono::steady_clock::now();
  std::lock_guard lk(engine_->mu_);  // (stats() reads last_ from any thread)
  last_.generated_tokens = 0;
  last_.ttft_seconds = 0;
  last_.decode_tokens_per_second = 0;
}

void Session::forget_mtp_after(int64_t n_keep) {
  if (mtp_pos_ + int64_t(mtp_hidden_.size()) / engine_->model().cfg.hidden_size > n_keep) {
    mtp_hidden_.clear();
    mtp_pos_ = std::min(mtp_pos_, n_keep);
  }
}

void Session::drop_drafts() {
  if (drafts_.empty()) return;
  const int64_t V = engine_->model().cfg.vocab_size, H = engine_->model().cfg.hidden_size;
  const size_t k = drafts_.size();
  tokens_.resize(tokens_.size() - k);
  engine_->release_pages(*this, int64_t(tokens_.size()));
  if (logits_rows_ == int64_t(k) + 1) {  // keep the first row: the logits of the last cached token
    logits_.resize(size_t(V));
    logits_rows_ = 1;
  }
  const int64_t waiting = int64_t(tokens_.size()) - mtp_pos_;  // the rows of cached positions still wait
  if (int64_t(mtp_hidden_.size()) > waiting * H) mtp_hidden_.resize(size_t(std::max<int64_t>(waiting, 0) * H));
  drafts_.clear();
}

void Session::repend_device_logits() {
  if (!logits_on_device_ || !pending_.empty() || logits_rows_ != 0 || tokens_.empty() || !drafts_.empty()) return;
  // The last step evaluated the token the turn emitted last (it runs ahead of the consumer) and sampled
  // its successor on the device, which this turn does not take (it ended at that token, or the step that
  // was to evaluate that successor failed and was rolled back): those logits never reached the host. The
  // token goes back to pending, so whatever comes next (a turn, an eval) evaluates it again at the same
  // position, rewriting the same cache entry, and gets its logits.
  const int32_t last = tokens_.back();
  tokens_.pop_back();
  published_ = std::min<int64_t>(published_, int64_t(tokens_.size()) / kPageTokens);
  pending_.insert(pending_.begin(), last);
  mtp_pos_ = std::min<int64_t>(mtp_pos_, int64_t(tokens_.size()));
  const int64_t H = engine_->model().cfg.hidden_size, waiting = int64_t(tokens_.size()) - mtp_pos_;
  if (int64_t(mtp_hidden_.size()) > waiting * H) mtp_hidden_.resize(size_t(std::max<int64_t>(waiting, 0) * H));
  engine_->release_pages(*this, int64_t(tokens_.size()));  // (a page it had alone comes back with its step)
  // logits_on_device_ stays: the session is as when that token was appended and not evaluated yet (no logits on
  // the host; logits_view says where they were).
}

Event Session::finish_turn(Finish why, int32_t token) {
  {
    auto lk = lock_settled();
    drop_drafts();
    turn_active_ = false;
    repend_device_logits();
    stopping_ = false;
    presampled_ = {};  // a draw the turn did not take (cancelled, context full): the stream stays where it is
    engine_->pool_->unreserve(kv_);
    engine_->work_cv_.notify_one();
  }
  cancel_flag_.store(0);  // a cancel ends this turn, not the session's later calls
  Event ev;
  ev.done = true;
  ev.finish = why;
  ev.token = token;
  if (detok_) ev.text = detok_->flush();
  reply_ += ev.text;
  auto now = std::chrono::steady_clock::now();
  {
    std::lock_guard lk(engine_->mu_);  // (stats() reads last_ from any thread)
    if (n_generated_ > 1)
      last_.decode_tokens_per_second = double(n_generated_ - 1) / std::chrono::duration<double>(now - first_token_).count();
    last_.generated_tokens = n_generated_;
  }
  if (!messages_.empty()) messages_.push_back({{"role", "assistant"}, {"content", reply_}});
  return ev;
}

// The turn's next token from this session's logits after its step: the verification of an MTP draft
// (*accepted: the draft was right, its cache entry stays), the step's draw on the device, or a draw here.
int32_t Session::sample_next(bool &accepted) {
  if (logits_rows_ == 0 && !presampled_.valid) fail(DSRT_ERR_INTERNAL, "no logits after evaluation");
  const int64_t V = engine_->model().cfg.vocab_size;
  int32_t tok;
  if (!drafts_.empty()) {
    // The step verified [sampled token, drafts...]: logits_ row 0 predicts the first draft's position. Sample
    // that token as always (same distribution, same random draw); if it is the draft, the draft's cache entry
    // and the next logits row are already there, else the drafts leave. Either way the output is what it would
    // have been without MTP.
    std::lock_guard lk(engine_->mu_);
    tok = sample_token(logits_.data(), V, gp_.sampling, tokens_.data(), tokens_.size() - drafts_.size(), banned_,
                       rng_);
    keep_sampled(logits_.data(), tok);
    if (tok == drafts_.front()) {
      accepted = true;
      last_.mtp_accepted++;
      engine_->stats_.mtp_accepted++;
      drafts_.erase(drafts_.begin());
      logits_.erase(logits_.begin(), logits_.begin() + V);
      logits_rows_--;
    } else {
      drop_drafts();
    }
  } else if (presampled_.valid) {  // sampled on the device by the step: the same draw from the same stream
    const Presample ps = std::move(presampled_);
    presampled_ = {};
    uint64_t st[4];
    rng_.state(st);
    if (!std::equal(st, st + 4, ps.rng_before)) fail(DSRT_ERR_INTERNAL, "the random stream moved after the step sampled");
    if (ps.status != DSRT_OK) throw Error(ps.status, ps.error);
    rng_.set_state(ps.rng_after);
    tok = ps.token;
    if (keep_logprobs_) {  // turned on after the step was planned: this token's row was not kept
      sampled_row_.clear();
      sampled_token_ = -1;
    }
  } else {  // unlocked: this session is idle with nothing pending, so no step writes its logits
    tok = sample_token(logits_.data() + size_t((logits_rows_ - 1) * V), V, gp_.sampling, tokens_.data(),
                       tokens_.size(), banned_, rng_);
    keep_sampled(logits_.data() + size_t((logits_rows_ - 1) * V), tok);
  }
  return tok;
}

Event Session::next() {
  if (!turn_active_) fail(DSRT_ERR_BAD_STATE, "no generation turn in progress: call start first");
  if (finish_pending_ != Finish::None) return finish_turn(finish_pending_, -1);
  // A token a step ran ahead with (ahead_) is taken below without waiting; else this turn's next step, if it
  // has not run yet (which may itself run ahead: eval returns then, and that token comes first).
  auto ahead_valid = [&] {
    std::lock_guard lk(engine_->mu_);
    return ahead_.valid;
  };
  bool ahead = ahead_valid();
  if (!ahead) {
    try {
      engine_->eval(*this, gp_.cancel, &cancel_flag_, /*take_ahead=*/true);
    } catch (const Error &e) {
      if (e.code() == DSRT_ERR_CANCELLED) return finish_turn(Finish::Cancelled, -1);
      if (e.code() == DSRT_ERR_CONTEXT_FULL) return finish_turn(Finish::ContextFull, -1);
      Event ev = finish_turn(Finish::Error, -1);
      ev.status = e.code();
      ev.error = e.what();
      return ev;
    }
    ahead = ahead_valid();
  }
  if ((gp_.cancel && gp_.cancel->load()) || cancel_flag_.load()) return finish_turn(Finish::Cancelled, -1);
  if (gp_.max_new_tokens > 0 && n_generated_ >= gp_.max_new_tokens) return finish_turn(Finish::Length, -1);
  int32_t tok = -1;
  bool took = false;
  if (ahead) {  // (its room in the context was checked when it went into pending_)
    std::lock_guard lk(engine_->mu_);
    // (Looked at again under the lock: a step that found no page for it or failed on it may have taken it back
    // meanwhile; it is then the draw again, taken below. The session is idle then, with nothing pending.)
    if (ahead_.valid) {
      tok = ahead_.token;
      ahead_ = {};
      turn_taken_++;
      took = true;
      if (keep_logprobs_) {  // turned on after the step was planned: this token's row was not kept
        sampled_row_.clear();
        sampled_token_ = -1;
      }
    }
  }
  if (!took) {
    if (int64_t(tokens_.size() + pending_.size() - drafts_.size()) >= max_ctx_) return finish_turn(Finish::ContextFull, -1);
    bool accepted = false;  // the token is an accepted draft, already in the cache
    try {
      tok = sample_next(accepted);
    } catch (const Error &e) {  // non-finite logits, nothing left to sample: the turn ends with the error
      Event ev = finish_turn(Finish::Error, -1);
      ev.status = e.code();
      ev.error = e.what();
      return ev;
    }
    std::lock_guard lk(engine_->mu_);
    turn_taken_++;
    if (!accepted) {  // room was checked above; the flag goes with the token (steps read it to draft)
      pending_.push_back(tok);
      sampled_pending_ = true;
      engine_->work_cv_.notify_one();  // the step thread may be holding the next step for this token
    }
  }
  if (n_generated_++ == 0) {
    first_token_ = std::chrono::steady_clock::now();
    std::lock_guard lk(engine_->mu_);  // (stats() reads last_ from any thread)
    last_.ttft_seconds = std::chrono::duration<double>(first_token_ - turn_start_).count();
  }
  const bool eog = !gp_.ignore_eos && std::binary_search(eog_.begin(), eog_.end(), tok);
  if (eog) return finish_turn(Finish::Eos, tok);
  if (std::find(gp_.stop_tokens.begin(), gp_.stop_tokens.end(), tok) != gp_.stop_tokens.end())
    return finish_turn(Finish::StopToken, tok);
  Event ev;
  ev.token = tok;
  if (detok_) {
    ev.text = detok_->push(tok);
    reply_ += ev.text;
    if (detok_->stopped()) finish_pending_ = Finish::StopString;
  }
  if (finish_pending_ == Finish::None && gp_.max_new_tokens > 0 && n_generated_ >= gp_.max_new_tokens)
    finish_pending_ = Finish::Length;
  if (finish_pending_ != Finish::None) {
    // The turn ends at this token: no step runs ahead with its successor (nor evaluates one already appended,
    // when no step has taken it yet); finish_turn then waits for no step of a token nobody takes.
    std::lock_guard lk(engine_->mu_);
    stopping_ = true;
    if (ahead_.valid && !in_flight_) retract_ahead();
  }
  return ev;
}

void Session::truncate(size_t n_keep) {
  auto lk = lock_settled();
  drop_drafts();
  if (n_keep > tokens_.size())
    failf(DSRT_ERR_INVALID_ARGUMENT, "truncate to ", n_keep, " tokens, but the session holds ", tokens_.size());
  if (n_keep < tokens_.size()) forget_mtp_after(int64_t(n_keep));
  tokens_.resize(n_keep);
  published_ = std::min<int64_t>(published_, int64_t(n_keep) / kPageTokens);
  pending_.clear();
  pending_started_ = false;
  sampled_pending_ = false;
  failed_ = DSRT_OK;
  logits_.clear();
  logits_rows_ = 0;
  logits_on_device_ = false;
  presampled_ = {};
  engine_->release_pages(*this, int64_t(n_keep));
}

static const char *on_device_text =
    "no logits on the host: this session's last step belonged to a generation turn, whose tokens are sampled where "
    "the logits are computed (the GPU); evaluate with no turn active, or create the session with logits_all or turn "
    "on dsrt_session_keep_logprobs before the turn, to keep them";

// Embedding rows that are no token (padding past the tokenizer, spec §3.11) are never sampled.
int32_t Session::sample(float temperature) {
  auto lk = lock_settled();  // a step may be replacing the logits of this session's pending tokens
  if (logits_rows_ == 0 && logits_on_device_) fail(DSRT_ERR_BAD_STATE, on_device_text);
  if (logits_rows_ == 0) fail(DSRT_ERR_BAD_STATE, "no logits: evaluate the session's pending tokens first");
  presampled_ = {};  // (the stream moves here)
  const int64_t V = engine_->model().cfg.vocab_size;
  SamplingParams p;
  p.temperature = temperature;
  const float *row = logits_.data() + size_t((logits_rows_ - 1) * V);
  const int32_t tok = sample_token(row, V, p, nullptr, 0, engine_->vocab().unused_ids, rng_);
  keep_sampled(row, tok);
  return tok;
}

void Session::keep_sampled(const float *row, int32_t tok) {
  if (!keep_logprobs_) return;
  sampled_row_.assign(row, row + vocab());
  sampled_token_ = tok;
}

float Session::token_logprobs(size_t n_top, int32_t *token, std::vector<std::pair<int32_t, float>> &top) const {
  if (sampled_token_ < 0)
    fail(DSRT_ERR_BAD_STATE, "no sampled token kept: logprobs follow dsrt_session_next or dsrt_session_sample "
                             "while dsrt_session_keep_logprobs is on");
  const float *x = sampled_row_.data();
  const size_t V = sampled_row_.size();
  float mx = -INFINITY;
  for (size_t i = 0; i < V; i++) mx = std::max(mx, x[i]);
  double sum = 0.0;
  for (size_t i = 0; i < V; i++) sum += std::exp(double(x[i]) - double(mx));
  const double lse = double(mx) + std::log(sum);  // the row was sampled from, so it is finite somewhere
  top.clear();
  n_top = std::min(n_top, V);
  if (n_top > 0) {
    std::vector<int32_t> ids(V);
    for (size_t i = 0; i < V; i++) ids[i] = int32_t(i);
    std::partial_sort(ids.begin(), ids.begin() + std::ptrdiff_t(n_top), ids.end(),
                      [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
    for (size_t i = 0; i < n_top; i++) top.push_back({ids[i], float(double(x[ids[i]]) - lse)});
  }
  if (token) *token = sampled_token_;
  return float(double(x[sampled_token_]) - lse);
}

// With nothing pending no step touches this session, so the views point into it directly; with tokens
// pending (a turn's last sample, or appended ones a step may take) they are copies.
Session::LogitsView Session::logits_view() {
  std::lock_guard lk(engine_->mu_);
  const int64_t rows = drafts_.empty() ? logits_rows_ : std::min<int64_t>(logits_rows_, 1);
  // (A token a step ran ahead with: the last emitted token's logits were sampled on the device; rows the step
  // that evaluated the token ahead copied are that token's, not the session's yet.)
  if ((rows == 0 && logits_on_device_) || ahead_.valid) fail(DSRT_ERR_BAD_STATE, on_device_text);
  if (pending_.empty()) return {logits_.data(), rows};
  logits_snapshot_.assign(logits_.data(), logits_.data() + rows * vocab());
  return {logits_snapshot_.data(), rows};
}

std::span<const int32_t> Session::tokens_view() {
  std::lock_guard lk(engine_->mu_);
  const size_t n = size_t(visible_tokens());
  if (pending_.empty()) return {tokens_.data(), n};
  tokens_snapshot_.assign(tokens_.begin(), tokens_.begin() + std::ptrdiff_t(n));
  return tokens_snapshot_;
}

SessionStats Session::stats() const {
  std::lock_guard lk(engine_->mu_);
  SessionStats s = last_;
  s.n_tokens = int64_t(tokens_.size()) - ahead_in_cache();  // (not the turn's yet: a step ran ahead with it)
  s.n_pending = int64_t(pending_.size()) - (ahead_.valid && !pending_.empty() ? 1 : 0);
  s.n_pages = visible_pages();
  s.n_evaluated = n_evaluated_;
  return s;
}

int64_t Session::visible_pages() const {
  int64_t n = int64_t(kv_.pages.size());
  // A page taken for the token a step ran ahead with alone (its first position; taken at the plan of the step that
  // evaluates it).
  if (ahead_.valid) {
    const int64_t at = int64_t(tokens_.size()) - ahead_in_cache();  // its position
    if (at % kPageTokens == 0 && n == KvPagePool::pages_for(at + 1)) n--;
  }
  return n;
}

std::vector<int32_t> Session::tokens_and_pending() const {
  std::vector<int32_t> seq(tokens_);
  seq.insert(seq.end(), pending_.begin(), pending_.end());
  return seq;
}

void Session::prefer_cached_region(int64_t pages) {
  KvPagePool &pool = *engine_->pool_;
  // A session holding nothing yet, with data-parallel attention: of the ranks with room for the turn, the one
  // whose cache holds the longest cached prefix of its tokens, so that its reservation (which fixes the rank)
  // does not land where the prefix is not.
  if (pool.regions() == 1 || kv_.region >= 0 || !pool.cache_enabled()) return;
  const std::vector<int32_t> seq = tokens_and_pending();
  const int64_t total = int64_t(seq.size());
  size_t best = 0;
  for (int r = 0; r < pool.regions(); r++) {  // (each region caches its own copy of a prefix)
    if (pool.unreserved(r) < pages) continue;
    const PrefixIndex::Walk w = pool.match(seq.data(), total, total / kPageTokens, r);
    if (w.pages.size() > best) best = w.pages.size(), kv_.region = r;
  }
}

int64_t Session::adopt_cached_prefix() {
  KvPagePool &pool = *engine_->pool_;
  // Not for a turn's sampled token (a decode row: at most the rest of its page to gain, for a walk over the
  // whole sequence under the engine lock).
  if (logits_all_ || pending_.empty() || sampled_pending_ || !drafts_.empty() || !pool.cache_enabled()) return 0;
  const int64_t n_past = int64_t(tokens_.size()), total = n_past + int64_t(pending_.size());
  if (total / kPageTokens <= n_past / kPageTokens) return 0;  // no full page beyond those it holds
  const std::vector<int32_t> seq = tokens_and_pending();
  // Cached pages of the session's region only (its cache lives on one rank); a session without a region yet
  // takes the region of the pages it matches.
  const PrefixIndex::Walk w = pool.match(seq.data(), total, total / kPageTokens, kv_.region);
  const int region = w.pages.empty() ? kv_.region : pool.region_of(w.pages[0]);
  // The session keeps its own full pages (same tokens, same values); cached pages replace the rest, as far as
  // the region has room for those that are idle (what affordable() says when the session has that region).
  const int64_t keep = n_past / kPageTokens;
  int64_t m = keep, cost = 0;
  while (m < int64_t(w.pages.size())) {
    const int64_t c = pool.is_idle(w.pages[size_t(m)]) ? 1 : 0;
    if (cost + c > kv_.reserved + pool.unreserved(region)) break;
    cost += c;
    m++;
  }
  // At least one token is evaluated (its logits are the run's result); under the automatic attention form, at
  // least three, so that the tail is a prefill chunk like the full prompt's (a chunk of 1 or 2 tokens would take
  // the absorbed form, equal only in exact arithmetic). The last cached page is then copied, not shared.
  const int64_t min_tail = engine_->opt_.attention == AttentionPolicy::Auto ? 3 : 1;
  const int64_t n_cached = std::min(m * kPageTokens, total - std::min(min_tail, total));
  if (n_cached <= n_past) return 0;
  pool.shrink(kv_, keep * kPageTokens);  // its partial page, if any: the cached one holds the same and more
  for (int64_t k = keep; k < m; k++) pool.adopt(kv_, w.pages[size_t(k)]);
  const int64_t taken = n_cached - n_past;
  tokens_.insert(tokens_.end(), pending_.begin(), pending_.begin() + taken);
  pending_.erase(pending_.begin(), pending_.begin() + taken);
  // MTP: the cached pages' MTP layer holds their writer's entries; this session's own go on from here.
  mtp_pos_ = n_cached;
  mtp_hidden_.clear();
  published_ = std::min<int64_t>(published_, keep);
  last_.cached_tokens += taken;
  engine_->stats_.prefix_hits++;
  engine_->stats_.prefix_tokens += uint64_t(taken);
  return taken;
}

bool Session::make_writable(int64_t from, std::vector<PageCopy> &copies) {
  KvPagePool &pool = *engine_->pool_;
  const size_t first = size_t(std::max<int64_t>(from, 0) / kPageTokens);
  int64_t n = 0;
  for (size_t i = first; i < kv_.pages.size(); i++) n += pool.shared(kv_.pages[i]) ? 1 : 0;
  if (n == 0) return true;
  if (!pool.affordable(kv_, n)) return false;
  for (size_t i = first; i < kv_.pages.size(); i++) {
    if (!pool.shared(kv_.pages[i])) continue;
    const int32_t to = pool.take(kv_);
    if (to < 0) fail(DSRT_ERR_INTERNAL, "KV page pool: no page for a copy that was counted");
    copies.push_back({i, kv_.pages[i], to});
    kv_.pages[i] = to;
  }
  return true;
}

void Session::publish_pages() {
  KvPagePool &pool = *engine_->pool_;
  if (!pool.cache_enabled()) return;
  int64_t n_final = visible_tokens();  // (not the token a step ran ahead with: the turn may never take it)
  if (engine_->mtp_) n_final = std::min(n_final, mtp_pos_);  // the MTP layer's entries are final below mtp_pos_
  const int64_t full = std::min<int64_t>(n_final / kPageTokens, int64_t(kv_.pages.size()));
  if (full <= published_) return;
  pool.publish(tokens_.data(), full, kv_);
  published_ = full;
}

}  // namespace dsrt
