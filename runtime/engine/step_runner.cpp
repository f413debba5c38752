#include "engine/step_runner.h"

#include <algorithm>
#include <chrono>
#include <new>

#include "core/status.h"
#include "engine/engine.h"

namespace dsrt {

bool StepRunner::plan() {
  const ModelConfig &c = e_.model_->cfg;
  const int64_t H = c.hidden_size;
  int64_t budget = e_.opt_.max_batch_tokens;
  step_.batch.rank_pages = int32_t(e_.rank_pages_);  // data-parallel attention: which rank holds which pages
  // Decode rows first (a turn's sampled token), then prefill chunks in arrival order: a long prompt takes
  // what the budget leaves and never delays the sessions that are generating.
  std::vector<Session *> order;
  for (int decode = 1; decode >= 0; decode--)
    for (Session *s : e_.sessions_)
      if (e_.runnable(*s) && s->sampled_pending_ == bool(decode)) order.push_back(s);
  for (Session *s : order) {
    if (budget == 0) break;
    const bool first_chunk = !s->pending_started_;
    if (first_chunk) {
      s->run_start_ = int64_t(s->tokens_.size());
      if (s->adopt_cached_prefix() > 0) s->pending_started_ = true;  // a failed step rolls the adoption back too
    }
    const int64_t n_past = int64_t(s->tokens_.size());
    const int64_t n = std::min<int64_t>(int64_t(s->pending_.size()), budget);
    // MTP: a session that just sampled a token in a turn gets drafts of the tokens after it, as many as the
    // budget and the context have room for.
    int64_t want = 0;
    if (e_.mtp_) {
      const int64_t rows = int64_t(s->mtp_hidden_.size()) / H;
      want = std::min<int64_t>({int64_t(e_.opt_.mtp_drafts), budget - n, s->max_ctx_ - n_past - 1});
      const bool ok = s->turn_active_ && s->sampled_pending_ && s->pending_.size() == 1 && !s->logits_all_ &&
                      s->drafts_.empty() && rows > 0 && s->mtp_pos_ + rows == n_past && want >= 1;
      if (!ok || !e_.ensure_pages(*s, n_past + n + want)) want = 0;  // drafts are optional
    }
    // The lowest position this step writes: the MTP catch-up starts at the waiting rows' position.
    const int64_t rows_waiting = int64_t(s->mtp_hidden_.size()) / H;
    const int64_t write_from = e_.mtp_ && rows_waiting > 0 && s->mtp_pos_ + rows_waiting == n_past ? s->mtp_pos_ : n_past;
    std::vector<PageCopy> copies;
    if (!e_.ensure_pages(*s, n_past + n) || !s->make_writable(write_from, copies)) {
      if (s->ahead_.valid) {  // a token run ahead with: the draw again; the turn's next() appends it and waits
        s->retract_ahead();
        continue;
      }
      if (s->demand_ == 0) continue;  // nobody waits for it: it stays pending for a later step
      s->failed_ = DSRT_ERR_CONTEXT_FULL;
      s->failed_msg_ = e_.rank_pages_
                           ? "this session's rank's KV pool is full (" + std::to_string(e_.session_capacity_tokens()) +
                                 " tokens over its sessions, some reserved by running turns; data-parallel attention keeps "
                                 "a session's cache on one rank); free or truncate sessions, or raise max_tokens"
                           : "the engine's KV pool is full (" + std::to_string(e_.capacity_tokens()) +
                                 " tokens over all sessions, some reserved by running turns); free or truncate sessions, "
                                 "or raise max_tokens";
      continue;
    }
    Work w;
    w.s = s;
    w.seq = int32_t(step_.batch.seqs.size());
    w.n_pending = int32_t(n);
    w.n_drafts = int32_t(want);
    w.n_past = n_past;
    w.first_chunk = first_chunk;
    w.copies = std::move(copies);
    w.pages = s->kv_.pages;
    Batch &b = step_.batch;
    b.add_seq(int32_t(n + want), int32_t(n_past), w.pages.data(), int32_t(w.pages.size()));
    for (int64_t i = 0; i < n + want; i++) {
      b.tokens.push_back(i < n ? s->pending_[size_t(i)] : 0);  // drafts: filled in by the draft pass
      b.positions.push_back(int32_t(n_past + i));
    }
    const bool completes = n == int64_t(s->pending_.size());
    w.logit_row0 = int64_t(step_.logit_rows.size());
    const int32_t row0 = b.seqs.back().row0;
    if (s->logits_all_ || want > 0) {  // drafts: the rows of the sampled token and of each draft
      for (int64_t i = 0; i < n + want; i++) step_.logit_rows.push_back(row0 + int32_t(i));
    } else if (completes) {
      step_.logit_rows.push_back(row0 + int32_t(n - 1));
    }
    w.n_logit_rows = int64_t(step_.logit_rows.size()) - w.logit_row0;
    // The turn's next() samples exactly this row (no drafts to verify, no reader of the logits: logits_all and
    // kept logprobs need the row on the host; a step that fills the context ends the turn there instead).
    w.sample = e_.device_sampling_ && w.n_logit_rows == 1 && completes && want == 0 && s->turn_active_ &&
               !s->logits_all_ && s->drafts_.empty() && !s->keep_logprobs_ && n_past + n < s->max_ctx_;
    if (w.sample) {
      w.sp = s->gp_.sampling;
      w.banned = &s->banned_;
      const SamplingParams &sp = w.sp;
      if (sp.repetition_penalty != 1.0f || sp.presence_penalty != 0.0f || sp.frequency_penalty != 0.0f) {
        const int64_t total = n_past + n;  // the history next() passes: the cache after this step
        const int64_t from = sp.penalty_window > 0 ? std::max<int64_t>(0, total - sp.penalty_window) : 0;
        for (int64_t i = from; i < total; i++)
          w.history.push_back(i < n_past ? s->tokens_[size_t(i)] : s->pending_[size_t(i - n_past)]);
      }
      s->rng_.state(w.rng_before);
      w.rng.set_state(w.rng_before);
    }
    if (e_.mtp_) {
      w.mtp_pos = s->mtp_pos_;
      w.mtp_hidden = s->mtp_hidden_;
      w.tail0 = std::min(s->mtp_pos_, n_past);
      w.tail.assign(s->tokens_.begin() + w.tail0, s->tokens_.end());
      if (want > 0 && e_.opt_.mtp_draft_override) {
        w.override_seq = s->tokens_;
        w.override_seq.push_back(s->pending_[0]);
      }
    }
    s->in_flight_ = true;
    budget -= n + want;
    work_.push_back(std::move(w));
  }
  step_.policy = e_.opt_.attention;
  step_.hidden = e_.mtp_;  // (every rank keeps them for the MTP passes)
  return !work_.empty();
}

int32_t StepRunner::token_at(const Work &w, int64_t pos) const {
  if (pos < w.n_past) {
    if (pos < w.tail0) fail(DSRT_ERR_INTERNAL, "MTP: a pair reaches before the copied tokens");
    return w.tail[size_t(pos - w.tail0)];
  }
  return step_.batch.tokens[size_t(step_.batch.seqs[size_t(w.seq)].row0 + (pos - w.n_past))];
}

void StepRunner::run() {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    // Mapped shards that changed under us would feed the forward garbage (or SIGBUS): fail the step instead.
    if (e_.model_->ckpt) e_.model_->ckpt->verify_unchanged();
    // Copy-on-write: shared pages this step writes into were replaced by fresh ones at plan; they get their
    // contents first, on every rank (the followers wait for the step and do not touch their backends).
    std::vector<std::pair<int32_t, int32_t>> copies;
    for (const Work &w : work_)
      for (const PageCopy &c : w.copies) copies.push_back({c.from, c.to});
    if (!copies.empty()) e_.ranks_->kv_copy_pages(copies);  // (ranks in other processes too)
    if (std::any_of(work_.begin(), work_.end(), [](const Work &w) { return w.n_drafts > 0; })) draft();
    Tensor hidden;
    forward_and_sample(e_.mtp_ ? &hidden : nullptr);
    if (e_.mtp_) catch_up(hidden);
  } catch (const Error &e) {
    failed_ = true;
    fail_code_ = e.code();
    fail_msg_ = e.what();
  } catch (const std::bad_alloc &) {
    failed_ = true;
    fail_code_ = DSRT_ERR_OUT_OF_MEMORY;
    fail_msg_ = "out of host memory in a forward step";
  } catch (const std::exception &e) {
    failed_ = true;
    fail_code_ = DSRT_ERR_INTERNAL;
    fail_msg_ = e.what();
  }
  seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The forward, then the logits: every row to the host (the host path), or, when some sessions sample on the
// device, those rows sampled there (one launch; only the ids come back) and only the other rows copied.
void StepRunner::forward_and_sample(Tensor *hidden) {
  const int64_t V = e_.model_->cfg.vocab_size;
  const bool any = std::any_of(work_.begin(), work_.end(), [](const Work &w) { return w.sample; });
  for (Work &w : work_) w.host_row0 = w.logit_row0;
  if (!any) {
    logits_.resize(step_.logit_rows.size() * size_t(V));
    e_.ranks_->forward(step_, logits_.data(), hidden);
    return;
  }
  Tensor lt;
  e_.ranks_->forward(step_, nullptr, hidden, &lt);
  Backend &be = e_.ranks_->leader();
  std::vector<SampleRequest> req;
  std::vector<Work *> sampling;
  std::vector<int32_t> host_rows;
  for (Work &w : work_) {
    if (w.sample) {
      SampleRequest r;
      r.row = int32_t(w.logit_row0);
      r.params = &w.sp;
      r.history = w.history.data();
      r.n_history = w.history.size();
      r.banned = w.banned;
      r.u = w.sp.temperature > 0.0f ? w.rng.uniform() : 0.0;  // the draw sample_token would take (kept only if used)
      req.push_back(r);
      sampling.push_back(&w);
      continue;
    }
    w.host_row0 = int64_t(host_rows.size());
    for (int64_t i = 0; i < w.n_logit_rows; i++) host_rows.push_back(int32_t(w.logit_row0 + i));
  }
  const std::vector<SampleResult> got = be.sample_rows(lt, req);
  for (size_t i = 0; i < sampling.size(); i++) sampling[i]->sampled = got[i];
  logits_.resize(host_rows.size() * size_t(V));
  if (!host_rows.empty()) {
    Tensor rows = be.alloc(int64_t(host_rows.size()), V);
    be.gather_rows(lt, host_rows, rows);
    be.to_host(rows, logits_.data());
  }
}

// Each drafting session's waiting hidden rows are paired with the tokens after them (the last one being the
// token just sampled) and run through the MTP module; its argmax at the last row is the first draft. Further
// drafts chain the module on its own head-normed output in place of the main model's hidden state (spec §6),
// writing MTP cache entries that the real pairs overwrite later. Drafts fill the step's draft rows for the
// main forward to verify; their quality affects only speed: next() keeps a draft only where the main
// model's own sample equals it. Each pass runs on every rank (RankGroup::mtp_forward: its inputs as MtpPass
// segments every rank can rebuild).
void StepRunner::draft() {
  const int64_t H = e_.model_->cfg.hidden_size, V = e_.model_->cfg.vocab_size;
  auto take = [&](Work &w, const float *logits_row) {
    int32_t d = int32_t(std::max_element(logits_row, logits_row + V) - logits_row);
    if (e_.opt_.mtp_draft_override) {
      d = e_.opt_.mtp_draft_override(w.override_seq, d);
      w.override_seq.push_back(d);
    }
    w.drafts.push_back(d);
    step_.batch.tokens[size_t(step_.batch.seqs[size_t(w.seq)].row0 + w.n_pending) + w.drafts.size() - 1] = d;
  };
  // Pass 1: the waiting pairs. It begins one scratch step for all passes: each pass reads the previous one's output.
  MtpPass p1;
  p1.begin_step = true;
  p1.step.policy = e_.opt_.attention;
  Batch &mb = p1.step.batch;
  std::vector<int32_t> &logit_rows = p1.step.logit_rows;
  std::vector<Work *> drafting;
  for (Work &w : work_) {
    if (w.n_drafts == 0) continue;
    const int64_t rows = int64_t(w.mtp_hidden.size()) / H;
    mb.add_seq(int32_t(rows), int32_t(w.mtp_pos), w.pages.data(), int32_t(w.pages.size()));
    for (int64_t i = 0; i < rows; i++) {
      mb.tokens.push_back(token_at(w, w.mtp_pos + i + 1));
      mb.positions.push_back(int32_t(w.mtp_pos + i));
    }
    logit_rows.push_back(int32_t(mb.tokens.size()) - 1);
    drafting.push_back(&w);
    p1.add_host(w.mtp_hidden.data(), rows, H);
  }
  HostVec<float> logits(logit_rows.size() * size_t(V));
  e_.ranks_->mtp_forward(p1, logits.data());
  std::vector<int32_t> row_of(drafting.size());  // each session's row in `normed`
  for (size_t k = 0; k < drafting.size(); k++) {
    Work &w = *drafting[k];
    w.mtp_pos += mb.seqs[k].n_new;
    w.mtp_hidden.clear();
    take(w, logits.data() + k * size_t(V));
    row_of[k] = int32_t(k);
  }
  // Passes 2, 3, ...: one row per session that wants another draft, at the position after the last one.
  for (int64_t j = 2;; j++) {
    MtpPass pj;
    pj.step.policy = e_.opt_.attention;
    Batch &cb = pj.step.batch;
    std::vector<int32_t> rows, chained;
    for (size_t k = 0; k < drafting.size(); k++) {
      Work &w = *drafting[k];
      if (w.n_drafts < j) continue;
      const int32_t pos = int32_t(w.n_past + j - 2);  // the position of the token before the last draft
      cb.add_seq(1, pos, w.pages.data(), int32_t(w.pages.size()));
      cb.tokens.push_back(w.drafts.back());
      cb.positions.push_back(pos);
      rows.push_back(row_of[k]);
      row_of[k] = int32_t(chained.size());
      chained.push_back(int32_t(k));
    }
    if (chained.empty()) break;
    pj.add_rows(MtpPass::From::Normed, rows);
    for (size_t i = 0; i < chained.size(); i++) pj.step.logit_rows.push_back(int32_t(i));
    logits.resize(chained.size() * size_t(V));
    e_.ranks_->mtp_forward(pj, logits.data());
    for (size_t i = 0; i < chained.size(); i++) take(*drafting[size_t(chained[i])], logits.data() + i * size_t(V));
  }
}

// After the main forward: every row whose next token is known and final goes through the MTP module now (its
// hidden state is still on the device), together with rows waiting from earlier steps; the step's last row
// waits for the token sampled after it. A verified draft's rows all wait: the drafts may be rejected.
void StepRunner::catch_up(Tensor hidden) {
  const int64_t H = e_.model_->cfg.hidden_size;
  Backend &be = e_.ranks_->leader();
  const Batch &b = step_.batch;
  MtpPass pass;
  pass.step.policy = e_.opt_.attention;
  Batch &mb = pass.step.batch;
  struct Part {
    Work *w;
    int64_t waiting, step_row0, step_rows;  // rows from mtp_hidden, then rows of this step
  };
  std::vector<Part> parts;
  std::vector<int64_t> keep(work_.size());  // per session: this step's last rows, which wait for the next
  for (size_t k = 0; k < work_.size(); k++) {
    Work &w = work_[k];
    const SeqSlice &sl = b.seqs[size_t(w.seq)];
    int64_t waiting = int64_t(w.mtp_hidden.size()) / H;
    if (w.mtp_pos + waiting != sl.n_past) {  // the cache was cut or restored: continue from here (a gap in the
      w.mtp_hidden.clear();                  // MTP cache costs draft accuracy, never correctness)
      w.mtp_pos = sl.n_past;
      waiting = 0;
    }
    keep[k] = w.n_drafts == 0 ? 1 : sl.n_new;
    const int64_t run = sl.n_new - keep[k];
    if (waiting + run > 0) {
      mb.add_seq(int32_t(waiting + run), int32_t(w.mtp_pos), w.pages.data(), int32_t(w.pages.size()));
      for (int64_t i = 0; i < waiting + run; i++) {
        mb.tokens.push_back(token_at(w, w.mtp_pos + i + 1));
        mb.positions.push_back(int32_t(w.mtp_pos + i));
      }
      parts.push_back({&w, waiting, sl.row0, run});
    }
  }
  if (!mb.seqs.empty()) {
    for (const Part &p : parts) {
      pass.add_host(p.w->mtp_hidden.data(), p.waiting, H);
      std::vector<int32_t> rows(size_t(p.step_rows));
      for (int64_t i = 0; i < p.step_rows; i++) rows[size_t(i)] = int32_t(p.step_row0 + i);
      pass.add_rows(MtpPass::From::StepHidden, std::move(rows));
      p.w->mtp_pos += p.waiting + p.step_rows;
    }
    e_.ranks_->mtp_forward(pass, nullptr);
  }
  // The rows that wait, to the host in one copy.
  std::vector<int32_t> rows;
  for (size_t k = 0; k < work_.size(); k++) {
    const SeqSlice &sl = b.seqs[size_t(work_[k].seq)];
    for (int64_t i = sl.n_new - keep[k]; i < sl.n_new; i++) rows.push_back(sl.row0 + int32_t(i));
  }
  Tensor waiting = be.alloc(int64_t(rows.size()), H);
  be.gather_rows(hidden, rows, waiting);
  HostVec<float> host(rows.size() * size_t(H));
  be.to_host(waiting, host.data());
  size_t at = 0;
  for (size_t k = 0; k < work_.size(); k++) {
    work_[k].mtp_hidden.assign(host.data() + at * size_t(H), host.data() + (at + size_t(keep[k])) * size_t(H));
    at += size_t(keep[k]);
  }
}

// The turn's next token, sampled on the device by this step, goes into pending_ now (Session::ahead_), so the
// next step can start without waiting for the session's thread. Not when next() will not take it as the
// turn's next token or when taking it ends the turn (it appends those itself, as without run-ahead): the
// turn's last token by max_new_tokens, an end-of-generation or stop token, a full context, a cancel, a token
// already ahead. Not with MTP (drafting follows the taken token).
void StepRunner::run_ahead(Session &s) {
  const Session::Presample &ps = s.presampled_;
  if (!e_.run_ahead_ || !ps.valid || ps.status != DSRT_OK || s.ahead_.valid || !s.turn_active_ || !s.pending_.empty() ||
      !s.drafts_.empty() || s.failed_ != DSRT_OK || s.cancel_requested() || s.stopping_ || s.plain_evals_ > 0)
    return;
  const GenParams &g = s.gp_;
  const int32_t tok = ps.token;
  if (g.max_new_tokens > 0 && s.turn_taken_ + 1 >= g.max_new_tokens) return;
  if (!g.ignore_eos && std::binary_search(s.eog_.begin(), s.eog_.end(), tok)) return;
  if (std::find(g.stop_tokens.begin(), g.stop_tokens.end(), tok) != g.stop_tokens.end()) return;
  if (int64_t(s.tokens_.size()) >= s.max_ctx_) return;
  s.ahead_.valid = true;
  s.ahead_.token = tok;
  std::copy(ps.rng_before, ps.rng_before + 4, s.ahead_.rng_before);
  s.rng_.set_state(ps.rng_after);
  s.pending_.push_back(tok);
  s.sampled_pending_ = true;
  s.presampled_ = {};
  e_.stats_.tokens_run_ahead++;
}

std::vector<Session *> StepRunner::sampling_sessions() const {
  std::vector<Session *> v;
  for (const Work &w : work_)
    if (!failed_ && w.s->turn_active_ && w.s->demand_ > 0 && w.s->pending_.empty()) v.push_back(w.s);
  return v;
}

int64_t StepRunner::commit() {
  const int64_t V = e_.model_->cfg.vocab_size;
  // The logits copies below are the commit's only allocations in dsrt's heap: reserved first, so that running
  // out of memory here fails the step as a failure in run() does (nothing committed yet), instead of throwing
  // out of the step thread.
  if (!failed_) try {
      for (Work &w : work_)
        if (w.n_logit_rows > 0 && !w.sample) {
          Session &s = *w.s;
          const bool keep = !w.first_chunk && s.logits_all_;
          s.logits_.reserve((keep ? s.logits_.size() : 0) + size_t(w.n_logit_rows * V));
        }
    } catch (const std::bad_alloc &) {
      failed_ = true;
      fail_code_ = DSRT_ERR_OUT_OF_MEMORY;
      fail_msg_ = "out of host memory for the step's logits";
    }
  for (Work &w : work_) {
    Session &s = *w.s;
    s.in_flight_ = false;
    for (const PageCopy &c : w.copies) {  // the copy or the shared page it replaced goes
      if (failed_) s.kv_.pages[c.index] = c.from;
      e_.pool_->unref(failed_ ? c.to : c.from);
    }
    if (failed_) {
      // The step's pages go back. Sessions whose thread waits for this step get the error (their pending run is
      // rolled back there); the others keep their pending tokens for a later step.
      e_.return_turn_pages(s, int64_t(s.tokens_.size()));
      if (s.ahead_.valid) {  // a token run ahead with: the draw again; the turn's next() appends it and waits
        s.retract_ahead();
      } else if (s.demand_ > 0) {
        s.failed_ = fail_code_;
        s.failed_msg_ = fail_msg_;
      }
      continue;
    }
    if (w.first_chunk) {  // the first chunk of a pending run starts a new logits set
      s.logits_.clear();
      s.logits_rows_ = 0;
    }
    s.tokens_.insert(s.tokens_.end(), s.pending_.begin(), s.pending_.begin() + w.n_pending);
    s.tokens_.insert(s.tokens_.end(), w.drafts.begin(), w.drafts.end());
    s.pending_.erase(s.pending_.begin(), s.pending_.begin() + w.n_pending);
    s.drafts_ = w.drafts;
    s.sampled_pending_ = false;
    s.pending_started_ = !s.pending_.empty();
    s.n_evaluated_ += uint64_t(w.n_pending + w.n_drafts);
    if (w.n_logit_rows > 0) {
      if (!s.logits_all_) {
        s.logits_.clear();
        s.logits_rows_ = 0;
      }
      s.presampled_ = {};
      s.logits_on_device_ = w.sample;
      if (w.sample) {  // the row stayed on the device: next() takes the draw
        Session::Presample &ps = s.presampled_;
        ps.valid = true;
        ps.token = w.sampled.token;
        ps.status = w.sampled.status;
        ps.error = w.sampled.error;
        std::copy(w.rng_before, w.rng_before + 4, ps.rng_before);
        if (w.sampled.status == DSRT_OK) w.rng.state(ps.rng_after);
        else std::copy(w.rng_before, w.rng_before + 4, ps.rng_after);
        run_ahead(s);
      } else {
        const float *src = logits_.data() + size_t(w.host_row0 * V);
        s.logits_.insert(s.logits_.end(), src, src + w.n_logit_rows * V);
        s.logits_rows_ += w.n_logit_rows;
      }
    }
    if (e_.mtp_) {
      s.mtp_pos_ = w.mtp_pos;
      s.mtp_hidden_ = std::move(w.mtp_hidden);
    }
    s.publish_pages();
    s.last_.mtp_drafted += w.n_drafts;
    e_.stats_.mtp_drafted += uint64_t(w.n_drafts);
  }
  if (failed_) return 0;
  const int64_t T = step_.batch.n_tokens();
  e_.stats_.forward_seconds += seconds_;
  e_.stats_.backend = e_.ranks_->leader().counters();  // (device time lags a step: read at the next begin_step)
  e_.stats_.n_steps++;
  e_.stats_.n_tokens += uint64_t(T);
  e_.stats_.max_batch_seqs = std::max<uint64_t>(e_.stats_.max_batch_seqs, work_.size());
  return T;
}

}  // namespace dsrt
