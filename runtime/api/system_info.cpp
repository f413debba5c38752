#include "api/system_info.h"

#include "backend/backend.h"

#include <nlohmann/json.hpp>
#include <thread>

namespace dsrt {

#if defined(DSRT_WITH_CUDA)
nlohmann::json cuda_devices_json();  // runtime/backend/cuda/device_query.cu
#endif

std::string system_info_json() {
  nlohmann::json j;
  j["cpu_threads"] = std::thread::hardware_concurrency();
#if defined(DSRT_WITH_CUDA)
  j["cuda_built"] = true;
  j["cuda"] = cuda_devices_json();
  j["cuda"]["fp8_gemm"] = cublaslt_status();
#else
  j["cuda_built"] = false;
#endif
  return j.dump();
}

#if !defined(DSRT_WITH_CUDA)
int cuda_device_count(std::string *why) {
  if (why) *why = "this build of dsrt has no CUDA support (configured with DSRT_CUDA=OFF or without nvcc)";
  return 0;
}
double device_copy_bandwidth(int) { return 0.0; }
std::string cublaslt_status() { return "this build of dsrt has no CUDA support"; }
double fp8_gemm_tflops(int, int64_t, int64_t, int64_t) { return 0.0; }
#endif

}  // namespace dsrt
