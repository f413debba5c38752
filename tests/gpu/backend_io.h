// Host vectors in and out of a backend's tensors (the GPU suite's op tests).
#pragma once
#include <vector>

#include "backend/backend.h"

namespace testing {

inline dsrt::Tensor put(dsrt::Backend &b, const std::vector<float> &v, int64_t rows, int64_t cols) {
  dsrt::Tensor t = b.alloc(rows, cols);
  b.from_host(t, v.data());
  return t;
}
inline std::vector<float> get(dsrt::Backend &b, dsrt::Tensor t) {
  std::vector<float> v(size_t(t.rows * t.cols));
  b.to_host(t, v.data());
  return v;
}

}  // namespace testing
