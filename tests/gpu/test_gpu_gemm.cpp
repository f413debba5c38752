// The tensor-core FP8 kernels (kernels/gemm_fp8_mma.cu): the swap-AB GEMM and the grouped MoE path against fp64
// host sums over the same quantised operands, then both through the CUDA backend with FP8 activations. Part of
// dsrt_gpu_tests (doctest's main is in test_gpu.cpp; it exits 77 without a GPU).
//
// Bounds. The fp64 references see exactly the e4m3 operands and fp32 scales the kernels see, so what remains is
// the kernels' own arithmetic: products of e4m3 values are exact, but Hopper's FP8 tensor-core accumulation keeps
// fewer bits than fp32 (DeepSeek-V3's report: ~14 bits; cuBLASLt's block-scaled GEMM measured 1.8e-4 against the
// same kind of reference in test_gpu.cpp), so the bound is 5e-4 relative L2 per case and 1e-3 per output row
// rather than fp32's 1e-5. An indexing or scale bug costs O(1) on the rows it touches: one wrong element in a
// row of 7168 is already 1.2e-2 of that row.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "../helpers.h"
#include "backend_io.h"
#include "backend/backend.h"
#include "core/dtype.h"
#if defined(DSRT_WITH_CUDA)
#include <cuda_runtime.h>

#include "device_buffer.h"
#include "kernels.h"
#endif

using namespace dsrt;

