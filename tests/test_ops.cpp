// Every CPU op against a direct formula on random inputs; the router against brute force; absorbed == naive.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>

#include "backend/backend.h"
#include "core/dtype.h"
#include "kernels.h"
#include "model/config.h"

using namespace dsrt;

namespace {

// A weight held in test memory, FP8 with block scales or BF16 / F32.
struct OwnedWeight {
  std::vector<uint8_t> bytes;
  std::vector<float> scale;
  Weight w;
  std::vector<double> real;  // the exact value of each element, in double

  OwnedWeight(int64_t rows, int64_t cols, DType dt, std::mt19937 &rng, double sd = 1.0) {
    std::normal_distribution<float> nd(0.0f, float(sd));
    real.resize(size_t(rows * cols));
    w.dtype = dt;
    w.rows = rows;
    w.cols = cols;
    if (dt == DType::F8_E4M3) {
      const int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
      scale.resize(size_t(sr * sc));
      std::uniform_real_distribution<float> ud(0.001f, 0.01f);
      for (auto &s : scale) s = ud(rng);
      bytes.resize(size_t(rows * cols));
      for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
          uint8_t q = f32_to_fp8_e4m3(nd(rng) * 100.0f);
          bytes[size_t(r * cols + c)] = q;
          real[size_t(r * cols + c)] = double(fp8_e4m3_to_f32(q)) * scale[size_t((r / 128) * sc + c / 128)];
        }
      w.scale = scale.data();
      w.scale_cols = sc;
    } else if (dt == DType::BF16) {
      bytes.resize(size_t(rows * cols) * 2);
      for (size_t i = 0; i < real.size(); i++) {
        uint16_t b = f32_to_bf16(nd(rng));
        std::memcpy(&bytes[2 * i], &b, 2);
        real[i] = bf16_to_f32(b);
      }
    } else {
      bytes.resize(size_t(rows * cols) * 4);
      for (size_t i = 0; i < real.size(); i++) {
        float f = nd(rng);
        std::memcpy(&bytes[4 * i], &f, 4);
        real[i] = f;
      }
    }
    w.data = bytes.data();
  }
};

void fill(Tensor t, std::mt19937 &rng, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  for (int64_t i = 0; i < t.rows * t.cols; i++) t.f32()[i] = nd(rng);
}

std::unique_ptr<Backend> backend(int threads = 3) {
  BackendOptions o;
  o.n_threads = threads;
  return make_cpu_backend(o);
}

}  // namespace

TEST_CASE("linear: FP8 with partial blocks, BF16 and F32 equal the dequantised matrix product") {
  std::mt19937 rng(1);
  auto be = backend();
  for (DType dt : {DType::F8_E4M3, DType::BF16, DType::F32}) {
    for (auto [N, K, T] : {std::tuple{200, 300, 5}, std::tuple{576, 256, 1}, std::tuple{129, 130, 9}}) {
      CAPTURE(dtype_name(dt));
      CAPTURE(N);
      CAPTURE(K);
      OwnedWeight ow(N, K, dt, rng);
      be->begin_step();
      Tensor x = be->alloc(T, K), y = be->alloc(T, N);
      fill(x, rng);
      be->linear(x, ow.w, y);
      double max_rel = 0;
      for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
          double ref = 0, mag = 0;
          for (int k = 0; k < K; k++) {
            ref += double(x.f32()[t * K + k]) * ow.real[size_t(n * K + k)];
            mag += std::fabs(double(x.f32()[t * K + k]) * ow.real[size_t(n * K + k)]);
          }
          max_rel = std::max(max_rel, std::fabs(y.f32()[t * N + n] - ref) / mag);
        }
      CHECK(max_rel < 1e-6);
    }
  }
}

