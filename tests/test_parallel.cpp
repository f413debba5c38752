// Tensor and expert parallelism on the CPU (design.md §5): the Mapping's arithmetic and errors, the in-process
// communicator's collectives, the step's byte encoding, and whole models split over tp x ep in-process ranks
// against one rank (logits within 1e-5, the same greedy tokens), through the C API and the `dsrt` command.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "core/status.h"
#include "dist/communicator.h"
#include "dist/mapping.h"
#include "engine/engine.h"
#include "engine/load.h"
#include "engine/ranks.h"
#include "engine/step.h"
#include "helpers.h"
#include "model/config.h"
#include "model/model.h"
#include "model/placement.h"

using namespace testing;

namespace {

// Runs fn(rank) on world threads; rethrows the first failure.
void on_ranks(int world, const std::function<void(int)> &fn) {
  std::vector<std::thread> t;
  std::vector<std::string> errors(static_cast<size_t>(world));
  for (int r = 0; r < world; r++)
    t.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const std::exception &e) {
        errors[size_t(r)] = e.what();
      }
    });
  for (auto &x : t) x.join();
  for (int r = 0; r < world; r++) {
    CAPTURE(r);
    CHECK(errors[size_t(r)] == "");
  }
}

dsrt::Tensor host_tensor(std::vector<float> &v, int64_t rows, int64_t cols) {
  return {v.data(), dsrt::DType::F32, rows, cols, dsrt::Device::host()};
}

dsrt_status load(Loaded &l, const std::string &dir, int tp, int ep) {
  dsrt_engine_params p;
  dsrt_engine_params_init(&p, sizeof p);
  p.tp = tp;
  p.ep = ep;
  return load_cpu(l, dir, p);
}

// Logits of every prompt position, then n greedy tokens.
struct Output {
  std::vector<float> logits;
  std::vector<int32_t> greedy;
};

Output run_model(const std::string &dir, int tp, int ep, const std::vector<int32_t> &prompt, int n) {
  Loaded l;
  CHECK_OK(load(l, dir, tp, ep));
  Output o;
  o.logits = prompt_logits(l.e, prompt);
  dsrt_session *s = nullptr;
  CHECK_OK(dsrt_session_create(l.e, nullptr, &s));
  CHECK_OK(dsrt_session_append_tokens(s, prompt.data(), prompt.size()));
  dsrt_gen_params gp;
  dsrt_gen_params_init(&gp, sizeof gp, l.m);
  gp.temperature = 0;
  gp.max_new_tokens = n;
  gp.ignore_eos = 1;
  o.greedy = pull(s, &gp).tokens;
  dsrt_session_free(s);
  return o;
}

}  // namespace

