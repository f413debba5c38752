// The weight table: every tensor the config implies, bound to its bytes in the mapped shards and checked
// for presence, dtype and shape (and FP8 block scales) before anything runs.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace dsrt {

// One tensor as the forward uses it: a matrix [rows, cols] (vectors have cols = 1), stored in place. A weight
// may be a view of a block of a larger tensor (a rank's shard, Mapping): element (r, c) of the view is element
// (row0 + r, col0 + c) of the tensor, whose rows are `ld` elements apart; block scales index the tensor.
struct Weight {
  const TensorInfo *info = nullptr;  // null: absent
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  const uint8_t *data = nullptr;  // element (0, 0) of the whole tensor
  const float *scale = nullptr;  // FP8: block scales [ceil(rows/128), ceil(cols/128)] of the whole tensor
  int64_t scale_cols = 0;
  // Index in ModelWeights::all of the tensor this weight is, or is a part of (a view keeps its tensor's id:
  // is_whole() tells them apart); -1 for weights made outside a checkpoint (tests).
  int32_t id = -1;
  int64_t row0 = 0, col0 = 0, ld = 0;  // ld 0: the tensor's own cols

  explicit operator bool() const { return data != nullptr; }
  const std::string &name() const;  // "(unnamed)" for weights made outside a checkpoint (tests)
  bool part = false;  // a view of part of its tensor (rows_part, cols_part); a prefix of rows is one too
  bool is_whole() const { return !part; }
  // Views of rows [r.begin, r.end) or columns [c.begin, c.end); the whole range returns the weight itself.
  Weight rows_part(int64_t r0, int64_t n) const;
  Weight cols_part(int64_t c0, int64_t n) const;
  // out[0..n) = W[r, c0 .. c0+n) in fp32, block scale applied.
  void dequant_row(int64_t r, int64_t c0, int64_t n, float *out) const;
  float at(int64_t i) const;  // element i of a vector
};

// A weight as one contiguous [rows, cols] matrix in its own dtype, and for FP8 its block scales
// [ceil(rows/128), ceil(cols/128)] (row-major): what a device copy of a rank's part of a tensor holds, so that
// the kernels index it as a whole tensor. An FP8 part must start on a 128 x 128 scale block (a part cut inside
// one would need two scales per block): throws DSRT_ERR_UNSUPPORTED naming the tensor and where it is cut.
struct PackedWeight {
  std::vector<uint8_t> data;
  std::vector<float> scale;
  int64_t scale_cols = 0;
};
PackedWeight pack_weight(const Weight &w);
// Empty when pack_weight(w) can pack w; else why not ("<tensor>: rows [a, b) of R start inside a 128-row FP8
// scale block").
std::string fp8_block_cut(const Weight &w);

struct FfnWeights {
  Weight gate, up, down;  // SwiGLU: down(silu(gate x) * up x)
};

struct LayerWeights {
  int64_t index = 0;
  Weight input_norm, post_norm;
  Weight q_a, q_a_norm, q_b;  // q_lora_rank > 0
  Weight q;                   // q_lora_rank == 0
  Weight kv_a, kv_a_norm, kv_b, o;
  bool moe = false;
  FfnWeights dense;              // !moe
  Weight router, router_bias;    // moe; bias only for noaux_tc
  std::vector<FfnWeights> experts;
  FfnWeights shared;             // moe with n_shared_experts > 0
  // MTP module extras (spec §6).
  bool is_mtp = false;
  Weight mtp_embed, enorm, hnorm, eh_proj, head_norm, head;
};

// Calls fn on every weight slot of a layer (absent ones too: test with bool(w)), its experts' included.
void for_each_weight(const LayerWeights &L, const std::function<void(const Weight &)> &fn);

struct ModelWeights {
  Weight embed, norm, head;
  std::vector<LayerWeights> layers;  // num_hidden_layers
  std::vector<LayerWeights> mtp;     // loaded MTP layers
  std::vector<Weight *> all;         // every bound weight (pointers into this object; do not copy it)
  std::vector<std::string> unknown;  // checkpoint tensors the config does not explain
  bool fp8 = false;                  // any FP8 weight present
  uint64_t bytes = 0;                // bytes of all bound tensors (scales included)

  ModelWeights() = default;
  ModelWeights(const ModelWeights &) = delete;
  ModelWeights &operator=(const ModelWeights &) = delete;
};

struct BindOptions {
  bool load_mtp = true;
  bool validate_scales = true;
  // Called per tensor checked; returns false to cancel.
  bool (*progress)(uint64_t done, uint64_t total, void *user) = nullptr;
  void *user = nullptr;
};

// Binds and validates. Throws DSRT_ERR_FORMAT naming the file and tensor on any problem.
void bind_weights(const ModelConfig &cfg, const Checkpoint &ckpt, const BindOptions &opt, ModelWeights &out);

// Names of the expert tensors "model.layers.L.mlp.experts.E.gate_proj.weight" etc. as bound.
std::string layer_prefix(const ModelConfig &cfg, int64_t layer);

}  // namespace dsrt
