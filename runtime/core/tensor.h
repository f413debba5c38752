// Tensor: a 2-D view of activations in one device's memory. It knows its device, so an op handed a tensor
// from another device fails loudly instead of reading foreign pointers (no op copies across devices).
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace dsrt {

// Where memory lives: host memory, or one CUDA device.
struct Device {
  enum Kind : uint8_t { Host, Cuda };
  Kind kind = Host;
  int16_t index = 0;

  static Device host() { return {}; }
  static Device cuda(int i) { return {Cuda, int16_t(i)}; }
  bool operator==(const Device &) const = default;
  std::string str() const { return kind == Host ? std::string("cpu") : "cuda:" + std::to_string(index); }
};

// Row-major [rows, cols], fp32 unless stated (routing ids: I32).
struct Tensor {
  void *data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  Device device;

  float *f32() const { return static_cast<float *>(data); }
  int32_t *i32() const { return static_cast<int32_t *>(data); }
  size_t bytes() const { return size_t(rows * cols) * dtype_size(dtype); }
  Tensor rows_view(int64_t r0, int64_t n) const {
    return {static_cast<char *>(data) + size_t(r0 * cols) * dtype_size(dtype), dtype, n, cols, device};
  }
  // The same memory read as [rows * cols / c, c] (the MTP module's row interleave).
  Tensor reshaped(int64_t r, int64_t c) const { return {data, dtype, r, c, device}; }
};

}  // namespace dsrt
