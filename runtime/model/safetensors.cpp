#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/fault.h"
#include "core/json.h"
#include "core/status.h"

namespace dsrt {

using json = nlohmann::json;

bool file_exists(const std::string &path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_text_file(const std::string &path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) failf(DSRT_ERR_IO, path, ": cannot open (", std::strerror(errno), ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) failf(DSRT_ERR_IO, path, ": read error");
  return ss.str();
}

nlohmann::json read_json_file(const std::string &path, bool want_object) {
  const std::string text = read_text_file(path);
  const json j = parse_json_sorted(text, path.c_str(), DSRT_ERR_FORMAT);
  if (want_object && !j.is_object()) failf(DSRT_ERR_FORMAT, path, ": not a JSON object");
  return j;
}

MappedFile::MappedFile(const std::string &path) : path_(path) {
  if (fault::alloc_should_fail()) failf(DSRT_ERR_OUT_OF_MEMORY, path, ": out of memory mapping the file");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) failf(DSRT_ERR_IO, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    failf(DSRT_ERR_IO, path, ": not a regular file");
  }
  size_ = uint64_t(st.st_size);
  if (size_ > 0) {
    void *p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      failf(DSRT_ERR_IO, path, ": mmap failed (", std::strerror(err), ")");
    }
    data_ = static_cast<const uint8_t *>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t *>(data_), size_);
}

SafetensorsFile::SafetensorsFile(const std::string &path) : map_(path) {
  const uint64_t fsize = map_.size();
  if (fsize < 8) failf(DSRT_ERR_FORMAT, path, ": too short for a safetensors header (", fsize, " bytes)");
  uint64_t hlen = 0;
  std::memcpy(&hlen, map_.data(), 8);  // little-endian hosts only (x86-64, aarch64)
  if (hlen > fsize - 8) failf(DSRT_ERR_FORMAT, path, ": header length ", hlen, " exceeds the file (", fsize, " bytes)");
  if (hlen > (uint64_t(100) << 20)) failf(DSRT_ERR_FORMAT, path, ": header length ", hlen, " is implausibly large");
  json h;
  std::set<std::string> names;  // JSON parsers keep the last of duplicate keys: a hostile header could hide one
  std::string duplicate;
  try {
    h = json::parse(map_.data() + 8, map_.data() + 8 + hlen, [&](int depth, json::parse_event_t ev, json &parsed) {
      if (depth == 1 && ev == json::parse_event_t::key && !names.insert(parsed.get<std::string>()).second)
        duplicate = parsed.get<std::string>();
      return true;
    });
  } catch (const std::exception &e) {
    failf(DSRT_ERR_FORMAT, path, ": header is not valid JSON (", e.what(), ")");
  }
  if (!duplicate.empty()) failf(DSRT_ERR_FORMAT, path, ": tensor ", duplicate, " is listed twice in the header");
  if (!h.is_object()) failf(DSRT_ERR_FORMAT, path, ": header is not a JSON object");
  const uint8_t *base = map_.data() + 8 + hlen;
  const uint64_t data_size = fsize - 8 - hlen;
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
    ti.file = &map_.path();
    if (!dtype_parse(dt->get<std::string>(), &ti.dtype)) bad("unknown dtype \"" + dt->get<std::string>() + "\"");
    unsigned __int128 numel = 1;
    for (auto &d : *sh) {
      if (!d.is_number_unsigned()) bad("shape has a non-integer or negative dimension");
      uint64_t v = d.get<uint64_t>();
      if (v > (uint64_t(1) << 40)) bad("dimension " + std::to_string(v) + " is too large");
      ti.shape.push_back(int64_t(v));
      numel *= v;
      if (numel > (unsigned __int128)(uint64_t(1) << 62)) bad("element count overflows");
    }
    if (sh->size() > 8) bad("more than 8 dimensions");
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
  for (auto &t : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto *a, auto *b) { return a->data < b->data; });
  for (size_t i = 1; i < order.size(); i++)
    if (order[i - 1]->nbytes && order[i]->data < order[i - 1]->data + order[i - 1]->nbytes)
      failf(DSRT_ERR_FORMAT, path, ": tensors ", order[i - 1]->name, " and ", order[i]->name, " overlap");
}

Checkpoint::Checkpoint(const std::string &dir, Progress progress, void *user) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> files;
  std::map<std::string, std::string> weight_map;
  if (file_exists(index_path)) {
    json idx = read_json_file(index_path);
    auto wm = idx.find("weight_map");
    if (wm == idx.end() || !wm->is_object()) failf(DSRT_ERR_FORMAT, index_path, ": no weight_map object");
    std::set<std::string> seen;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) failf(DSRT_ERR_FORMAT, index_path, ": weight_map entry ", it.key(), " is not a file name");
      std::string f = it.value().get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        failf(DSRT_ERR_FORMAT, index_path, ": weight_map entry ", it.key(), " names \"", f, "\", not a file in the directory");
      weight_map[it.key()] = f;
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
    if (!file_exists(path)) failf(DSRT_ERR_IO, path, ": shard named in the index is missing");
    shards_.push_back(std::make_unique<SafetensorsFile>(path));
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
