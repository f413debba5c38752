// A CUDA runtime status as dsrt's error: out of device memory is DSRT_ERR_OUT_OF_MEMORY (the sticky error
// cleared), anything else DSRT_ERR_INTERNAL naming what failed.
#pragma once
#include <cuda_runtime.h>

#include "core/status.h"

namespace dsrt {

inline void cuda_check(cudaError_t e, const char *what) {
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    failf(DSRT_ERR_OUT_OF_MEMORY, "CUDA: out of device memory (", what, ")");
  }
  if (e != cudaSuccess) failf(DSRT_ERR_INTERNAL, "CUDA: ", what, ": ", cudaGetErrorString(e));
}

}  // namespace dsrt
