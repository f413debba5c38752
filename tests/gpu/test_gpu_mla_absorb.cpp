// MLA's absorption products (kernels/mla_absorb.cu: mla_q_absorb, mla_out_absorb) against fp64 host sums of
// the same formula on the same operands, on V3's shape and on small odd ones, kv_b in FP8 (random 128x128
// block scales) and in BF16, for 1 to 4096 query rows: the tensor-core kernels (2 rows or more, where the shape
// allows) and the fp32 CUDA-core ones (one row; shapes the tensor-core kernels leave to them). Part of
// dsrt_gpu_tests (doctest's main is in test_gpu.cpp; it exits 77 without a GPU).
//
// Bound: relative L2 <= 1e-4 per case and <= 1e-3 for any one (row, head) output row. The tensor-core kernels
// multiply exact bf16 weights by a two-term bf16 split of the fp32 activations (~2^-17 relative) with fp32
// accumulation; the fp32 kernels are at ~1e-7. A wrong scale block, row, column or head costs O(1) on the
// rows it touches. The scale rows on the device are padded by 3 NaN columns and the outputs start as NaN:
// a scale read past a row's K blocks, an output left unwritten or a write past a row shows.
#include <doctest/doctest.h>

#if defined(DSRT_WITH_CUDA)  // (the kernels are built with the CUDA parts only)

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "device_buffer.h"
#include "kernels.h"

namespace {

using testing::Dev;
using testing::parallel_for;

constexpr double kCaseBound = 1e-4;  // relative L2 over a whole output (see the top of the file)
constexpr double kRowBound = 1e-3;   // relative L2 of any one (row, head) output row

struct Shape {
  const char *name;
  int64_t nh, dn, dr, dv, dc;
};

// kv_b [nh*(dn+dv), dc] in FP8 (bytes from e4m3-rounded normal samples, scales log-uniform in [1/4, 4]) or BF16,
// on the device, and on the host as fp64 values with the scales applied (w * s is exact in fp64).
struct KvB {
  int64_t rows, cols;
  std::vector<double> w;  // [rows][cols]
  std::unique_ptr<Dev<uint8_t>> data;
  std::unique_ptr<Dev<float>> scale;
  dsrt::kernels::DevMatrix dm;
  KvB(const Shape &s, bool fp8, std::mt19937 &rng) : rows(s.nh * (s.dn + s.dv)), cols(s.dc) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<uint8_t> bytes(size_t(rows * cols) * (fp8 ? 1 : 2));
    w.resize(size_t(rows * cols));
    const int64_t kb = (cols + 127) / 128, rb = (rows + 127) / 128, ld = kb + 3;
    std::vector<float> sc(size_t(rb * kb)), padded(size_t(rb * ld), std::nanf(""));
    std::uniform_real_distribution<float> ud(-2.0f, 2.0f);
    for (auto &v : sc) v = std::exp2(ud(rng));
    for (int64_t b = 0; b < rb; b++)
      for (int64_t k = 0; k < kb; k++) padded[size_t(b * ld + k)] = sc[size_t(b * kb + k)];
    // Values from a pool of samples (V3's kv_b has 16.8 M: too many for a normal_distribution each).
    std::vector<uint16_t> pool(4096);
    for (auto &p : pool) p = fp8 ? dsrt::f32_to_fp8_e4m3(nd(rng) * 100.0f) : dsrt::f32_to_bf16(nd(rng));
    uint64_t st = (uint64_t(rng()) << 32 | rng()) | 1;
    for (int64_t r = 0; r < rows; r++)
      for (int64_t c = 0; c < cols; c++) {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        const uint16_t v = pool[(st >> 20) & 4095];
        const size_t i = size_t(r * cols + c);
        if (fp8) {
          bytes[i] = uint8_t(v);
          w[i] = double(dsrt::fp8_e4m3_to_f32(uint8_t(v))) * double(sc[size_t((r / 128) * kb + c / 128)]);
        } else {
          std::memcpy(&bytes[2 * i], &v, 2);
          w[i] = double(dsrt::bf16_to_f32(v));
        }
      }
    data = std::make_unique<Dev<uint8_t>>(bytes);
    dm.data = data->p;
    dm.dtype = fp8 ? dsrt::kernels::kFP8 : dsrt::kernels::kBF16;
    dm.rows = rows;
    dm.cols = cols;
    if (fp8) {
      scale = std::make_unique<Dev<float>>(padded);
      dm.scale = scale->p;
      dm.scale_cols = ld;
    }
  }
};