TEST_CASE("Mapping: near-equal contiguous splits, rank layout, and errors that name the numbers") {
  using dsrt::Mapping;
  CHECK(Mapping::split(10, 3, 0).begin == 0);
  CHECK(Mapping::split(10, 3, 0).end == 4);
  CHECK(Mapping::split(10, 3, 1).begin == 4);
  CHECK(Mapping::split(10, 3, 2).end == 10);
  Mapping m{4, 3, 2, 2};
  CHECK(m.tp_rank() == 1);
  CHECK(m.ep_rank() == 1);
  CHECK(m.experts(64).begin == 32);
  CHECK(m.heads(8).begin == 4);
  auto err = [](const Mapping &x, const dsrt::ModelConfig *c) {
    try {
      if (c) x.check_divides(*c);
      else x.validate();
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_INVALID_ARGUMENT);
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(err({3, 0, 2, 2}, nullptr).find("tp 2 x ep 2 = 4 ranks, but the world has 3") != std::string::npos);
  CHECK(err({1, 0, 0, 1}, nullptr) != "");
  dsrt::ModelConfig c;
  c.num_attention_heads = 8;
  c.n_routed_experts = 32;
  c.intermediate_size = c.moe_intermediate_size = 64;
  c.vocab_size = 100;
  CHECK(err({3, 0, 3, 1}, &c).find("3 does not divide the model's 8 attention heads") != std::string::npos);
  CHECK(err({3, 0, 1, 3}, &c).find("3 does not divide the model's 32 routed experts") != std::string::npos);
  CHECK(err({4, 0, 2, 2}, &c) == "");
}

TEST_CASE("in-process communicator: every collective on 2 x 2 ranks") {
  auto comms = dsrt::make_local_group(2, 2);
  REQUIRE(comms.size() == 4);
  using G = dsrt::Communicator::Group;
  on_ranks(4, [&](int r) {
    dsrt::Communicator &c = *comms[size_t(r)];
    CHECK(c.mapping().rank == r);
    // all-reduce over the world: bitwise the same everywhere, the sum in rank order
    std::vector<float> x(37);
    for (size_t i = 0; i < x.size(); i++) x[i] = float(r + 1) * 0.1f + float(i);
    c.all_reduce_sum(host_tensor(x, 1, 37), G::World);
    for (size_t i = 0; i < x.size(); i++) {
      float want = 0;
      for (int k = 0; k < 4; k++) want += float(k + 1) * 0.1f + float(i);
      CHECK(x[i] == want);
    }
    // all-reduce over the tensor group: ranks {0,1} and {2,3}
    std::vector<float> y(5, float(r));
    c.all_reduce_sum(host_tensor(y, 5, 1), G::Tensor);
    CHECK(y[0] == float(r < 2 ? 0 + 1 : 2 + 3));
    // all-gather of columns within the tensor group: rank t contributes 1 + t columns
    const int t = c.mapping().tp_rank();
    std::vector<float> local(size_t(2 * (1 + t)), float(r)), all(2 * 3);
    c.all_gather_cols(host_tensor(local, 2, 1 + t), host_tensor(all, 2, 3), G::Tensor);
    const float first = float(r - t);
    CHECK(all == std::vector<float>{first, first + 1, first + 1, first, first + 1, first + 1});
    // all-to-all-v over the world: rank r sends k+1 rows of value 10r+k to rank k
    std::vector<int64_t> send_counts{1, 2, 3, 4}, recv_counts(4, r + 1);
    std::vector<float> send, recv(size_t(4 * (r + 1)));
    for (int k = 0; k < 4; k++)
      for (int j = 0; j <= k; j++) send.push_back(float(10 * r + k));
    c.all_to_all_v(host_tensor(send, 10, 1), send_counts, host_tensor(recv, 4 * (r + 1), 1), recv_counts, G::World);
    for (int k = 0; k < 4; k++)
      for (int j = 0; j <= r; j++) CHECK(recv[size_t(k * (r + 1) + j)] == float(10 * k + r));
    // broadcast of bytes from rank 0
    std::string msg = r == 0 ? std::string("step 7\0x", 8) : std::string();
    c.broadcast(msg, 0);
    CHECK(msg == std::string("step 7\0x", 8));
    c.barrier();
  });
}

TEST_CASE("in-process communicator: a failing rank wakes the others with an error instead of a hang") {
  auto comms = dsrt::make_local_group(3, 1);
  std::atomic<int> failed{0};
  std::vector<std::thread> t;
  for (int r = 0; r < 3; r++)
    t.emplace_back([&, r] {
      try {
        if (r == 2) {
          comms[2]->abort("rank 2: out of memory");
          return;
        }
        std::vector<float> x(4, 1.0f);
        comms[size_t(r)]->all_reduce_sum(host_tensor(x, 1, 4), dsrt::Communicator::Group::World);
      } catch (const dsrt::Error &e) {
        CHECK(std::string(e.what()).find("rank 2: out of memory") != std::string::npos);
        failed++;
      }
    });
  for (auto &x : t) x.join();
  CHECK(failed == 2);
}

TEST_CASE("a step is plain data: its encoding round-trips and corrupt bytes are refused") {
  dsrt::Step s;
  s.policy = dsrt::AttentionPolicy::Absorbed;
  s.batch.add_seq(3, 60, std::vector<int32_t>{7, 2}.data(), 2);
  s.batch.tokens = {5, 6, 7};
  s.batch.positions = {60, 61, 62};
  s.batch.add_seq(1, 0, std::vector<int32_t>{4}.data(), 1);
  s.batch.tokens.push_back(9);
  s.batch.positions.push_back(0);
  s.logit_rows = {2, 3};
  const std::string bytes = s.encode();
  const dsrt::Step d = dsrt::Step::decode(bytes);
  CHECK(d.batch.tokens == s.batch.tokens);
  CHECK(d.batch.positions == s.batch.positions);
  CHECK(d.batch.pages == std::vector<int32_t>{7, 2, 4});
  REQUIRE(d.batch.seqs.size() == 2);
  CHECK(d.batch.seqs[1].row0 == 3);
  CHECK(d.batch.seqs[1].page0 == 2);
  CHECK(d.logit_rows == s.logit_rows);
  CHECK(d.policy == s.policy);
  CHECK(d.encode() == bytes);
  // Every truncation, and single-byte changes that break the structure, are errors (never a crash).
  for (size_t n = 0; n < bytes.size(); n++) CHECK_THROWS_AS(dsrt::Step::decode(std::string_view(bytes).substr(0, n)), dsrt::Error);
  std::string bad = bytes;
  bad[bytes.size() - 8] = char(100);  // a logit row past the batch
  CHECK_THROWS_AS(dsrt::Step::decode(bad), dsrt::Error);
  dsrt::Step far = s;
  far.batch.seqs[0].n_past = 200;  // the page table does not reach the positions
  CHECK_THROWS_AS(dsrt::Step::decode(far.encode()), dsrt::Error);
}

// An MTP pass as plain data (MTP drafts with several ranks): the step with its hidden flag, and the input rows'
// segments round-trip; truncations, segments that do not fill the batch, and malformed segments are errors.
TEST_CASE("an MTP pass is plain data: its encoding round-trips and corrupt bytes are refused") {
  const int64_t H = 4;
  dsrt::MtpPass p;
  p.begin_step = true;
  p.step.hidden = true;
  p.step.batch.add_seq(3, 10, std::vector<int32_t>{1}.data(), 1);
  p.step.batch.tokens = {5, 6, 7};
  p.step.batch.positions = {10, 11, 12};
  p.step.logit_rows = {2};
  const std::vector<float> host = {1, 2, 3, 4, 5, 6, 7, 8};
  p.add_host(host.data(), 2, H);
  p.add_rows(dsrt::MtpPass::From::StepHidden, {4});
  p.add_rows(dsrt::MtpPass::From::Normed, {});  // (empty: no segment)
  CHECK(p.segments.size() == 2);
  CHECK(p.n_rows(H) == 3);
  const std::string bytes = p.encode();
  const dsrt::MtpPass d = dsrt::MtpPass::decode(bytes, H);
  CHECK(d.begin_step);
  CHECK(d.step.hidden);
  CHECK(d.step.batch.tokens == p.step.batch.tokens);
  REQUIRE(d.segments.size() == 2);
  CHECK(d.segments[0].from == dsrt::MtpPass::From::Host);
  CHECK(d.segments[0].host == host);
  CHECK(d.segments[1].from == dsrt::MtpPass::From::StepHidden);
  CHECK(d.segments[1].rows == std::vector<int32_t>{4});
  CHECK(d.encode() == bytes);
  for (size_t n = 0; n < bytes.size(); n++)
    CHECK_THROWS_AS(dsrt::MtpPass::decode(std::string_view(bytes).substr(0, n), H), dsrt::Error);
  CHECK_THROWS_AS(dsrt::MtpPass::decode(bytes, 3), dsrt::Error);  // 8 host floats are not rows of 3
  dsrt::MtpPass short_rows = p;
  short_rows.segments.pop_back();  // 2 input rows for a batch of 3
  CHECK_THROWS_AS(dsrt::MtpPass::decode(short_rows.encode(), H), dsrt::Error);
  dsrt::MtpPass negative = p;
  negative.segments[1].rows = {-1};
  CHECK_THROWS_AS(dsrt::MtpPass::decode(negative.encode(), H), dsrt::Error);
  dsrt::MtpPass mixed = p;
  mixed.segments[1].host = {1, 2, 3, 4};  // a row source with host floats
  CHECK_THROWS_AS(dsrt::MtpPass::decode(mixed.encode(), H), dsrt::Error);
}

// The batch tests/gpu/test_gpu_nccl.cpp once built: the prompt's rows appended, then add_seq, so the sequence
// started at row 80 of an 80-row batch. The CUDA backend's mla_cache_write then wrote cache slots 80..159 of an
// 80-entry host vector (320 bytes past it: glibc's "munmap_chunk(): invalid pointer" on the H200); the CPU
// backend read activations past the batch. A rank group now refuses such a step before any backend sees it,
// and stays usable: in one rank and in 1 x 2 in-process ranks (a refused step reaches no follower).
TEST_CASE("a rank group refuses a step whose sequence lies outside the batch, and keeps working") {
  auto model = dsrt::Model::load(tiny("v3-mini"), {});
  const int32_t V = int32_t(model->cfg.vocab_size);
  const auto prompt = prompt_tokens(V, 80);
  auto step_of = [&](bool rows_first) {
    dsrt::Step st;
    const int32_t pages[2] = {2, 0};
    if (!rows_first) st.batch.add_seq(80, 0, pages, 2);
    for (int32_t i = 0; i < 80; i++) {
      st.batch.tokens.push_back(prompt[size_t(i)]);
      st.batch.positions.push_back(i);
    }
    if (rows_first) st.batch.add_seq(80, 0, pages, 2);  // row0 = 80: past the batch
    st.logit_rows = {79};
    return st;
  };
  const dsrt::Step bad = step_of(true), good = step_of(false);
  REQUIRE(bad.batch.seqs[0].row0 == 80);
  try {
    bad.check(DSRT_ERR_INTERNAL, "test");
    FAIL("a sequence past the batch must be refused");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_INTERNAL);
    CHECK(std::string(e.what()).find("rows 80..160 of 80") != std::string::npos);
  }
  CHECK_THROWS_AS(dsrt::Step::decode(bad.encode()), dsrt::Error);
  good.check(DSRT_ERR_INTERNAL, "test");
  for (int ep : {1, 2}) {
    CAPTURE(ep);
    dsrt::RankGroup g(*model, 1, ep, [](int) { return dsrt::make_backend(dsrt::BackendKind::Cpu, {}); });
    std::vector<const dsrt::Weight *> used;
    for (const dsrt::Weight *w : model->w.all)
      if (w->data && model->placement.part.at(size_t(w->id)) != dsrt::Placement::Part::Mtp) used.push_back(w);
    g.for_each_backend([&](dsrt::Backend &be) { be.prepare_weights(model->device_weights, used, {}); });
    dsrt::KvCacheSpec spec;
    spec.n_layers = model->cfg.num_hidden_layers + int64_t(model->w.mtp.size());
    spec.width = model->cfg.kv_cache_width();
    spec.max_pages = 4;
    spec.dtype = dsrt::DType::F32;
    g.kv_init(spec);
    std::vector<float> logits(static_cast<size_t>(V), -1.0f);
    try {
      g.forward(bad, logits.data());
      FAIL("the rank group ran a step whose sequence lies outside the batch");
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_INTERNAL);
      CHECK(std::string(e.what()).find("rank group forward: a sequence lies outside the batch") != std::string::npos);
    }
    CHECK(logits == std::vector<float>(static_cast<size_t>(V), -1.0f));
    g.forward(good, logits.data());  // the group was not aborted: its followers take the next step
    bool finite = true;
    for (float x : logits) finite = finite && std::isfinite(x);
    CHECK(finite);
    CHECK(logits != std::vector<float>(static_cast<size_t>(V), -1.0f));
  }
}

