// A loaded checkpoint: config, mapped shards, bound weights. Immutable after load, shared by engines.
// The tokenizer and the ids generation needs from it are not here: engine/load.h loads them beside the model.
#pragma once
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/file.h"
#include "model/config.h"
#include "model/identity.h"
#include "model/placement.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dsrt {

struct LoadOptions {
  bool load_mtp = true;
  bool validate_scales = true;
  // stage: 0 config, 1 shards, 2 validate, 3 text files (tokenizer, generation config); returns false to cancel.
  bool (*progress)(int stage, uint64_t done, uint64_t total, void *user) = nullptr;
  void *user = nullptr;
  const std::atomic<int> *cancel = nullptr;
  // config.json (and generation_config.json) only, no weights: the model of a tokenizer-only load
  // (engine/load.h), on which text calls work and no engine runs.
  bool config_only = false;
  // Placement (model/placement.h): the devices the weights go to (none: host memory, read in place) and the
  // bytes each may hold with an engine's KV pool (plan_placement; 0: what the device has free, less 1 GiB of
  // working room, for the weights alone).
  std::vector<Device> devices;
  uint64_t device_memory = 0;
  double device_memory_fraction = 0;  // > 0: this share of the device's free memory instead of device_memory
  ExpertCompute experts_compute = ExpertCompute::Gpu;  // AllOnCpu: no routed expert on the device
  // Map (default): weights read in place from the shards, which must not change while the model is loaded
  // (Checkpoint::verify_unchanged detects it between steps). Copy: weights copied into memory at load.
  ShardAccess shard_access = ShardAccess::Map;
};

// Sampling defaults a checkpoint ships in generation_config.json (absent fields keep dsrt's defaults).
struct GenerationDefaults {
  bool has_temperature = false, has_top_p = false, has_top_k = false, do_sample = true;
  float temperature = 0.0f, top_p = 1.0f;
  int32_t top_k = 0;
};

// Reads generation_config.json of a model directory (absent: defaults stay). Throws DSRT_ERR_FORMAT.
void load_generation_defaults(const std::string &dir, GenerationDefaults &g);

// Load progress: DSRT_ERR_CANCELLED "model load cancelled" when opt.cancel is set or opt.progress asks to stop.
void report_load_progress(const LoadOptions &opt, int stage, uint64_t done, uint64_t total);

// The KV capacity of an engine that asks for none (EngineOptions::max_tokens 0): min(n_ctx_train, 16384).
int64_t default_kv_tokens(const ModelConfig &c);

// The latent KV pool of an engine of this model holding max_tokens tokens (0: default_kv_tokens) in dtype:
// every cache layer (the main ones, then the loaded MTP layers), whole 64-token pages. The engine sizes its
// pool with it and the placement reserves its bytes under a device budget: one formula for both.
KvCacheSpec kv_pool_spec(const ModelConfig &c, const ModelWeights &w, DType dtype, int64_t max_tokens = 0);

// The placement of w on devices (model/placement.h) for a budget of device_memory bytes, or device_fraction
// (> 0) of the first device's free memory. A budget given covers the weights and the KV pool of one engine of
// the default size (kv_pool_spec, BF16 as the CUDA backend keeps it), reserved before routed experts are
// placed; none given (0): the device's free memory less 1 GiB of working room holds the weights, and the KV
// pool takes what they leave.
Placement plan_placement(const ModelConfig &c, const ModelWeights &w, const std::vector<Device> &devices,
                         uint64_t device_memory, double device_fraction);

class Model {
 public:
  // The model alone: begin_load, load_weights (unless config_only), generation_config.json, finish_load.
  // No tokenizer: engine/load.h's load_model reads the text files too, in the order of the stages.
  static std::shared_ptr<Model> load(const std::string &dir, const LoadOptions &opt);
  // The steps of a load, in this order; each consults cancel and progress (DSRT_ERR_CANCELLED "model load
  // cancelled"). Between load_weights and finish_load a caller reads the directory's other files (stage 3).
  static std::shared_ptr<Model> begin_load(const std::string &dir, const LoadOptions &opt);  // config.json: stage 0
  void load_weights(const LoadOptions &opt);  // the shards (stage 1), bound and checked against the config (stage 2)
  void finish_load(const LoadOptions &opt);   // fingerprint, RoPE and MLA tables, placement, parameter count
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
  bool has_weights = true;  // false after a config_only load
  GenerationDefaults gen_defaults;
  std::string fingerprint;  // sha256 over config.json and every tensor's name, dtype, shape and first bytes
  mutable ModelIdentity identity;  // every weight byte hashed, on first use (model/identity.h)
  Placement placement;      // where each weight lives, planned at load
  ExpertCompute experts_compute = ExpertCompute::Gpu;
  // The weights' copies on each device, made by the backends that need them and shared by every engine of
  // the model (two engines on one GPU hold one copy).
  mutable DeviceWeightRegistry device_weights;
};

}  // namespace dsrt
