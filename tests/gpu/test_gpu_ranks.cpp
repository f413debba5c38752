// Tensor- and expert-parallel ranks on the CUDA backend, on one GPU: every rank a backend of its own on device
// 0 and a thread, their collectives through host memory (dist/host_staged_communicator.h; NCCL refuses two
// ranks on one device). What this checks is the GPU side of a split: each rank uploading only its shard, parts
// of FP8 tensors as device tensors of their own with their own scale blocks (pack_weight), the kernels on a
// rank's heads, FFN columns, experts and vocabulary rows. With fp32 activations and an F32 latent cache (the
// fp32 attention kernels) the ranks must equal one rank within 1e-5 per step, as the CPU's in-process ranks do
// (tests/test_parallel.cpp). With the GPU's BF16 cache the attention rounds its operands to BF16, a
// discontinuous function: the ~1e-7 differences of a split (partial sums meeting in another order) flip last
// bits there, so those runs are held to 1e-3. Measured on the H200: F32 cache <= 2.9e-7 for every split; BF16
// cache 2.1e-4 at tp 2 on v3-mini-tp, 7.6e-7 on bf16, <= 6.5e-7 for expert parallelism.
#include <doctest/doctest.h>

#if defined(DSRT_WITH_CUDA)

#include <algorithm>
#include <set>
#include <tuple>

#include "../helpers.h"
#include "backend/backend.h"
#include "dist/host_staged_communicator.h"
#include "engine/ranks.h"
#include "engine/step.h"
#include "model/shard.h"
#include "model/model.h"
#include "tiny_model.h"

using namespace dsrt;

namespace {

// v3-mini with routed and shared experts of 256 columns, so that tp 2 cuts every FP8 tensor on a 128 block
// (v3-mini's 128-column experts split into 64: refused on GPUs, see check_gpu_split).
std::string tp_friendly_v3_mini() {
  static const std::string dir = [] {
    tools::TinyPreset p = *tools::find_tiny_preset("v3-mini");
    p.name = "v3-mini-tp";
    p.config["moe_intermediate_size"] = 256;
    const std::string d = (testing::temp_root() / "tiny-v3-mini-tp").string();
    tools::make_tiny_model(p, d, 1);
    return d;
  }();
  return dir;
}

// Logits of the last prompt row, then of three decode steps (greedy from the previous step's logits: the
// same tokens on both sides as long as they agree), through a rank group as the engine drives it.
// The device bytes a rank group on one GPU should hold: every rank's shard once (ranks sharing a GPU share the
// copies of the tensors they both hold whole), as the checkpoint counts them (FP8 scales included).
uint64_t shard_bytes(const Model &model, int tp, int ep) {
  std::set<std::tuple<int32_t, int64_t, int64_t, int64_t, int64_t>> seen;
  uint64_t bytes = 0;
  for (int r = 0; r < tp * ep; r++) {
    const ModelShard shard = ModelShard::bind(model, Mapping{tp * ep, r, tp, ep});
    for (const Weight *w : shard.weights(false)) {
      const bool whole = w->is_whole();
      if (!seen.insert({w->id, whole ? -1 : w->row0, whole ? -1 : w->col0, w->rows, w->cols}).second) continue;
      bytes += uint64_t(w->rows * w->cols) * dtype_size(w->dtype);
      if (w->dtype == DType::F8_E4M3) bytes += uint64_t((w->rows + 127) / 128 * ((w->cols + 127) / 128)) * 4;
    }
  }
  return bytes;
}

std::vector<float> run(const std::string &dir, int tp, int ep, bool fp8_activations, DType kv = DType::BF16) {
  auto loaded = Model::load(dir, {});  // (its own device store: what this group uploads, and nothing else)
  const Model &model = *loaded;
  RankGroup g(model, tp, ep, [&](int) {
    BackendOptions o;
    o.device = 0;
    o.fp8_activations = fp8_activations;
    return make_backend(BackendKind::Cuda, o);
  }, [&](const std::vector<Backend *> &bes) { return make_host_staged_local_group(tp, ep, bes); });
  g.for_each_rank([&](Backend &be, const ModelShard &shard) {
    be.prepare_weights(model.device_weights, shard.weights(false), {});
  });
  const auto usage = model.device_weights.usage();  // each rank uploaded its shard only
  REQUIRE(usage.size() == 1);
  CHECK(usage[0].second == shard_bytes(model, tp, ep));
  CHECK(usage[0].second == shard_bytes(model, 1, 1));  // on one GPU the ranks' shards together are the model once
  KvCacheSpec spec;
  spec.n_layers = model.cfg.num_hidden_layers + int64_t(model.w.mtp.size());
  spec.width = model.cfg.kv_cache_width();
  spec.max_pages = 4;
  spec.dtype = kv;
  g.kv_init(spec);
  const int32_t V = int32_t(model.cfg.vocab_size);
  const auto prompt = testing::prompt_tokens(V, 70);
  std::vector<float> all;
  int32_t next = 0;
  for (int step = 0; step < 4; step++) {
    Step st;
    const int32_t n_past = step ? 70 + step - 1 : 0, n_new = step ? 1 : 70;
    const int32_t pages[2] = {2, 0};
    st.batch.add_seq(n_new, n_past, pages, 2);
    for (int32_t i = 0; i < n_new; i++) {
      st.batch.tokens.push_back(step ? next : prompt[size_t(i)]);
      st.batch.positions.push_back(n_past + i);
    }
    st.logit_rows = {n_new - 1};
    std::vector<float> l(static_cast<size_t>(V));
    g.forward(st, l.data());
    next = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
    all.insert(all.end(), l.begin(), l.end());
  }
  return all;
}

}  // namespace