TEST_CASE("placement: one device within its budget, routed experts beyond it in host memory, or an error naming the bytes") {
  auto model = dsrt::Model::load(tiny("v3-mini"), {});
  const auto gpu = std::vector<dsrt::Device>{dsrt::Device::cuda(0)};
  const dsrt::Placement all = dsrt::Placement::plan(model->w, gpu, uint64_t(1) << 30);
  REQUIRE(all.devices.size() == 1);
  CHECK(all.devices[0].routed_experts > 0);
  CHECK(all.devices[0].non_expert > 0);
  CHECK(all.devices[0].mtp > 0);
  for (int16_t w : all.where) CHECK(w == 0);
  CHECK(all.str().find("cuda:0") != std::string::npos);
  const uint64_t non_expert = all.devices[0].non_expert;
  try {
    dsrt::Placement::plan(model->w, gpu, non_expert / 2);
    FAIL("a budget below the non-expert weights must fail");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_OUT_OF_MEMORY);
    CHECK(std::string(e.what()).find("the non-expert weights need") != std::string::npos);
  }
  // A budget between the non-expert weights and the whole model: whole routed experts fill it, round robin
  // over the layers; the others stay in host memory (expert offload).
  const uint64_t experts = all.devices[0].routed_experts;
  const int64_t n_experts = all.devices[0].experts_on_device;
  CHECK(all.experts_in_host == 0);
  CHECK(all.host_bytes == 0);
  for (double share : {0.0, 0.3, 0.5, 0.99}) {
    CAPTURE(share);
    const dsrt::Placement some = dsrt::Placement::plan(model->w, gpu, non_expert + uint64_t(share * double(experts)));
    REQUIRE(some.devices.size() == 1);
    CHECK(some.devices[0].non_expert == non_expert);
    CHECK(some.devices[0].routed_experts <= uint64_t(share * double(experts)));
    CHECK(some.devices[0].routed_experts + some.host_bytes == experts);
    CHECK(some.devices[0].experts_on_device + some.experts_in_host == n_experts);
    CHECK(some.experts_in_host > 0);
    // Every layer holds the same number of experts on the device, give or take one.
    int64_t lo = INT64_MAX, hi = 0;
    for (const dsrt::LayerWeights &L : model->w.layers) {
      if (L.experts.empty()) continue;
      int64_t on = 0;
      for (const dsrt::FfnWeights &e : L.experts) {
        const int16_t g = some.where[size_t(e.gate.id)];
        CHECK(some.where[size_t(e.up.id)] == g);  // whole experts
        CHECK(some.where[size_t(e.down.id)] == g);
        CHECK(some.part[size_t(e.gate.id)] == dsrt::Placement::Part::RoutedExpert);
        on += g == 0;
      }
      lo = std::min(lo, on);
      hi = std::max(hi, on);
    }
    CHECK(hi - lo <= 1);
    for (const dsrt::Weight *w : model->w.all)  // nothing else leaves the device
      if (some.part[size_t(w->id)] != dsrt::Placement::Part::RoutedExpert) CHECK(some.where[size_t(w->id)] == 0);
    CHECK(some.str().find("read in place over PCIe") != std::string::npos);
  }
  CHECK_THROWS_AS(dsrt::Placement::plan(model->w, {dsrt::Device::cuda(0), dsrt::Device::cuda(1)}, 1 << 30), dsrt::Error);
  const dsrt::Placement host = dsrt::Placement::plan(model->w, {}, 0);
  CHECK(host.devices.empty());
  CHECK(host.host_bytes == non_expert + all.devices[0].routed_experts + all.devices[0].mtp);
}