// FP8 activations on the CPU (BackendOptions::fp8_activations, DSRT_PRECISION_FP8): the reference for the GPU's
// FP8 path. GEMMs of >= kFp8ActivationMinRows rows with FP8 weights multiply activations rounded per 128
// channels (s = amax / 448, e4m3 nearest even, times s), with BF16 weights (the lm_head) activations rounded to
// bf16, as the GPU's tensor-core GEMMs take them; fewer rows stay fp32.
TEST_CASE("FP8 activations on the CPU: e4m3 (or bf16) rounding for GEMMs of >= 8 rows, fp32 below") {
  BackendOptions o;
  o.n_threads = 2;
  o.fp8_activations = true;
  auto q = make_cpu_backend(o), f = backend(2);
  // Through an identity matrix (e4m3 1.0, scale 1) the output is the rounded activations themselves.
  std::vector<uint8_t> eye(128 * 128, 0);
  for (int i = 0; i < 128; i++) eye[size_t(i * 128 + i)] = f32_to_fp8_e4m3(1.0f);
  std::vector<float> one{1.0f};
  Weight id;
  id.dtype = DType::F8_E4M3;
  id.rows = id.cols = 128;
  id.data = eye.data();
  id.scale = one.data();
  id.scale_cols = 1;
  for (int T : {7, 8}) {
    CAPTURE(T);
    q->begin_step();
    Tensor x = q->alloc(T, 128), y = q->alloc(T, 128);
    for (int t = 0; t < T; t++)
      for (int c = 0; c < 128; c++) x.f32()[t * 128 + c] = c == 0 ? 448.0f : c == 1 ? 1.0625f : c == 2 ? 3.3f : c == 3 ? -0.01f : 0.0f;
    q->linear(x, id, y);
    // amax 448: s = 1. 1.0625 is halfway between e4m3's 1.0 and 1.125 (even: 1.0); 3.3 -> 3.25 (spacing 0.25
    // in [2, 4)); -0.01 -> -0.009765625 (subnormal 5 x 2^-9).
    const float want[4] = {448.0f, T >= 8 ? 1.0f : 1.0625f, T >= 8 ? 3.25f : 3.3f, T >= 8 ? -0.009765625f : -0.01f};
    for (int t = 0; t < T; t++)
      for (int c = 0; c < 4; c++) CHECK(y.f32()[t * 128 + c] == want[c]);
  }
  std::mt19937 rng(11);
  for (DType dt : {DType::F8_E4M3, DType::BF16}) {
    OwnedWeight ow(200, 256, dt, rng);
    for (int T : {1, 7, 8, 33}) {
      CAPTURE(T);
      q->begin_step();
      f->begin_step();
      Tensor x = q->alloc(T, 256), yq = q->alloc(T, 200), xf = f->alloc(T, 256), yf = f->alloc(T, 200);
      fill(x, rng);
      q->linear(x, ow.w, yq);
      const bool rounds = T >= kFp8ActivationMinRows;  // to e4m3 for FP8 weights, to bf16 for BF16 weights
      for (int64_t i = 0; i < T * 256; i += 128) {  // the rounding written out, on the fp32 backend's input
        float amax = 0;
        for (int64_t j = i; j < i + 128; j++) amax = std::max(amax, std::fabs(x.f32()[j]));
        const float sc = amax / 448.0f;
        for (int64_t j = i; j < i + 128; j++)
          xf.f32()[j] = !rounds ? x.f32()[j]
                        : dt == DType::BF16 ? bf16_to_f32(f32_to_bf16(x.f32()[j]))
                                            : fp8_e4m3_to_f32(f32_to_fp8_e4m3(x.f32()[j] / sc)) * sc;
      }
      f->linear(xf, ow.w, yf);
      CHECK(std::equal(yq.f32(), yq.f32() + T * 200, yf.f32()));
    }
  }
}

TEST_CASE("results do not depend on the thread count") {
  std::mt19937 rng(2);
  OwnedWeight ow(300, 256, DType::F8_E4M3, rng);
  std::vector<float> x(7 * 256);
  for (auto &v : x) v = std::normal_distribution<float>()(rng);
  std::vector<float> ref;
  for (int threads : {1, 2, 5}) {
    auto be = backend(threads);
    be->begin_step();
    Tensor tx = be->alloc(7, 256), ty = be->alloc(7, 300);
    std::copy(x.begin(), x.end(), tx.f32());
    be->linear(tx, ow.w, ty);
    std::vector<float> y(ty.f32(), ty.f32() + 7 * 300);
    if (ref.empty())
      ref = y;
    else
      CHECK(y == ref);
  }
}

TEST_CASE("rms_norm, silu_mul, add and embed equal their formulas") {
  std::mt19937 rng(3);
  auto be = backend();
  be->begin_step();
  const int T = 4, H = 200;
  OwnedWeight w(H, 1, DType::BF16, rng);
  Tensor x = be->alloc(T, H), y = be->alloc(T, H);
  fill(x, rng, 3.0f);
  be->rms_norm(x, w.w, 1e-6f, y);
  for (int t = 0; t < T; t++) {
    double ss = 0;
    for (int i = 0; i < H; i++) ss += double(x.f32()[t * H + i]) * x.f32()[t * H + i];
    double inv = 1.0 / std::sqrt(ss / H + 1e-6);
    for (int i = 0; i < H; i++) CHECK(y.f32()[t * H + i] == doctest::Approx(x.f32()[t * H + i] * inv * w.real[size_t(i)]).epsilon(1e-5));
  }
  Tensor g = be->alloc(T, H), u = be->alloc(T, H), o = be->alloc(T, H);
  fill(g, rng, 4.0f);
  fill(u, rng);
  be->silu_mul(g, u, o);
  for (int i = 0; i < T * H; i++) {
    double gv = g.f32()[i];
    CHECK(o.f32()[i] == doctest::Approx(gv / (1 + std::exp(-gv)) * u.f32()[i]).epsilon(1e-5));
  }
  std::vector<float> before(x.f32(), x.f32() + T * H);
  be->add(x, y);
  for (int i = 0; i < T * H; i++) CHECK(x.f32()[i] == before[size_t(i)] + y.f32()[i]);
  OwnedWeight table(50, H, DType::BF16, rng);
  Batch b;
  b.tokens = {7, 0, 49, 7};
  b.positions = {0, 1, 2, 3};
  Tensor e = be->alloc(4, H);
  be->embed(table.w, b, e);
  for (int t = 0; t < 4; t++)
    for (int i = 0; i < H; i++) CHECK(e.f32()[t * H + i] == float(table.real[size_t(b.tokens[size_t(t)] * H + i)]));
}

