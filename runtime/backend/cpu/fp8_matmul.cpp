// FP8 block-scaled matrix x fp32 activations: scalar, AVX2 and AVX-512 paths computing the same bits (see the
// header for the arithmetic they share). The SIMD functions carry their own target attributes, so the build
// needs no global -m flags; best_path() asks the CPU at run time.
#include "backend/cpu/fp8_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define DSRT_FP8_X86 1
#endif

#include "core/status.h"

// GCC 12 reports the _mm512_undefined_* placeholders inside its own AVX-512 intrinsics as maybe-uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dsrt::fp8 {
namespace {

constexpr int kLanes = 32;  // lane l of a segment accumulates the offsets l mod 32

// A run of a row's columns inside one 128-wide scale block of the whole tensor.
struct Seg {
  int64_t k0, len, sblk;  // view columns [k0, k0 + len); scale column of the block
};

// A tile of up to kRowTile rows times a group of g tokens (g <= the path's group size). Loops run segment by
// segment over the tile's rows, so the group's activations of one segment stay in L1 while the rows stream
// by; tot[r][t] (row r of the tile . x[t]) keeps each (row, token)'s order of operations unchanged.
constexpr int kRowTile = 16, kMaxGroup = 8;
struct TileArgs {
  const uint8_t *wrows[kRowTile];  // element (row, view column 0) of each row
  const float *srows[kRowTile];    // the row's block-scale row
  int nr;
  const Seg *segs;
  int64_t nseg;
  const float *x;  // token 0 of the group
  int64_t ldx;
};
using TileFn = void (*)(const TileArgs &a, int g, float (*tot)[kMaxGroup]);

// e4m3 -> the fp16 with the same bits shifted (sign to 15, exponent/mantissa to 7..13): the code's value x 2^-8,
// exact, no fp32 denormal on the way (fp16 subnormals widen to normal fp32). 2^8 goes into the block scale.
inline uint16_t fp8_to_half_bits(uint8_t b) { return uint16_t((uint32_t(int32_t(int8_t(b))) << 7) & 0xBF80u); }
inline float decode_scalar(uint8_t b) { return f16_to_f32(fp8_to_half_bits(b)); }
constexpr float kScaleMul = 256.0f;

// 32 lanes -> 1 in the shared tree: (l + l+16), (l + l+8), (l + l+4), (l + l+2), (l + l+1).
inline float reduce_scalar(const float *a) {
  float s16[16], s8[8], s4[4], s2[2];
  for (int i = 0; i < 16; i++) s16[i] = a[i] + a[i + 16];
  for (int i = 0; i < 8; i++) s8[i] = s16[i] + s16[i + 8];
  for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

constexpr int kGroupScalar = 8;
void tile_scalar(const TileArgs &a, int g, float (*tot)[kMaxGroup]) {
  float acc[kGroupScalar][kLanes];
  for (int r = 0; r < a.nr; r++) std::fill(tot[r], tot[r] + kMaxGroup, 0.0f);
  for (int64_t s = 0; s < a.nseg; s++) {
    const Seg &sg = a.segs[s];
    for (int r = 0; r < a.nr; r++) {
      for (int t = 0; t < g; t++) std::fill(acc[t], acc[t] + kLanes, 0.0f);
      for (int64_t j = 0; j < sg.len; j++) {
        const float wv = decode_scalar(a.wrows[r][sg.k0 + j]);
        for (int t = 0; t < g; t++) acc[t][j % kLanes] = std::fma(wv, a.x[t * a.ldx + sg.k0 + j], acc[t][j % kLanes]);
      }
      const float sc = a.srows[r][sg.sblk] * kScaleMul;
      for (int t = 0; t < g; t++) tot[r][t] = std::fma(reduce_scalar(acc[t]), sc, tot[r][t]);
    }
  }
}

#ifdef DSRT_FP8_X86

// ---- AVX2 + FMA: a lane group of 32 is four ymm registers per token.
#define DSRT_AVX2 __attribute__((target("avx2,fma,f16c")))

// 16 bytes -> two vectors of 8 floats (codes 0-7 and 8-15).
DSRT_AVX2 inline void decode16_avx2(__m128i b16, __m256 &lo, __m256 &hi) {
  __m256i h = _mm256_cvtepi8_epi16(b16);
  h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(int16_t(0xBF80)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

DSRT_AVX2 inline float reduce8_avx2(__m256 r8) {
  __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
  __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
  __m128 r1 = _mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1));
  return _mm_cvtss_f32(r1);
}

constexpr int kGroupAvx2 = 2;
template <int G>
DSRT_AVX2 void tile_avx2_g(const TileArgs &a, float (*tot)[kMaxGroup]) {
  alignas(32) uint8_t wpad[kLanes];
  alignas(32) float xpad[G][kLanes];
  for (int r = 0; r < a.nr; r++) std::fill(tot[r], tot[r] + kMaxGroup, 0.0f);
  for (int64_t s = 0; s < a.nseg; s++) {
    const Seg &sg = a.segs[s];
    const float *xs = a.x + sg.k0;
    const int64_t full = sg.len / kLanes * kLanes, rest = sg.len - full;
    if (rest) {  // the segment's tail, zero-padded to 32 (0 x 0 leaves a lane unchanged)
      _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) {
        std::memset(xpad[t], 0, sizeof xpad[t]);
        std::memcpy(xpad[t], xs + t * a.ldx + full, size_t(rest) * sizeof(float));
      }
    }
    for (int r = 0; r < a.nr; r++) {
      __m256 acc[G][4];
      _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) for (int q = 0; q < 4; q++) acc[t][q] = _mm256_setzero_ps();
      const uint8_t *w = a.wrows[r] + sg.k0;
      for (int64_t j = 0; j < full; j += kLanes) {
        const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w + j));
        const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w + j + 16));
        __m256 w0, w1, w2, w3;
        decode16_avx2(b0, w0, w1);
        decode16_avx2(b1, w2, w3);
        _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) {
          const float *xr = xs + t * a.ldx + j;
          acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[t][0]);
          acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[t][1]);
          acc[t][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[t][2]);
          acc[t][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[t][3]);
        }
      }
      if (rest) {
        std::memset(wpad, 0, sizeof wpad);
        std::memcpy(wpad, w + full, size_t(rest));
        const __m128i b0 = _mm_load_si128(reinterpret_cast<const __m128i *>(wpad));
        const __m128i b1 = _mm_load_si128(reinterpret_cast<const __m128i *>(wpad + 16));
        __m256 w0, w1, w2, w3;
        decode16_avx2(b0, w0, w1);
        decode16_avx2(b1, w2, w3);
        _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) {
          acc[t][0] = _mm256_fmadd_ps(w0, _mm256_load_ps(xpad[t]), acc[t][0]);
          acc[t][1] = _mm256_fmadd_ps(w1, _mm256_load_ps(xpad[t] + 8), acc[t][1]);
          acc[t][2] = _mm256_fmadd_ps(w2, _mm256_load_ps(xpad[t] + 16), acc[t][2]);
          acc[t][3] = _mm256_fmadd_ps(w3, _mm256_load_ps(xpad[t] + 24), acc[t][3]);
        }
      }
      const float sc = a.srows[r][sg.sblk] * kScaleMul;
      _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) {
        // lanes (0-7, 8-15) + (16-23, 24-31), then 0-7 + 8-15
        const __m256 r8 = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][2]), _mm256_add_ps(acc[t][1], acc[t][3]));
        tot[r][t] = std::fma(reduce8_avx2(r8), sc, tot[r][t]);
      }
    }
  }
}