// A device budget covers one engine's KV pool as well as the weights: the plan keeps the pool's bytes before
// placing routed experts (so it places those of a budget smaller by exactly them), a budget that cannot hold
// the non-expert weights and the pool is an error naming both, and an engine's pool stays within what was kept.
TEST_CASE("placement: a device budget keeps the KV pool's bytes before the routed experts") {
  auto model = dsrt::Model::load(tiny("v3-mini"), {});
  const auto gpu = std::vector<dsrt::Device>{dsrt::Device::cuda(0)};
  const dsrt::Placement all = dsrt::Placement::plan(model->w, gpu, uint64_t(1) << 30);
  const uint64_t non_expert = all.devices[0].non_expert, experts = all.devices[0].routed_experts;
  CHECK(all.devices[0].kv_pool == 0);
  const dsrt::KvCacheSpec spec = dsrt::kv_pool_spec(model->cfg, model->w, dsrt::DType::BF16);
  CHECK(spec.n_layers == model->cfg.num_hidden_layers + 1);  // v3-mini's MTP layer has its own cache layer
  CHECK(spec.max_pages * dsrt::kPageTokens == dsrt::default_kv_tokens(model->cfg));
  const uint64_t kv = spec.pool_bytes();
  REQUIRE(kv > 0);
  for (double share : {0.0, 0.3, 0.5, 1.0}) {
    CAPTURE(share);
    const uint64_t budget = non_expert + kv + uint64_t(share * double(experts));
    const dsrt::Placement with = dsrt::Placement::plan(model->w, gpu, budget, kv);
    const dsrt::Placement smaller = dsrt::Placement::plan(model->w, gpu, budget - kv);
    REQUIRE(with.devices.size() == 1);
    CHECK(with.devices[0].kv_pool == kv);
    CHECK(with.devices[0].budget == budget);
    CHECK(with.devices[0].non_expert == non_expert);
    CHECK(with.devices[0].routed_experts == smaller.devices[0].routed_experts);
    CHECK(with.devices[0].experts_on_device == smaller.devices[0].experts_on_device);
    CHECK(with.where == smaller.where);
    CHECK(non_expert + kv + with.devices[0].routed_experts <= budget);
    CHECK(with.devices[0].routed_experts + with.host_bytes == experts);
    if (share == 1.0) CHECK(with.experts_in_host == 0);
    CHECK(with.str().find("kept for the KV pool") != std::string::npos);
  }
  // Room for the non-expert weights but not for the pool too.
  for (uint64_t budget : {non_expert, non_expert + kv - 1}) {
    try {
      dsrt::Placement::plan(model->w, gpu, budget, kv);
      FAIL("a budget below the non-expert weights and the KV pool must fail");
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_OUT_OF_MEMORY);
      const std::string m = e.what();
      CAPTURE(m);
      CHECK(m.find("the non-expert weights need") != std::string::npos);
      CHECK(m.find("and the KV pool") != std::string::npos);
      CHECK(m.find("but the budget is") != std::string::npos);
    }
  }
  // plan_placement: a budget given keeps a default-sized BF16 pool; the error names the pool at load.
  const dsrt::Placement given = dsrt::plan_placement(model->cfg, model->w, gpu, non_expert + kv, 0);
  CHECK(given.devices[0].kv_pool == kv);
  CHECK(given.devices[0].experts_on_device == 0);
  CHECK(dsrt::plan_placement(model->cfg, model->w, {}, 1 << 30, 0).devices.empty());  // host memory: no reserve
  dsrt::LoadOptions lo;
  lo.devices = gpu;
  lo.device_memory = non_expert + kv / 2;
  try {
    dsrt::Model::load(tiny("v3-mini"), lo);
    FAIL("the load must fail");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_OUT_OF_MEMORY);
    CHECK(std::string(e.what()).find("KV pool") != std::string::npos);
  }
  // An engine's pool within the bytes kept for it (here a CPU engine, whose F32 pool takes twice the BF16
  // reserve's bytes per token): half the default tokens fit exactly; the default, or one page more than half,
  // does not; kv_memory_fraction is a share of the reserve.
  lo.device_memory = non_expert + kv + experts / 2;
  const auto placed = dsrt::Model::load(tiny("v3-mini"), lo);
  REQUIRE(placed->placement.devices.size() == 1);
  CHECK(placed->placement.devices[0].kv_pool == kv);
  auto engine = [&](int64_t max_tokens, double fraction = 0) {
    dsrt::EngineOptions eo;
    eo.max_tokens = max_tokens;
    eo.kv_memory_fraction = fraction;
    eo.backend.n_threads = 2;
    return std::make_shared<dsrt::Engine>(placed, nullptr, dsrt::make_cpu_backend(eo.backend), eo);
  };
  const int64_t half = dsrt::default_kv_tokens(placed->cfg) / 2;
  CHECK(engine(half)->capacity_tokens() == half);
  CHECK(engine(0, 0.25)->capacity_tokens() == half / 4);  // a quarter of the reserve, F32 pages
  for (int64_t too_many : {int64_t(0), half + dsrt::kPageTokens}) {
    CAPTURE(too_many);
    try {
      engine(too_many);
      FAIL("a KV pool larger than the reserve must fail");
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_OUT_OF_MEMORY);
      CHECK(std::string(e.what()).find("the device budget kept for it") != std::string::npos);
    }
  }
}

