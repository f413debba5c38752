// Host-side queries of the CUDA runtime: which devices exist and what they are. The CUDA runtime is linked
// statically, so a machine without a driver simply reports zero devices.
#include <cuda_runtime.h>

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