DSRT_AVX2 void tile_avx2(const TileArgs &a, int g, float (*tot)[kMaxGroup]) {
  if (g == 2)
    tile_avx2_g<2>(a, tot);
  else
    tile_avx2_g<1>(a, tot);
}

// ---- AVX-512 (F, BW, VL): a lane group of 32 is two zmm registers per token; tails use masked loads.
#define DSRT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// 32 bytes -> two vectors of 16 floats.
DSRT_AVX512 inline void decode32_avx512(__m256i b32, __m512 &lo, __m512 &hi) {
  __m512i h = _mm512_cvtepi8_epi16(b32);
  h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16(int16_t(0xBF80)));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

DSRT_AVX512 inline float reduce32_avx512(__m512 a, __m512 b) {
  const __m512 r16 = _mm512_add_ps(a, b);  // l + l+16
  const __m256 r8 = _mm256_add_ps(_mm512_castps512_ps256(r16),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r16), 1)));
  __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
  __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
  __m128 r1 = _mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1));
  return _mm_cvtss_f32(r1);
}

// The same tree for 8 tokens at once (lanes of several tokens share registers; each lane addition is the one
// reduce32_avx512 makes), then tot[t] = fma(sum_t, sc, tot[t]).
DSRT_AVX512 inline void reduce32x8_avx512(const __m512 *a0, const __m512 *a1, float sc, float *tot) {
  __m512 r[8], p[4], q[2];
  for (int t = 0; t < 8; t++) r[t] = _mm512_add_ps(a0[t], a1[t]);  // l + l+16
  for (int k = 0; k < 4; k++)  // l + l+8: [token 2k | token 2k+1], 8 lanes each
    p[k] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * k], r[2 * k + 1], 0x44), _mm512_shuffle_f32x4(r[2 * k], r[2 * k + 1], 0xEE));
  for (int k = 0; k < 2; k++)  // l + l+4: 128-bit block j = token 4k + j, 4 lanes each
    q[k] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0x88), _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0xDD));
  // l + l+2: block j = [token j lanes 0,1 | token 4+j lanes 0,1]
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(q[0], q[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(q[0], q[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 f = _mm512_add_ps(z, _mm512_permute_ps(z, _MM_SHUFFLE(2, 3, 0, 1)));  // l + l+1
  const __m512 g = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), f);
  _mm256_storeu_ps(tot, _mm256_fmadd_ps(_mm512_castps512_ps256(g), _mm256_set1_ps(sc), _mm256_loadu_ps(tot)));
}

constexpr int kGroupAvx512 = 8;
template <int G>
DSRT_AVX512 void tile_avx512_g(const TileArgs &a, float (*tot)[kMaxGroup]) {
  for (int r = 0; r < a.nr; r++) std::fill(tot[r], tot[r] + kMaxGroup, 0.0f);
  for (int64_t s = 0; s < a.nseg; s++) {
    const Seg &sg = a.segs[s];
    const float *xs = a.x + sg.k0;
    const int64_t full = sg.len / kLanes * kLanes, rest = sg.len - full;  // rest: 0..31
    const __mmask32 mb = __mmask32((1u << rest) - 1);  // rest < 32
    const __mmask16 m0 = __mmask16(mb), m1 = __mmask16(mb >> 16);
    for (int r = 0; r < a.nr; r++) {
      __m512 a0[G], a1[G];
      _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) a0[t] = a1[t] = _mm512_setzero_ps();
      const uint8_t *w = a.wrows[r] + sg.k0;
      for (int64_t j = 0; j < full; j += kLanes) {
        __m512 w0, w1;
        decode32_avx512(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + j)), w0, w1);
        _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) {
          a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs + t * a.ldx + j), a0[t]);
          a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs + t * a.ldx + j + 16), a1[t]);
        }
      }
      if (rest) {
        __m512 w0, w1;
        decode32_avx512(_mm256_maskz_loadu_epi8(mb, w + full), w0, w1);
        _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) {
          a0[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, xs + t * a.ldx + full), a0[t]);
          a1[t] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, xs + t * a.ldx + full + 16), a1[t]);
        }
      }
      const float sc = a.srows[r][sg.sblk] * kScaleMul;
      if constexpr (G == 8)
        reduce32x8_avx512(a0, a1, sc, tot[r]);
      else
        _Pragma("GCC unroll 8") for (int t = 0; t < G; t++) tot[r][t] = std::fma(reduce32_avx512(a0[t], a1[t]), sc, tot[r][t]);
    }
  }
}