TEST_CASE("tp x ep in-process ranks equal one rank on every tiny preset") {
  struct Split {
    int tp, ep;
  };
  for (const std::string &preset : preset_names()) {
    CAPTURE(preset);
    const std::string dir = tiny(preset);
    Model m(dir);
    const auto prompt = prompt_tokens(m.vocab(), 21);
    const Output one = run_model(dir, 1, 1, prompt, 8);
    for (Split sp : {Split{2, 1}, Split{1, 2}, Split{2, 2}}) {
      CAPTURE(sp.tp);
      CAPTURE(sp.ep);
      const Output par = run_model(dir, sp.tp, sp.ep, prompt, 8);
      REQUIRE(par.logits.size() == one.logits.size());
      CHECK(rel_l2(par.logits.data(), one.logits.data(), one.logits.size()) <= 1e-5);
      CHECK(par.greedy == one.greedy);
    }
  }
}

TEST_CASE("a mapping that does not divide the model is DSRT_ERR_INVALID_ARGUMENT at engine creation") {
  Loaded l;
  CHECK(load(l, tiny("no-qlora"), 3, 1) == DSRT_ERR_INVALID_ARGUMENT);  // 4 heads
  CHECK(std::string(dsrt_last_error()).find("does not divide the model's 4 attention heads") != std::string::npos);
  Loaded l2;
  CHECK(load(l2, tiny("no-qlora"), 1, 3) == DSRT_ERR_INVALID_ARGUMENT);  // 8 experts
  CHECK(std::string(dsrt_last_error()).find("8 routed experts") != std::string::npos);
  Loaded l3;
  CHECK(load(l3, tiny("no-qlora"), 0, 1) == DSRT_ERR_INVALID_ARGUMENT);
}

