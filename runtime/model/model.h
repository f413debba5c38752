// A loaded checkpoint: config, mapped shards, bound weights. Immutable after load, shared by engines.
#pragma once
#include <atomic>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dsrt {

struct LoadOptions {
  bool load_mtp = true;
  bool validate_scales = true;
  // stage: 0 config, 1 shards, 2 validate; returns false to cancel.
  bool (*progress)(int stage, uint64_t done, uint64_t total, void *user) = nullptr;
  void *user = nullptr;
  const std::atomic<int> *cancel = nullptr;
};

class Model {
 public:
  static std::shared_ptr<Model> load(const std::string &dir, const LoadOptions &opt);

  std::string dir;
  std::string config_json;
  ModelConfig cfg;
  std::unique_ptr<Checkpoint> ckpt;
  ModelWeights w;
  RopeTable rope;
  MlaDims mla;
  RouterParams router;
  uint64_t n_params = 0;  // main model (MTP excluded)
};

}  // namespace dsrt
