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
  // cudart's own words for "no GPU here" ("CUDA driver version is insufficient for CUDA runtime version" when
  // there is no driver at all) mislead: say what the machine lacks.
  auto &c = j["cuda"];
  if (c["devices"].empty()) {
    const int driver = c.value("driver_version", 0), runtime = c.value("runtime_version", 0);
    if (driver == 0)
      c["status"] = "no NVIDIA driver (no GPU, or its driver is not installed): the CUDA backend is unavailable, the CPU backend runs";
    else if (driver < runtime)
      c["status"] = "the NVIDIA driver supports CUDA " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
                    ", older than the CUDA " + std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10) +
                    " runtime this build uses: update the driver to use the GPU; the CPU backend runs";
  }
  j["cuda"]["fp8_gemm"] = cublaslt_status();
#else
  j["cuda_built"] = false;
#endif
  return j.dump();
}


}  // namespace dsrt