#if defined(DSRT_WITH_CUDA)
namespace {

using testing::Dev;
using testing::parallel_for;

constexpr double kCaseBound = 5e-4;  // relative L2 over a whole output (see the top of the file)
constexpr double kRowBound = 1e-3;   // relative L2 of any one output row

// A random FP8 weight [rows, cols] with 128x128 block scales, on the host and (for the kernel tests) on the
// device. The device's scale rows are padded by 3 NaN columns: a kernel that read scale_cols wrongly, or a scale
// past the row's K blocks, would turn its output into NaN.
struct Fp8Weight {
  int64_t rows, cols, kb;
  std::vector<uint8_t> q;
  std::vector<float> scale;  // [ceil(rows/128)][kb], as a checkpoint has them
  Weight w;                  // host view for the backends
  std::unique_ptr<Dev<uint8_t>> dq;
  std::unique_ptr<Dev<float>> ds;
  kernels::DevMatrix dm;
  // Bytes drawn from a pool of e4m3-rounded normal samples with a xorshift generator: V3's expert matrices are
  // 15 M bytes each, too many for a normal_distribution per byte.
  Fp8Weight(int64_t r, int64_t c, std::mt19937 &rng, bool device) : rows(r), cols(c), kb((c + 127) / 128) {
    std::normal_distribution<float> nd(0.0f, 100.0f);
    uint8_t pool[4096];
    for (auto &b : pool) b = f32_to_fp8_e4m3(nd(rng));
    uint64_t st = (uint64_t(rng()) << 32 | rng()) | 1;
    q.resize(size_t(rows * cols));
    for (auto &b : q) {
      st ^= st << 13;
      st ^= st >> 7;
      st ^= st << 17;
      b = pool[(st >> 20) & 4095];
    }
    std::uniform_real_distribution<float> ud(0.0005f, 0.005f);
    scale.resize(size_t((rows + 127) / 128 * kb));
    for (auto &s : scale) s = ud(rng);
    w.dtype = DType::F8_E4M3;
    w.rows = rows;
    w.cols = cols;
    w.data = q.data();
    w.scale = scale.data();
    w.scale_cols = kb;
    if (!device) return;
    const int64_t ld = kb + 3;
    std::vector<float> padded(size_t((rows + 127) / 128 * ld), std::nanf(""));
    for (int64_t b = 0; b < (rows + 127) / 128; b++)
      std::memcpy(&padded[size_t(b * ld)], &scale[size_t(b * kb)], size_t(kb) * 4);
    dq = std::make_unique<Dev<uint8_t>>(q);
    ds = std::make_unique<Dev<float>>(padded);
    dm.data = dq->p;
    dm.dtype = kernels::kFP8;
    dm.rows = rows;
    dm.cols = cols;
    dm.scale = ds->p;
    dm.scale_cols = ld;
  }
  double s(int64_t n, int64_t b) const { return scale[size_t((n / 128) * kb + b)]; }
  // row n decoded (e4m3 values are exact in fp32)
  void row(int64_t n, std::vector<float> &out) const {
    out.resize(size_t(cols));
    for (int64_t k = 0; k < cols; k++) out[size_t(k)] = fp8_e4m3_to_f32(q[size_t(n * cols + k)]);
  }
};

// row-major [rows][K] e4m3 activations with their scale of each 128 block: sc(t, b)
struct QuantRows {
  int64_t rows = 0, K = 0;
  std::vector<float> xf;   // e4m3 values
  std::vector<double> sc;  // [rows][K/128]
};

// sum_b (sum_{k in b} x[t, k] w[n, k]) * sx[t, b] * sw[n/128, b] in fp64 for every t < rows, n < w.rows
std::vector<double> ref_gemm(const QuantRows &x, const Fp8Weight &w) {
  const int64_t N = w.rows, K = w.cols, M = x.rows, KB = K / 128;
  std::vector<double> out(size_t(M * N));
  parallel_for(N, [&](int64_t n) {
    thread_local std::vector<float> wrow;
    w.row(n, wrow);
    const float *wr = wrow.data();
    for (int64_t t = 0; t < M; t++) {
      const float *xr = &x.xf[size_t(t * K)];
      double acc = 0;
      for (int64_t b = 0; b < KB; b++) {
        double part = 0;
        for (int64_t k = b * 128; k < b * 128 + 128; k++) part += double(xr[k] * wr[k]);  // (exact in fp32)
        acc += part * x.sc[size_t(t * KB + b)] * w.s(n, b);
      }
      out[size_t(t * N + n)] = acc;
    }
  });
  return out;
}

double rel_rows(const float *got, int64_t ld_got, const double *want, int64_t rows, int64_t cols, double *worst_row) {
  double num = 0, den = 0;
  *worst_row = 0;
  for (int64_t r = 0; r < rows; r++) {
    double rn = 0, rd = 0;
    for (int64_t c = 0; c < cols; c++) {
      const double d = double(got[r * ld_got + c]) - want[r * cols + c];
      rn += d * d;
      rd += want[r * cols + c] * want[r * cols + c];
    }
    num += rn;
    den += rd;
    const double e = std::sqrt(rn / std::max(rd, 1e-300));
    *worst_row = std::isnan(e) || std::isnan(*worst_row) ? NAN : std::max(*worst_row, e);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// x quantised per row per 128 channels the way quantize_rows_fp8 does it (its own test checks it is exact).
QuantRows quantise_host(const std::vector<float> &x, int64_t rows, int64_t K) {
  QuantRows q;
  q.rows = rows;
  q.K = K;
  q.xf.resize(size_t(rows * K));
  q.sc.resize(size_t(rows * K / 128));
  for (int64_t t = 0; t < rows; t++)
    for (int64_t b = 0; b < K / 128; b++) {
      float amax = 0;
      for (int64_t k = b * 128; k < b * 128 + 128; k++) amax = std::max(amax, std::fabs(x[size_t(t * K + k)]));
      const float s = amax > 0 ? amax / 448.0f : 1.0f;
      q.sc[size_t(t * (K / 128) + b)] = s;
      for (int64_t k = b * 128; k < b * 128 + 128; k++)
        q.xf[size_t(t * K + k)] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(x[size_t(t * K + k)] / s));
    }
  return q;
}

std::vector<float> randn(size_t n, std::mt19937 &rng, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> v(n);
  for (auto &x : v) x = nd(rng);
  for (size_t i = 0; i < v.size(); i += 977) v[i] *= 30.0f;  // outliers, as real activations have
  return v;
}

}  // namespace

TEST_CASE("FP8 swap-AB GEMM (mma.sync e4m3) vs fp64 on the same quantised operands: 1-255 rows, split K off/on/auto") {
  std::mt19937 rng(101);
  // (576, 7168) kv_a and (144, 256) end in a partial 128-row block; (24576, 1536) q_b; (2048, 7168) an expert's
  // gate; (7168, 2048) its down.
  for (auto [N, K] : {std::pair<int64_t, int64_t>{576, 7168}, {2048, 7168}, {7168, 2048}, {24576, 1536}, {144, 256}}) {
    Fp8Weight w(N, K, rng, true);
    for (int64_t m : {1, 7, 8, 16, 33, 200, 255}) {
      CAPTURE(N);
      CAPTURE(K);
      CAPTURE(m);
      const auto x = randn(size_t(m * K), rng);
      const int64_t ld_s = m + 3, ld_out = N + 16;  // padded strides, read from the arguments
      Dev<float> dx(x), dxs(size_t(K / 128 * ld_s));
      Dev<uint8_t> dxq(size_t(m * K));
      dxs.fill_nan();  // the padding of each scale row stays NaN: reading it would show
      kernels::quantize_rows_fp8(dx.p, m, K, ld_s, dxq.p, dxs.p, nullptr);
      QuantRows qx;  // the device's own quantised activations
      qx.rows = m;
      qx.K = K;
      {
        const auto q = dxq.get();
        const auto s = dxs.get();
        qx.xf.resize(q.size());
        for (size_t i = 0; i < q.size(); i++) qx.xf[i] = fp8_e4m3_to_f32(q[i]);
        qx.sc.resize(size_t(m * K / 128));
        for (int64_t t = 0; t < m; t++)
          for (int64_t b = 0; b < K / 128; b++) qx.sc[size_t(t * (K / 128) + b)] = s[size_t(b * ld_s + t)];
      }
      const auto want = ref_gemm(qx, w);
      for (int split : {1, 3, 0}) {
        CAPTURE(split);
        const kernels::GemmFp8Plan plan = kernels::gemm_fp8_mma_plan(m, N, K, split);
        const int64_t wsf = kernels::gemm_fp8_mma_workspace_floats(m, N, K, split);
        if (split > 0) CHECK(plan.splits == std::min<int64_t>(split, K / 128));  // forced: as asked, at most K / 128
        CHECK(wsf == (plan.splits > 1 ? plan.splits * m * N : 0));
        Dev<float> out(static_cast<size_t>(m * ld_out)), ws(size_t(std::max<int64_t>(wsf, 1)));
        out.fill_nan();
        kernels::gemm_fp8_mma(dxq.p, dxs.p, ld_s, m, w.dm, out.p, ld_out, wsf ? ws.p : nullptr, split, nullptr);
        REQUIRE(cudaGetLastError() == cudaSuccess);
        const auto got = out.get();
        double worst_row = 0;
        const double e = rel_rows(got.data(), ld_out, want.data(), m, N, &worst_row);
        bool pad_kept = true;  // columns N .. ld_out of each row are not written
        for (int64_t t = 0; t < m; t++)
          for (int64_t c = N; c < ld_out; c++) pad_kept &= std::isnan(got[size_t(t * ld_out + c)]);
        MESSAGE("N " << N << " K " << K << " m " << m << " split " << split << " (" << plan.splits << " x "
                     << plan.kb_per_split << " K blocks, tile " << plan.tile << "): relative L2 " << e
                     << ", worst row " << worst_row);
        CHECK(e < kCaseBound);
        CHECK(worst_row < kRowBound);
        CHECK(pad_kept);
      }
    }
  }
}

namespace {

// A random BF16 weight [rows, cols], on the host (for the backend) and on the device (for the kernel), its
// values drawn from a pool of bf16-rounded normal samples with a xorshift generator (the lm_head holds 926 M).
struct Bf16Weight {
  int64_t rows, cols;
  std::vector<uint16_t> b;
  Weight w;  // host view
  std::unique_ptr<Dev<uint16_t>> d;
  kernels::DevMatrix dm;
  Bf16Weight(int64_t r, int64_t c, std::mt19937 &rng, bool device) : rows(r), cols(c) {
    std::normal_distribution<float> nd(0.0f, 0.02f);
    uint16_t pool[4096];
    for (auto &v : pool) v = f32_to_bf16(nd(rng));
    uint64_t st = (uint64_t(rng()) << 32 | rng()) | 1;
    b.resize(size_t(rows * cols));
    for (auto &v : b) {
      st ^= st << 13;
      st ^= st >> 7;
      st ^= st << 17;
      v = pool[(st >> 20) & 4095];
    }
    w.dtype = DType::BF16;
    w.rows = rows;
    w.cols = cols;
    w.data = reinterpret_cast<const uint8_t *>(b.data());
    if (!device) return;
    d = std::make_unique<Dev<uint16_t>>(b);
    dm.data = d->p;
    dm.dtype = kernels::kBF16;
    dm.rows = rows;
    dm.cols = cols;
  }
};

// want[t * ns.size() + i] = sum_k xf[t, k] w[ns[i], k] in fp64 (products of two bf16 values are exact in fp32)
std::vector<double> ref_bf16(const std::vector<float> &xf, int64_t m, const Bf16Weight &w,
                             const std::vector<int64_t> &ns) {
  const int64_t K = w.cols, C = int64_t(ns.size());
  std::vector<double> out(size_t(m * C));
  parallel_for(C, [&](int64_t i) {
    thread_local std::vector<float> wr;
    wr.resize(size_t(K));
    const uint16_t *src = &w.b[size_t(ns[size_t(i)] * K)];
    for (int64_t k = 0; k < K; k++) wr[size_t(k)] = bf16_to_f32(src[k]);
    for (int64_t t = 0; t < m; t++) {
      const float *xr = &xf[size_t(t * K)];
      double acc = 0;
      for (int64_t k = 0; k < K; k++) acc += double(xr[k] * wr[size_t(k)]);
      out[size_t(t * C + i)] = acc;
    }
  });
  return out;
}

// Relative L2 of got[t * ld + ns[i]] against want (ref_bf16's layout) over all t < m, and of the worst token row.
double rel_cols(const std::vector<float> &got, int64_t ld, const std::vector<double> &want, int64_t m,
                const std::vector<int64_t> &ns, double *worst_row) {
  const int64_t C = int64_t(ns.size());
  std::vector<float> sel(size_t(m * C));
  for (int64_t t = 0; t < m; t++)
    for (int64_t i = 0; i < C; i++) sel[size_t(t * C + i)] = got[size_t(t * ld + ns[size_t(i)])];
  return rel_rows(sel.data(), C, want.data(), m, C, worst_row);
}

constexpr double kBf16Bound = 1e-5;  // fp32 accumulation over up to 7168 exact products

}  // namespace

// The lm_head's shape (N = 129280: 1010 blocks of 128 rows, K = 7168) at a few batch sizes, then small odd shapes
// (a partial last block, K not a multiple of the 64-wide K tile, K = 8) at every size: 1 (one token in a tile of
// 8), 7, 16, 33, 128 (one tile of 128), 200 and 256 (two tiles of 128). x is rounded to bf16 by round_to_bf16 as
// Fp8Gemm::run_bf16 does; the reference is an fp64 sum over the device's rounded x. The output has a padded row
// stride prefilled with NaN: every element must be written (finite), the padding never.
TEST_CASE("BF16 swap-AB GEMM (mma.sync bf16) vs fp64 on the same bf16 operands: lm_head and odd shapes, 1-256 rows") {
  std::mt19937 rng(505);
  for (auto [N, K] : {std::pair<int64_t, int64_t>{129280, 7168}, {1000, 264}, {72, 64}, {130, 8}}) {
    const Bf16Weight w(N, K, rng, true);
    const bool big = N * K > (int64_t(1) << 26);
    // Columns compared: all of a small shape; of the lm_head every 11th row (each block, each warp row
    // position over the blocks) and the first and last 128.
    std::vector<int64_t> ns;
    for (int64_t n = 0; n < N; n++)
      if (!big || n % 11 == 0 || n < 128 || n >= N - 128) ns.push_back(n);
    const std::vector<int64_t> ms =
        big ? std::vector<int64_t>{1, 33, 128, 256} : std::vector<int64_t>{1, 7, 16, 33, 128, 200, 256};
    for (int64_t m : ms) {
      CAPTURE(N);
      CAPTURE(K);
      CAPTURE(m);
      REQUIRE(kernels::gemm_bf16_mma_supported(m, N, K));
      const auto x = randn(size_t(m * K), rng);
      const int64_t ld_out = N + 16;
      Dev<float> dx(x), out(size_t(m * ld_out));
      Dev<uint16_t> dxb(size_t(m * K));
      kernels::round_to_bf16(dx.p, m * K, dxb.p, nullptr);
      std::vector<float> xf(size_t(m * K));  // the device's rounding, as the kernel reads it
      {
        const auto xb = dxb.get();
        for (size_t i = 0; i < xb.size(); i++) xf[i] = bf16_to_f32(xb[i]);
      }
      out.fill_nan();
      kernels::gemm_bf16_mma(dxb.p, m, w.dm, out.p, ld_out, nullptr);
      REQUIRE(cudaGetLastError() == cudaSuccess);
      const auto got = out.get();
      int64_t unwritten = 0, pad_written = 0;
      for (int64_t t = 0; t < m; t++) {
        for (int64_t n = 0; n < N; n++) unwritten += !std::isfinite(got[size_t(t * ld_out + n)]);
        for (int64_t n = N; n < ld_out; n++) pad_written += !std::isnan(got[size_t(t * ld_out + n)]);
      }
      const auto want = ref_bf16(xf, m, w, ns);
      double worst_row = 0;
      const double e = rel_cols(got, ld_out, want, m, ns, &worst_row);
      MESSAGE("BF16 swap-AB N " << N << " K " << K << " m " << m << " (tile " << kernels::gemm_bf16_mma_tile(m) << ", "
                                << ns.size() << " columns compared): relative L2 " << e << ", worst token row "
                                << worst_row << ", unwritten " << unwritten);
      CHECK(unwritten == 0);
      CHECK(pad_written == 0);
      CHECK(e < kBf16Bound);
      CHECK(worst_row < 2 * kBf16Bound);
    }
  }
}

namespace {

// One MoE problem on the device: experts, routing, and the grouped path's scratch.
struct MoeProblem {
  int64_t T, E, K, H, I;
  std::vector<std::unique_ptr<Fp8Weight>> gate, up, down;
  std::unique_ptr<Dev<kernels::DevMatrix>> table;  // [gate[E], up[E], down[E]]
  MoeProblem(int64_t t, int64_t e, int64_t k, int64_t h, int64_t i, std::mt19937 &rng) : T(t), E(e), K(k), H(h), I(i) {
    std::vector<kernels::DevMatrix> tab;
    for (auto *part : {&gate, &up, &down})
      for (int64_t j = 0; j < E; j++) {
        part->push_back(part == &down ? std::make_unique<Fp8Weight>(H, I, rng, true)
                                      : std::make_unique<Fp8Weight>(I, H, rng, true));
        tab.push_back(part->back()->dm);
      }
    table = std::make_unique<Dev<kernels::DevMatrix>>(tab);
  }
};

// Hand-made routing: expert 0 takes every token (many), expert 1 only token 0 (one), experts 2 and 3 none,
// the other slots distinct random experts from 4 .. E-1; each token's slots shuffled so that slot order is not
// expert order (the combine must sort).
void hand_routing(int64_t T, int64_t E, int64_t K, std::mt19937 &rng, std::vector<int32_t> &ids, std::vector<float> &w) {
  ids.assign(size_t(T * K), 0);
  w.resize(size_t(T * K));
  std::uniform_real_distribution<float> ud(0.1f, 1.0f);
  for (int64_t t = 0; t < T; t++) {
    std::vector<int32_t> pool;
    for (int32_t e = 4; e < E; e++) pool.push_back(e);
    std::shuffle(pool.begin(), pool.end(), rng);
    std::vector<int32_t> row{0};
    if (t == 0) row.push_back(1);
    for (size_t j = 0; int64_t(row.size()) < K; j++) row.push_back(pool[j]);
    std::shuffle(row.begin(), row.end(), rng);
    for (int64_t k = 0; k < K; k++) {
      ids[size_t(t * K + k)] = row[size_t(k)];
      w[size_t(t * K + k)] = ud(rng);
    }
  }
}

}  // namespace

TEST_CASE("grouped MoE (FP8 tensor cores, no host sync): sort, gate+up+SwiGLU+h quantisation, down, combine vs fp64") {
  std::mt19937 rng(202);
  struct Case {
    int64_t T, E, K, H, I;
  };
  // V3's expert shape at decode size; then more tokens on smaller experts (the reference is fp64 on the host).
  for (const Case c : {Case{8, 16, 8, 7168, 2048}, Case{33, 32, 8, 2048, 1024}, Case{200, 64, 6, 1024, 512},
                       Case{4096, 64, 8, 512, 256}}) {
    REQUIRE(kernels::moe_grouped_supported(c.H, c.I, c.K, c.E));
    const MoeProblem mp(c.T, c.E, c.K, c.H, c.I, rng);
    for (bool router : {false, true}) {
      CAPTURE(c.T);
      CAPTURE(c.E);
      CAPTURE(router);
      const int64_t T = c.T, E = c.E, K = c.K, H = c.H, I = c.I, P = T * K, HB = H / 128, IB = I / 128;
      const auto x = randn(size_t(T * H), rng);
      Dev<float> dx(x), dout(size_t(T * H));
      Dev<int32_t> dids(static_cast<size_t>(P));
      Dev<float> dw(static_cast<size_t>(P));
      std::vector<int32_t> ids;
      std::vector<float> w;
      if (router) {  // the device router on random logits (sigmoid scores, no groups, normalised, scaled)
        const auto logits = randn(size_t(T * E), rng, 2.0f);
        Dev<float> dl(logits);
        kernels::RouteParams rp{int32_t(E), int32_t(K), 1, 1, 1, 0, 1, 2.5f};
        kernels::moe_route(dl.p, T, kernels::DevMatrix{}, rp, dids.p, dw.p, nullptr);
        ids = dids.get();
        w = dw.get();
      } else {
        hand_routing(T, E, K, rng, ids, w);
        dids.put(ids);
        dw.put(w);
      }
      const kernels::MoeGroupedLayout L = kernels::moe_grouped_layout(T, K, E, H, I);
      Dev<unsigned char> scratch(static_cast<size_t>(L.bytes));
      scratch.fill_nan();
      dout.fill_nan();
      kernels::moe_experts_grouped(dx.p, T, H, I, dids.p, dw.p, K, E, mp.table->p, mp.table->p + E, mp.table->p + 2 * E,
                                   scratch.p, dout.p, nullptr);
      REQUIRE(cudaGetLastError() == cudaSuccess);
      const auto out = dout.get();
      const auto sc = scratch.get();
      auto at = [&](int64_t off) { return sc.data() + off; };
      const uint8_t *xq = at(L.xq), *hq = at(L.hq);
      const float *xs = reinterpret_cast<const float *>(at(L.xs)), *hs = reinterpret_cast<const float *>(at(L.hs));
      const float *y = reinterpret_cast<const float *>(at(L.y));
      const int32_t *sorted = reinterpret_cast<const int32_t *>(at(L.sorted));
      const int32_t *tiles = reinterpret_cast<const int32_t *>(at(L.tiles));
      int32_t n_tiles;
      std::memcpy(&n_tiles, at(L.n_tiles), 4);

      // 1. the sort: expert e's pairs at positions [start_e, start_e + count_e), tiles covering them in order
      std::vector<int64_t> count(size_t(E), 0), start(size_t(E), 0);
      for (int32_t e : ids) count[size_t(e)]++;
      for (int64_t e = 1; e < E; e++) start[size_t(e)] = start[size_t(e - 1)] + count[size_t(e - 1)];
      if (!router) {
        CHECK(count[0] == T);
        CHECK(count[1] == 1);
        CHECK(count[2] + count[3] == 0);
      }
      std::vector<int64_t> pos_of(size_t(P), -1);
      bool sort_ok = true;
      for (int64_t p = 0; p < P; p++) {
        const int32_t s = sorted[p];
        if (s < 0 || s >= P || pos_of[size_t(s)] >= 0) {
          sort_ok = false;
          break;
        }
        pos_of[size_t(s)] = p;
        const int64_t e = ids[size_t(s)];
        sort_ok &= p >= start[size_t(e)] && p < start[size_t(e)] + count[size_t(e)];
      }
      REQUIRE(sort_ok);
      int64_t want_tiles = 0;
      for (int64_t e = 0; e < E; e++) want_tiles += (count[size_t(e)] + L.tile - 1) / L.tile;
      CHECK(n_tiles == want_tiles);
      REQUIRE(n_tiles <= L.max_tiles);
      {
        int64_t covered = 0;
        bool tiles_ok = true;
        for (int32_t i = 0; i < n_tiles; i++) {
          const int32_t e = tiles[4 * i], first = tiles[4 * i + 1], rows = tiles[4 * i + 2];
          tiles_ok &= e >= 0 && e < E && rows > 0 && rows <= L.tile && first == covered;
          tiles_ok &= first >= start[size_t(e)] && first + rows <= start[size_t(e)] + count[size_t(e)];
          covered += rows;
        }
        CHECK(tiles_ok);
        CHECK(covered == P);
      }

      // 2. h = silu(gate x) * up x in fp64 from the device's quantised x; the device's h is e4m3 * its scale
      std::vector<double> href(size_t(P * I));
      parallel_for(P, [&](int64_t p) {
        const int64_t t = p / K, e = ids[size_t(p)];
        const Fp8Weight &g = *mp.gate[size_t(e)], &u = *mp.up[size_t(e)];
        thread_local std::vector<float> xr, gr, ur;
        xr.resize(size_t(H));
        for (int64_t k = 0; k < H; k++) xr[size_t(k)] = fp8_e4m3_to_f32(xq[t * H + k]);
        for (int64_t i = 0; i < I; i++) {
          g.row(i, gr);
          u.row(i, ur);
          double gv = 0, uv = 0;
          for (int64_t b = 0; b < HB; b++) {
            double gp = 0, up = 0;
            for (int64_t k = b * 128; k < b * 128 + 128; k++) {
              gp += double(xr[size_t(k)] * gr[size_t(k)]);
              up += double(xr[size_t(k)] * ur[size_t(k)]);
            }
            const double sx = xs[b * T + t];
            gv += gp * sx * g.s(i, b);
            uv += up * sx * u.s(i, b);
          }
          href[size_t(p * I + i)] = gv / (1.0 + std::exp(-gv)) * uv;
        }
      });
      double worst_h = 0, worst_scale = 0;
      int64_t same_code = 0;
      for (int64_t p = 0; p < P; p++) {
        const int64_t pos = pos_of[size_t(p)];
        double num = 0, den = 0;
        for (int64_t b = 0; b < IB; b++) {
          const double s = hs[pos * IB + b];
          double amax = 0;
          for (int64_t i = b * 128; i < b * 128 + 128; i++) {
            const double r = href[size_t(p * I + i)], v = double(fp8_e4m3_to_f32(hq[pos * I + i])) * s;
            amax = std::max(amax, std::fabs(r));
            num += (v - r) * (v - r);
            den += r * r;
            same_code += hq[pos * I + i] == f32_to_fp8_e4m3(float(r / s));
          }
          const double want_s = amax > 0 ? amax / 448.0 : 1.0, es = std::fabs(s - want_s) / want_s;
          worst_scale = std::isnan(es) ? NAN : std::max(worst_scale, es);
        }
        const double e = std::sqrt(num / std::max(den, 1e-300));
        worst_h = std::isnan(e) ? NAN : std::max(worst_h, e);
      }
      const double code_share = double(same_code) / double(P * I);
      MESSAGE("T " << T << " E " << E << " router " << router << " (tile " << L.tile << ", " << n_tiles
                   << " tiles): h worst pair relative L2 " << worst_h << " (e4m3 rounding), worst scale "
                   << worst_scale << ", e4m3 codes equal to the reference's rounding " << code_share);
      CHECK(worst_h < 0.06);         // e4m3's 3 mantissa bits: ~0.025-0.035 expected; a wrong row or column ~1.4
      CHECK(worst_scale < 1e-3);     // amax / 448 of the tile's 128 channels
      CHECK(code_share > 0.98);      // the same rounding except where fp32 and fp64 straddle a midpoint

      // 3. y[pair] = down_e (the device's h) in fp64, against the device's y rows
      std::vector<double> yref(size_t(P * H));
      parallel_for(P, [&](int64_t p) {
        const int64_t pos = pos_of[size_t(p)], e = ids[size_t(p)];
        const Fp8Weight &d = *mp.down[size_t(e)];
        thread_local std::vector<float> hr, dr;
        hr.resize(size_t(I));
        for (int64_t i = 0; i < I; i++) hr[size_t(i)] = fp8_e4m3_to_f32(hq[pos * I + i]);
        for (int64_t n = 0; n < H; n++) {
          d.row(n, dr);
          double acc = 0;
          for (int64_t b = 0; b < IB; b++) {
            double part = 0;
            for (int64_t i = b * 128; i < b * 128 + 128; i++) part += double(hr[size_t(i)] * dr[size_t(i)]);
            acc += part * double(hs[pos * IB + b]) * d.s(n, b);
          }
          yref[size_t(p * H + n)] = acc;
        }
      });
      double worst_y = 0;
      const double ey = rel_rows(y, H, yref.data(), P, H, &worst_y);
      MESSAGE("  down: relative L2 " << ey << ", worst pair " << worst_y);
      CHECK(ey < kCaseBound);
      CHECK(worst_y < kRowBound);

      // 4. out[t] = sum over t's pairs in ascending expert id of w * y (the device's y), in fp64
      std::vector<double> oref(size_t(T * H), 0.0);
      for (int64_t t = 0; t < T; t++) {
        std::vector<int64_t> order;
        for (int64_t k = 0; k < K; k++) order.push_back(k);
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t a, int64_t b) { return ids[size_t(t * K + a)] < ids[size_t(t * K + b)]; });
        for (int64_t k : order)
          for (int64_t n = 0; n < H; n++)
            oref[size_t(t * H + n)] += double(w[size_t(t * K + k)]) * y[(t * K + k) * H + n];
      }
      double worst_out = 0;
      const double eo = rel_rows(out.data(), H, oref.data(), T, H, &worst_out);
      MESSAGE("  combine: relative L2 " << eo << ", worst token " << worst_out);
      CHECK(worst_out < 1e-5);
    }
  }
}

