// Expert parallelism on the CUDA backend's device expert paths: a rank holds only its slice of each MoE layer's
// routed experts (ModelShard::bind), the others are absent (null weights, null device table entries). Each rank's
// moe_experts must run on the same device path as the full layer (the GEMV kernels for small T * K, the grouped
// FP8 kernels for larger batches with FP8 activations: no host sync), equal the CPU backend's moe_experts with the
// same absent experts, and the ranks' outputs must add up to the full layer's.
#include <doctest/doctest.h>

#if defined(DSRT_WITH_CUDA)  // (the CUDA backend is built with the CUDA parts only)

#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../helpers.h"
#include "backend/backend.h"
#include "backend_io.h"
#include "core/dtype.h"
#include "dist/mapping.h"
#include "model/model.h"
#include "model/shard.h"

using namespace dsrt;

namespace {

std::vector<float> randn(size_t n, std::mt19937 &rng) {
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (float &x : v) x = nd(rng);
  return v;
}

double rel(const std::vector<float> &a, const std::vector<float> &b) { return testing::rel_l2(a.data(), b.data(), a.size()); }

enum class MoePath { Gemv, Grouped, Host };
const char *path_name(MoePath p) { return p == MoePath::Gemv ? "GEMV" : p == MoePath::Grouped ? "grouped" : "host (reference)"; }

// The path CudaBackend::moe_on_gpu picks for a layer whose present experts are these (its thresholds:
// kDeviceExpertSlots = 256 (T * K) for the GEMV kernels; the grouped FP8 kernels with FP8 activations from
// kFp8ActivationMinRows tokens, FP8 experts and H, I multiples of 128; otherwise the reference path on the host).
MoePath expected_path(bool fp8, int64_t T, int64_t K, int64_t H, const FfnWeights &f) {
  const int64_t I = f.gate.rows;
  if (fp8 && T >= kFp8ActivationMinRows && H % 128 == 0 && I % 128 == 0 && K <= 32 && f.gate.dtype == DType::F8_E4M3 &&
      f.up.dtype == DType::F8_E4M3 && f.down.dtype == DType::F8_E4M3)
    return MoePath::Grouped;
  if (T * K <= 256 && H % 4 == 0 && I % 4 == 0 && K <= 32) return MoePath::Gemv;
  return MoePath::Host;
}

// Which path moe_experts took, from the backend's counters around the call.
MoePath taken(const BackendCounters &a, const BackendCounters &b) {
  const uint64_t gemv = b.moe_gemv_calls - a.moe_gemv_calls, grouped = b.moe_grouped_calls - a.moe_grouped_calls,
                 host = b.moe_host_calls - a.moe_host_calls;
  REQUIRE(gemv + grouped + host == 1);
  return gemv ? MoePath::Gemv : grouped ? MoePath::Grouped : MoePath::Host;
}

// moe_experts on one backend with these inputs: the output and the path (CUDA) taken.
std::vector<float> run_experts(Backend &be, const std::vector<FfnWeights> &experts, const std::vector<float> &x,
                               const std::vector<int32_t> &ids, const std::vector<float> &w, int64_t T, int64_t H,
                               int64_t K, MoePath *path = nullptr) {
  Tensor tx = testing::put(be, x, T, H), ti = be.alloc(T, K, DType::I32), tw = testing::put(be, w, T, K);
  be.from_host(ti, ids.data());
  // The output starts as NaN: a row the call leaves unwritten shows.
  Tensor ty = testing::put(be, std::vector<float>(size_t(T * H), std::numeric_limits<float>::quiet_NaN()), T, H);
  const BackendCounters before = be.counters();
  be.moe_experts(tx, experts, ti, tw, ty);
  std::vector<float> y = testing::get(be, ty);
  if (path) *path = taken(before, be.counters());
  return y;
}

// The router's choices (ids, weights [T, K]) on hidden states x [T, H], on backend be.
void route(Backend &be, const Model &model, const LayerWeights &L, const std::vector<float> &x, int64_t T,
           std::vector<int32_t> &ids, std::vector<float> &w) {
  const int64_t H = model.cfg.hidden_size, K = model.cfg.num_experts_per_tok;
  Tensor tx = testing::put(be, x, T, H), ti = be.alloc(T, K, DType::I32), tw = be.alloc(T, K);
  be.moe_route(tx, L.router, L.router_bias, model.router, ti, tw);
  ids.resize(size_t(T * K));
  be.to_host(ti, reinterpret_cast<float *>(ids.data()));
  w = testing::get(be, tw);
}

}  // namespace

