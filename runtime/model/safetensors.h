// Safetensors shards, memory-mapped or copied, and the index that maps tensor names to shards (spec §2.1).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace dsrt {

// How a shard's bytes are held. Map: the file's pages, shared with the page cache (no copy, fast load), valid
// only while nobody truncates or rewrites the file (truncation turns a later read into SIGBUS). Copy: read
// into anonymous memory at load (RAM for the whole checkpoint, slower load), immune to later file changes.
enum class ShardAccess { Map, Copy };

// What identifies a file's contents cheaply (fstat at open): any difference means it was replaced, truncated
// or written since.
struct FileStamp {
  uint64_t dev = 0, ino = 0, size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  bool operator==(const FileStamp &) const = default;
};

// The bytes of one whole regular file, mapped or copied (see ShardAccess).
class FileBytes {
 public:
  FileBytes(const std::string &path, ShardAccess access);  // throws DSRT_ERR_IO / DSRT_ERR_OUT_OF_MEMORY
  ~FileBytes();
  FileBytes(const FileBytes &) = delete;
  FileBytes &operator=(const FileBytes &) = delete;
  const uint8_t *data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string &path() const { return path_; }
  const FileStamp &stamp() const { return stamp_; }
  ShardAccess access() const { return access_; }

 private:
  std::string path_;
  ShardAccess access_;
  const uint8_t *data_ = nullptr;
  uint64_t size_ = 0;
  FileStamp stamp_;
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t *data = nullptr;  // inside the shard's bytes
  uint64_t nbytes = 0;
  const std::string *file = nullptr;  // shard path, for messages
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// One shard: the header is parsed and checked (offsets inside the file, byte counts equal to
// shape x dtype, no overlapping tensors, no duplicate names) on open, in time linear in its size.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string &path, ShardAccess access = ShardAccess::Map);
  const std::string &path() const { return bytes_.path(); }
  const std::vector<TensorInfo> &tensors() const { return tensors_; }
  const FileBytes &bytes() const { return bytes_; }

 private:
  FileBytes bytes_;
  std::vector<TensorInfo> tensors_;
};

// All shards of a checkpoint directory: model.safetensors.index.json + the shards it names, or a single
// model.safetensors. Tensors are found by name.
class Checkpoint {
 public:
  // progress(done, total) after each shard; returns false to cancel (throws DSRT_ERR_CANCELLED).
  using Progress = bool (*)(uint64_t done, uint64_t total, void *user);
  Checkpoint(const std::string &dir, Progress progress = nullptr, void *user = nullptr,
             ShardAccess access = ShardAccess::Map);
  const TensorInfo *find(const std::string &name) const;
  const std::map<std::string, const TensorInfo *> &all() const { return by_name_; }
  size_t n_shards() const { return shards_.size(); }
  uint64_t total_bytes() const;
  ShardAccess access() const { return access_; }

  // Mapped shards: throws DSRT_ERR_IO naming the first shard whose size, mtime, ctime or inode differ from
  // load time (one stat per shard; call it between forward steps). Copied shards cannot change: no-op.
  void verify_unchanged() const;

 private:
  ShardAccess access_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const TensorInfo *> by_name_;
};

// The first key that some object of a JSON text lists twice (JSON parsers keep only one of the values, so a
// hostile file could hide one); empty when none. Linear in the text (hash sets, one per open object).
// Throws the parser's exception on malformed JSON.
std::string find_duplicate_key(const char *begin, const char *end);

}  // namespace dsrt