namespace {

std::unique_ptr<Backend> cuda_fp8() {
  BackendOptions opt;
  opt.fp8_activations = true;
  return make_backend(BackendKind::Cuda, opt);
}

using testing::get;
using testing::put;

}  // namespace

// The backend's rule (kFp8ActivationMinRows): FP8 activations from 8 rows - the swap-AB kernel below 256 rows,
// cuBLASLt (or the swap-AB kernel where it is missing) from 256 - and fp32 activations (the GEMV) below 8.
TEST_CASE("CUDA backend with FP8 activations: linear takes the FP8 path from kFp8ActivationMinRows rows") {
  std::mt19937 rng(303);
  auto g = cuda_fp8();
  std::vector<std::unique_ptr<Fp8Weight>> keep;  // the backend keeps device copies by host address
  for (auto [N, K] : {std::pair<int64_t, int64_t>{576, 7168}, {7168, 2048}, {1536, 512}}) {
    keep.push_back(std::make_unique<Fp8Weight>(N, K, rng, false));
    const Fp8Weight &w = *keep.back();
    for (int64_t m : {kFp8ActivationMinRows - 1, kFp8ActivationMinRows, int64_t(33), int64_t(200), int64_t(300)}) {
      CAPTURE(N);
      CAPTURE(K);
      CAPTURE(m);
      const auto x = randn(size_t(m * K), rng);
      g->begin_step();
      Tensor y = g->alloc(m, N);
      g->linear(put(*g, x, m, K), w.w, y);
      const auto got = get(*g, y);
      QuantRows xr;  // fp32 activations below the threshold (the e4m3 "values" are then the fp32 ones)
      if (m >= kFp8ActivationMinRows) {
        xr = quantise_host(x, m, K);
      } else {
        xr.rows = m;
        xr.K = K;
        xr.xf = x;
        xr.sc.assign(size_t(m * K / 128), 1.0);
      }
      const auto want = ref_gemm(xr, w);
      double worst_row = 0;
      const double e = rel_rows(got.data(), N, want.data(), m, N, &worst_row);
      MESSAGE("N " << N << " K " << K << " m " << m << ": relative L2 " << e << " worst row " << worst_row);
      CHECK(e < (m >= kFp8ActivationMinRows ? 2e-3 : 1e-5));  // (cuBLASLt at 300 rows: measured 1.8e-4)
    }
  }
}