TEST_CASE("interleaved RoPE equals the rotation formula and de-interleave + NeoX on dot products") {
  std::mt19937 rng(4);
  auto be = backend();
  be->begin_step();
  RopeTable rt;
  for (int i = 0; i < 32; i++) rt.inv_freq.push_back(float(std::pow(10000.0, -2.0 * i / 64)));
  const int dr = 64;
  Batch b;
  b.positions = {0, 5, 1000, 70000};
  b.tokens = {0, 0, 0, 0};
  Tensor q = be->alloc(4, 2 * (16 + dr)), k = be->alloc(4, dr);
  fill(q, rng);
  fill(k, rng);
  std::vector<float> q0(q.f32(), q.f32() + q.rows * q.cols), k0(k.f32(), k.f32() + k.rows * k.cols);
  be->rope(q, 2, 16 + dr, 16, rt, b);
  be->rope(k, 1, dr, 0, rt, b);
  for (int t = 0; t < 4; t++) {
    // nope columns untouched
    for (int j = 0; j < 16; j++) CHECK(q.f32()[t * q.cols + j] == q0[size_t(t * q.cols + j)]);
    for (int i = 0; i < 32; i++) {
      float ang = float(b.positions[size_t(t)]) * rt.inv_freq[size_t(i)];
      double c = std::cos(double(ang)), s = std::sin(double(ang));
      double x0 = k0[size_t(t * dr + 2 * i)], x1 = k0[size_t(t * dr + 2 * i + 1)];
      CHECK(k.f32()[t * dr + 2 * i] == doctest::Approx(x0 * c - x1 * s).epsilon(1e-5));
      CHECK(k.f32()[t * dr + 2 * i + 1] == doctest::Approx(x0 * s + x1 * c).epsilon(1e-5));
    }
  }
  // Spec §3.5: NeoX rotate-half after de-interleaving gives the same q.k (the HF formulation).
  auto neox = [&](const float *x, int pos, std::vector<double> &out) {
    std::vector<double> d(dr);
    for (int i = 0; i < 32; i++) {
      d[size_t(i)] = x[2 * i];
      d[size_t(32 + i)] = x[2 * i + 1];
    }
    out.resize(dr);
    for (int i = 0; i < 32; i++) {
      double a = double(float(pos) * rt.inv_freq[size_t(i)]);
      out[size_t(i)] = d[size_t(i)] * std::cos(a) - d[size_t(32 + i)] * std::sin(a);
      out[size_t(32 + i)] = d[size_t(32 + i)] * std::cos(a) + d[size_t(i)] * std::sin(a);
    }
  };
  for (int t = 0; t < 4; t++) {
    std::vector<double> qn, kn;
    neox(q0.data() + t * q.cols + 16, b.positions[size_t(t)], qn);
    neox(k0.data() + ((t + 1) % 4) * dr, b.positions[size_t((t + 1) % 4)], kn);
    double want = 0, got = 0;
    for (int i = 0; i < dr; i++) {
      want += qn[size_t(i)] * kn[size_t(i)];
      got += double(q.f32()[t * q.cols + 16 + i]) * k.f32()[((t + 1) % 4) * dr + i];
    }
    CHECK(got == doctest::Approx(want).epsilon(1e-4));
  }
}

// ---- router
namespace {

struct RouteResult {
  std::vector<int32_t> ids;
  std::vector<float> w;
};

// Brute force: the group set maximising the summed group score, then the expert set maximising summed u.
RouteResult brute_route(const std::vector<float> &logit, const std::vector<float> &bias, const RouterParams &p) {
  const int E = int(p.n_experts), per = E / int(p.n_group);
  std::vector<double> s(static_cast<size_t>(E)), u(static_cast<size_t>(E));
  for (int e = 0; e < E; e++) {
    s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(logit[size_t(e)])));
    u[size_t(e)] = s[size_t(e)] + bias[size_t(e)];
  }
  std::vector<double> gscore(static_cast<size_t>(p.n_group));
  for (int g = 0; g < p.n_group; g++) {
    std::vector<double> v(u.begin() + g * per, u.begin() + (g + 1) * per);
    std::sort(v.rbegin(), v.rend());
    gscore[size_t(g)] = v[0] + v[1];
  }
  double best = -1e300;
  unsigned best_mask = 0;
  for (unsigned m = 0; m < (1u << p.n_group); m++) {
    if (__builtin_popcount(m) != p.topk_group) continue;
    double sum = 0;
    for (int g = 0; g < p.n_group; g++)
      if (m >> g & 1) sum += gscore[size_t(g)];
    if (sum > best) best = sum, best_mask = m;
  }
  std::vector<int> allowed;
  for (int e = 0; e < E; e++)
    if (best_mask >> (e / per) & 1) allowed.push_back(e);
  // every K-subset of the allowed experts
  double best_sum = -1e300;
  std::vector<int> best_set, idx(size_t(p.top_k));
  std::function<void(int, int, double)> rec = [&](int start, int depth, double sum) {
    if (depth == p.top_k) {
      if (sum > best_sum) {
        best_sum = sum;
        best_set.clear();
        for (int i : idx) best_set.push_back(allowed[size_t(i)]);
      }
      return;
    }
    for (int i = start; i < int(allowed.size()); i++) {
      idx[size_t(depth)] = i;
      rec(i + 1, depth + 1, sum + u[size_t(allowed[size_t(i)])]);
    }
  };
  rec(0, 0, 0.0);
  RouteResult r;
  double total = 0;
  for (int e : best_set) total += s[size_t(e)];
  for (int e : best_set) {
    r.ids.push_back(e);
    r.w.push_back(float(s[size_t(e)] / total * p.routed_scaling_factor));
  }
  return r;
}

}  // namespace

