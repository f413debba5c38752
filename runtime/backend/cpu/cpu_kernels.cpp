#include "backend/cpu/cpu_kernels.h"

#include <algorithm>
#include <cmath>

#include "backend/backend.h"
#include "backend/cpu/fp8_matmul.h"
#include "core/dtype.h"
#include "core/memory.h"

namespace dsrt::cpu {

float *thread_scratch(size_t n, int slot) {
  thread_local HostVec<float> bufs[kScratchSlots];
  HostVec<float> &b = bufs[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

void matmul_rows(const Weight &w, const float *x, int64_t m, int64_t ldx, float *out, int64_t ldo, int64_t n0, int64_t n1) {
  if (w.dtype == DType::F8_E4M3) return fp8::matmul_rows(w, x, m, ldx, out, ldo, n0, n1);
  constexpr int64_t kTile = 8;
  const int64_t K = w.cols;
  float *buf = thread_scratch(size_t(kTile * K), kMatmulScratchSlot);
  for (int64_t r0 = n0; r0 < n1; r0 += kTile) {
    const int64_t nn = std::min(kTile, n1 - r0);
    for (int64_t i = 0; i < nn; i++) w.dequant_row(r0 + i, 0, K, buf + i * K);
    for (int64_t t = 0; t < m; t++)
      for (int64_t i = 0; i < nn; i++) out[t * ldo + r0 + i] = dot(buf + i * K, x + t * ldx, K);
  }
}

bool takes_fp8_activations(bool on, int64_t step_rows, const Weight &w) {
  return on && step_rows >= kFp8ActivationMinRows && w.dtype == DType::F8_E4M3 && w.cols % 128 == 0;
}

namespace {
// The scale of one 128-channel group: amax / 448, 1 for an all-zero group.
float fp8_group_scale(const float *x) {
  float amax = 0.0f;
  for (int j = 0; j < 128; j++) amax = std::max(amax, std::fabs(x[j]));
  return amax > 0.0f ? amax / 448.0f : 1.0f;
}
}  // namespace

void quantize_rows_to_fp8(const float *x, int64_t rows, int64_t k, uint8_t *q, float *scales) {
  for (int64_t i = 0; i < rows * k; i += 128) {
    const float s = scales[i / 128] = fp8_group_scale(x + i);
    for (int64_t j = i; j < i + 128; j++) q[j] = f32_to_fp8_e4m3(x[j] / s);
  }
}

void dequantize_fp8_rows(const uint8_t *q, const float *scales, int64_t rows, int64_t k, float *out) {
  for (int64_t j = 0; j < rows * k; j++) out[j] = fp8_e4m3_to_f32(q[j]) * scales[j / 128];
}

void round_rows_to_fp8(const float *x, int64_t rows, int64_t k, float *out) {
  for (int64_t i = 0; i < rows * k; i += 128) {
    const float s = fp8_group_scale(x + i);
    for (int64_t j = i; j < i + 128; j++) out[j] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x[j] / s)) * s;
  }
}

}  // namespace dsrt::cpu
