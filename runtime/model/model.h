// A loaded checkpoint: config, mapped shards, bound weights. Immutable after load, shared by engines.
#pragma once
#include <atomic>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "core/file.h"
#include "model/config.h"
#include "model/identity.h"
#include "model/placement.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "text/tokenizer.h"

namespace dsrt {

struct LoadOptions {
  bool load_mtp = true;
  bool validate_scales = true;
  // stage: 0 config, 1 shards, 2 validate, 3 text files; returns false to cancel.
  bool (*progress)(int stage, uint64_t done, uint64_t total, void *user) = nullptr;
  void *user = nullptr;
  const std::atomic<int> *cancel = nullptr;
  bool tokenizer_only = false;  // config.json + tokenizer files only: text calls work, no weights
  // Placement (model/placement.h): the devices the weights go to (none: host memory, read in place) and the
  // bytes each may hold (0: what the device has free, less 1 GiB of working room).
  std::vector<Device> devices;
  uint64_t device_memory = 0;
  // Map (default): weights read in place from the shards, which must not change while the model is loaded
  // (Checkpoint::verify_unchanged detects it between steps). Copy: weights copied into memory at load.
  ShardAccess shard_access = ShardAccess::Map;
};

// A tokenizer-only load has no embedding to check vocab_size against: the padding ids beyond what its
// files can hold (each id costs at least one byte of a tokenizer file) are capped by this.
constexpr int64_t kTokenizerOnlyPaddingMax = int64_t(1) << 20;

// Sampling defaults a checkpoint ships in generation_config.json (absent fields keep dsrt's defaults).
struct GenerationDefaults {
  bool has_temperature = false, has_top_p = false, has_top_k = false, do_sample = true;
  float temperature = 0.0f, top_p = 1.0f;
  int32_t top_k = 0;
};

// Reads generation_config.json of a model directory (absent: defaults stay). Throws DSRT_ERR_FORMAT.
void load_generation_defaults(const std::string &dir, GenerationDefaults &g);

class Model {
 public:
  static std::shared_ptr<Model> load(const std::string &dir, const LoadOptions &opt);
  Model();
  ~Model();  // the last model freed hands dsrt's freed host memory back to the system
  Model(const Model &) = delete;
  Model &operator=(const Model &) = delete;

  std::string dir;
  std::string config_json;
  ModelConfig cfg;
  std::unique_ptr<Checkpoint> ckpt;
  ModelWeights w;
  RopeTable rope;
  MlaDims mla;
  RouterParams router;
  uint64_t n_params = 0;  // main model (MTP excluded)
  bool has_weights = true;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the directory has no tokenizer files
  GenerationDefaults gen_defaults;
  std::string fingerprint;  // sha256 over config.json and every tensor's name, dtype, shape and first bytes
  mutable ModelIdentity identity;  // every weight byte hashed, on first use (model/identity.h)
  Placement placement;      // where each weight lives, planned at load
  // The weights' copies on each device, made by the backends that need them and shared by every engine of
  // the model (two engines on one GPU hold one copy).
  mutable DeviceWeightRegistry device_weights;

  // The tokenizer, or DSRT_ERR_UNSUPPORTED naming the directory when it has none.
  const Tokenizer &tok() const;
  // Ids that end generation: the config's EOS ids and the tokenizer's end-of-generation tokens.
  std::vector<int32_t> eog_ids() const;
  // Ids in the vocabulary that no token uses (padding rows of the embedding): never sampled. Set at load.
  std::vector<int32_t> unused_ids;
};

}  // namespace dsrt