TEST_CASE("router equals brute force with biases of magnitude ~2, including negative selection scores") {
  std::mt19937 rng(5);
  auto be = backend();
  RouterParams p{32, 8, 8, 3, ScoringFunc::Sigmoid, TopkMethod::NoauxTc, true, 2.5f};
  const int H = 64, T = 40;
  OwnedWeight gate(p.n_experts, H, DType::F32, rng, 0.5);
  std::vector<float> bias(static_cast<size_t>(p.n_experts));
  std::uniform_real_distribution<float> ub(-3.0f, 1.0f);  // |bias| up to 3: u = s + b often negative
  for (auto &b : bias) b = ub(rng);
  std::vector<uint8_t> bias_bytes(bias.size() * 4);
  std::memcpy(bias_bytes.data(), bias.data(), bias_bytes.size());
  Weight bw;
  bw.dtype = DType::F32;
  bw.rows = p.n_experts;
  bw.cols = 1;
  bw.data = bias_bytes.data();
  be->begin_step();
  Tensor x = be->alloc(T, H), ids = be->alloc(T, p.top_k, DType::I32), w = be->alloc(T, p.top_k);
  fill(x, rng, 2.0f);
  be->moe_route(x, gate.w, bw, p, ids, w);
  int negative = 0;
  for (int t = 0; t < T; t++) {
    std::vector<float> logit(static_cast<size_t>(p.n_experts));
    for (int e = 0; e < p.n_experts; e++) {
      double acc = 0;
      for (int k = 0; k < H; k++) acc += double(x.f32()[t * H + k]) * gate.real[size_t(e * H + k)];
      logit[size_t(e)] = float(acc);
    }
    RouteResult ref = brute_route(logit, bias, p);
    std::vector<std::pair<int32_t, float>> got, want;
    double wsum = 0;
    for (int k = 0; k < p.top_k; k++) {
      got.push_back({ids.i32()[t * p.top_k + k], w.f32()[t * p.top_k + k]});
      want.push_back({ref.ids[size_t(k)], ref.w[size_t(k)]});
      wsum += w.f32()[t * p.top_k + k];
      if (1.0 / (1.0 + std::exp(-logit[size_t(ref.ids[size_t(k)])])) + bias[size_t(ref.ids[size_t(k)])] < 0) negative++;
    }
    std::sort(got.begin(), got.end());
    std::sort(want.begin(), want.end());
    for (int k = 0; k < p.top_k; k++) {
      CHECK(got[size_t(k)].first == want[size_t(k)].first);
      CHECK(got[size_t(k)].second == doctest::Approx(want[size_t(k)].second).epsilon(1e-5));
    }
    CHECK(wsum == doctest::Approx(2.5).epsilon(1e-5));  // normalised, then routed_scaling_factor
  }
  CHECK(negative > 0);  // the case where masking with 0 instead of -inf would differ was exercised
}

TEST_CASE("router variants: one group, softmax greedy without renormalisation") {
  std::mt19937 rng(6);
  auto be = backend();
  const int H = 32, E = 8, K = 2, T = 10;
  OwnedWeight gate(E, H, DType::F32, rng, 0.5);
  be->begin_step();
  Tensor x = be->alloc(T, H), ids = be->alloc(T, K, DType::I32), w = be->alloc(T, K);
  fill(x, rng, 2.0f);
  RouterParams p{E, K, 1, 1, ScoringFunc::Softmax, TopkMethod::Greedy, false, 1.0f};
  be->moe_route(x, gate.w, Weight{}, p, ids, w);
  for (int t = 0; t < T; t++) {
    std::vector<double> lg(E), sm(E);
    double mx = -1e300, sum = 0;
    for (int e = 0; e < E; e++) {
      for (int k = 0; k < H; k++) lg[size_t(e)] += double(x.f32()[t * H + k]) * gate.real[size_t(e * H + k)];
      mx = std::max(mx, lg[size_t(e)]);
    }
    for (int e = 0; e < E; e++) sum += sm[size_t(e)] = std::exp(lg[size_t(e)] - mx);
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return sm[size_t(a)] > sm[size_t(b)]; });
    for (int k = 0; k < K; k++) {
      CHECK(ids.i32()[t * K + k] == order[size_t(k)]);
      CHECK(w.f32()[t * K + k] == doctest::Approx(sm[size_t(order[size_t(k)])] / sum).epsilon(1e-5));
    }
  }
}