// Every tiny preset's MoE layers, ep 2 and 4 (where ep divides the routed experts), T = 1, 3, 8, 64, 300 tokens,
// fp32 and FP8 activations; ids and weights from the real router (moe_route on the GPU) on random hidden states,
// and ids where every token picks only experts absent on the rank.
// - each rank on the GPU takes the path the full layer takes (asserted from the backend's path counters): a
//   regression to the host reference path fails here;
// - each rank on the GPU equals the CPU backend's moe_experts with the same absent experts: relative L2 1e-5,
//   or 2e-3 where the layer quantises to FP8 (as the op-by-op FP8 test: the same e4m3 inputs, but the SwiGLU
//   output's last-bit differences can move an e4m3 rounding of h);
// - the ranks' outputs, added in rank order, equal the full layer's on the GPU within 1e-5 (each (token, expert)
//   row is computed as in the full layer; only the order of the additions across ranks differs);
// - tokens whose experts are all absent get exactly zero, on both backends.
TEST_CASE("expert parallelism: a rank's MoE layer on the device paths equals the CPU's, and the ranks add up to the full layer") {
  int n_gemv = 0, n_grouped = 0, n_host = 0;
  for (const std::string &preset : testing::preset_names()) {
    auto model = Model::load(testing::tiny(preset), {});
    const ModelConfig &c = model->cfg;
    const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, H = c.hidden_size;
    // Every shard stays alive as long as the backends: the CUDA backend keys a layer's expert table by the
    // address of its expert vector.
    std::vector<std::vector<std::unique_ptr<ModelShard>>> shards;  // [ep index][rank]
    std::vector<int> eps;
    for (int ep : {2, 4}) {
      if (E % ep) continue;
      eps.push_back(ep);
      shards.emplace_back();
      for (int r = 0; r < ep; r++) {
        Mapping map;
        map.world = ep;
        map.rank = r;
        map.tp = 1;
        map.ep = ep;
        shards.back().push_back(std::make_unique<ModelShard>(ModelShard::bind(*model, map)));
      }
    }
    for (bool fp8 : {false, true}) {
      BackendOptions opt;
      opt.fp8_activations = fp8;
      auto g = make_backend(BackendKind::Cuda, opt), cpu = make_cpu_backend(opt);
      std::mt19937 rng(77);
      for (size_t l = 0; l < model->w.layers.size(); l++) {
        const LayerWeights &L = model->w.layers[l];
        if (!L.moe) continue;
        for (int64_t T : {1, 3, 8, 64, 300}) {
          CAPTURE(preset);
          CAPTURE(fp8);
          CAPTURE(l);
          CAPTURE(T);
          g->begin_step();
          cpu->begin_step();
          // The router's choices on random hidden states (the GPU's; both backends then get the same ids).
          const std::vector<float> x = randn(size_t(T * H), rng);
          std::vector<int32_t> ids;
          std::vector<float> w;
          route(*g, *model, L, x, T, ids, w);
          const MoePath want = expected_path(fp8, T, K, H, L.experts[0]);
          const bool quantised = want == MoePath::Grouped;
          (want == MoePath::Gemv ? n_gemv : want == MoePath::Grouped ? n_grouped : n_host)++;
          MoePath full_path;
          const std::vector<float> full = run_experts(*g, L.experts, x, ids, w, T, H, K, &full_path);
          CHECK_MESSAGE(full_path == want, "full layer took ", path_name(full_path), ", expected ", path_name(want));
          const double e_full = rel(full, run_experts(*cpu, L.experts, x, ids, w, T, H, K));
          CHECK_MESSAGE(e_full <= (quantised ? 2e-3 : 1e-5), "full layer vs CPU relative L2 ", e_full);
          for (size_t i = 0; i < eps.size(); i++) {
            const int ep = eps[i];
            CAPTURE(ep);
            std::vector<float> sumf(full.size(), 0.0f);
            for (int r = 0; r < ep; r++) {
              CAPTURE(r);
              const ModelShard &s = *shards[i][size_t(r)];
              const std::vector<FfnWeights> &experts = s.layers[l].experts;
              REQUIRE(experts.size() == size_t(E));
              MoePath path;
              const std::vector<float> yg = run_experts(*g, experts, x, ids, w, T, H, K, &path);
              const std::vector<float> yc = run_experts(*cpu, experts, x, ids, w, T, H, K);
              CHECK_MESSAGE(path == want, "rank took ", path_name(path), ", expected ", path_name(want));
              const double e = rel(yg, yc);
              CHECK_MESSAGE(e <= (quantised ? 2e-3 : 1e-5), "rank vs CPU relative L2 ", e);
              for (size_t j = 0; j < yg.size(); j++) sumf[j] += yg[j];

              // Every token picks only experts absent on this rank (K distinct ones of those outside its range):
              // exactly zero on both backends, on the same path.
              const Range mine = s.experts;
              std::vector<int32_t> away;
              for (int64_t e2 = 0; e2 < E; e2++)
                if (!mine.contains(e2)) away.push_back(int32_t(e2));
              REQUIRE(int64_t(away.size()) >= K);
              std::vector<int32_t> aid(size_t(T * K));
              for (int64_t t = 0; t < T; t++)
                for (int64_t k = 0; k < K; k++) aid[size_t(t * K + k)] = away[size_t((t + k) % int64_t(away.size()))];
              MoePath apath;
              const std::vector<float> zg = run_experts(*g, experts, x, aid, w, T, H, K, &apath);
              const std::vector<float> zc = run_experts(*cpu, experts, x, aid, w, T, H, K);
              CHECK_MESSAGE(apath == want, "rank (absent experts only) took ", path_name(apath), ", expected ", path_name(want));
              CHECK(zg == std::vector<float>(zg.size(), 0.0f));
              CHECK(zc == std::vector<float>(zc.size(), 0.0f));
            }
            const double e = rel(sumf, full);
            CHECK_MESSAGE(e <= 1e-5, "sum over ", ep, " ranks vs the full layer: relative L2 ", e);
          }
        }
      }
    }
  }
  MESSAGE("cases per path: GEMV " << n_gemv << ", grouped " << n_grouped << ", host reference " << n_host);
  CHECK(n_gemv > 0);
  CHECK(n_grouped > 0);
}