TEST_CASE("tensor- and expert-parallel ranks sharing one GPU equal one rank (host-staged collectives)") {
  struct Case {
    std::string dir;
    std::vector<std::pair<int, int>> splits;  // (tp, ep)
  };
  std::vector<Case> cases = {
      {tp_friendly_v3_mini(), {{2, 1}, {2, 2}, {1, 4}}},
      {testing::tiny("bf16"), {{2, 1}, {2, 2}, {1, 2}}},
  };
  for (const std::string &preset : testing::preset_names())
    if (preset != "bf16") cases.push_back({testing::tiny(preset), {{1, 2}}});  // expert parallelism everywhere
  for (const Case &c : cases) {
    CAPTURE(c.dir);
    auto model = Model::load(c.dir, {});  // (config and split checks; each run loads its own)
    for (DType kv : {DType::F32, DType::BF16}) {
      const std::string kv_name = dtype_name(kv);
      CAPTURE(kv_name);
      const auto one = run(c.dir, 1, 1, false, kv);
      for (auto [tp, ep] : c.splits) {
        if (model->cfg.n_routed_experts % ep) continue;
        CAPTURE(tp);
        CAPTURE(ep);
        check_gpu_split(BackendKind::Cuda, *model, tp, ep);  // (these splits are allowed)
        const auto par = run(c.dir, tp, ep, false, kv);
        REQUIRE(par.size() == one.size());
        const size_t V = one.size() / 4;
        double worst = 0;
        for (size_t s = 0; s < 4; s++) worst = std::max(worst, testing::rel_l2(par.data() + s * V, one.data() + s * V, V));
        MESSAGE("tp ", tp, " x ep ", ep, " on one GPU vs one rank, ", kv_name, " cache: worst relative L2 per step ", worst);
        CHECK(worst <= (kv == DType::F32 ? 1e-5 : 1e-3));
      }
    }
  }
}

// With FP8 activations a rank quantises its own inputs per 128 channels, as one rank does (its parts start on
// channel blocks), but the partial sums meet in another order and FP8 rounding is discontinuous, so the
// ranks are held to the tolerance the GPU's FP8 path keeps against the CPU (test_gpu.cpp) rather than 1e-5.
TEST_CASE("tensor-parallel ranks sharing one GPU with FP8 activations stay within the FP8 tolerance of one rank") {
  const auto one = run(tp_friendly_v3_mini(), 1, 1, true), par = run(tp_friendly_v3_mini(), 2, 1, true);
  REQUIRE(par.size() == one.size());
  const size_t V = one.size() / 4;
  double worst = 0;
  for (size_t s = 0; s < 4; s++) worst = std::max(worst, testing::rel_l2(par.data() + s * V, one.data() + s * V, V));
  MESSAGE("tp 2 with FP8 activations vs one rank: worst relative L2 per step ", worst);
  CHECK(worst <= 3e-2);
}

