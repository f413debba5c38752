// One step of the engine's step thread: plan (engine lock held: which sessions' tokens, which pages), run
// (unlocked: MTP drafts, the forward on every rank, MTP catch-up; reads only the plan's copies), commit
// (lock held: tokens into the cache, logits into their sessions). Sessions in a step are marked in flight;
// app calls that would change their token state wait until the commit.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/memory.h"
#include "core/status.h"
#include "engine/kv_pages.h"
#include "engine/sampler.h"
#include "engine/step.h"

namespace dsrt {

class Engine;
class Session;

class StepRunner {
 public:
  explicit StepRunner(Engine &e) : e_(e) {}
  // Engine lock held. false: nothing to run.
  bool plan();
  // Engine lock not held.
  void run();
  // Engine lock held. Returns the tokens the step processed.
  int64_t commit();
  // After commit: the step's sessions whose generation turn samples next (their thread is waiting for these
  // logits). Engine lock held.
  std::vector<Session *> sampling_sessions() const;

 private:
  void run_ahead(Session &s);  // (commit)
  // One session's share of the step, and the copies of its state the unlocked phase reads.
  struct Work {
    Session *s;
    int32_t seq;             // index into step_.batch.seqs
    int32_t n_pending;       // pending tokens taken
    int32_t n_drafts;        // MTP draft rows after them (filled in by the draft pass)
    int64_t n_past;
    bool first_chunk;        // starts a pending run: a new logits set
    int64_t logit_row0 = 0, n_logit_rows = 0;
    std::vector<int32_t> pages;
    std::vector<PageCopy> copies;  // copy-on-write before the forward (Session::make_writable)
    // MTP state, advanced by the draft pass and the catch-up, written back at commit.
    int64_t mtp_pos = 0;
    std::vector<float> mtp_hidden;
    int64_t tail0 = 0;
    std::vector<int32_t> tail;           // cached tokens [tail0, n_past)
    std::vector<int32_t> override_seq;   // cached + sampled + drafts so far (EngineOptions::mtp_draft_override)
    std::vector<int32_t> drafts;
    // Sampling on the device (Engine::device_sampling): the session's generation turn samples this step's one
    // logits row next, so the step samples it where the logits are, with copies of the turn's settings and of
    // the session's random stream taken at plan; only the token comes back (Session::presampled_).
    bool sample = false;
    SamplingParams sp;
    const std::vector<int32_t> *banned = nullptr;  // the session's bans (changed only by start(), never mid-step)
    std::vector<int32_t> history;                   // the penalty window's tokens (empty when no penalty is on)
    Rng rng;
    uint64_t rng_before[4] = {};
    SampleResult sampled;
    int64_t host_row0 = 0;  // where its logits rows start in logits_ (the rows that came to the host)
  };
  int32_t token_at(const Work &w, int64_t pos) const;  // the sequence's token at pos (cached or this step's)
  void draft();
  void forward_and_sample(Tensor *hidden);
  void catch_up(Tensor hidden);

  Engine &e_;
  Step step_;
  std::vector<Work> work_;
  HostVec<float> logits_;
  bool failed_ = false;
  dsrt_status fail_code_ = DSRT_OK;
  std::string fail_msg_;
  double seconds_ = 0;
};

}  // namespace dsrt
