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

}  // namespace dsrt