// n activations (roughly normal: a sum of four uniforms, every 977th times 30), generated in parallel.
std::vector<float> activations(int64_t n, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  constexpr int64_t kChunk = 1 << 16;
  parallel_for((n + kChunk - 1) / kChunk, [&](int64_t ch) {
    uint64_t st = (seed * 0x9e3779b97f4a7c15ull) ^ (uint64_t(ch + 1) * 0xbf58476d1ce4e5b9ull);
    st |= 1;
    for (int64_t i = ch * kChunk; i < std::min(n, (ch + 1) * kChunk); i++) {
      float s = 0;
      for (int u = 0; u < 4; u++) {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        s += float(st >> 40) * (1.0f / 16777216.0f);
      }
      v[size_t(i)] = (s - 2.0f) * 1.7f * (i % 977 == 0 ? 30.0f : 1.0f);
    }
  });
  return v;
}

// Relative L2 over all (row, head) output rows and the worst single one, from per-row squared sums.
struct Err {
  std::vector<double> num, den;
  explicit Err(int64_t n) : num(size_t(n), 0.0), den(size_t(n), 0.0) {}
  void add(int64_t i, double got, double want) {
    const double d = got - want;
    num[size_t(i)] += std::isnan(got) ? INFINITY : d * d;
    den[size_t(i)] += want * want;
  }
  double total() const {
    double a = 0, b = 0;
    for (size_t i = 0; i < num.size(); i++) a += num[i], b += den[i];
    return std::sqrt(a / std::max(b, 1e-300));
  }
  double worst() const {
    double w = 0;
    for (size_t i = 0; i < num.size(); i++) w = std::max(w, std::sqrt(num[i] / std::max(den[i], 1e-300)));
    return w;
  }
};

const Shape kV3{"V3", 128, 128, 64, 128, 512};
// Odd shapes: A (dc 96: a partial K chunk and column tile; FP8 both on tensor cores); B (q_absorb's scale row
// block changes inside head 3, out_absorb's inside head 1's v rows; dc 160: two K scale blocks, a partial
// third column tile; dv 48: a partial v tile); the tiny preset's (dn + dv = 88: FP8 q_absorb falls back to
// the fp32 kernel, dv 40: a partial n8 tile).
const Shape kOdd[] = {{"odd A", 3, 48, 16, 32, 96}, {"odd B", 5, 32, 16, 48, 160}, {"tiny", 4, 48, 32, 40, 160}};