TEST_CASE("moe_experts equals the weighted sum of each selected expert's SwiGLU") {
  std::mt19937 rng(7);
  auto be = backend();
  const int H = 64, I = 48, E = 4, K = 2, T = 5;
  std::vector<std::unique_ptr<OwnedWeight>> own;
  std::vector<FfnWeights> experts(E);
  for (int e = 0; e < E; e++) {
    own.push_back(std::make_unique<OwnedWeight>(I, H, DType::BF16, rng, 0.2));
    experts[size_t(e)].gate = own.back()->w;
    own.push_back(std::make_unique<OwnedWeight>(I, H, DType::BF16, rng, 0.2));
    experts[size_t(e)].up = own.back()->w;
    own.push_back(std::make_unique<OwnedWeight>(H, I, DType::BF16, rng, 0.2));
    experts[size_t(e)].down = own.back()->w;
  }
  be->begin_step();
  Tensor x = be->alloc(T, H), ids = be->alloc(T, K, DType::I32), w = be->alloc(T, K), y = be->alloc(T, H);
  fill(x, rng);
  const int32_t sel[T][K] = {{0, 1}, {3, 0}, {2, 3}, {1, 2}, {0, 3}};
  for (int t = 0; t < T; t++)
    for (int k = 0; k < K; k++) {
      ids.i32()[t * K + k] = sel[t][k];
      w.f32()[t * K + k] = 0.3f + 0.2f * float(k + t);
    }
  be->moe_experts(x, experts, ids, w, y);
  for (int t = 0; t < T; t++) {
    std::vector<double> ref(H);
    for (int k = 0; k < K; k++) {
      const int e = sel[t][k];
      const auto &G = *own[size_t(3 * e)], &U = *own[size_t(3 * e + 1)], &D = *own[size_t(3 * e + 2)];
      std::vector<double> h(I);
      for (int i = 0; i < I; i++) {
        double g = 0, u = 0;
        for (int j = 0; j < H; j++) {
          g += G.real[size_t(i * H + j)] * x.f32()[t * H + j];
          u += U.real[size_t(i * H + j)] * x.f32()[t * H + j];
        }
        h[size_t(i)] = g / (1 + std::exp(-g)) * u;
      }
      for (int j = 0; j < H; j++) {
        double d = 0;
        for (int i = 0; i < I; i++) d += D.real[size_t(j * I + i)] * h[size_t(i)];
        ref[size_t(j)] += w.f32()[t * K + k] * d;
      }
    }
    for (int j = 0; j < H; j++) CHECK(y.f32()[t * H + j] == doctest::Approx(ref[size_t(j)]).epsilon(1e-4).scale(1.0));
  }
}

TEST_CASE("MLA cache write and attention: both forms equal the direct formula, across page boundaries") {
  std::mt19937 rng(8);
  auto be = backend();
  const MlaDims d{3, 16, 8, 12, 40, 0.2f};  // nh, dn, dr, dv, dc
  const int n_prev = 70, n_new = 6, n_ctx = n_prev + n_new;
  KvCacheSpec spec{2, d.latent + d.rope, 8};
  be->kv_init(spec);
  std::vector<int32_t> pages = {5, 2};  // a scattered page table: positions 64.. live in page 2
  RopeTable rt;
  for (int i = 0; i < d.rope / 2; i++) rt.inv_freq.push_back(float(std::pow(10000.0, -2.0 * i / d.rope)));
  OwnedWeight kv_norm(d.latent, 1, DType::BF16, rng);
  OwnedWeight kv_b(d.n_heads * (d.nope + d.v), d.latent, DType::F8_E4M3, rng);
  const int layer = 1;
  // Write all n_ctx tokens' latents: first the prefix (one sequence step), then the new tokens.
  std::vector<float> kv_all(size_t(n_ctx * (d.latent + d.rope)));
  for (auto &v : kv_all) v = std::normal_distribution<float>()(rng);
  auto make_batch = [&](int n_past, int n) {
    Batch b;
    for (int i = 0; i < n; i++) {
      b.tokens.push_back(0);
      b.positions.push_back(n_past + i);
    }
    b.seqs.push_back({0, n, n_past, 0, 2});
    b.pages = pages;
    return b;
  };
  const int W = d.latent + d.rope;
  be->begin_step();
  Batch b1 = make_batch(0, n_prev), b2 = make_batch(n_prev, n_new);
  Tensor kv1 = be->alloc(n_prev, W), kv2 = be->alloc(n_new, W);
  std::copy(kv_all.begin(), kv_all.begin() + n_prev * W, kv1.f32());
  std::copy(kv_all.begin() + n_prev * W, kv_all.end(), kv2.f32());
  be->mla_cache_write(layer, kv1, kv_norm.w, 1e-6f, rt, b1);
  be->mla_cache_write(layer, kv2, kv_norm.w, 1e-6f, rt, b2);
  // The latent and rotated rope parts per position, computed directly.
  std::vector<std::vector<double>> ckv(n_ctx), kpe(n_ctx);
  for (int j = 0; j < n_ctx; j++) {
    const float *src = kv_all.data() + j * W;
    double ss = 0;
    for (int i = 0; i < d.latent; i++) ss += double(src[i]) * src[i];
    double inv = 1.0 / std::sqrt(ss / d.latent + 1e-6);
    for (int i = 0; i < d.latent; i++) ckv[size_t(j)].push_back(src[i] * inv * kv_norm.real[size_t(i)]);
    for (int i = 0; i < d.rope / 2; i++) {
      double a = double(float(j) * rt.inv_freq[size_t(i)]);
      kpe[size_t(j)].push_back(src[d.latent + 2 * i] * std::cos(a) - src[d.latent + 2 * i + 1] * std::sin(a));
      kpe[size_t(j)].push_back(src[d.latent + 2 * i] * std::sin(a) + src[d.latent + 2 * i + 1] * std::cos(a));
    }
  }
  Tensor q = be->alloc(n_new, d.n_heads * (d.nope + d.rope));
  fill(q, rng);
  Tensor on = be->alloc(n_new, d.n_heads * d.v), oa = be->alloc(n_new, d.n_heads * d.v);
  be->mla_attention(layer, q, kv_b.w, d, b2, AttnForm::Naive, on);
  be->mla_attention(layer, q, kv_b.w, d, b2, AttnForm::Absorbed, oa);
  const int kvw = d.nope + d.v, qk = d.nope + d.rope;
  double max_err_n = 0, max_err_a = 0;
  for (int i = 0; i < n_new; i++) {
    const int pos = n_prev + i;
    for (int h = 0; h < d.n_heads; h++) {
      std::vector<double> sc(static_cast<size_t>(pos + 1));
      double mx = -1e300;
      for (int j = 0; j <= pos; j++) {
        double s = 0;
        for (int r = 0; r < d.nope; r++) {
          double k = 0;
          for (int c = 0; c < d.latent; c++) k += kv_b.real[size_t((h * kvw + r) * d.latent + c)] * ckv[size_t(j)][size_t(c)];
          s += q.f32()[i * q.cols + h * qk + r] * k;
        }
        for (int r = 0; r < d.rope; r++) s += q.f32()[i * q.cols + h * qk + d.nope + r] * kpe[size_t(j)][size_t(r)];
        sc[size_t(j)] = s * d.softmax_scale;
        mx = std::max(mx, sc[size_t(j)]);
      }
      double z = 0;
      for (auto &s : sc) z += s = std::exp(s - mx);
      for (int r = 0; r < d.v; r++) {
        double o = 0;
        for (int j = 0; j <= pos; j++) {
          double v = 0;
          for (int c = 0; c < d.latent; c++) v += kv_b.real[size_t((h * kvw + d.nope + r) * d.latent + c)] * ckv[size_t(j)][size_t(c)];
          o += sc[size_t(j)] / z * v;
        }
        max_err_n = std::max(max_err_n, std::fabs(on.f32()[i * on.cols + h * d.v + r] - o) / (1 + std::fabs(o)));
        max_err_a = std::max(max_err_a, std::fabs(oa.f32()[i * oa.cols + h * d.v + r] - o) / (1 + std::fabs(o)));
      }
    }
  }
  CHECK(max_err_n < 1e-4);
  CHECK(max_err_a < 1e-4);
}