DSRT_AVX512 void tile_avx512(const TileArgs &a, int g, float (*tot)[kMaxGroup]) {
  switch (g) {
    case 8: return tile_avx512_g<8>(a, tot);
    case 7: return tile_avx512_g<7>(a, tot);
    case 6: return tile_avx512_g<6>(a, tot);
    case 5: return tile_avx512_g<5>(a, tot);
    case 4: return tile_avx512_g<4>(a, tot);
    case 3: return tile_avx512_g<3>(a, tot);
    case 2: return tile_avx512_g<2>(a, tot);
    default: return tile_avx512_g<1>(a, tot);
  }
}

#endif  // DSRT_FP8_X86

}  // namespace

#ifdef DSRT_FP8_X86
// F16C (the fp16 -> fp32 conversions of the decode) from CPUID leaf 1: clang 14's __builtin_cpu_supports does not
// know "f16c". Asked once: matmul_rows checks its path on every call, and CPUID traps to the hypervisor in a VM
// (it took 10% of a V3 expert's time in 16-row calls).
static bool has_f16c() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  }();
  return yes;
}
#endif

bool path_supported(Path p) {
  switch (p) {
    case Path::Auto:
    case Path::Scalar: return true;
#ifdef DSRT_FP8_X86
    case Path::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    case Path::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             has_f16c();
#else
    default: return false;
#endif
  }
  return false;
}

