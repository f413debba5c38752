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


}  // namespace dsrt