// moe_experts with FP8 activations from kFp8ActivationMinRows tokens: the grouped path, against the CPU's fp32
// activations (x and h each rounded to e4m3: a few percent per token row); below, the fp32 path within 1e-5.
TEST_CASE("CUDA backend with FP8 activations: moe_experts takes the grouped path and matches the CPU") {
  std::mt19937 rng(404);
  auto g = cuda_fp8();
  auto c = make_cpu_backend({});
  const int64_t H = 1024, I = 256, E = 32, K = 8;
  std::vector<std::unique_ptr<Fp8Weight>> own;
  std::vector<FfnWeights> experts(static_cast<size_t>(E));
  for (auto &f : experts) {
    own.push_back(std::make_unique<Fp8Weight>(I, H, rng, false));
    f.gate = own.back()->w;
    own.push_back(std::make_unique<Fp8Weight>(I, H, rng, false));
    f.up = own.back()->w;
    own.push_back(std::make_unique<Fp8Weight>(H, I, rng, false));
    f.down = own.back()->w;
  }
  std::vector<float> gate_w = randn(size_t(E * H), rng, 0.05f);
  Weight router;
  router.dtype = DType::F32;
  router.rows = E;
  router.cols = H;
  router.data = reinterpret_cast<const uint8_t *>(gate_w.data());
  RouterParams rp{E, K, 4, 2, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, true, 2.5f};
  for (int64_t T : {kFp8ActivationMinRows - 1, kFp8ActivationMinRows, int64_t(33), int64_t(200), int64_t(700)}) {
    CAPTURE(T);
    const auto x = randn(size_t(T * H), rng);
    g->begin_step();
    c->begin_step();
    Tensor gx = put(*g, x, T, H), gi = g->alloc(T, K, DType::I32), gw = g->alloc(T, K), gy = g->alloc(T, H);
    g->moe_route(gx, router, Weight{}, rp, gi, gw);
    std::vector<int32_t> ids(size_t(T * K));
    g->to_host(gi, reinterpret_cast<float *>(ids.data()));
    const auto wts = get(*g, gw);
    std::vector<int64_t> count(size_t(E), 0);
    for (int32_t e : ids) count[size_t(e)]++;
    g->moe_experts(gx, experts, gi, gw, gy);
    const auto got = get(*g, gy);
    Tensor cx = put(*c, x, T, H), ci = c->alloc(T, K, DType::I32), cw = put(*c, wts, T, K), cy = c->alloc(T, H);
    c->from_host(ci, ids.data());  // the same routing on both
    c->moe_experts(cx, experts, ci, cw, cy);
    const auto want = get(*c, cy);
    double worst = 0;
    for (int64_t t = 0; t < T; t++) {
      const double e = testing::rel_l2(got.data() + t * H, want.data() + t * H, size_t(H));
      worst = std::isnan(e) ? NAN : std::max(worst, e);
    }
    MESSAGE("T " << T << ": worst token relative L2 vs the CPU " << worst << " (experts used: "
                 << std::count_if(count.begin(), count.end(), [](int64_t n) { return n > 0; }) << " of " << E << ")");
    CHECK(worst < (T >= kFp8ActivationMinRows ? 8e-2 : 1e-5));
    if (T >= kFp8ActivationMinRows) CHECK(worst > 1e-4);  // (the FP8 path did run: fp32 would be ~1e-6)
  }
}

