// A forward step as plain data (design.md §5): the batch, the rows whose logits come back, and the attention
// policy, with a byte encoding so that rank 0 can send it to the ranks that run the same forward in lockstep.
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "dsrt.h"
#include "model/deepseek_v3.h"

namespace dsrt {

struct Step {
  enum class Kind : uint8_t { Forward = 1, Stop = 2 };  // Stop: followers leave their loop
  Kind kind = Kind::Forward;
  Batch batch;
  std::vector<int32_t> logit_rows;
  AttentionPolicy policy = AttentionPolicy::Auto;
  // The final normed hidden states stay on every rank after the forward, for the MTP module's passes (MtpPass).
  bool hidden = false;

  std::string encode() const;
  // Throws DSRT_ERR_FORMAT when the bytes are not a step this version wrote, or do not hold together
  // (rows, sequences and page tables out of range).
  static Step decode(std::string_view bytes);
  // Throws `code` (the message starting with `what`) when the step does not hold together: a position per
  // token, each sequence's rows inside the batch and its page table inside the batch's pages and covering its
  // positions, logit rows inside the batch. The backends index host and device arrays by these rows (the CUDA
  // backend's cache slots: a sequence past the batch wrote past a host vector), so nothing runs a step that
  // fails it: decode() checks what arrives, RankGroup::forward what rank 0 is given.
  void check(dsrt_status code, const char *what) const;
};

// One pass of the MTP module (spec §6) as plain data, so that ranks in lockstep run it too: its batch, logit
// rows and policy (a Step), and its input rows [T, hidden] given as segments in batch-row order, each from
// where every rank has the same rows: the host (hidden states sessions kept from earlier steps), the normed
// hidden states of the last main forward (a Step with `hidden`), or the head-normed output of the previous
// pass. Every rank rebuilds the same input from its own copies.
struct MtpPass {
  enum class From : uint8_t { Host = 1, StepHidden = 2, Normed = 3 };
  struct Segment {
    From from = From::Host;
    std::vector<int32_t> rows;  // StepHidden, Normed: the source rows, in order
    std::vector<float> host;    // Host: rows x hidden floats
  };
  Step step;
  bool begin_step = false;  // the first pass of a step's drafts: a new scratch step on every rank
  std::vector<Segment> segments;

  void add_host(const float *rows, int64_t n, int64_t hidden);
  void add_rows(From from, std::vector<int32_t> rows);
  // Input rows the segments hold, given the hidden size.
  int64_t n_rows(int64_t hidden) const;
  // Throws `code` when the step does not hold together (Step::check) or the segments do not: a host segment not
  // whole rows of `hidden` floats, a row segment with host floats or a negative row, rows that do not fill the
  // batch. (Source rows past their tensor are refused where the tensors are: RankGroup.)
  void check(int64_t hidden, dsrt_status code) const;
  std::string encode() const;
  // Throws DSRT_ERR_FORMAT like Step::decode, and when the segments do not fill the batch's rows.
  static MtpPass decode(std::string_view bytes, int64_t hidden);
};

}  // namespace dsrt