// Data-parallel attention on GPU ranks sharing one GPU: three sequences, two on rank 0's pool and one on rank
// 1's (pages 4..7 of rank 0's pool are rank 1's 0..3), a prefill then decode steps, the last two with rank 1's
// sequence done (rank 1 then has no rows and serves its experts only). One rank runs the same pages as one
// pool of 8. The routed rows cross the ranks through the host-staged all-to-all; kernels as on one rank.
// fp8: FP8 activations (the routed rows then travel in FP8 where the receivers' grouped GEMMs take them);
// *fp8_rows_moved: calls of dequantize_fp8_rows on every rank.
std::vector<float> run_dp(const std::string &dir, int ep, DType kv, bool fp8 = false, int64_t *fp8_rows_moved = nullptr) {
  auto loaded = Model::load(dir, {});
  const Model &model = *loaded;
  const bool dp = ep > 1;
  RankGroup g(model, 1, ep, [&](int) {
    BackendOptions o;
    o.device = 0;
    o.fp8_activations = fp8;
    return make_backend(BackendKind::Cuda, o);
  }, [&](const std::vector<Backend *> &bes) { return make_host_staged_local_group(1, ep, bes); }, dp);
  if (fp8_rows_moved) g.for_each_backend([](Backend &be) { be.set_profiling(true); });
  g.for_each_rank([&](Backend &be, const ModelShard &shard) {
    be.prepare_weights(model.device_weights, shard.weights(false), {});
  });
  KvCacheSpec spec;
  spec.n_layers = model.cfg.num_hidden_layers + int64_t(model.w.mtp.size());
  spec.width = model.cfg.kv_cache_width();
  spec.max_pages = dp ? 4 : 8;
  spec.dtype = kv;
  g.kv_init(spec);
  const int32_t V = int32_t(model.cfg.vocab_size);
  const auto prompt = testing::prompt_tokens(V, 70);
  const std::vector<std::vector<int32_t>> pages = {{2, 0}, {5, 7}, {1, 3}};
  const int32_t len[3] = {70, 40, 9};
  std::vector<float> all;
  int32_t next[3] = {0, 0, 0};
  for (int step = 0; step < 5; step++) {
    Step st;
    st.batch.rank_pages = dp ? 4 : 0;
    for (int q = 0; q < 3; q++) {
      if (q == 1 && step >= 3) continue;  // rank 1's sequence is done
      const int32_t n_past = step ? len[q] + step - 1 : 0, n_new = step ? 1 : len[q];
      st.batch.add_seq(n_new, n_past, pages[size_t(q)].data(), 2);
      for (int32_t i = 0; i < n_new; i++) {
        st.batch.tokens.push_back(step ? next[q] : prompt[size_t(i + q)]);
        st.batch.positions.push_back(n_past + i);
      }
      st.logit_rows.push_back(int32_t(st.batch.tokens.size()) - 1);
    }
    std::vector<float> l(st.logit_rows.size() * size_t(V));
    g.forward(st, l.data());
    for (size_t k = 0, q = 0; k < st.logit_rows.size(); k++, q++) {
      if (q == 1 && step >= 3) q++;
      next[q] = int32_t(std::max_element(l.begin() + k * V, l.begin() + (k + 1) * V) - (l.begin() + k * V));
    }
    all.insert(all.end(), l.begin(), l.end());
  }
  if (fp8_rows_moved) {
    *fp8_rows_moved = 0;
    g.for_each_backend([&](Backend &be) {
      for (const OpTime &t : be.op_times())
        if (t.op == "dequantize_fp8_rows") *fp8_rows_moved += t.calls;
    });
  }
  return all;
}

TEST_CASE("data-parallel attention on GPU ranks sharing one GPU equals one rank (host-staged all-to-all)") {
  for (const std::string &dir : {testing::tiny("v3-mini"), testing::tiny("bf16")}) {
    CAPTURE(dir);
    for (DType kv : {DType::F32, DType::BF16}) {
      const std::string kv_name = dtype_name(kv);
      CAPTURE(kv_name);
      const auto one = run_dp(dir, 1, kv);
      for (int ep : {2, 4}) {
        CAPTURE(ep);
        const auto par = run_dp(dir, ep, kv);
        REQUIRE(par.size() == one.size());
        const double err = testing::rel_l2(par.data(), one.data(), one.size());
        MESSAGE("data-parallel attention, ep ", ep, " on one GPU vs one rank, ", kv_name, " cache: relative L2 ", err);
        CHECK(err <= (kv == DType::F32 ? 1e-5 : 1e-3));
      }
    }
  }
}

// FP8 activations: the prefill's routed rows (every receiver gets >= 8) travel in FP8, the decode steps' (3
// tokens) in fp32, as the receivers' GEMMs take them. The rows' FP8 round trip itself changes nothing the
// grouped layer computes (test_gpu_moe_ep.cpp); what differs from one rank is each rank's GEMMs over fewer
// rows (other tile choices, other sum orders), which v3-mini under FP8 activations amplifies as it does tp 2's
// (3e-2 above; the first run of this test measured 7.3e-3).
TEST_CASE("data-parallel attention with FP8 activations on GPU ranks: routed rows in FP8, one rank's logits") {
  const std::string dir = testing::tiny("v3-mini");
  const auto one = run_dp(dir, 1, DType::F32, true);
  int64_t moved = 0;
  const auto par = run_dp(dir, 2, DType::F32, true, &moved);
  REQUIRE(par.size() == one.size());
  const double err = testing::rel_l2(par.data(), one.data(), one.size());
  MESSAGE("data-parallel attention with FP8 activations, ep 2 on one GPU vs one rank: relative L2 ", err, "; ",
          moved, " FP8 row exchanges dequantised");
  CHECK(moved > 0);
  CHECK(err <= 3e-2);
}

#endif  // DSRT_WITH_CUDA
