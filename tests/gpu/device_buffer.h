// Raw device buffers for the kernel-level GPU tests, and a parallel loop for their fp64 host references (tens of
// GMACs).
#pragma once
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace testing {

// f(i) for i in [0, n) on every host thread.
template <class F>
void parallel_for(int64_t n, F f) {
  const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
  std::atomic<int64_t> next{0};
  std::vector<std::thread> th;
  for (unsigned i = 0; i < nt; i++)
    th.emplace_back([&] {
      for (int64_t j; (j = next.fetch_add(1)) < n;) f(j);
    });
  for (auto &t : th) t.join();
}

// A device buffer of n elements.
template <class T>
struct Dev {
  T *p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { REQUIRE(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)) == cudaSuccess); }
  explicit Dev(const std::vector<T> &v) : Dev(v.size()) { put(v); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev &) = delete;
  Dev &operator=(const Dev &) = delete;
  void put(const std::vector<T> &v) {
    REQUIRE(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  void fill_nan() { REQUIRE(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(T)) == cudaSuccess); }  // 0xff..: NaN
  std::vector<T> get() const {
    std::vector<T> v(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
  }
};

}  // namespace testing
