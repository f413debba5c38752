// Routed experts on the host (runtime/backend/cpu/host_experts.h): equal to the CPU backend's moe_experts bit for
// bit (fp32 and FP8 activations; FP8, partial-block FP8 and BF16 experts), a chosen subset equal to moe_experts
// with the other experts absent, complementary subsets adding up to the whole, results independent of the
// thread count and of how rows are batched. And the offload cost model (runtime/backend/offload_cost.h) on
// hand-computed cases.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "backend/backend.h"
#include "backend/cpu/host_experts.h"
#include "backend/offload_cost.h"
#include "core/status.h"
#include "helpers.h"
#include "model/model.h"

using namespace dsrt;
using testing::tiny;

namespace {

// One MoE layer of a tiny checkpoint, a step of T random token rows and their routing by the layer's router.
struct Step {
  std::shared_ptr<Model> model;
  const LayerWeights *layer = nullptr;
  int64_t T = 0, H = 0, K = 0;
  std::vector<float> x, w;
  std::vector<int32_t> ids;

  Step(const std::string &preset, int64_t tokens, uint32_t seed) : T(tokens) {
    model = Model::load(tiny(preset), LoadOptions{});
    for (const LayerWeights &lw : model->w.layers)
      if (lw.moe && !layer) layer = &lw;
    REQUIRE(layer != nullptr);
    H = model->cfg.hidden_size;
    K = model->router.top_k;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    x.resize(size_t(T * H));
    for (float &v : x) v = nd(rng);
    BackendOptions bo;
    bo.n_threads = 2;
    auto be = make_cpu_backend(bo);
    be->begin_step();
    Tensor tx = be->alloc(T, H), tids = be->alloc(T, K, DType::I32), tw = be->alloc(T, K);
    std::copy(x.begin(), x.end(), tx.f32());
    be->moe_route(tx, layer->router, layer->router_bias, model->router, tids, tw);
    ids.assign(tids.i32(), tids.i32() + T * K);
    w.assign(tw.f32(), tw.f32() + T * K);
  }
  const std::vector<FfnWeights> &experts() const { return layer->experts; }
};

// CpuBackend::moe_experts on the step (with these experts, some perhaps absent).
std::vector<float> backend_experts(const Step &s, const std::vector<FfnWeights> &experts, bool fp8) {
  BackendOptions bo;
  bo.n_threads = 2;
  bo.fp8_activations = fp8;
  auto be = make_cpu_backend(bo);
  be->begin_step();
  Tensor tx = be->alloc(s.T, s.H), tids = be->alloc(s.T, s.K, DType::I32), tw = be->alloc(s.T, s.K), out = be->alloc(s.T, s.H);
  std::copy(s.x.begin(), s.x.end(), tx.f32());
  std::copy(s.ids.begin(), s.ids.end(), tids.i32());
  std::copy(s.w.begin(), s.w.end(), tw.f32());
  be->moe_experts(tx, experts, tids, tw, out);
  return std::vector<float>(out.f32(), out.f32() + s.T * s.H);
}

std::vector<float> host_experts(HostExperts &he, const Step &s, const uint8_t *on_cpu, bool fp8) {
  std::vector<float> out(size_t(s.T * s.H), NAN);
  he.run(s.x.data(), s.T, s.H, s.ids.data(), s.w.data(), s.K, s.experts(), on_cpu, fp8, out.data());
  return out;
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("host experts equal the CPU backend's moe_experts bit for bit, with fp32 and FP8 activations") {
  HostExperts he(3);
  // v3-mini: FP8, dims multiples of 128 (FP8 activations apply from 8 tokens); partial-yarn: FP8 with partial
  // blocks (activations stay fp32); bf16: BF16 experts.
  for (const char *preset : {"v3-mini", "partial-yarn", "bf16"})
    for (int64_t T : {1, 3, 8, 37}) {
      CAPTURE(preset);
      CAPTURE(T);
      const Step s(preset, T, uint32_t(T));
      for (bool fp8 : {false, true}) {
        CAPTURE(fp8);
        const std::vector<float> ref = backend_experts(s, s.experts(), fp8);
        CHECK(same_bits(host_experts(he, s, nullptr, fp8), ref));
      }
      int64_t used = 0;
      for (size_t e = 0; e < s.experts().size(); e++)
        if (std::count(s.ids.begin(), s.ids.end(), int32_t(e))) used += HostExperts::weight_bytes(s.experts()[e]);
      CHECK(he.last_weight_bytes() == used);
    }
  // The FP8 mode is exercised: from 8 tokens on v3-mini the activations are rounded and the result moves.
  const Step s("v3-mini", 8, 99);
  CHECK(!same_bits(host_experts(he, s, nullptr, true), host_experts(he, s, nullptr, false)));
}

TEST_CASE("host experts: a chosen subset equals moe_experts without the others; complementary subsets add up") {
  HostExperts he(2);
  for (bool fp8 : {false, true}) {
    CAPTURE(fp8);
    const Step s("v3-mini", 12, 7);
    const size_t E = s.experts().size();
    std::mt19937 rng(3);
    std::vector<uint8_t> mask(E), rest(E);
    for (size_t e = 0; e < E; e++) mask[e] = uint8_t(rng() & 1), rest[e] = uint8_t(!mask[e]);
    std::vector<FfnWeights> only = s.experts();
    for (size_t e = 0; e < E; e++)
      if (!mask[e]) only[e] = FfnWeights{};  // absent, as another rank's expert
    const std::vector<float> a = host_experts(he, s, mask.data(), fp8);
    CHECK(same_bits(a, backend_experts(s, only, fp8)));
    const std::vector<float> b = host_experts(he, s, rest.data(), fp8);
    const std::vector<float> whole = host_experts(he, s, nullptr, fp8);
    // Tolerance: a + b adds a token's K terms in another order than the whole does, which moves the fp32 sum by a
    // few ulps of the terms; 1e-5 of the row's largest |a|, |b| or |whole| is well above that and far below a
    // missing or doubled expert.
    double worst = 0;
    int64_t nonzero_a = 0, nonzero_b = 0;
    for (int64_t t = 0; t < s.T; t++) {
      double mag = 0;
      for (int64_t j = 0; j < s.H; j++) {
        const size_t i = size_t(t * s.H + j);
        mag = std::max({mag, double(std::fabs(a[i])), double(std::fabs(b[i])), double(std::fabs(whole[i]))});
        nonzero_a += a[i] != 0, nonzero_b += b[i] != 0;
      }
      for (int64_t j = 0; j < s.H; j++) {
        const size_t i = size_t(t * s.H + j);
        worst = std::max(worst, std::fabs(double(a[i]) + double(b[i]) - double(whole[i])) / mag);
      }
    }
    CHECK(worst <= 1e-5);
    CHECK(nonzero_a > 0);  // both halves did work
    CHECK(nonzero_b > 0);
    // Nothing chosen: zeros.
    std::vector<uint8_t> none(E, 0);
    const std::vector<float> z = host_experts(he, s, none.data(), fp8);
    CHECK(std::count(z.begin(), z.end(), 0.0f) == int64_t(z.size()));
    CHECK(he.last_weight_bytes() == 0);
  }
}

TEST_CASE("host experts: the same bits whatever the thread count, and across row batches") {
  const Step s("v3-mini", 37, 5);
  HostExperts one(1);
  for (bool fp8 : {false, true}) {
    const std::vector<float> ref = host_experts(one, s, nullptr, fp8);
    for (int threads : {2, 3, 5, 8}) {
      CAPTURE(threads);
      CAPTURE(fp8);
      HostExperts he(threads);
      CHECK(same_bits(host_experts(he, s, nullptr, fp8), ref));
    }
  }
  // 520 tokens all on experts 0..7: each expert's 520 rows exceed a batch (512) and are computed in two pieces.
  Step big("v3-mini", 520, 6);
  for (int64_t t = 0; t < big.T; t++)
    for (int64_t k = 0; k < big.K; k++) big.ids[size_t(t * big.K + k)] = int32_t((k + t) % 8);
  HostExperts he(3);
  CHECK(same_bits(host_experts(he, big, nullptr, true), backend_experts(big, big.experts(), true)));
}

TEST_CASE("host experts: an expert id outside the layer is an internal error") {
  Step s("no-qlora", 2, 1);
  s.ids[1] = int32_t(s.experts().size());
  HostExperts he(2);
  std::vector<float> out(size_t(s.T * s.H));
  CHECK_THROWS_AS(he.run(s.x.data(), s.T, s.H, s.ids.data(), s.w.data(), s.K, s.experts(), nullptr, false, out.data()), Error);
}

TEST_CASE("host experts: the measured arithmetic rate is a CPU's (0.1-100 TFLOP/s)") {
  HostExperts he(2);
  const double flops = he.measure_flops();
  MESSAGE("HostExperts compute-bound rate, 2 threads: ", flops / 1e9, " GFLOP/s");
  CHECK(flops > 1e8);
  CHECK(flops < 1e14);
}

// ---- the cost model. Rates in round numbers (bytes 1000 over 1000 B/s = 1 s), so the sums are exact.

namespace {
using offload::CpuMode;
using offload::ExpertNeed;
using offload::Place;

ExpertNeed need(int64_t bytes, int64_t rows = 1, bool cached = false, int64_t macs = 0) {
  ExpertNeed n;
  n.bytes = bytes;
  n.rows = rows;
  n.cached = cached;
  n.macs_per_row = macs;
  return n;
}
offload::Rates rates(double pcie, double cpu) {
  offload::Rates r;
  r.pcie = pcie;
  r.cpu_bytes = cpu;
  return r;
}
}  // namespace

TEST_CASE("offload cost: misses split between PCIe and the CPU, hits stay, the longest queue is the step") {
  // Copy 1 s each, CPU 0.25 s each: the CPU takes three (0.25, 0.5, 0.75), the fourth ties (1.0 vs 1.0) and is
  // copied; the cached one stays.
  std::vector<ExpertNeed> n = {need(1000), need(1000), need(1000, 1, true), need(1000), need(1000)};
  offload::Plan p = offload::plan_experts(n, rates(1000, 4000));
  CHECK(p.place == std::vector<Place>{Place::Cpu, Place::Cpu, Place::Hit, Place::Cpu, Place::Copy});
  CHECK(p.cpu_s == 0.75);
  CHECK(p.pcie_s == 1.0);
  CHECK(p.step_s == 1.0);
  // The GPU's own work longer than both queues sets the step.
  offload::Rates r = rates(1000, 4000);
  r.gpu = 2.5;
  CHECK(offload::plan_experts(n, r).step_s == 2.5);
  // Largest first: sizes 3, 1, 1, 1 at equal rates go 3 -> copy (tie), then the 1s to the CPU until it would pass
  // 3: both queues end at 3 (smallest first would end at 4 or more).
  n = {need(1000), need(3000), need(1000), need(1000)};
  p = offload::plan_experts(n, rates(1000, 1000));
  CHECK(p.place == std::vector<Place>{Place::Cpu, Place::Copy, Place::Cpu, Place::Cpu});
  CHECK(p.pcie_s == 3.0);
  CHECK(p.cpu_s == 3.0);
}

TEST_CASE("offload cost: rows cost CPU arithmetic, a fixed CPU cost, and the modes") {
  // Bandwidth 1 s per expert on both; 1000 flop/s and 500 multiply-adds a row: 1 s per row. A 4-row expert costs
  // the CPU max(1, 4) = 4 s, a 1-row expert 1 s. More rows first: the 4-row one is copied (1 s < 4 s), then the
  // 1-row one goes to the CPU (1 s < 2 s).
  offload::Rates r = rates(1000, 1000);
  r.cpu_flops = 1000;
  std::vector<ExpertNeed> n = {need(1000, 1, false, 500), need(1000, 4, false, 500)};
  CHECK(offload::cpu_seconds(n[1], r) == 4.0);
  CHECK(offload::cpu_seconds(n[0], r) == 1.0);
  offload::Plan p = offload::plan_experts(n, r);
  CHECK(p.place == std::vector<Place>{Place::Cpu, Place::Copy});
  CHECK(p.step_s == 1.0);
  // A fixed cost of 0.5 s for waking the CPU: one small miss is cheaper to copy.
  r = rates(1000, 2000);
  r.cpu_overhead = 0.5;
  p = offload::plan_experts({need(1000)}, r);  // CPU 0.5 + 0.5 = 1.0 ties the copy: copied
  CHECK(p.place == std::vector<Place>{Place::Copy});
  p = offload::plan_experts({need(1000), need(1000)}, r);  // the second one: CPU 1.0 < PCIe 2.0
  CHECK(p.place == std::vector<Place>{Place::Copy, Place::Cpu});
  CHECK(p.cpu_s == 1.0);
  // --experts-on-cpu: everything on the CPU, hits too; never-CPU: every miss copied.
  n = {need(1000), need(1000, 1, true), need(2000)};
  p = offload::plan_experts(n, rates(1000, 4000), CpuMode::All);
  CHECK(p.place == std::vector<Place>{Place::Cpu, Place::Cpu, Place::Cpu});
  CHECK(p.cpu_s == 1.0);
  CHECK(p.pcie_s == 0.0);
  p = offload::plan_experts(n, rates(1000, 4000), CpuMode::Never);
  CHECK(p.place == std::vector<Place>{Place::Copy, Place::Hit, Place::Copy});
  CHECK(p.pcie_s == 3.0);
  CHECK(p.cpu_s == 0.0);
  // A missing rate sends everything to the other queue.
  p = offload::plan_experts(n, rates(0, 4000));
  CHECK(p.place == std::vector<Place>{Place::Cpu, Place::Hit, Place::Cpu});
  p = offload::plan_experts(n, rates(1000, 0));
  CHECK(p.place == std::vector<Place>{Place::Copy, Place::Hit, Place::Copy});
}
