// A forward step as plain data (design.md §5): the batch, the rows whose logits come back, and the attention
// policy, with a byte encoding so that rank 0 can send it to the ranks that run the same forward in lockstep.
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
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
};

}  // namespace dsrt
