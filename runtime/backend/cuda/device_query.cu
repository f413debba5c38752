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

double host_to_device_bandwidth(int device) {
  if (cudaSetDevice(device) != cudaSuccess) return 0.0;
  const size_t n = size_t(512) << 20;
  void *h = nullptr, *d = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  double best = 0.0;
  if (cudaHostAlloc(&h, n, cudaHostAllocDefault) == cudaSuccess && cudaMalloc(&d, n) == cudaSuccess &&
      cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess) {
    std::memset(h, 1, n);
    for (int r = 0; r < 4; r++) {
      cudaEventRecord(e0);
      cudaMemcpy(d, h, n, cudaMemcpyHostToDevice);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (ms > 0) best = std::max(best, double(n) / (double(ms) * 1e-3));
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFreeHost(h);
  cudaFree(d);
  cudaGetLastError();
  return best;
}

double device_copy_bandwidth(int device) {
  if (cudaSetDevice(device) != cudaSuccess) return 0.0;
  const size_t n = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  double best = 0.0;
  if (cudaMalloc(&a, n) == cudaSuccess && cudaMalloc(&b, n) == cudaSuccess && cudaEventCreate(&e0) == cudaSuccess &&
      cudaEventCreate(&e1) == cudaSuccess) {
    cudaMemset(a, 1, n);
    for (int r = 0; r < 5; r++) {
      cudaEventRecord(e0);
      cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (ms > 0) best = std::max(best, 2.0 * double(n) / (double(ms) * 1e-3));
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  cudaGetLastError();
  return best;
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
