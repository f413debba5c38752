#include "safetensors_writer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/status.h"

namespace dsrt::tools {

void write_safetensors(const std::string &path, const std::vector<const TensorData *> &tensors) {
  std::vector<const TensorData *> order = tensors;
  std::sort(order.begin(), order.end(), [](auto *a, auto *b) {
    size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  nlohmann::ordered_json h;
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (auto *t : order) {
    h[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {off, off + t->bytes.size()}}};
    off += t->bytes.size();
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) failf(DSRT_ERR_IO, path, ": cannot create (", std::strerror(errno), ")");
  uint64_t n = header.size();
  f.write(reinterpret_cast<const char *>(&n), 8);
  f.write(header.data(), std::streamsize(header.size()));
  for (auto *t : order) f.write(reinterpret_cast<const char *>(t->bytes.data()), std::streamsize(t->bytes.size()));
  if (!f) failf(DSRT_ERR_IO, path, ": write failed");
}

}  // namespace dsrt::tools