namespace {

// One sequence of n_prev cached tokens and n_new new ones over the scattered page table {5, 2} (positions
// 64.. live in page 2), cache layer 1 of 2, written by mla_cache_write in two steps and attended in both forms,
// in a pool of the given dtype; or, with `entries`, the pool is filled by kv_write instead.
struct BlendedMla {
  static constexpr int n_prev = 70, n_new = 6, n_ctx = n_prev + n_new, layer = 1;
  MlaDims d{4, 32, 16, 24, 128, 0.15f};  // nh, dn, dr, dv, dc
  int W = int(d.latent + d.rope);
  std::vector<int32_t> pages = {5, 2};
  RopeTable rt;
  std::mt19937 rng{41};
  OwnedWeight kv_norm{d.latent, 1, DType::BF16, rng};
  OwnedWeight kv_b{d.n_heads * (d.nope + d.v), d.latent, DType::F8_E4M3, rng};
  std::vector<float> kv_in, q_in;
  BlendedMla() {
    for (int i = 0; i < d.rope / 2; i++) rt.inv_freq.push_back(float(std::pow(10000.0, -2.0 * i / d.rope)));
    kv_in.resize(size_t(n_ctx * W));
    for (auto &v : kv_in) v = std::normal_distribution<float>()(rng);
    q_in.resize(size_t(n_new * d.n_heads * (d.nope + d.rope)));
    for (auto &v : q_in) v = std::normal_distribution<float>()(rng);
  }
  Batch batch(int n_past, int n) const {
    Batch b;
    for (int i = 0; i < n; i++) {
      b.tokens.push_back(0);
      b.positions.push_back(n_past + i);
    }
    b.seqs.push_back({0, n, n_past, 0, 2});
    b.pages = pages;
    return b;
  }
  struct Out {
    std::vector<float> cache, naive, absorbed;  // cache: kv_read of all n_ctx positions, [n_ctx][2][W]
  };
  Out run(DType dtype, const std::vector<float> *entries = nullptr) {
    auto be = backend();
    be->kv_init({2, W, 8, dtype});
    be->begin_step();
    if (entries) {
      be->kv_write(pages.data(), n_ctx, entries->data());
    } else {
      for (auto [n_past, n] : {std::pair{0, n_prev}, std::pair{n_prev, n_new}}) {
        Tensor kv = be->alloc(n, W);
        std::copy(kv_in.begin() + n_past * W, kv_in.begin() + (n_past + n) * W, kv.f32());
        be->mla_cache_write(layer, kv, kv_norm.w, 1e-6f, rt, batch(n_past, n));
      }
    }
    Out o;
    o.cache.resize(size_t(n_ctx * 2 * W));
    be->kv_read(pages.data(), n_ctx, o.cache.data());
    Tensor q = be->alloc(n_new, d.n_heads * (d.nope + d.rope));
    std::copy(q_in.begin(), q_in.end(), q.f32());
    for (AttnForm f : {AttnForm::Naive, AttnForm::Absorbed}) {
      Tensor out = be->alloc(n_new, d.n_heads * d.v);
      be->mla_attention(layer, q, kv_b.w, d, batch(n_prev, n_new), f, out);
      (f == AttnForm::Naive ? o.naive : o.absorbed).assign(out.f32(), out.f32() + out.rows * out.cols);
    }
    return o;
  }
};

double rel_l2(const std::vector<float> &a, const std::vector<float> &b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); i++) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

}  // namespace