// A BF16 linear through the CUDA backend with FP8 activations (the lm_head's route: Fp8Gemm::run_bf16 from
// kFp8ActivationMinRows rows): the swap-AB kernel up to 256 rows when the weight's 128-row blocks occupy half the SMs
// (N = 17000: 133 blocks, a partial last one), cuBLASLt above; below kFp8ActivationMinRows the fp32 GEMV. The
// reference rounds x to bf16 from kFp8ActivationMinRows rows (f32_to_bf16: round_to_bf16's nearest even).
// Needs cuBLASLt (the backend sends BF16 weights to run_bf16 only when it loaded).
// Rows 8..kCudaBf16SwapAbMaxRows run on the swap-AB kernel, more on cuBLASLt: both against the same bound.
TEST_CASE("CUDA backend with FP8 activations: a BF16 linear of 8-300 rows, swap-AB kernel or cuBLASLt (fp64 reference)") {
  const std::string status = cublaslt_status();
  MESSAGE("cuBLASLt: " << status);
  if (status.rfind("cuBLASLt ", 0) != 0) return;  // not loadable here: BF16 linears stay on the GEMV path
  std::mt19937 rng(606);
  auto g = cuda_fp8();
  const int64_t N = 17000, K = 1024;
  const Bf16Weight w(N, K, rng, false);
  std::vector<int64_t> ns(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; n++) ns[size_t(n)] = n;
  for (int64_t m : {kFp8ActivationMinRows - 1, kFp8ActivationMinRows, int64_t(33), kCudaBf16SwapAbMaxRows,
                    kCudaBf16SwapAbMaxRows + 1, int64_t(200), int64_t(300)}) {
    CAPTURE(m);
    auto x = randn(size_t(m * K), rng);
    g->begin_step();
    Tensor y = g->alloc(m, N);
    g->linear(put(*g, x, m, K), w.w, y);
    const auto got = get(*g, y);
    if (m >= kFp8ActivationMinRows)
      for (auto &v : x) v = bf16_to_f32(f32_to_bf16(v));
    const auto want = ref_bf16(x, m, w, ns);
    double worst_row = 0;
    const double e = rel_rows(got.data(), N, want.data(), m, N, &worst_row);
    MESSAGE("BF16 linear N " << N << " K " << K << " m " << m << ": relative L2 " << e << ", worst row " << worst_row);
    CHECK(e < kBf16Bound);
    CHECK(worst_row < 2 * kBf16Bound);
  }
}

#endif  // DSRT_WITH_CUDA
