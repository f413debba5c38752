#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_set>

#include "core/fault.h"
#include "core/file.h"
#include "core/json.h"
#include "core/status.h"

namespace dsrt {

using json = nlohmann::json;

namespace {

FileStamp stamp_of(const struct stat &st) {
  FileStamp s;
  s.dev = uint64_t(st.st_dev);
  s.ino = uint64_t(st.st_ino);
  s.size = uint64_t(st.st_size);
  s.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  s.ctime_ns = int64_t(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
  return s;
}

// SAX pass that remembers the keys of each open object; nlohmann's callback parser instead rescans the
// parent object after every child (quadratic: 100,000 header entries took 67-101 s).
struct DuplicateKeyFinder {
  std::vector<std::unordered_set<std::string>> open;  // the keys of each open object, innermost last
  std::string duplicate;

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(json::number_integer_t) { return true; }
  bool number_unsigned(json::number_unsigned_t) { return true; }
  bool number_float(json::number_float_t, const json::string_t &) { return true; }
  bool string(json::string_t &) { return true; }
  bool binary(json::binary_t &) { return true; }
  bool start_object(std::size_t) {
    open.emplace_back();
    return true;
  }
  bool key(json::string_t &k) {
    if (!open.back().insert(k).second) {
      duplicate = k;
      return false;  // stop: one is enough
    }
    return true;
  }
  bool end_object() {
    open.pop_back();
    return true;
  }
  bool start_array(std::size_t) { return true; }
  bool end_array() { return true; }
  bool parse_error(std::size_t, const std::string &, const json::exception &e) {
    if (auto *pe = dynamic_cast<const json::parse_error *>(&e)) throw *pe;  // keeps the byte offset
    throw e;
  }
};

}  // namespace

std::string find_duplicate_key(const char *begin, const char *end) {
  DuplicateKeyFinder f;
  json::sax_parse(begin, end, &f);
  return f.duplicate;
}

FileBytes::FileBytes(const std::string &path, ShardAccess access) : path_(path), access_(access) {
  if (fault::alloc_should_fail()) failf(DSRT_ERR_OUT_OF_MEMORY, path, ": out of memory mapping the file");
  // O_NONBLOCK: a FIFO must be refused by fstat below, not wait for a writer inside open.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) failf(DSRT_ERR_IO, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    failf(DSRT_ERR_IO, path, ": not a regular file (a FIFO, device, socket or directory)");
  }
  stamp_ = stamp_of(st);
  size_ = uint64_t(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    return;
  }
  if (access == ShardAccess::Map) {
    void *p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) failf(DSRT_ERR_IO, path, ": mmap failed (", std::strerror(err), ")");
    data_ = static_cast<const uint8_t *>(p);
    return;
  }
  // Copy: anonymous pages (page-aligned like a mapping, so in-file alignment carries over; returned to the
  // system on unmap, not kept by an allocator).
  void *p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    ::close(fd);
    failf(DSRT_ERR_OUT_OF_MEMORY, path, ": cannot allocate ", size_, " bytes to copy the file (load with mmap instead)");
  }
  uint8_t *dst = static_cast<uint8_t *>(p);
  uint64_t got = 0;
  std::string why;
  while (got < size_) {
    ssize_t r = ::pread(fd, dst + got, size_t(std::min<uint64_t>(size_ - got, uint64_t(1) << 30)), off_t(got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) why = std::string("read error (") + std::strerror(errno) + ")";
    if (r == 0) why = "file shrank while being copied";
    if (r <= 0) break;
    got += uint64_t(r);
  }
  struct stat after;
  if (why.empty() && (::fstat(fd, &after) != 0 || !(stamp_of(after) == stamp_)))
    why = "file changed while being copied";
  ::close(fd);
  if (!why.empty()) {
    ::munmap(p, size_);
    failf(DSRT_ERR_IO, path, ": ", why);
  }
  ::mprotect(p, size_, PROT_READ);  // weights are read-only, as when mapped
  data_ = dst;
}

FileBytes::~FileBytes() {
  if (data_) ::munmap(const_cast<uint8_t *>(data_), size_);
}

