// Host-side queries of the CUDA runtime: which devices exist and what they are. The CUDA runtime is linked
// statically, so a machine without a driver simply reports zero devices.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

namespace dsrt {

int cuda_device_count(std::string *why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (why) *why = std::string("CUDA: ") + cudaGetErrorString(err);
    cudaGetLastError();
    return 0;
  }
  if (n == 0 && why) *why = "CUDA: no devices";
  return n;
}

namespace {

// The best of `rounds` timed copies of n bytes (src to dst), in bytes per second times `counted` (2 for a copy
// within device memory: read and written); 0 when the events cannot be made.
double best_copy_rate(void *dst, const void *src, size_t n, cudaMemcpyKind kind, int rounds, double counted) {
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  double best = 0.0;
  if (cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess)
    for (int r = 0; r < rounds; r++) {
      cudaEventRecord(e0);
      cudaMemcpy(dst, src, n, kind);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (ms > 0) best = std::max(best, counted * double(n) / (double(ms) * 1e-3));
    }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return best;
}

}  // namespace

double host_to_device_bandwidth(int device) {
  if (cudaSetDevice(device) != cudaSuccess) return 0.0;
  const size_t n = size_t(512) << 20;
  void *h = nullptr, *d = nullptr;
  double rate = 0.0;
  if (cudaHostAlloc(&h, n, cudaHostAllocDefault) == cudaSuccess && cudaMalloc(&d, n) == cudaSuccess) {
    std::memset(h, 1, n);
    rate = best_copy_rate(d, h, n, cudaMemcpyHostToDevice, 4, 1.0);
  }
  cudaFreeHost(h);
  cudaFree(d);
  cudaGetLastError();
  return rate;
}

double device_copy_bandwidth(int device) {
  if (cudaSetDevice(device) != cudaSuccess) return 0.0;
  const size_t n = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  double rate = 0.0;
  if (cudaMalloc(&a, n) == cudaSuccess && cudaMalloc(&b, n) == cudaSuccess) {
    cudaMemset(a, 1, n);
    rate = best_copy_rate(b, a, n, cudaMemcpyDeviceToDevice, 5, 2.0);
  }
  cudaFree(a);
  cudaFree(b);
  cudaGetLastError();
  return rate;
}

uint64_t cuda_free_memory(int device) {
  int prev = 0;
  size_t free_b = 0, total_b = 0;
  if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess ||
      cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  cudaSetDevice(prev);
  return free_b;
}

nlohmann::json cuda_devices_json() {
  nlohmann::json j;
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  j["runtime_version"] = runtime;
  j["driver_version"] = driver;
  std::string why;
  int n = cuda_device_count(&why);
  if (n == 0) j["status"] = why;
  nlohmann::json devs = nlohmann::json::array();
  for (int i = 0; i < n; i++) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    devs.push_back({{"index", i},
                    {"name", p.name},
                    {"compute_capability", std::to_string(p.major) + "." + std::to_string(p.minor)},
                    {"memory_bytes", p.totalGlobalMem},
                    {"multiprocessors", p.multiProcessorCount}});
  }
  j["devices"] = devs;
  return j;
}

}  // namespace dsrt
