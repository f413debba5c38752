// Element types of checkpoint tensors and their scalar conversions (fp8 e4m3fn, bf16, f16, f32).
#pragma once
#include <cstdint>
#include <cstring>
#include <string_view>

namespace dsrt {

enum class DType : uint8_t { F32, BF16, F16, F8_E4M3, I32, I64, U8 };

// Bytes per element.
size_t dtype_size(DType t);
// Safetensors spelling ("F8_E4M3"); parse returns false for a dtype we do not know.
const char *dtype_name(DType t);
bool dtype_parse(std::string_view s, DType *out);

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float f);

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; max 448; no infinities; S.1111.111 is NaN.
extern const float *const kFp8E4m3ToF32;  // 256 entries
inline float fp8_e4m3_to_f32(uint8_t v) { return kFp8E4m3ToF32[v]; }
// Round to nearest even, saturating to +-448 (what a "satfinite" conversion does); NaN -> NaN.
uint8_t f32_to_fp8_e4m3(float f);
constexpr float kFp8E4m3Max = 448.0f;

}  // namespace dsrt