SafetensorsFile::SafetensorsFile(const std::string &path, ShardAccess access) : bytes_(path, access) {
  const uint64_t fsize = bytes_.size();
  // The first 8 bytes are the header length; messages never quote them (a shard symlinked to a secret file
  // would otherwise leak its first bytes as a number).
  if (fsize < 8) failf(DSRT_ERR_FORMAT, path, ": too short for a safetensors header (", fsize, " bytes)");
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes_.data(), 8);  // little-endian hosts only (x86-64, aarch64)
  if (hlen > fsize - 8)
    failf(DSRT_ERR_FORMAT, path, ": not a safetensors file (its header length field exceeds the file's ", fsize, " bytes)");
  if (hlen > kShardHeaderMax)
    failf(DSRT_ERR_FORMAT, path, ": not a safetensors file (its header length field exceeds the ", kShardHeaderMax,
          " bytes allowed)");
  const char *hbegin = reinterpret_cast<const char *>(bytes_.data() + 8), *hend = hbegin + hlen;
  json h;
  try {
    if (std::string dup = find_duplicate_key(hbegin, hend); !dup.empty())
      failf(DSRT_ERR_FORMAT, path, ": key ", dup, " is listed twice in the header");
    h = json::parse(hbegin, hend);
  } catch (const json::exception &e) {
    failf(DSRT_ERR_FORMAT, path, ": header is not valid JSON (", json_error_position(e), ")");
  }
  if (!h.is_object()) failf(DSRT_ERR_FORMAT, path, ": header is not a JSON object");
  const uint8_t *base = bytes_.data() + 8 + hlen;
  const uint64_t data_size = fsize - 8 - hlen;
  tensors_.reserve(h.size());
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string &name = it.key();
    const json &t = it.value();
    auto bad = [&](const std::string &why) { failf(DSRT_ERR_FORMAT, path, ": tensor ", name, ": ", why); };
    if (!t.is_object()) bad("entry is not an object");
    auto dt = t.find("dtype"), sh = t.find("shape"), off = t.find("data_offsets");
    if (dt == t.end() || !dt->is_string()) bad("missing dtype");
    if (sh == t.end() || !sh->is_array()) bad("missing shape");
    if (off == t.end() || !off->is_array() || off->size() != 2) bad("missing data_offsets");
    TensorInfo ti;
    ti.name = name;
    ti.file = &bytes_.path();
    if (!dtype_parse(dt->get<std::string>(), &ti.dtype)) bad("unknown dtype \"" + dt->get<std::string>() + "\"");
    if (sh->size() > 8) bad("more than 8 dimensions");
    unsigned __int128 numel = 1;
    for (auto &d : *sh) {
      if (!d.is_number_unsigned()) bad("shape has a non-integer or negative dimension");
      uint64_t v = d.get<uint64_t>();
      if (v > (uint64_t(1) << 40)) bad("dimension " + std::to_string(v) + " is too large");
      ti.shape.push_back(int64_t(v));
      numel *= v;
      if (numel > (unsigned __int128)(uint64_t(1) << 62)) bad("element count overflows");
    }
    for (auto &o : *off)
      if (!o.is_number_unsigned()) bad("data_offsets are not non-negative integers");
    uint64_t b = (*off)[0].get<uint64_t>(), e = (*off)[1].get<uint64_t>();
    if (b > e || e > data_size)
      bad("data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + ") lie outside the data section (" +
          std::to_string(data_size) + " bytes; file truncated?)");
    uint64_t want = uint64_t(numel) * dtype_size(ti.dtype);
    if (e - b != want)
      bad("holds " + std::to_string(e - b) + " bytes but shape x dtype needs " + std::to_string(want));
    ti.data = base + b;
    ti.nbytes = e - b;
    tensors_.push_back(std::move(ti));
  }
  // Overlapping data regions mean a corrupt or hostile file.
  std::vector<const TensorInfo *> order;
  order.reserve(tensors_.size());
  for (auto &t : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto *a, auto *b) { return a->data < b->data; });
  for (size_t i = 1; i < order.size(); i++)
    if (order[i - 1]->nbytes && order[i]->data < order[i - 1]->data + order[i - 1]->nbytes)
      failf(DSRT_ERR_FORMAT, path, ": tensors ", order[i - 1]->name, " and ", order[i]->name, " overlap");
}