void check_shape(const Shape &s, const std::vector<int64_t> &row_counts, std::mt19937 &rng) {
  const int64_t nh = s.nh, dn = s.dn, dr = s.dr, dv = s.dv, dc = s.dc, kvw = dn + dv;
  for (bool fp8 : {true, false}) {
    const KvB kv(s, fp8, rng);
    for (int64_t rows : row_counts) {
      CAPTURE(s.name);
      CAPTURE(fp8);
      CAPTURE(rows);
      // q_absorb: q [rows, qs] with a padded stride, qcat [rows, nh, dc + dr]
      {
        const int64_t qs = nh * (dn + dr) + 5;
        const std::vector<float> q = activations(rows * qs, uint64_t(rows * 7 + (fp8 ? 1 : 2)));
        Dev<float> dq(q), dqcat(size_t(rows * nh * (dc + dr)));
        dqcat.fill_nan();
        dsrt::kernels::mla_q_absorb(dq.p, qs, rows, kv.dm, nh, dn, dr, dv, dqcat.p, nullptr);
        REQUIRE(cudaGetLastError() == cudaSuccess);
        const std::vector<float> got = dqcat.get();
        Err err(rows * nh);
        std::atomic<int64_t> pe_wrong{0};
        parallel_for(rows * nh, [&](int64_t i) {
          const int64_t h = i / rows, r = i % rows;  // consecutive tasks share a head's weights
          std::vector<double> acc(size_t(dc), 0.0);
          const float *qh = &q[size_t(r * qs + h * (dn + dr))];
          for (int64_t d = 0; d < dn; d++) {
            const double x = qh[d];
            const double *wr = &kv.w[size_t((h * kvw + d) * dc)];
            for (int64_t c = 0; c < dc; c++) acc[size_t(c)] += x * wr[c];
          }
          const float *o = &got[size_t((r * nh + h) * (dc + dr))];
          for (int64_t c = 0; c < dc; c++) err.add(r * nh + h, o[c], acc[size_t(c)]);
          int64_t wrong = 0;
          for (int64_t k = 0; k < dr; k++) wrong += std::memcmp(&o[dc + k], &qh[dn + k], 4) != 0;
          pe_wrong += wrong;
        });
        const bool tc = dsrt::kernels::mla_q_absorb_tc(rows, kv.dm, nh, dn, dv);
        MESSAGE(s.name << (fp8 ? " FP8" : " BF16") << " q_absorb rows " << rows << (tc ? " (tensor cores)" : " (fp32)")
                       << ": relative L2 " << err.total() << ", worst row " << err.worst());
        CHECK(err.total() <= kCaseBound);
        CHECK(err.worst() <= kRowBound);
        CHECK(pe_wrong.load() == 0);
      }
      // out_absorb: olat [rows, nh, dc] contiguous, out [rows, os] with os > nh * dv (the padding stays NaN)
      {
        const int64_t os = nh * dv + 8;
        const std::vector<float> olat = activations(rows * nh * dc, uint64_t(rows * 7 + (fp8 ? 3 : 4)));
        Dev<float> dl(olat), dout(size_t(rows * os));
        dout.fill_nan();
        dsrt::kernels::mla_out_absorb(dl.p, rows, kv.dm, nh, dn, dv, dout.p, os, nullptr);
        REQUIRE(cudaGetLastError() == cudaSuccess);
        const std::vector<float> got = dout.get();
        Err err(rows * nh);
        parallel_for(rows * nh, [&](int64_t i) {
          const int64_t h = i / rows, r = i % rows;
          const float *x = &olat[size_t((r * nh + h) * dc)];
          for (int64_t v = 0; v < dv; v++) {
            const double *wr = &kv.w[size_t((h * kvw + dn + v) * dc)];
            double acc = 0;
            for (int64_t c = 0; c < dc; c++) acc += double(x[c]) * wr[c];
            err.add(r * nh + h, got[size_t(r * os + h * dv + v)], acc);
          }
        });
        bool pad_kept = true;
        for (int64_t r = 0; r < rows; r++)
          for (int64_t c = nh * dv; c < os; c++) pad_kept &= std::isnan(got[size_t(r * os + c)]);
        const bool tc = dsrt::kernels::mla_out_absorb_tc(rows, kv.dm, nh, dn, dv);
        MESSAGE(s.name << (fp8 ? " FP8" : " BF16") << " out_absorb rows " << rows
                       << (tc ? " (tensor cores)" : " (fp32)") << ": relative L2 " << err.total() << ", worst row "
                       << err.worst());
        CHECK(err.total() <= kCaseBound);
        CHECK(err.worst() <= kRowBound);
        CHECK(pad_kept);
      }
    }
  }
}

}  // namespace

TEST_CASE("MLA absorption products (tensor cores and fp32 kernels) vs fp64: V3 shape, FP8 and BF16 kv_b, 1-4096 rows") {
  std::mt19937 rng(303);
  const Shape &s = kV3;
  for (bool fp8 : {true, false}) {  // V3's shape takes the tensor cores from 2 rows on
    dsrt::kernels::DevMatrix m;
    m.data = reinterpret_cast<const void *>(uintptr_t(256));
    m.dtype = fp8 ? dsrt::kernels::kFP8 : dsrt::kernels::kBF16;
    m.rows = s.nh * (s.dn + s.dv);
    m.cols = s.dc;
    m.scale = reinterpret_cast<const float *>(uintptr_t(256));
    m.scale_cols = 4;
    CHECK(!dsrt::kernels::mla_q_absorb_tc(1, m, s.nh, s.dn, s.dv));
    CHECK(!dsrt::kernels::mla_out_absorb_tc(1, m, s.nh, s.dn, s.dv));
    for (int64_t rows : {2, 32, 128, 4096}) {
      CHECK(dsrt::kernels::mla_q_absorb_tc(rows, m, s.nh, s.dn, s.dv));
      CHECK(dsrt::kernels::mla_out_absorb_tc(rows, m, s.nh, s.dn, s.dv));
    }
  }
  check_shape(s, {1, 7, 16, 33, 200, 4096}, rng);
}

TEST_CASE("MLA absorption products vs fp64: small odd shapes (partial tiles, scale blocks changing inside a head)") {
  std::mt19937 rng(304);
  for (const Shape &s : kOdd) check_shape(s, {1, 7, 16, 33, 200}, rng);
}

#endif  // DSRT_WITH_CUDA
