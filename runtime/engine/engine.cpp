#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "core/status.h"
#include "text/chat_template.h"

namespace dsrt {

Engine::Engine(std::shared_ptr<const Model> model, std::unique_ptr<Backend> backend, const EngineOptions &opt)
    : model_(std::move(model)), backend_(std::move(backend)), opt_(opt) {
  const ModelConfig &c = model_->cfg;
  mtp_ = opt_.mtp_drafts > 0 && !model_->w.mtp.empty();
  // The weights first (the MTP layer's only when drafts are on): on a GPU they take the device memory the KV
  // pool is then sized from.
  std::vector<const Weight *> used;
  for (const Weight *w : model_->w.all) {
    const std::string &n = w->name();
    const bool mtp = n.rfind("model.layers.", 0) == 0 && std::atoll(n.c_str() + 13) >= c.num_hidden_layers;
    if (w->data && (!mtp || mtp_)) used.push_back(w);
  }
  backend_->prepare_weights(used);
  KvCacheSpec spec;
  spec.n_layers = c.num_hidden_layers + int64_t(model_->w.mtp.size());  // MTP layers get their own slots
  spec.width = c.kv_cache_width();
  if (opt_.kv_memory_fraction > 0) {  // a share of what the backend has free now, in whole pages
    const double page_bytes = double(spec.n_layers * spec.width * kPageTokens) * sizeof(float);
    const double avail = double(backend_->available_memory());
    if (avail <= 0) fail(DSRT_ERR_UNSUPPORTED, "this backend cannot report its free memory: set max_tokens instead");
    const int64_t pages = int64_t(opt_.kv_memory_fraction * avail / page_bytes);
    if (pages < 1)
      failf(DSRT_ERR_OUT_OF_MEMORY, "kv_memory_fraction ", opt_.kv_memory_fraction, " of ", int64_t(avail) >> 20,
            " MiB free is less than one 64-token KV page (", int64_t(page_bytes) >> 10, " KiB)");
    opt_.max_tokens = std::min<int64_t>(pages, int64_t(1) << 30) * kPageTokens;
  }
  if (opt_.max_tokens <= 0) opt_.max_tokens = std::min<int64_t>(c.max_position_embeddings, 16384);
  if (opt_.max_batch_tokens <= 0) opt_.max_batch_tokens = 512;
  n_pages_ = (opt_.max_tokens + kPageTokens - 1) / kPageTokens;
  if (n_pages_ > (int64_t(1) << 30)) failf(DSRT_ERR_INVALID_ARGUMENT, "max_tokens ", opt_.max_tokens, " is too large");
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
  size_t n_drafted = 0;
  if (mtp_) {
    // Sessions that just sampled a token in a turn get drafts of the tokens after it, as many as the step and
    // the context have room for (the same walk over the sessions as below).
    std::vector<std::pair<Session *, int64_t>> drafting;
    int64_t left = budget;
    for (Session *s : sessions_) {
      if (s->pending_.empty() || s->failed_ != DSRT_OK || left == 0) continue;
      const int64_t n_past = int64_t(s->tokens_.size());
      const int64_t rows = int64_t(s->mtp_hidden_.size()) / model_->cfg.hidden_size;
      const int64_t want = std::min<int64_t>({int64_t(opt_.mtp_drafts), left - 1, s->max_ctx_ - n_past - 1});
      const bool ok = s->turn_active_ && s->sampled_pending_ && s->pending_.size() == 1 && !s->logits_all_ &&
                      s->drafts_.empty() && rows > 0 && s->mtp_pos_ + rows == n_past && want >= 1 &&
                      ensure_pages(*s, n_past + 1 + want);
      if (ok) drafting.push_back({s, want});
      left -= std::min<int64_t>(int64_t(s->pending_.size()) + (ok ? want : 0), left);
    }
    if (!drafting.empty()) mtp_draft(drafting);
    n_drafted = drafting.size();
  }
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
    if (s->logits_all_ || !s->drafts_.empty()) {  // drafts: the rows of the sampled token and of each draft
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
  Tensor hidden;
  try {
    forward(*model_, *backend_, b, logit_rows, opt_.attention, logits.data(), mtp_ ? &hidden : nullptr);
  } catch (...) {
    if (n_drafted > 0)  // the drafts never reached the cache: take them back out of pending_
      for (Session *s : in_batch)
        if (!s->drafts_.empty()) {
          s->pending_.resize(s->pending_.size() - s->drafts_.size());
          s->drafts_.clear();
        }
    throw;
  }

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
    s.sampled_pending_ = false;
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
  if (mtp_) mtp_catch_up(b, in_batch, hidden);  // reads the tokens just committed
  stats_.forward_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.n_steps++;
  stats_.n_tokens += uint64_t(b.n_tokens());
  stats_.max_batch_seqs = std::max<uint64_t>(stats_.max_batch_seqs, in_batch.size());
  return b.n_tokens();
}

// Each drafting session's waiting hidden rows are paired with the tokens after them (the last one being the
// token just sampled) and run through the MTP module; its argmax at the last row is the first draft. Further
// drafts chain the module on its own head-normed output in place of the main model's hidden state (spec §6),
// writing MTP cache entries that the real pairs overwrite later. Drafts are appended to pending_ for the main
// step to verify; their quality affects only speed: next() keeps a draft only where the main model's own
// sample equals it.
void Engine::mtp_draft(const std::vector<std::pair<Session *, int64_t>> &drafting) {
  const int64_t H = model_->cfg.hidden_size, V = model_->cfg.vocab_size;
  auto take = [&](Session &s, const float *logits_row) {
    int32_t d = int32_t(std::max_element(logits_row, logits_row + V) - logits_row);
    if (opt_.mtp_draft_override) {
      std::vector<int32_t> seq = s.tokens_;
      seq.insert(seq.end(), s.pending_.begin(), s.pending_.end());
      d = opt_.mtp_draft_override(seq, d);
    }
    s.drafts_.push_back(d);
    s.pending_.push_back(d);
    s.last_.mtp_drafted++;
    stats_.mtp_drafted++;
  };
  backend_->begin_step();  // one step for all passes: each pass reads the previous one's output
  // Pass 1: the waiting pairs.
  Batch mb;
  std::vector<int32_t> logit_rows;
  for (auto &[s, want] : drafting) {
    const int64_t rows = int64_t(s->mtp_hidden_.size()) / H;
    mb.seqs.push_back({int32_t(mb.tokens.size()), int32_t(rows), int32_t(s->mtp_pos_), s->pages_.data(),
                       int32_t(s->pages_.size())});
    for (int64_t i = 0; i < rows; i++) {
      const size_t next = size_t(s->mtp_pos_ + i + 1);
      mb.tokens.push_back(next < s->tokens_.size() ? s->tokens_[next] : s->pending_[0]);
      mb.positions.push_back(int32_t(s->mtp_pos_ + i));
    }
    logit_rows.push_back(int32_t(mb.tokens.size()) - 1);
  }
  Tensor hidden = backend_->alloc(mb.n_tokens(), H);
  for (size_t k = 0; k < drafting.size(); k++)
    backend_->from_host(hidden.rows_view(mb.seqs[k].row0, mb.seqs[k].n_new), drafting[k].first->mtp_hidden_.data());
  HostVec<float> logits(logit_rows.size() * size_t(V));
  Tensor normed;
  mtp_forward(*model_, *backend_, mb, hidden, logit_rows, opt_.attention, logits.data(), &normed);
  std::vector<int32_t> row_of(drafting.size());  // each session's row in `normed`
  for (size_t k = 0; k < drafting.size(); k++) {
    Session &s = *drafting[k].first;
    s.mtp_pos_ += mb.seqs[k].n_new;
    s.mtp_hidden_.clear();
    take(s, logits.data() + k * size_t(V));
    row_of[k] = int32_t(k);
  }
  // Passes 2, 3, ...: one row per session that wants another draft, at the position after the last one.
  for (int64_t j = 2;; j++) {
    Batch cb;
    std::vector<int32_t> rows, chained;
    for (size_t k = 0; k < drafting.size(); k++) {
      auto &[s, want] = drafting[k];
      if (want < j) continue;
      const int32_t pos = int32_t(s->tokens_.size() + s->pending_.size()) - 2;  // the position of the draft before
      cb.seqs.push_back({int32_t(cb.tokens.size()), 1, pos, s->pages_.data(), int32_t(s->pages_.size())});
      cb.tokens.push_back(s->drafts_.back());
      cb.positions.push_back(pos);
      rows.push_back(row_of[k]);
      row_of[k] = int32_t(chained.size());
      chained.push_back(int32_t(k));
    }
    if (chained.empty()) break;
    Tensor h = backend_->alloc(cb.n_tokens(), H);
    backend_->gather_rows(normed, rows, h);
    std::vector<int32_t> all(chained.size());
    for (size_t i = 0; i < all.size(); i++) all[i] = int32_t(i);
    logits.resize(all.size() * size_t(V));
    mtp_forward(*model_, *backend_, cb, h, all, opt_.attention, logits.data(), &normed);
    for (size_t i = 0; i < chained.size(); i++) take(*drafting[size_t(chained[i])].first, logits.data() + i * size_t(V));
  }
}

// After a main step: every row whose next token is known and final goes through the MTP module now (its
// hidden state is still on the device), together with rows waiting from earlier steps; the step's last row
// waits for the token sampled after it. A verified draft's two rows both wait: the draft may be rejected.
void Engine::mtp_catch_up(const Batch &b, const std::vector<Session *> &in_batch, Tensor hidden) {
  const int64_t H = model_->cfg.hidden_size;
  Batch mb;
  struct Part {
    Session *s;
    int64_t waiting, step_row0, step_rows;  // rows from mtp_hidden_, then rows of this step
  };
  std::vector<Part> parts;
  std::vector<int64_t> keep(in_batch.size());  // per session: this step's last rows, which wait for the next
  for (size_t k = 0; k < in_batch.size(); k++) {
    Session &s = *in_batch[k];
    const SeqSlice &sl = b.seqs[k];
    int64_t waiting = int64_t(s.mtp_hidden_.size()) / H;
    if (s.mtp_pos_ + waiting != sl.n_past) {  // the cache was cut or restored: continue from here (a gap in the
      s.mtp_hidden_.clear();                  // MTP cache costs draft accuracy, never correctness)
      s.mtp_pos_ = sl.n_past;
      waiting = 0;
    }
    keep[k] = s.drafts_.empty() ? 1 : sl.n_new;
    const int64_t run = sl.n_new - keep[k];
    if (waiting + run > 0) {
      SeqSlice ms = sl;
      ms.row0 = int32_t(mb.tokens.size());
      ms.n_new = int32_t(waiting + run);
      ms.n_past = int32_t(s.mtp_pos_);
      mb.seqs.push_back(ms);
      for (int64_t i = 0; i < waiting + run; i++) {
        mb.tokens.push_back(s.tokens_[size_t(s.mtp_pos_ + i + 1)]);  // committed by now
        mb.positions.push_back(int32_t(s.mtp_pos_ + i));
      }
      parts.push_back({&s, waiting, sl.row0, run});
    }
  }
  if (!mb.seqs.empty()) {
    Tensor mh = backend_->alloc(mb.n_tokens(), H);
    for (size_t k = 0; k < parts.size(); k++) {
      const Part &p = parts[k];
      const int64_t r0 = mb.seqs[k].row0;
      if (p.waiting > 0) backend_->from_host(mh.rows_view(r0, p.waiting), p.s->mtp_hidden_.data());
      if (p.step_rows > 0) {
        std::vector<int32_t> rows(size_t(p.step_rows));
        for (int64_t i = 0; i < p.step_rows; i++) rows[size_t(i)] = int32_t(p.step_row0 + i);
        backend_->gather_rows(hidden, rows, mh.rows_view(r0 + p.waiting, p.step_rows));
      }
      p.s->mtp_pos_ += p.waiting + p.step_rows;
    }
    mtp_forward(*model_, *backend_, mb, mh, {}, opt_.attention, nullptr);
  }
  // The rows that wait, to the host in one copy.
  std::vector<int32_t> rows;
  for (size_t k = 0; k < in_batch.size(); k++) {
    const SeqSlice &sl = b.seqs[k];
    for (int64_t i = sl.n_new - keep[k]; i < sl.n_new; i++) rows.push_back(sl.row0 + int32_t(i));
  }
  Tensor waiting = backend_->alloc(int64_t(rows.size()), H);
  backend_->gather_rows(hidden, rows, waiting);
  HostVec<float> host(rows.size() * size_t(H));
  backend_->to_host(waiting, host.data());
  size_t at = 0;
  for (size_t k = 0; k < in_batch.size(); k++) {
    in_batch[k]->mtp_hidden_.assign(host.data() + at * size_t(H), host.data() + (at + size_t(keep[k])) * size_t(H));
    at += size_t(keep[k]);
  }
}

void Engine::eval(Session &s, const std::atomic<int> *cancel, const std::atomic<int> *cancel2) {
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
    if ((cancel && cancel->load(std::memory_order_relaxed)) || (cancel2 && cancel2->load(std::memory_order_relaxed)))
      fail(DSRT_ERR_CANCELLED, "evaluation cancelled");
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

void Engine::set_profiling(bool on) {
  std::lock_guard lk(mu_);
  backend_->set_profiling(on);
}

std::vector<OpTime> Engine::op_times() {
  std::lock_guard lk(mu_);
  return backend_->op_times();
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

void Session::append_text(std::string_view text, bool parse_special, bool add_bos) {
  const std::vector<int32_t> ids = engine_->model().tok().encode_prompt(text, add_bos, parse_special);
  append(ids.data(), ids.size());
}

void Session::replace_tail(const std::vector<int32_t> &want) {
  std::vector<int32_t> have;
  {
    std::lock_guard lk(engine_->mu_);
    drop_drafts();
    have = tokens_;
    have.insert(have.end(), pending_.begin(), pending_.end());
  }
  size_t common = 0;
  while (common < have.size() && common < want.size() && have[common] == want[common]) common++;
  if (common < have.size()) {
    std::lock_guard lk(engine_->mu_);
    if (common < tokens_.size()) {
      forget_mtp_after(int64_t(common));
      tokens_.resize(common);
      pending_.clear();
      logits_.clear();
      logits_rows_ = 0;
      engine_->release_pages(*this, int64_t(common));
    } else {
      pending_.resize(common - tokens_.size());
    }
    pending_started_ = false;
    sampled_pending_ = false;
  }
  last_.reused_tokens = int64_t(std::min(common, tokens_.size()));
  append(want.data() + common, want.size() - common);
}

void Session::append_chat(const std::string &messages_json, const std::string &tools_json, bool add_generation_prompt) {
  const Model &m = engine_->model();
  const Tokenizer &t = m.tok();
  nlohmann::ordered_json add;
  try {
    add = nlohmann::ordered_json::parse(messages_json);
  } catch (const std::exception &e) {
    failf(DSRT_ERR_INVALID_ARGUMENT, "messages are not valid JSON (", e.what(), ")");
  }
  if (add.is_object()) add = nlohmann::ordered_json::array({add});
  if (!add.is_array()) fail(DSRT_ERR_INVALID_ARGUMENT, "messages must be a JSON array of {\"role\", \"content\"} objects");
  for (auto &msg : add)
    if (!msg.is_object() || !msg.contains("role") || !msg["role"].is_string())
      fail(DSRT_ERR_INVALID_ARGUMENT, "every message needs a string \"role\"");
  nlohmann::ordered_json all = messages_;
  for (auto &msg : add) all.push_back(msg);
  nlohmann::ordered_json ctx;
  ctx["messages"] = all;
  if (!tools_json.empty()) tools_json_ = tools_json;
  if (!tools_json_.empty()) {
    try {
      ctx["tools"] = nlohmann::ordered_json::parse(tools_json_);
    } catch (const std::exception &e) {
      failf(DSRT_ERR_INVALID_ARGUMENT, "tools are not valid JSON (", e.what(), ")");
    }
  }
  ctx["add_generation_prompt"] = add_generation_prompt;
  ctx["bos_token"] = t.bos_text;
  ctx["eos_token"] = t.eos_text;
  ChatTemplate tmpl(t.chat_template.empty() ? ChatTemplate::builtin_deepseek_v3() : t.chat_template);
  const std::string prompt = tmpl.render(ctx);
  // The template writes BOS itself: tokenize without adding one (no double BOS).
  replace_tail(t.encode(prompt, true));
  messages_ = std::move(all);
}

void Session::reset() {
  truncate(0);
  messages_ = nlohmann::ordered_json::array();
  std::lock_guard lk(engine_->mu_);  // steps on other threads read turn_active_
  turn_active_ = false;
}

std::shared_ptr<Session> Session::fork() {
  auto s = engine_->create_session(max_ctx_, logits_all_, 0);
  std::lock_guard lk(engine_->mu_);
  drop_drafts();
  if (!engine_->ensure_pages(*s, int64_t(tokens_.size())))
    fail(DSRT_ERR_CONTEXT_FULL, "the engine's KV pool has no room for a copy of this session");
  for (size_t i = 0; i < s->pages_.size(); i++) engine_->backend_->kv_copy_page(pages_[i], s->pages_[i]);
  s->tokens_ = tokens_;
  s->pending_ = pending_;
  s->logits_ = logits_;
  s->logits_rows_ = logits_rows_;
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
    last_.prompt_tokens = int64_t(pending_.size());
  }
  if (!p.stop_strings.empty() && !m.tokenizer) m.tok();  // throws the no-tokenizer error
  gp_ = p;
  {
    std::lock_guard lk(engine_->mu_);
    drop_drafts();
    last_.mtp_drafted = last_.mtp_accepted = 0;
    turn_active_ = true;  // under the lock: steps on other threads read it (drafting)
  }
  if (p.has_seed) rng_.reseed(p.seed);
  detok_.reset();
  if (m.tokenizer) detok_ = std::make_unique<Detokenizer>(*m.tokenizer, p.skip_special, p.stop_strings);
  eog_ = m.eog_ids();
  banned_ = engine_->model().unused_ids;
  if (p.ignore_eos) banned_.insert(banned_.end(), eog_.begin(), eog_.end());
  finish_pending_ = Finish::None;
  n_generated_ = 0;
  reply_.clear();
  cancel_flag_.store(0);
  turn_start_ = std::chrono::steady_clock::now();
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

Event Session::finish_turn(Finish why, int32_t token) {
  {
    std::lock_guard lk(engine_->mu_);
    drop_drafts();
    turn_active_ = false;
  }
  Event ev;
  ev.done = true;
  ev.finish = why;
  ev.token = token;
  if (detok_) ev.text = detok_->flush();
  reply_ += ev.text;
  auto now = std::chrono::steady_clock::now();
  if (n_generated_ > 1)
    last_.decode_tokens_per_second = double(n_generated_ - 1) / std::chrono::duration<double>(now - first_token_).count();
  last_.generated_tokens = n_generated_;
  if (!messages_.empty()) messages_.push_back({{"role", "assistant"}, {"content", reply_}});
  return ev;
}

Event Session::next() {
  if (!turn_active_) fail(DSRT_ERR_BAD_STATE, "no generation turn in progress: call start first");
  if (finish_pending_ != Finish::None) return finish_turn(finish_pending_, -1);
  const Model &m = engine_->model();
  try {
    eval(gp_.cancel);
  } catch (const Error &e) {
    if (e.code() == DSRT_ERR_CANCELLED) return finish_turn(Finish::Cancelled, -1);
    if (e.code() == DSRT_ERR_CONTEXT_FULL) return finish_turn(Finish::ContextFull, -1);
    Event ev = finish_turn(Finish::Error, -1);
    ev.status = e.code();
    ev.error = e.what();
    return ev;
  }
  if ((gp_.cancel && gp_.cancel->load()) || cancel_flag_.load()) return finish_turn(Finish::Cancelled, -1);
  if (gp_.max_new_tokens > 0 && n_generated_ >= gp_.max_new_tokens) return finish_turn(Finish::Length, -1);
  int32_t tok;
  if (int64_t(tokens_.size() + pending_.size() - drafts_.size()) >= max_ctx_) return finish_turn(Finish::ContextFull, -1);
  if (logits_rows_ == 0) fail(DSRT_ERR_INTERNAL, "no logits after evaluation");
  const int64_t V = m.cfg.vocab_size;
  bool accepted = false;  // the token is an accepted draft, already in the cache
  if (!drafts_.empty()) {
    // The step verified [sampled token, drafts...]: logits_ row 0 predicts the first draft's position. Sample
    // that token as always (same distribution, same random draw); if it is the draft, the draft's cache entry
    // and the next logits row are already there, else the drafts leave. Either way the output is what it would
    // have been without MTP.
    std::lock_guard lk(engine_->mu_);
    tok = sample_token(logits_.data(), V, gp_.sampling, tokens_.data(), tokens_.size() - drafts_.size(), banned_,
                       rng_);
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
  } else {
    tok = sample_token(logits_.data() + size_t((logits_rows_ - 1) * V), V, gp_.sampling, tokens_.data(),
                       tokens_.size(), banned_, rng_);
  }
  if (!accepted) {  // room was checked above; the flag goes with the token (steps read it to draft)
    std::lock_guard lk(engine_->mu_);
    pending_.push_back(tok);
    sampled_pending_ = true;
  }
  if (n_generated_++ == 0) {
    first_token_ = std::chrono::steady_clock::now();
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
  return ev;
}

void Session::truncate(size_t n_keep) {
  std::lock_guard lk(engine_->mu_);
  drop_drafts();
  if (n_keep > tokens_.size())
    failf(DSRT_ERR_INVALID_ARGUMENT, "truncate to ", n_keep, " tokens, but the session holds ", tokens_.size());
  if (n_keep < tokens_.size()) forget_mtp_after(int64_t(n_keep));
  tokens_.resize(n_keep);
  pending_.clear();
  pending_started_ = false;
  sampled_pending_ = false;
  failed_ = DSRT_OK;
  logits_.clear();
  logits_rows_ = 0;
  engine_->release_pages(*this, int64_t(n_keep));
}

// Embedding rows that are no token (padding past the tokenizer, spec §3.11) are never sampled.
int32_t Session::sample(float temperature) {
  if (logits_rows_ == 0) fail(DSRT_ERR_BAD_STATE, "no logits: evaluate the session's pending tokens first");
  const int64_t V = engine_->model().cfg.vocab_size;
  SamplingParams p;
  p.temperature = temperature;
  return sample_token(logits_.data() + size_t((logits_rows_ - 1) * V), V, p, nullptr, 0, engine_->model().unused_ids, rng_);
}

// With nothing pending no other thread's step touches this session, so the views point into it directly;
// with a token pending (a turn's last sample) they are copies.
Session::LogitsView Session::logits_view() {
  std::lock_guard lk(engine_->mu_);
  const int64_t rows = drafts_.empty() ? logits_rows_ : std::min<int64_t>(logits_rows_, 1);
  if (pending_.empty()) return {logits_.data(), rows};
  logits_snapshot_.assign(logits_.data(), logits_.data() + rows * vocab());
  return {logits_snapshot_.data(), rows};
}

std::span<const int32_t> Session::tokens_view() {
  std::lock_guard lk(engine_->mu_);
  const size_t n = tokens_.size() - drafts_.size();
  if (pending_.empty()) return {tokens_.data(), n};
  tokens_snapshot_.assign(tokens_.begin(), tokens_.begin() + std::ptrdiff_t(n));
  return tokens_snapshot_;
}

SessionStats Session::stats() const {
  std::lock_guard lk(engine_->mu_);
  SessionStats s = last_;
  s.n_tokens = int64_t(tokens_.size());
  s.n_pending = int64_t(pending_.size());
  s.n_pages = int64_t(pages_.size());
  s.n_evaluated = n_evaluated_;
  return s;
}

// ---- state blobs
namespace {
constexpr char kMagic[8] = {'D', 'S', 'R', 'T', 'S', 'E', 'S', 'S'};
constexpr uint32_t kStateVersion = 1;

struct Writer {
  std::string out;
  template <class T>
  void pod(const T &v) {
    out.append(reinterpret_cast<const char *>(&v), sizeof v);
  }
  void bytes(const void *p, size_t n) {
    pod(uint64_t(n));
    out.append(static_cast<const char *>(p), n);
  }
};
struct Reader {
  std::string_view in;
  size_t pos = 0;
  void need(size_t n) {
    if (in.size() - pos < n) fail(DSRT_ERR_FORMAT, "session state is truncated or corrupt");
  }
  template <class T>
  T pod() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, in.data() + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::string_view bytes(size_t max) {
    uint64_t n = pod<uint64_t>();
    if (n > max) fail(DSRT_ERR_FORMAT, "session state holds a field larger than it may be");
    need(size_t(n));
    std::string_view v = in.substr(pos, size_t(n));
    pos += size_t(n);
    return v;
  }
};
}  // namespace

std::string Session::save_state() const {
  std::lock_guard lk(engine_->mu_);
  if (turn_active_) fail(DSRT_ERR_BAD_STATE, "cannot save a session in the middle of a generation turn");
  const Model &m = engine_->model();
  Writer w;
  w.out.append(kMagic, 8);
  w.pod(kStateVersion);
  w.bytes(m.fingerprint.data(), m.fingerprint.size());
  w.bytes(tokens_.data(), tokens_.size() * sizeof(int32_t));
  w.bytes(pending_.data(), pending_.size() * sizeof(int32_t));
  std::string msgs = messages_.dump(), tools = tools_json_;
  w.bytes(msgs.data(), msgs.size());
  w.bytes(tools.data(), tools.size());
  uint64_t st[4];
  rng_.state(st);
  w.bytes(st, sizeof st);
  w.bytes(logits_.data(), logits_.size() * sizeof(float));
  w.pod(int64_t(logits_rows_));
  const int64_t per_token = (m.cfg.num_hidden_layers + int64_t(m.w.mtp.size())) * m.cfg.kv_cache_width();
  std::vector<float> kv(tokens_.size() * size_t(per_token));
  if (!tokens_.empty()) engine_->backend_->kv_read(pages_.data(), int64_t(tokens_.size()), kv.data());
  w.bytes(kv.data(), kv.size() * sizeof(float));
  return w.out;
}

void Session::load_state(const std::string &blob) {
  const Model &m = engine_->model();
  Reader r{blob};
  r.need(8);
  if (std::memcmp(blob.data(), kMagic, 8) != 0) fail(DSRT_ERR_FORMAT, "not a dsrt session state (bad magic)");
  r.pos = 8;
  if (uint32_t v = r.pod<uint32_t>(); v != kStateVersion)
    failf(DSRT_ERR_VERSION_MISMATCH, "session state format version ", v, ", this library reads ", kStateVersion);
  if (r.bytes(256) != m.fingerprint)
    fail(DSRT_ERR_VERSION_MISMATCH, "session state was saved with a different model (fingerprint mismatch)");
  const size_t cap = size_t(max_ctx_) * sizeof(int32_t);
  auto tok = r.bytes(cap), pend = r.bytes(cap);
  if (tok.size() % 4 || pend.size() % 4) fail(DSRT_ERR_FORMAT, "session state: token arrays are corrupt");
  std::string msgs(r.bytes(size_t(1) << 30)), tools(r.bytes(size_t(1) << 30));
  auto st = r.bytes(32);
  const int64_t V = m.cfg.vocab_size;
  auto lg = r.bytes(size_t(max_ctx_) * size_t(V) * sizeof(float));
  int64_t lrows = r.pod<int64_t>();
  const int64_t per_token = (m.cfg.num_hidden_layers + int64_t(m.w.mtp.size())) * m.cfg.kv_cache_width();
  const size_t n_tok = tok.size() / 4;
  auto kv = r.bytes(n_tok * size_t(per_token) * sizeof(float));
  // lrows is checked before it is multiplied: a hostile value must not overflow.
  if (lrows < 0 || lrows > max_ctx_ || st.size() != 32 || kv.size() != n_tok * size_t(per_token) * sizeof(float) ||
      lg.size() != size_t(lrows) * size_t(V) * sizeof(float) || r.pos != blob.size())
    fail(DSRT_ERR_FORMAT, "session state is corrupt (sizes disagree)");
  std::vector<int32_t> t(n_tok), p(pend.size() / 4);
  if (!tok.empty()) std::memcpy(t.data(), tok.data(), tok.size());
  if (!pend.empty()) std::memcpy(p.data(), pend.data(), pend.size());
  for (int32_t id : t)
    if (id < 0 || id >= V) fail(DSRT_ERR_FORMAT, "session state holds a token id outside the vocabulary");
  for (int32_t id : p)
    if (id < 0 || id >= V) fail(DSRT_ERR_FORMAT, "session state holds a token id outside the vocabulary");
  nlohmann::ordered_json mj;
  try {
    mj = nlohmann::ordered_json::parse(msgs);
  } catch (const std::exception &) {
    fail(DSRT_ERR_FORMAT, "session state: messages are corrupt");
  }
  if (int64_t(t.size() + p.size()) > max_ctx_) fail(DSRT_ERR_CONTEXT_FULL, "session state is longer than this session's context");
  std::lock_guard lk(engine_->mu_);
  if (turn_active_) fail(DSRT_ERR_BAD_STATE, "cannot load state in the middle of a generation turn");
  engine_->release_pages(*this, 0);
  if (!engine_->ensure_pages(*this, int64_t(t.size()))) fail(DSRT_ERR_CONTEXT_FULL, "the engine's KV pool has no room for this state");
  if (!t.empty()) engine_->backend_->kv_write(pages_.data(), int64_t(t.size()), reinterpret_cast<const float *>(kv.data()));
  tokens_ = std::move(t);
  pending_ = std::move(p);
  pending_started_ = false;
  sampled_pending_ = false;
  drafts_.clear();
  mtp_pos_ = int64_t(tokens_.size());  // the blob has no hidden states: the MTP cache goes on from here
  mtp_hidden_.clear();
  messages_ = std::move(mj);
  tools_json_ = tools;
  uint64_t s4[4];
  std::memcpy(s4, st.data(), 32);
  rng_.set_state(s4);
  logits_.assign(reinterpret_cast<const float *>(lg.data()), reinterpret_cast<const float *>(lg.data()) + lrows * V);
  logits_rows_ = lrows;
  failed_ = DSRT_OK;
}

}  // namespace dsrt
