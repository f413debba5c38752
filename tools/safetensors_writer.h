// Writes safetensors files the way the reference writer does: header padded to 8 bytes, tensors ordered by
// element size (largest first) then name, so every tensor is aligned to its element size.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace dsrt::tools {

struct TensorData {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Throws dsrt::Error(DSRT_ERR_IO) on failure.
void write_safetensors(const std::string &path, const std::vector<const TensorData *> &tensors);

}  // namespace dsrt::tools
