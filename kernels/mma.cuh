// Building blocks the tensor-core kernel families share (gemm_fp8_mma.cu, gemm_bf16_mma.cu, mla_flash.cu,
// mla_absorb.cu): cp.async copies into shared memory, the m16n8k16 BF16 MMA; on the host, the dynamic shared
// memory opt-in and the SM count a launch sizes its grid by.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace dsrt::kernels {

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return uint32_t(__cvta_generic_to_shared(p)); }
// 16 (or 4) bytes global -> shared, 16 bypassing L1; zero-filled without reading when !valid (rows past a matrix,
// tokens or keys past the end contribute zeros, never stale shared memory that could hold NaN bit patterns).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// d += a (16 x 16 bf16, row-major) * b (16 x 8 bf16, column-major), fp32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Dynamic shared memory above 48 KB needs an opt-in per kernel and device, once (done: a bit per device).
template <class K>
void smem_opt_in(K kernel, size_t bytes, std::atomic<uint64_t> &done, const char *who) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (done.load() >> (dev & 63) & 1) return;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e != cudaSuccess) throw std::runtime_error(std::string(who) + ": shared memory: " + cudaGetErrorString(e));
  done.fetch_or(uint64_t(1) << (dev & 63));
}

// The current device's SM count (cached per device).
inline int sm_count() {
  static std::atomic<int> cached[64];
  int dev = 0;
  cudaGetDevice(&dev);
  int v = cached[dev & 63].load();
  if (v > 0) return v;
  cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
  if (v <= 0) v = 132;
  cached[dev & 63].store(v);
  return v;
}

}  // namespace dsrt::kernels