TEST_CASE("dsrt eval and generate with --tp 2 --ep 2 match one rank (the command-line contract)") {
  const std::string dir = tiny("v3-mini");
  const fs::path d = fresh_dir("tp-cli");
  const std::string cli = DSRT_CLI_PATH, toks = "0,7,19,23,101,5,77,2";
  auto sh = [](const std::string &cmd) {
    std::string out;
    FILE *p = popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    CHECK(pclose(p) == 0);
    return out;
  };
  sh(cli + " eval --model " + dir + " --tokens " + toks + " --logits-out " + (d / "one.bin").string() + " --backend cpu 2>/dev/null");
  sh(cli + " eval --model " + dir + " --tokens " + toks + " --logits-out " + (d / "par.bin").string() +
     " --backend cpu --tp 2 --ep 2 2>/dev/null");
  auto read = [](const fs::path &p) {
    std::ifstream f(p, std::ios::binary);
    std::vector<char> b((std::istreambuf_iterator<char>(f)), {});
    std::vector<float> v(b.size() / 4);
    std::memcpy(v.data(), b.data(), v.size() * 4);
    return v;
  };
  const auto one = read(d / "one.bin"), par = read(d / "par.bin");
  REQUIRE(!one.empty());
  REQUIRE(one.size() == par.size());
  CHECK(rel_l2(par.data(), one.data(), one.size()) <= 1e-5);
  const std::string g1 = sh(cli + " generate --model " + dir + " --tokens " + toks + " -n 12 --backend cpu");
  const std::string g4 = sh(cli + " generate --model " + dir + " --tokens " + toks + " -n 12 --backend cpu --tp 2 --ep 2");
  const std::string g4m = sh(cli + " generate --model " + dir + " --tokens " + toks + " -n 12 --backend cpu --tp 2 --ep 2 --mtp");
  CHECK(g1.size() > 12);
  CHECK(g4 == g1);
  CHECK(g4m == g1);
}

