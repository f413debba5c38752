// Block-scaled FP8 GEMM through cuBLASLt (spec §5.3), for prefill and large batches: activations are
// quantised per token per 128 channels (e4m3, fp32 scales) on the GPU, weights are used as published
// (e4m3 with 128x128 scales). cuBLASLt is loaded at run time: it is 540 MB, optional, and when it is
// missing (or refuses a shape) the caller falls back to dsrt's own kernels.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace dsrt {

class Fp8Gemm {
 public:
  explicit Fp8Gemm(cudaStream_t stream);
  ~Fp8Gemm();
  Fp8Gemm(const Fp8Gemm &) = delete;
  Fp8Gemm &operator=(const Fp8Gemm &) = delete;

  // Whether cuBLASLt loaded (and if not, why).
  bool available() const { return lt_ != nullptr; }
  const std::string &why_unavailable() const { return why_; }

  // out [m, w.rows] (fp32) = x [m, w.cols] W^T with x quantised per 128 channels into xq [mp, K] bytes and
  // xs [K/128, mp] floats (M-major, the layout cuBLASLt's VEC128 mode reads), mp = padded_rows(m). tmp
  // (mp * w.rows floats) is
  // scratch for an output that needs widening or transposing. Returns false (nothing enqueued that
  // matters) when cuBLASLt is missing or has no algorithm for the shape.
  bool run(const float *x, int64_t m, const kernels::DevMatrix &w, float *out, uint8_t *xq, float *xs, void *tmp);
  // Activation rows as cuBLASLt gets them (whole 16-row tiles); xq, xs and tmp are sized for these.
  static int64_t padded_rows(int64_t m) { return (m + 15) / 16 * 16; }
  // True when the shape can go through run(): FP8 weight, K a multiple of 128, N of 16.
  static bool eligible(const kernels::DevMatrix &w) { return w.dtype == kernels::kFP8 && w.cols % 128 == 0 && w.rows % 16 == 0; }

  // out [m, w.rows] (fp32) = x W^T for a BF16 weight, with x rounded to bf16 into xb (m * w.cols values): the
  // lm_head and other BF16 linears of many rows on tensor cores (the fp32-activation GEMV reads the weight
  // once per few rows). Up to kernels::kGemmBf16MmaMaxRows rows on dsrt's swap-AB kernel
  // (kernels/gemm_bf16_mma.cu) when the weight's 128-row blocks occupy half the SMs (or cuBLASLt is missing), else
  // cuBLASLt. false when neither takes the shape (K % 8 != 0; cuBLASLt missing or without an algorithm).
  bool run_bf16(const float *x, int64_t m, const kernels::DevMatrix &w, float *out, uint16_t *xb);

  // Frees the descriptors of GEMMs the stream has finished (call after a sync).
  void release();

  struct Lt;  // the loaded library's entry points

 private:
  struct Plan;
  Plan *plan(int64_t m, int64_t n, int64_t k);
  Plan *plan_bf16(int64_t m, int64_t n, int64_t k);

  cudaStream_t stream_;
  const Lt *lt_ = nullptr;
  std::string why_;
  void *handle_ = nullptr, *workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::unique_ptr<Plan>> plans_, bf16_plans_;
  std::vector<void *> used_descs_;  // descriptors of queued GEMMs
};

}  // namespace dsrt