TEST_CASE("BF16 latent cache: entries are the F32 pool's rounded to nearest even; attention reads them widened") {
  BlendedMla m;
  CHECK(backend()->default_kv_dtype() == DType::F32);  // the CPU reference keeps fp32 unless asked
  const auto f32 = m.run(DType::F32), bf16 = m.run(DType::BF16);
  // The write path computes each entry in fp32 and rounds once: exactly the F32 pool's entries, rounded (the
  // unused layer 0 reads back as zeros in both).
  REQUIRE(f32.cache.size() == bf16.cache.size());
  int64_t mismatched = 0, rounded = 0;
  for (size_t i = 0; i < f32.cache.size(); i++) {
    mismatched += bf16.cache[i] != bf16_round(f32.cache[i]);
    rounded += bf16.cache[i] != f32.cache[i];
  }
  CHECK(mismatched == 0);
  CHECK(rounded > int64_t(f32.cache.size()) / 4);  // the pool really holds bf16 (half of it is layer 0's zeros)
  // Reading widens exactly: an F32 pool given the same (rounded) entries gives bitwise the same attention.
  const auto same = m.run(DType::F32, &bf16.cache);
  CHECK(same.naive == bf16.naive);
  CHECK(same.absorbed == bf16.absorbed);
  // Against the unrounded F32 pool: each cached value moves by at most 2^-9 relative (round to nearest, 8
  // significant bits), about 2^-8/sqrt(12) = 1.1e-3 RMS. The output is a softmax-weighted mean of values
  // (that error, averaged) with weights moved by the scores' error (scale * q . dk: same relative order, the
  // scores here being O(1)), so a few 1e-3 is expected; 1e-2 leaves headroom, and a misplaced or misread
  // entry gives O(1).
  const double en = rel_l2(bf16.naive, f32.naive), ea = rel_l2(bf16.absorbed, f32.absorbed);
  MESSAGE("BF16 vs F32 cache, attention output relative L2: naive " << en << ", absorbed " << ea);
  CHECK(en < 1e-2);
  CHECK(ea < 1e-2);
  CHECK(en > 0);  // the rounding is visible downstream (the forms did read the bf16 entries)
}

TEST_CASE("BF16 latent cache: kv_write/kv_read round trip, kv_copy_page, page sizes, unsupported dtypes") {
  std::mt19937 rng(42);
  const int W = 40, L = 3, n = 70;
  CHECK(KvCacheSpec{L, W, 1, DType::BF16}.page_bytes() == size_t(L * 64 * W * 2));
  CHECK(KvCacheSpec{L, W, 1, DType::F32}.page_bytes() == size_t(L * 64 * W * 4));
  std::vector<float> src(size_t(n * L * W));
  for (auto &v : src) v = std::normal_distribution<float>(0.0f, 10.0f)(rng);
  src[0] = 1.0f + 1.0f / 256;       // a tie: rounds to the even neighbour 1.0
  src[1] = 1.0f + 3.0f / 256;       // a tie: rounds up to the even neighbour 1 + 4/256
  src[2] = -1e-40f;                 // an fp32 subnormal: kept as a bf16 subnormal
  for (DType dt : {DType::BF16, DType::F32}) {
    CAPTURE(std::string(dtype_name(dt)));
    auto be = backend();
    be->kv_init({L, W, 8, dt});
    const std::vector<int32_t> pages = {6, 1}, copy = {4, 1};
    be->kv_write(pages.data(), n, src.data());
    std::vector<float> back(src.size()), copied(src.size());
    be->kv_read(pages.data(), n, back.data());
    int64_t bad = 0;
    for (size_t i = 0; i < src.size(); i++) bad += back[i] != (dt == DType::BF16 ? bf16_round(src[i]) : src[i]);
    CHECK(bad == 0);
    if (dt == DType::BF16) {
      CHECK(back[0] == 1.0f);
      CHECK(back[1] == 1.0f + 4.0f / 256);
      CHECK(back[2] == bf16_round(-1e-40f));
      CHECK(back[2] < 0.0f);
    }
    be->kv_copy_page(6, 4);  // page 4 = page 6, every layer: the table {4, 1} reads what {6, 1} holds
    be->kv_read(copy.data(), n, copied.data());
    CHECK(copied == back);
  }
  auto be = backend();
  CHECK_THROWS(be->kv_init({L, W, 8, DType::F8_E4M3}));
}