// MTP drafts with tensor and expert parallelism: every rank runs the module's passes in lockstep with rank 0
// (RankGroup::mtp_forward), so the drafts, and the tokens, are one rank's.
TEST_CASE("MTP drafts on tp x ep in-process ranks: one rank's drafts and tokens") {
  auto model = dsrt::load_model(tiny("v3-mini"), {});
  const auto prompt = prompt_tokens(int32_t(model.model->cfg.vocab_size), 13);
  auto run = [&](int tp, int ep, int drafts) {
    std::vector<std::vector<int32_t>> seen;  // the module's drafts, as drafted
    std::mutex mu;
    dsrt::EngineOptions eo;
    eo.tp = tp;
    eo.ep = ep;
    eo.mtp_drafts = drafts;
    eo.backend.n_threads = 2;
    eo.mtp_draft_override = [&](const std::vector<int32_t> &seq, int32_t d) {
      std::lock_guard l(mu);
      std::vector<int32_t> v = seq;
      v.push_back(d);
      seen.push_back(v);
      return d;
    };
    auto e = std::make_shared<dsrt::Engine>(model.model, model.vocab, eo);
    CHECK(e->world() == tp * ep);
    CHECK(e->mtp_enabled() == (drafts > 0));
    auto s = e->create_session(0, false, 1);
    s->append(prompt.data(), prompt.size());
    dsrt::GenParams g;
    g.sampling.temperature = 0;
    g.max_new_tokens = 20;
    g.ignore_eos = true;
    s->start(g);
    std::vector<int32_t> out;
    for (;;) {
      const dsrt::Event ev = s->next();
      if (ev.token >= 0) out.push_back(ev.token);
      if (ev.done) break;
    }
    return std::make_pair(out, seen);
  };
  const auto plain = run(1, 1, 0), one = run(1, 1, 2), par = run(2, 2, 2);
  CHECK(one.first == plain.first);
  CHECK(par.first == plain.first);
  REQUIRE(!one.second.empty());
  CHECK(par.second == one.second);  // the same drafts, drafted at the same points
}

// A tensor-parallel rank on a GPU holds its parts of the checkpoint's tensors as tensors of their own
// (pack_weight): the same elements in a contiguous matrix with the part's own scale blocks.
TEST_CASE("weight parts: a packed part dequantises to the part's elements; FP8 parts must start on a scale block") {
  auto model = dsrt::Model::load(tiny("v3-mini"), {});
  const dsrt::Weight &gate = model->w.layers.at(0).dense.gate;  // FP8 [1024, 512]
  REQUIRE(gate.dtype == dsrt::DType::F8_E4M3);
  REQUIRE(gate.rows == 1024);
  REQUIRE(gate.cols == 512);
  auto same_elements = [](const dsrt::Weight &part) {
    const dsrt::PackedWeight p = dsrt::pack_weight(part);
    REQUIRE(p.data.size() == size_t(part.rows * part.cols) * dsrt::dtype_size(part.dtype));
    dsrt::Weight packed = part;  // the packed copy read as a whole tensor
    packed.data = p.data.data();
    packed.scale = p.scale.empty() ? nullptr : p.scale.data();
    packed.scale_cols = p.scale_cols;
    packed.row0 = packed.col0 = packed.ld = 0;
    packed.part = false;
    CHECK(packed.is_whole());
    std::vector<float> a(size_t(part.cols)), b(size_t(part.cols));
    for (int64_t r = 0; r < part.rows; r++) {
      part.dequant_row(r, 0, part.cols, a.data());
      packed.dequant_row(r, 0, part.cols, b.data());
      if (a != b) {
        FAIL_CHECK("row " << r << " differs");
        return;
      }
    }
  };
  const dsrt::Weight rows_part = gate.rows_part(256, 384), cols_part = gate.cols_part(128, 256);
  CHECK(rows_part.id == gate.id);  // a part keeps its tensor's id (device copies are keyed by it and the range)
  CHECK_FALSE(rows_part.is_whole());
  CHECK_FALSE(gate.rows_part(0, 512).is_whole());  // a prefix of the rows is a part too (its own device copy)
  CHECK(gate.rows_part(0, gate.rows).is_whole());
  same_elements(rows_part);
  same_elements(cols_part);
  same_elements(rows_part.cols_part(256, 256));
  same_elements(gate);
  const dsrt::PackedWeight p = dsrt::pack_weight(cols_part);
  CHECK(p.scale_cols == 2);
  CHECK(p.scale.size() == size_t(8 * 2));
  // A partial last block: partial-yarn's hidden size 320 (2.5 blocks) as the columns of its dense gate.
  auto py = dsrt::Model::load(tiny("partial-yarn"), {});
  const dsrt::Weight &pg = py->w.layers.at(0).dense.gate;
  REQUIRE(pg.cols == 320);
  same_elements(pg.cols_part(128, 192).rows_part(128, pg.rows - 128));
  // BF16 parts may start anywhere.
  auto bf = dsrt::Model::load(tiny("bf16"), {});
  same_elements(bf->w.head.rows_part(3, 101));
  // An FP8 part cut inside a block: refused, naming the tensor and the cut.
  for (const dsrt::Weight &bad : {gate.rows_part(64, 512), gate.cols_part(200, 100)}) {
    CHECK_FALSE(dsrt::fp8_block_cut(bad).empty());
    try {
      dsrt::pack_weight(bad);
      FAIL("an FP8 part cut inside a scale block must be refused");
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_UNSUPPORTED);
      CHECK(std::string(e.what()).find(gate.name()) != std::string::npos);
      CHECK(std::string(e.what()).find("FP8 scale block") != std::string::npos);
    }
  }
}

