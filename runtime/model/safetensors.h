// Safetensors shards, memory-mapped, and the index that maps tensor names to shards (spec §2.1).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/dtype.h"

namespace dsrt {

// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::string &path);  // throws DSRT_ERR_IO
  ~MappedFile();
  MappedFile(const MappedFile &) = delete;
  MappedFile &operator=(const MappedFile &) = delete;
  const uint8_t *data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string &path() const { return path_; }

 private:
  std::string path_;
  const uint8_t *data_ = nullptr;
  uint64_t size_ = 0;
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t *data = nullptr;  // inside the mapping
  uint64_t nbytes = 0;
  const std::string *file = nullptr;  // shard path, for messages
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// One shard: the header is parsed and checked (offsets inside the file, byte counts equal to
// shape x dtype, no overlapping tensors, no duplicate names) on open.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string &path);
  const std::string &path() const { return map_.path(); }
  const std::vector<TensorInfo> &tensors() const { return tensors_; }

 private:
  MappedFile map_;
  std::vector<TensorInfo> tensors_;
};

// All shards of a checkpoint directory: model.safetensors.index.json + the shards it names, or a single
// model.safetensors. Tensors are found by name.
class Checkpoint {
 public:
  // progress(done, total) after each shard; returns false to cancel (throws DSRT_ERR_CANCELLED).
  using Progress = bool (*)(uint64_t done, uint64_t total, void *user);
  Checkpoint(const std::string &dir, Progress progress = nullptr, void *user = nullptr);
  const TensorInfo *find(const std::string &name) const;
  const std::map<std::string, const TensorInfo *> &all() const { return by_name_; }
  size_t n_shards() const { return shards_.size(); }
  uint64_t total_bytes() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const TensorInfo *> by_name_;
};

std::string read_text_file(const std::string &path);  // throws DSRT_ERR_IO
// Parses a JSON file; DSRT_ERR_IO if it cannot be read, DSRT_ERR_FORMAT naming the file if it is not JSON
// (or, with want_object, not a JSON object).
nlohmann::json read_json_file(const std::string &path, bool want_object = true);
bool file_exists(const std::string &path);

}  // namespace dsrt