#endif

#if defined(DSRT_WITH_CUDA)
// Routed rows in FP8 (model/data_parallel.h): the CUDA backend quantises and dequantises rows bit for bit as the
// CPU does, says it takes FP8 exactly where moe_experts takes the grouped FP8 path, and that path gives the same
// output on the rows as they arrive (dequantised) as on the rows as they left: the receiver's GEMM rounds them
// to the same e4m3 values. Every tiny preset's MoE layers with FP8 experts, T = 3, 8 and 64.
TEST_CASE("routed rows in FP8: quantised as the CPU does, and the grouped FP8 layer gives the same output on them") {
  int checked = 0;
  for (const std::string &preset : testing::preset_names()) {
    auto model = Model::load(testing::tiny(preset), {});
    const ModelConfig &c = model->cfg;
    const int64_t K = c.num_experts_per_tok, H = c.hidden_size;
    BackendOptions opt;
    opt.fp8_activations = true;
    auto g = make_backend(BackendKind::Cuda, opt), cpu = make_cpu_backend(opt);
    std::mt19937 rng(5);
    for (const LayerWeights &L : model->w.layers) {
      if (!L.moe) continue;
      for (int64_t T : {3, 8, 64}) {
        CAPTURE(preset);
        CAPTURE(T);
        const MoePath path = expected_path(true, T, K, H, L.experts[0]);
        CHECK(g->moe_takes_fp8(L.experts, T, K) == (path == MoePath::Grouped));
        if (H % 128) continue;
        g->begin_step();
        cpu->begin_step();
        const std::vector<float> x = randn(size_t(T * H), rng);
        // Quantise and dequantise on both backends: the same codes, scales and values.
        auto roundtrip = [&](Backend &be, std::vector<uint8_t> &q, std::vector<float> &s) {
          Tensor tx = testing::put(be, x, T, H), tq = be.alloc(T, H, DType::F8_E4M3), ts = be.alloc(T, H / 128),
                 ty = be.alloc(T, H);
          be.quantize_fp8_rows(tx, tq, ts);
          be.dequantize_fp8_rows(tq, ts, ty);
          q.resize(size_t(T * H));
          be.to_host(tq, reinterpret_cast<float *>(q.data()));
          s = testing::get(be, ts);
          return testing::get(be, ty);
        };
        std::vector<uint8_t> qg, qc;
        std::vector<float> sg, sc;
        const std::vector<float> yg = roundtrip(*g, qg, sg), yc = roundtrip(*cpu, qc, sc);
        CHECK(qg == qc);
        CHECK(sg == sc);
        CHECK(yg == yc);
        if (path != MoePath::Grouped) continue;
        std::vector<int32_t> ids;
        std::vector<float> w;
        route(*g, *model, L, x, T, ids, w);
        const std::vector<float> left = run_experts(*g, L.experts, x, ids, w, T, H, K);
        const std::vector<float> arrived = run_experts(*g, L.experts, yg, ids, w, T, H, K);
        const double e = rel(arrived, left);
        CHECK_MESSAGE(e <= 1e-6, "grouped FP8 layer on the rows as they arrive vs as they left: relative L2 ", e);
        checked++;
      }
    }
  }
  MESSAGE(checked, " grouped FP8 layers run on rows that travelled in FP8");
  CHECK(checked > 0);
}
#endif
