// The CUDA entry points of a build without CUDA: no devices, and why.
#include <string>

#include "backend/backend.h"

namespace dsrt {

int cuda_device_count(std::string *why) {
  if (why) *why = "this build of dsrt has no CUDA support (configured with DSRT_CUDA=OFF or without nvcc)";
  return 0;
}
double device_copy_bandwidth(int) { return 0.0; }
double host_to_device_bandwidth(int) { return 0.0; }
uint64_t cuda_free_memory(int) { return 0; }
std::string cublaslt_status() { return "this build of dsrt has no CUDA support"; }
double fp8_gemm_tflops(int, int64_t, int64_t, int64_t) { return 0.0; }

}  // namespace dsrt