Path best_path() {
  static const Path best = [] {
    // DSRT_CPU_FP8_PATH=scalar|avx2|avx512 forces a path (benchmarks; unsupported or unknown: ignored).
    if (const char *e = std::getenv("DSRT_CPU_FP8_PATH"))
      for (Path p : {Path::Scalar, Path::Avx2, Path::Avx512})
        if (std::strcmp(e, path_name(p)) == 0 && path_supported(p)) return p;
    return path_supported(Path::Avx512) ? Path::Avx512 : path_supported(Path::Avx2) ? Path::Avx2 : Path::Scalar;
  }();
  return best;
}

const char *path_name(Path p) {
  switch (p) {
    case Path::Auto: return path_name(best_path());
    case Path::Scalar: return "scalar";
    case Path::Avx2: return "avx2";
    case Path::Avx512: return "avx512";
  }
  return "?";
}

void matmul_rows(const Weight &w, const float *x, int64_t m, int64_t ldx, float *out, int64_t ldo, int64_t n0,
                 int64_t n1, Path path) {
  if (w.dtype != DType::F8_E4M3 || !w.scale) failf(DSRT_ERR_INTERNAL, "fp8 matmul: ", w.name(), " is not FP8 with scales");
  if (path == Path::Auto) path = best_path();
  if (!path_supported(path)) failf(DSRT_ERR_INVALID_ARGUMENT, "fp8 matmul: this CPU cannot run the ", path_name(path), " path");
  TileFn fn = tile_scalar;
  int group = kGroupScalar;
#ifdef DSRT_FP8_X86
  if (path == Path::Avx2) fn = tile_avx2, group = kGroupAvx2;
  if (path == Path::Avx512) fn = tile_avx512, group = kGroupAvx512;
#endif
  const int64_t K = w.cols, ld = w.ld ? w.ld : w.cols;
  thread_local std::vector<Seg> segs;
  segs.clear();
  for (int64_t k = 0; k < K;) {
    const int64_t c = w.col0 + k, len = std::min(K - k, 128 - c % 128);
    segs.push_back({k, len, c / 128});
    k += len;
  }
  // Tiles of rows times groups of tokens (in registers); neither changes any result.
  TileArgs a;
  a.segs = segs.data();
  a.nseg = int64_t(segs.size());
  a.ldx = ldx;
  float tot[kRowTile][kMaxGroup];
  // Short rows (K < 4096) one at a time; long rows in tiles of 4, segment-major, so each x segment is reused from
  // L1 across the 4 rows. Measured on V3 shapes (one core, ms per call): K = 1536 and 2048 run 1.5-2x faster one
  // row at a time, K = 7168, 16384 and 18432 1.3-1.8x faster in tiles of 4 (16 was slower than both).
  const int64_t row_tile = K < 4096 ? 1 : 4;
  for (int64_t rt = n0; rt < n1; rt += row_tile) {
    a.nr = int(std::min<int64_t>(row_tile, n1 - rt));
    for (int i = 0; i < a.nr; i++) {
      const int64_t r = w.row0 + rt + i;
      a.wrows[i] = w.data + r * ld + w.col0;
      a.srows[i] = w.scale + (r / 128) * w.scale_cols;
    }
    for (int64_t t0 = 0; t0 < m; t0 += group) {
      const int g = int(std::min<int64_t>(group, m - t0));
      a.x = x + t0 * ldx;
      fn(a, g, tot);
      for (int i = 0; i < a.nr; i++)
        for (int t = 0; t < g; t++) out[(t0 + t) * ldo + rt + i] = tot[i][t];
    }
  }
}

}  // namespace dsrt::fp8
