// The full-model identity: a 64-bit hash over every byte of every bound weight (FP8 block scales included),
// so a session state saved with one set of weights is refused by a model whose weights differ anywhere.
// Model::fingerprint stays the cheap check (config text, tensor names, dtypes, shapes); the identity reads
// the whole checkpoint once (~690 GB for DeepSeek-V3: minutes, at the speed the mapped files can be read), so
// it is computed on the first call that needs it and cached in the Model.
#pragma once
#include <cstdint>
#include <mutex>

namespace dsrt {

class Model;

struct ModelIdentity {
  std::once_flag once;
  uint64_t value = 0;
};

// Computes (once per model, thread-safe; concurrent callers wait for the first) and returns the identity.
uint64_t model_identity(const Model &m);

}  // namespace dsrt
