// The CPU FP8 kernel (runtime/backend/cpu/fp8_matmul.cpp): every SIMD path equals the scalar path bit for
// bit, all equal the dequantised product (and the dequantise-then-dot op the kernel replaced) within a stated
// bound, on matrices with partial blocks and views at unaligned columns; results do not depend on the thread
// count or the batch. And the route skew of `dsrt make-tiny --route-skew`.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <random>

#include "backend/backend.h"
#include "backend/cpu/fp8_matmul.h"
#include "core/dtype.h"
#include "helpers.h"
#include "model/config.h"
#include "model/model.h"
#include "tiny_model.h"

using namespace dsrt;
using testing::fresh_dir;
using testing::slurp;
using testing::tiny;
namespace fs = std::filesystem;

namespace {

// An FP8 weight with 128x128 block scales in test memory (no NaN codes: checkpoints hold none).
struct Fp8Weight {
  std::vector<uint8_t> bytes;
  std::vector<float> scale;
  Weight w;
  Fp8Weight(int64_t rows, int64_t cols, std::mt19937 &rng) {
    w.dtype = DType::F8_E4M3;
    w.rows = rows;
    w.cols = cols;
    const int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
    std::uniform_real_distribution<float> ud(0.001f, 0.01f);
    scale.resize(size_t(sr * sc));
    for (auto &s : scale) s = ud(rng);
    bytes.resize(size_t(rows * cols));
    std::uniform_int_distribution<int> code(0, 255);
    for (auto &b : bytes) {
      int c = code(rng);
      if ((c & 0x7f) == 0x7f) c &= 0xfe;  // not the NaN code
      b = uint8_t(c);
    }
    w.data = bytes.data();
    w.scale = scale.data();
    w.scale_cols = sc;
  }
};

std::vector<float> random_x(int64_t n, std::mt19937 &rng) {
  std::vector<float> v(static_cast<size_t>(n));
  std::normal_distribution<float> nd;
  for (auto &f : v) f = nd(rng);
  return v;
}

std::vector<float> run(const Weight &w, const std::vector<float> &x, int64_t m, fp8::Path p) {
  std::vector<float> y(size_t(m * w.rows), -1.0f);
  fp8::matmul_rows(w, x.data(), m, w.cols, y.data(), w.rows, 0, w.rows, p);
  return y;
}

// The op the kernel replaced in CpuBackend::linear: the row dequantised (scale applied per element), then a
// dot product with 8 partial sums.
float old_linear(const Weight &w, const float *x, int64_t n) {
  std::vector<float> row(size_t(w.cols));
  w.dequant_row(n, 0, w.cols, row.data());
  float s[8] = {};
  int64_t j = 0;
  for (; j + 8 <= w.cols; j += 8)
    for (int u = 0; u < 8; u++) s[u] += row[size_t(j + u)] * x[j + u];
  float tail = 0;
  for (; j < w.cols; j++) tail += row[size_t(j)] * x[j];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

std::vector<fp8::Path> paths() {
  std::vector<fp8::Path> v;
  for (fp8::Path p : {fp8::Path::Scalar, fp8::Path::Avx2, fp8::Path::Avx512}) {
    if (fp8::path_supported(p))
      v.push_back(p);
    else
      MESSAGE("this CPU cannot run the ", fp8::path_name(p), " path: not tested");
  }
  return v;
}

}  // namespace

TEST_CASE("fp8 kernel: the e4m3 decode equals the table for every non-NaN code, on every path") {
  std::vector<uint8_t> bytes(256);
  for (int i = 0; i < 256; i++) bytes[size_t(i)] = uint8_t((i & 0x7f) == 0x7f ? 0 : i);
  std::vector<float> scale(2, 1.0f);
  Weight w;
  w.dtype = DType::F8_E4M3;
  w.rows = 1;
  w.cols = 256;
  w.data = bytes.data();
  w.scale = scale.data();
  w.scale_cols = 2;
  for (fp8::Path p : paths()) {
    CAPTURE(fp8::path_name(p));
    for (int k = 0; k < 256; k++) {
      std::vector<float> x(256, 0.0f);
      x[size_t(k)] = 1.0f;
      float y = -7;
      fp8::matmul_rows(w, x.data(), 1, 256, &y, 1, 0, 1, p);
      CHECK(y == fp8_e4m3_to_f32(bytes[size_t(k)]));
    }
  }
}

TEST_CASE("fp8 kernel: SIMD paths equal the scalar path bit for bit and the exact product within the bound") {
  // Bound (stated in docs/perf.md): |y - exact| <= (8 + K/128) * 2^-23 * sum_k |w_k x_k|: fp32 rounding of the
  // 4 fused products per lane, the 5-level lane tree and one fma per 128-block.
  std::mt19937 rng(11);
  struct Case {
    int64_t rows, cols, r0, c0, nr, nc;  // the tensor, and the view tested (rows_part/cols_part)
  };
  const Case cases[] = {
      {300, 333, 0, 0, 300, 333},    // partial blocks in both dimensions
      {130, 1000, 0, 0, 130, 1000},  // K = 7.8 blocks, tails of 104
      {17, 31, 0, 0, 17, 31},        // a single partial block, K < 32
      {260, 700, 5, 70, 200, 450},   // a view starting mid-block (a Mapping shard of columns and rows)
      {256, 512, 128, 128, 128, 256},
  };
  for (const Case &c : cases) {
    Fp8Weight fw(c.rows, c.cols, rng);
    const Weight w = fw.w.rows_part(c.r0, c.nr).cols_part(c.c0, c.nc);
    for (int64_t m : {1, 3, 8, 33}) {
      CAPTURE(c.rows);
      CAPTURE(c.cols);
      CAPTURE(c.c0);
      CAPTURE(m);
      const std::vector<float> x = random_x(m * w.cols, rng);
      const std::vector<float> ref = run(w, x, m, fp8::Path::Scalar);
      for (fp8::Path p : paths()) {
        CAPTURE(fp8::path_name(p));
        CHECK(std::memcmp(run(w, x, m, p).data(), ref.data(), ref.size() * 4) == 0);
      }
      const double bound_ulps = (8.0 + double(w.cols) / 128.0) * std::ldexp(1.0, -23);
      double worst = 0, worst_old = 0;
      std::vector<float> row(size_t(w.cols));
      for (int64_t n = 0; n < w.rows; n++) {
        w.dequant_row(n, 0, w.cols, row.data());
        for (int64_t t = 0; t < m; t++) {
          const float *xt = x.data() + t * w.cols;
          double exact = 0, mag = 0;
          for (int64_t k = 0; k < w.cols; k++) {
            // The element's exact value: the code's value times the block's scale, in double.
            const int64_t r = c.r0 + n, col = c.c0 + k;
            const double wv = double(fp8_e4m3_to_f32(fw.bytes[size_t(r * c.cols + col)])) *
                              double(fw.scale[size_t((r / 128) * fw.w.scale_cols + col / 128)]);
            exact += wv * double(xt[k]);
            mag += std::fabs(wv * double(xt[k]));
          }
          const double y = ref[size_t(t * w.rows + n)];
          worst = std::max(worst, std::fabs(y - exact) / (mag * bound_ulps));
          worst_old = std::max(worst_old, std::fabs(y - double(old_linear(w, xt, n))) / (mag * bound_ulps));
        }
      }
      CHECK(worst <= 1.0);      // within the bound of the exact product
      CHECK(worst_old <= 2.0);  // and of the op it replaced (each within its own rounding)
    }
  }
}

TEST_CASE("fp8 kernel: a row's result does not depend on the batch, the thread count or the backend's split") {
  std::mt19937 rng(12);
  Fp8Weight fw(333, 700, rng);
  const int64_t M = 33;
  const std::vector<float> x = random_x(M * 700, rng);
  for (fp8::Path p : paths()) {
    CAPTURE(fp8::path_name(p));
    const std::vector<float> all = run(fw.w, x, M, p);
    for (int64_t t : {0, 5, 32}) {  // the batch of one vs its row in the batch of 33
      std::vector<float> one(x.begin() + t * 700, x.begin() + (t + 1) * 700);
      const std::vector<float> y = run(fw.w, one, 1, p);
      CHECK(std::memcmp(y.data(), all.data() + t * 333, 333 * 4) == 0);
    }
    // rows computed in pieces (as threads split them) equal rows computed at once
    std::vector<float> pieces(size_t(M * 333), -1.0f);
    for (int64_t n0 = 0; n0 < 333; n0 += 37)
      fp8::matmul_rows(fw.w, x.data(), M, 700, pieces.data(), 333, n0, std::min<int64_t>(333, n0 + 37), p);
    CHECK(pieces == all);
  }
  // CpuBackend::linear runs this kernel: equal bits whatever the thread count
  const std::vector<float> expect = run(fw.w, x, M, fp8::Path::Auto);
  for (int threads : {1, 2, 3, 5}) {
    CAPTURE(threads);
    BackendOptions o;
    o.n_threads = threads;
    auto be = make_cpu_backend(o);
    be->begin_step();
    Tensor tx = be->alloc(M, 700), ty = be->alloc(M, 333);
    std::copy(x.begin(), x.end(), tx.f32());
    be->linear(tx, fw.w, ty);
    CHECK(std::memcmp(ty.f32(), expect.data(), expect.size() * 4) == 0);
  }
}

TEST_CASE("route skew: make-tiny --route-skew S makes expert popularity Zipf-like with exponent S") {
  // Tolerance: every rank's measured selection rate within 25% (+ 4 binomial sigmas) of the target
  // q_r = min(1, c (r+1)^-S), and the least-squares slope of log rate against log rank, over the ranks the cap
  // does not saturate, within 0.2 of -S.
  for (auto [preset, S] : {std::pair<const char *, double>{"v3-mini", 1.0}, {"no-qlora", 0.8}}) {
    CAPTURE(preset);
    CAPTURE(S);
    const fs::path dir = fresh_dir(std::string("skew-") + preset);
    tools::make_tiny_model(*tools::find_tiny_preset(preset), dir.string(), 1, S);
    auto model = dsrt::Model::load(dir.string(), dsrt::LoadOptions{});
    const RouterParams &rp = model->router;
    const int64_t E = rp.n_experts, K = rp.top_k, H = model->cfg.hidden_size, T = 4096;
    const std::vector<double> q = tools::zipf_selection_rates(E, K, S);
    BackendOptions bo;
    bo.n_threads = 2;
    auto be = make_cpu_backend(bo);
    std::mt19937 rng(5);
    int n_layers = 0;
    for (const LayerWeights &lw : model->w.layers) {
      if (!lw.moe) continue;
      CAPTURE(lw.index);
      n_layers++;
      be->begin_step();
      Tensor x = be->alloc(T, H), ids = be->alloc(T, K, DType::I32), wts = be->alloc(T, K);
      std::normal_distribution<float> nd;
      for (int64_t i = 0; i < T * H; i++) x.f32()[i] = nd(rng);
      be->moe_route(x, lw.router, lw.router_bias, rp, ids, wts);
      std::vector<double> rate(size_t(E), 0.0);
      for (int64_t i = 0; i < T * K; i++) rate[size_t(ids.i32()[i])] += 1.0 / double(T);
      std::sort(rate.begin(), rate.end(), std::greater<>());
      double sx = 0, sy = 0, sxx = 0, sxy = 0;
      int n = 0;
      for (int64_t r = 0; r < E; r++) {
        CAPTURE(r);
        CAPTURE(rate[size_t(r)]);
        CAPTURE(q[size_t(r)]);
        CHECK(std::fabs(rate[size_t(r)] - q[size_t(r)]) <= 0.25 * q[size_t(r)] + 4 * std::sqrt(q[size_t(r)] / double(T)));
        if (q[size_t(r)] < 0.999 && rate[size_t(r)] > 0) {
          const double lx = std::log(double(r + 1)), ly = std::log(rate[size_t(r)]);
          sx += lx, sy += ly, sxx += lx * lx, sxy += lx * ly, n++;
        }
      }
      REQUIRE(n >= 4);
      const double slope = (n * sxy - sx * sy) / (n * sxx - sx * sx);
      MESSAGE(std::string(preset), " layer ", lw.index, ": fitted exponent ", -slope, " (target ", S, "), top rate ", rate[0],
              ", bottom rate ", rate[size_t(E - 1)]);
      CHECK(std::fabs(slope + S) <= 0.2);
    }
    CHECK(n_layers > 0);
  }
}

TEST_CASE("route skew 0 is the default: the bytes the presets always had") {
  const fs::path dir = fresh_dir("skew-0");
  tools::make_tiny_model(*tools::find_tiny_preset("v3-mini"), dir.string(), 1, 0.0);
  for (const char *f : {"model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors"})
    CHECK(slurp(dir / f) == slurp(fs::path(tiny("v3-mini")) / f));
}