// The schedule of the GPU's tensor-core MLA kernel (kernels/mla_flash_plan.cpp, plain C++): every q-block's key
// tiles are handed out exactly once, in contiguous segments; blocks get equal runs of tiles (all but the last
// exactly `run`), at most one block per SM; a q-block cut into several segments has consecutive partial slots
// and one combine item naming them.
TEST_CASE("MLA flash plan: each q-block's keys once, equal runs per SM, split q-blocks merged") {
  namespace kk = dsrt::kernels;
  struct Case {
    std::vector<kk::MlaSeq> seqs;
    int64_t nh;
    int n_sm;
  };
  std::vector<kk::MlaSeq> ragged;
  for (int i = 0, row = 0, page = 0; i < 64; i++) {
    const int n_new = i % 9 == 0 ? 3 : 1, n_past = (i * 37) % 301;
    ragged.push_back({row, n_new, n_past, page});
    row += n_new;
    page += (n_past + n_new + 63) / 64;
  }
  const std::vector<Case> cases = {
      {{{0, 1, 4095, 0}}, 128, 132},               // decode, batch 1, 4k context, V3's heads
      {{{0, 1, 65535, 0}}, 128, 132},              // 64k context
      {{{0, 1, 0, 0}}, 4, 132},                    // the first token of a tiny model
      {ragged, 16, 132},                           // 64 ragged sequences
      {{{0, 512, 60000, 0}}, 128, 132},            // a prefill chunk after a long prefix
      {{{0, 5, 0, 0}, {5, 77, 100, 1}, {82, 1, 3, 5}}, 16, 7},  // a mix on a small GPU
  };
  for (const Case &c : cases) {
    const kk::MlaFlashPlan p = kk::mla_flash_plan(c.seqs, c.nh, c.n_sm);
    const int32_t n_blocks = int32_t(p.block_items.size()) - 1;
    REQUIRE(n_blocks >= 1);
    CHECK(n_blocks <= c.n_sm);
    CHECK(p.block_items.front() == 0);
    CHECK(p.block_items.back() == int32_t(p.items.size()));
    std::vector<int64_t> tiles_of_block;
    for (int32_t b = 0; b < n_blocks; b++) {
      CHECK(p.block_items[size_t(b)] < p.block_items[size_t(b) + 1]);
      int64_t t = 0;
      for (int32_t i = p.block_items[size_t(b)]; i < p.block_items[size_t(b) + 1]; i++)
        t += p.items[size_t(i)].tile1 - p.items[size_t(i)].tile0;
      tiles_of_block.push_back(t);
    }
    const int64_t run = tiles_of_block.front();
    for (int32_t b = 0; b + 1 < n_blocks; b++) CHECK(tiles_of_block[size_t(b)] == run);
    CHECK(tiles_of_block.back() <= run);
    // every q-block of every sequence: its tiles once, its segments' slots and its combine item
    std::vector<int> slot_seen(size_t(p.n_slots), 0);
    size_t n_split_qblocks = 0;
    for (const kk::MlaSeq &s : c.seqs)
      for (int64_t q = 0; q < s.n_new * c.nh; q += kk::kMlaFlashRows) {
        const int32_t qrow0 = int32_t(s.row0 * c.nh + q);
        const int32_t nq = int32_t(std::min<int64_t>(kk::kMlaFlashRows, s.n_new * c.nh - q));
        const int32_t n_kv = s.n_past + int32_t((q + nq - 1) / c.nh) + 1;
        std::vector<const kk::MlaWorkItem *> segs;
        for (const auto &it : p.items)
          if (it.qrow0 == qrow0) segs.push_back(&it);
        REQUIRE(!segs.empty());
        int32_t next = 0;
        for (const auto *it : segs) {
          CHECK(it->nq == nq);
          CHECK(it->n_kv == n_kv);
          CHECK(it->n_past == s.n_past);
          CHECK(it->page0 == s.page0);
          CHECK(it->qoff == q);
          CHECK(it->tile0 == next);
          CHECK(it->tile1 > it->tile0);
          next = it->tile1;
        }
        CHECK(next == (n_kv + kk::kMlaFlashTile - 1) / kk::kMlaFlashTile);
        if (segs.size() == 1) {
          CHECK(segs[0]->slot == -1);
          continue;
        }
        n_split_qblocks++;
        const auto comb = std::find_if(p.combine.begin(), p.combine.end(), [&](const kk::MlaCombineItem &ci) { return ci.qrow0 == qrow0; });
        REQUIRE(comb != p.combine.end());
        CHECK(comb->nq == nq);
        CHECK(comb->n_splits == int32_t(segs.size()));
        for (size_t k = 0; k < segs.size(); k++) {
          CHECK(segs[k]->slot == comb->slot0 + int32_t(k));
          REQUIRE(segs[k]->slot >= 0);
          REQUIRE(segs[k]->slot < p.n_slots);
          slot_seen[size_t(segs[k]->slot)]++;
        }
      }
    CHECK(p.combine.size() == n_split_qblocks);
    for (int v : slot_seen) CHECK(v == 1);
    MESSAGE(c.seqs.size() << " sequences, " << c.nh << " heads, " << c.n_sm << " SMs: " << n_blocks << " blocks of "
                          << run << " tiles, " << p.items.size() << " segments, " << p.combine.size() << " q-blocks split");
  }
}