TEST_CASE("a rank's shard lists only its weights; GPU splits that cut FP8 blocks are refused before loading") {
  auto model = dsrt::Model::load(tiny("v3-mini"), {});
  const dsrt::ModelConfig &c = model->cfg;
  const int tp = 2, ep = 2;
  int64_t expert_elems = 0, whole_expert_elems = 0;
  for (const dsrt::LayerWeights &L : model->w.layers)
    for (const dsrt::FfnWeights &f : L.experts)
      for (const dsrt::Weight *w : {&f.gate, &f.up, &f.down}) whole_expert_elems += w->rows * w->cols;
  for (int r = 0; r < tp * ep; r++) {
    CAPTURE(r);
    const dsrt::Mapping map{tp * ep, r, tp, ep};
    const dsrt::ModelShard shard = dsrt::ModelShard::bind(*model, map);
    const auto ws = shard.weights(false), with_mtp = shard.weights(true);
    CHECK(with_mtp.size() > ws.size());  // v3-mini has an MTP layer
    std::set<const dsrt::Weight *> mine(ws.begin(), ws.end());
    CHECK(mine.size() == ws.size());
    CHECK(mine.count(&shard.embed) == 1);
    CHECK(mine.count(&shard.head) == 1);
    for (const dsrt::Weight *w : ws) CHECK(bool(*w));
    for (const dsrt::LayerWeights &L : shard.layers) {
      CHECK(L.q_b.rows == c.num_attention_heads / tp * c.qk_head_dim());
      for (size_t e = 0; e < L.experts.size(); e++) {
        const bool owned = shard.experts.contains(int64_t(e));
        CHECK(bool(L.experts[e].gate) == owned);
        if (owned)
          for (const dsrt::Weight *w : {&L.experts[e].gate, &L.experts[e].up, &L.experts[e].down}) {
            CHECK(mine.count(w) == 1);
            expert_elems += w->rows * w->cols;
          }
      }
    }
  }
  CHECK(expert_elems == whole_expert_elems);  // every routed expert's elements on exactly one rank
  // v3-mini's experts (intermediate 128) split at tp 2 fall inside a block: refused for GPUs, fine on the CPU
  // and for expert parallelism; BF16 splits anywhere.
  try {
    dsrt::check_gpu_split(dsrt::BackendKind::Cuda, *model, 2, 1);
    FAIL("tp 2 of v3-mini on GPUs must be refused");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_UNSUPPORTED);
    const std::string m = e.what();
    CAPTURE(m);
    CHECK(m.find("FP8 scale block") != std::string::npos);
    CHECK(m.find("experts") != std::string::npos);
  }
  CHECK_NOTHROW(dsrt::check_gpu_split(dsrt::BackendKind::Cpu, *model, 2, 1));
  CHECK_NOTHROW(dsrt::check_gpu_split(dsrt::BackendKind::Cuda, *model, 1, 4));
  CHECK_NOTHROW(dsrt::check_gpu_split(dsrt::BackendKind::Cuda, *dsrt::Model::load(tiny("bf16"), {}), 2, 1));
}
