#include "core/dtype.h"

#include <array>
#include <cmath>

namespace dsrt {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F8_E4M3: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

const char *dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

bool dtype_parse(std::string_view s, DType *out) {
  static constexpr std::pair<std::string_view, DType> kNames[] = {
      {"F32", DType::F32}, {"BF16", DType::BF16}, {"F16", DType::F16}, {"F8_E4M3", DType::F8_E4M3},
      {"I32", DType::I32}, {"I64", DType::I64},   {"U8", DType::U8}};
  for (auto &[n, t] : kNames)
    if (n == s) {
      *out = t;
      return true;
    }
  return false;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while (!(man & 0x400));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000);
  float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;
  if (a < 6.103515625e-05f) {  // subnormal range: quantum 2^-24
    return sign | uint16_t(std::nearbyint(a * 16777216.0f));
  }
  uint32_t exp = ((u >> 23) & 0xff) - 127 + 15, man = u & 0x7fffff;
  uint32_t h = exp << 10 | man >> 13, rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
  return sign | uint16_t(h);
}

// Built at compile time so no static-initialisation order can observe an empty table.
static constexpr float pow2(int k) {
  float r = 1.0f;
  for (; k > 0; k--) r *= 2.0f;
  for (; k < 0; k++) r *= 0.5f;
  return r;
}
static constexpr std::array<float, 256> make_fp8_table() {
  std::array<float, 256> t{};
  for (int v = 0; v < 256; v++) {
    int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    float x;
    if (e == 15 && m == 7)
      x = __builtin_nanf("");
    else if (e == 0)
      x = float(m) * pow2(-9);  // subnormal: m/8 * 2^-6
    else
      x = float(8 + m) * pow2(e - 10);  // (1 + m/8) * 2^(e-7)
    t[v] = s ? -x : x;
  }
  return t;
}
static constexpr std::array<float, 256> kTable = make_fp8_table();
const float *const kFp8E4m3ToF32 = kTable.data();

uint8_t f32_to_fp8_e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= kFp8E4m3Max) return sign | 0x7e;
  // Positive codes 0..126 are monotonic in value: binary search the last code <= a, then round to nearest,
  // ties to the even code (the code's low bit is the mantissa's low bit).
  int lo = 0, hi = 126;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (kTable[mid] <= a)
      lo = mid;
    else
      hi = mid - 1;
  }
  if (lo == 126) return sign | 126;
  float d0 = a - kTable[lo], d1 = kTable[lo + 1] - a;
  int code = (d0 < d1) ? lo : (d1 < d0) ? lo + 1 : ((lo & 1) ? lo + 1 : lo);
  return sign | uint8_t(code);
}

}  // namespace dsrt