Checkpoint::Checkpoint(const std::string &dir, Progress progress, void *user, ShardAccess access) : access_(access) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> files;
  std::map<std::string, std::string> weight_map;
  if (file_exists(index_path)) {
    const std::string text = read_text_file(index_path, kIndexFileMax);
    json idx;
    try {
      if (std::string dup = find_duplicate_key(text.data(), text.data() + text.size()); !dup.empty())
        failf(DSRT_ERR_FORMAT, index_path, ": key ", dup, " is listed twice");
      idx = json::parse(text);
    } catch (const json::exception &e) {
      failf(DSRT_ERR_FORMAT, index_path, ": not valid JSON (", json_error_position(e), ")");
    }
    if (!idx.is_object()) failf(DSRT_ERR_FORMAT, index_path, ": not a JSON object");
    auto wm = idx.find("weight_map");
    if (wm == idx.end() || !wm->is_object()) failf(DSRT_ERR_FORMAT, index_path, ": no weight_map object");
    std::set<std::string> seen;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) failf(DSRT_ERR_FORMAT, index_path, ": weight_map entry ", it.key(), " is not a file name");
      std::string f = it.value().get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        failf(DSRT_ERR_FORMAT, index_path, ": weight_map entry ", it.key(), " names \"", f, "\", not a file in the directory");
      weight_map.emplace_hint(weight_map.end(), it.key(), f);  // the object iterates in key order
      if (seen.insert(f).second) files.push_back(f);
    }
  } else if (file_exists(dir + "/model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    failf(DSRT_ERR_IO, dir, ": neither model.safetensors.index.json nor model.safetensors found");
  }
  std::sort(files.begin(), files.end());
  for (size_t i = 0; i < files.size(); i++) {
    const std::string path = dir + "/" + files[i];
    if (!file_exists(path)) failf(DSRT_ERR_IO, path, ": shard named in the index is missing or not a regular file");
    shards_.push_back(std::make_unique<SafetensorsFile>(path, access));
    for (const TensorInfo &t : shards_.back()->tensors()) {
      auto [it, fresh] = by_name_.emplace(t.name, &t);
      if (!fresh) failf(DSRT_ERR_FORMAT, "tensor ", t.name, " appears in both ", *it->second->file, " and ", path);
    }
    if (progress && !progress(i + 1, files.size(), user)) fail(DSRT_ERR_CANCELLED, "model load cancelled");
  }
  // The index must agree with the shards.
  for (auto &[name, f] : weight_map) {
    auto it = by_name_.find(name);
    if (it == by_name_.end())
      failf(DSRT_ERR_FORMAT, index_path, ": tensor ", name, " is listed in ", f, " but that shard does not hold it");
    if (it->second->file->substr(it->second->file->size() - f.size()) != f)
      failf(DSRT_ERR_FORMAT, index_path, ": tensor ", name, " is listed in ", f, " but found in ", *it->second->file);
  }
}

void Checkpoint::verify_unchanged() const {
  if (access_ == ShardAccess::Copy) return;
  for (const auto &s : shards_) {
    const FileBytes &b = s->bytes();
    struct stat st;
    if (::stat(b.path().c_str(), &st) != 0)
      failf(DSRT_ERR_IO, b.path(), ": shard is gone since the model was loaded (", std::strerror(errno),
            "); its mapped weights can no longer be trusted: reload the model (use_mmap = 0 when files may change)");
    const FileStamp now = stamp_of(st);
    if (now == b.stamp()) continue;
    std::string what = now.size != b.stamp().size ? "its size changed from " + std::to_string(b.stamp().size) + " to " +
                                                        std::to_string(now.size) + " bytes"
                       : now.ino != b.stamp().ino || now.dev != b.stamp().dev ? "it was replaced by another file"
                                                                              : "it was written to";
    failf(DSRT_ERR_IO, b.path(), ": shard changed on disk since the model was loaded (", what,
          "); its mapped weights can no longer be trusted: reload the model (use_mmap = 0 when files may change)");
  }
}

const TensorInfo *Checkpoint::find(const std::string &name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (auto &[_, t] : by_name_) n += t->nbytes;
  return n;
}

}  // namespace dsrt
