// The CPU reference's arithmetic for a SwiGLU FFN: the product with a checkpoint weight of any dtype, the FP8
// activations that product takes under FP8 precision, the SwiGLU and the weighted sum. One definition shared by
// the CPU backend and the host expert path (host_experts.h), so that the two compute the same bits.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "model/weights.h"

namespace dsrt::cpu {

// Dot product with 8 independent partial sums (vectorisable without reassociation flags).
inline float dot(const float *a, const float *b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; u++) s[u] += a[j + u] * b[j + u];
  float tail = 0.0f;
  for (; j < n; j++) tail += a[j] * b[j];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

// y[j] += a x[j]
inline void axpy(float a, const float *x, float *y, int64_t n) {
  for (int64_t j = 0; j < n; j++) y[j] += a * x[j];
}

// SwiGLU's gate: silu(g) u.
inline float silu_mul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

// Scratch that grows per thread and is reused: `slot` (0 .. kScratchSlots - 1) picks one of the thread's
// buffers, so a caller may hold several at once. In mimalloc's heap (HostVec, core/memory.h) like the rest of
// dsrt's host scratch. matmul_rows uses kMatmulScratchSlot; its callers use the others.
constexpr int kScratchSlots = 4;
constexpr int kMatmulScratchSlot = kScratchSlots - 1;
float *thread_scratch(size_t n, int slot = 0);

// out[t * ldo + n] = sum_k x[t * ldx + k] W[n, k] for t in [0, m), n in [n0, n1). FP8: fp8::matmul_rows (decoded in
// registers). BF16/F32: rows dequantised in tiles of 8 (x streamed once per tile), each dotted with every token
// row by dot(). Each (t, n) is computed alone, so the split of rows over threads and the batch change nothing.
// Single-threaded: callers split rows.
void matmul_rows(const Weight &w, const float *x, int64_t m, int64_t ldx, float *out, int64_t ldo, int64_t n0, int64_t n1);

// Whether a GEMM with weight w over a step of `step_rows` token rows takes FP8 activations (the GPU's
// kernels::quantize_rows_fp8) when BackendOptions::fp8_activations is `on`: FP8 weights whose K is a multiple of
// 128, steps of at least kFp8ActivationMinRows rows.
bool takes_fp8_activations(bool on, int64_t step_rows, const Weight &w);

// FP8 activations as the GPU makes them: each 128-channel group of a row scaled by s = amax / 448 (1 for an
// all-zero group), rounded to e4m3 (nearest even, saturating) and scaled back, so an fp32 GEMM over the result is
// the block-scaled FP8 GEMM's arithmetic up to the order of its sums. k must be a multiple of 128; out may be x.
void round_rows_to_fp8(const float *x, int64_t rows, int64_t k, float *out);
// The two halves of that: q [rows, k] e4m3 codes and scales [rows, k / 128] (row-major); out = q * scale.
void quantize_rows_to_fp8(const float *x, int64_t rows, int64_t k, uint8_t *q, float *scales);
void dequantize_fp8_rows(const uint8_t *q, const float *scales, int64_t rows, int64_t k, float *out);

}  // namespace dsrt::cpu
