// Sampling on the GPU (kernels/sampling.cu through CudaBackend::sample_rows) against the CPU sampler
// (engine/sampler.h): greedy rows token for token (ties, -inf masks, V3's 129,280-wide rows, batches of 1, 8 and
// 64), seeded rows token for token for the same u under every filter combination (a token may differ only where
// u lies within rounding of a boundary of the CPU's cumulative distribution, which is checked, not assumed),
// the sampler's errors with the CPU's codes and texts, draws of tied logits following the CPU's distribution,
// and end to end: a CUDA engine sampling on the device emits the tokens of the same engine sampling on the host,
// and its greedy tokens are the CPU engine's argmax wherever the CPU's top two logits are apart.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <thread>

#include "../forwarding_backend.h"
#include "../helpers.h"
#include "backend/backend.h"
#include "core/status.h"
#include "engine/engine.h"
#include "engine/load.h"
#include "engine/sampler.h"

using namespace dsrt;

namespace {

constexpr int64_t kV3Vocab = 129280;

std::unique_ptr<Backend> cuda() { return make_backend(BackendKind::Cuda, {}); }

struct Row {
  std::vector<float> logits;
  SamplingParams p;
  std::vector<int32_t> hist, banned;
  double u = 0;
};

// Rows through the CUDA op, and the CPU sampler's answer (token, or status and text) for each.
struct Compared {
  std::vector<SampleResult> gpu, cpu;
};
Compared compare(Backend &be, const std::vector<Row> &rows, int64_t V) {
  be.begin_step();
  Tensor t = be.alloc(int64_t(rows.size()), V);
  std::vector<float> all;
  all.reserve(rows.size() * size_t(V));
  for (const Row &r : rows) all.insert(all.end(), r.logits.begin(), r.logits.end());
  be.from_host(t, all.data());
  std::vector<SampleRequest> req;
  Compared c;
  for (size_t i = 0; i < rows.size(); i++) {
    const Row &r = rows[i];
    SampleRequest q;
    q.row = int32_t(i);
    q.params = &r.p;
    q.history = r.hist.data();
    q.n_history = r.hist.size();
    q.banned = &r.banned;
    q.u = r.u;
    req.push_back(q);
    SampleResult s;
    try {
      s.token = sample_token_with(r.logits.data(), V, r.p, r.hist.data(), r.hist.size(), r.banned, r.u);
    } catch (const Error &e) {
      s.status = e.code();
      s.error = e.what();
    }
    c.cpu.push_back(s);
  }
  c.gpu = be.sample_rows(t, req);
  REQUIRE(c.gpu.size() == rows.size());
  return c;
}

// Where u sits in the CPU's cumulative distribution (ids ascending, as the sampler walks): the distance from u
// to the nearest boundary between two drawable ids. A GPU token that differs from the CPU's is accepted only
// when this is below what double sums in another order can move (1e-10: n * eps for 129,280 terms is 1.4e-11).
double boundary_distance(const Row &r, int64_t V) {
  const auto prob = sampling_distribution(r.logits.data(), V, r.p, r.hist.data(), r.hist.size(), r.banned);
  double acc = 0, best = 1;
  for (double q : prob) {
    if (q <= 0) continue;
    acc += q;
    best = std::min(best, std::fabs(acc - r.u));
  }
  return best;
}

// One logits row on the device and one request per u, all reading that row: the GPU's draws.
std::vector<int32_t> gpu_draws(Backend &be, const Row &base, int64_t V, const std::vector<double> &us) {
  be.begin_step();
  Tensor t = be.alloc(1, V);
  be.from_host(t, base.logits.data());
  std::vector<SampleRequest> req(us.size());
  for (size_t i = 0; i < us.size(); i++) {
    req[i].row = 0;
    req[i].params = &base.p;
    req[i].history = base.hist.data();
    req[i].n_history = base.hist.size();
    req[i].banned = &base.banned;
    req[i].u = us[i];
  }
  const auto got = be.sample_rows(t, req);
  std::vector<int32_t> v;
  for (const SampleResult &r : got) {
    REQUIRE(r.status == DSRT_OK);
    v.push_back(r.token);
  }
  return v;
}

std::vector<float> normal_row(int64_t V, std::mt19937 &rng, float sd) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> v(static_cast<size_t>(V));
  for (auto &x : v) x = nd(rng);
  return v;
}
std::vector<float> coarse_row(int64_t V, std::mt19937 &rng, int levels) {
  std::uniform_int_distribution<int> d(-levels, levels);
  std::vector<float> v(static_cast<size_t>(V));
  for (auto &x : v) x = float(d(rng)) * 0.5f;
  return v;
}

}  // namespace

TEST_CASE("GPU sampling, greedy: the CPU's token on rows with ties and -inf masks, V3-wide rows, batches 1/8/64") {
  auto be = cuda();
  std::mt19937 rng(101);
  int rows_checked = 0, tied = 0;
  for (int64_t V : {int64_t(77), int64_t(1000), kV3Vocab}) {
    for (int B : {1, 8, 64}) {
      CAPTURE(V);
      CAPTURE(B);
      std::vector<Row> rows(static_cast<size_t>(B));
      for (int b = 0; b < B; b++) {
        Row &r = rows[size_t(b)];
        const int kind = (b + int(V)) % 6;
        // coarse values: the maximum is shared by several ids (the first must win); fine values: one maximum
        r.logits = kind == 5 ? normal_row(V, rng, 4.0f) : coarse_row(V, rng, 3);
        if (kind == 1)  // a mask over most of the row
          for (auto &x : r.logits)
            if (rng() % 4 != 0) x = -INFINITY;
        if (kind == 2) {  // everything masked but a few ids near the end
          std::fill(r.logits.begin(), r.logits.end(), -INFINITY);
          for (int j = 0; j < 3; j++) r.logits[size_t(V - 1 - int64_t(rng() % 5))] = 0.25f * float(j);
        }
        if (kind == 3) {  // bias, bans and penalties move the maximum
          r.p.repetition_penalty = 1.5f;
          r.p.presence_penalty = 0.5f;
          r.p.frequency_penalty = 0.5f;
          for (int j = 0; j < 30; j++) r.hist.push_back(int32_t(rng() % std::min<int64_t>(V, 50)));
          r.p.logit_bias = {{int32_t(rng() % V), 3.0f}, {int32_t(V - 1), 0.75f}, {int32_t(V - 1), 0.75f}};
          r.banned = {0, int32_t(rng() % V)};
        }
        if (kind == 4) {  // the maximum tied at both ends of the row
          r.logits.front() = r.logits.back() = 10.0f;
          r.logits[size_t(V / 2)] = 10.0f;
        }
        const float mx = *std::max_element(r.logits.begin(), r.logits.end());
        tied += std::count(r.logits.begin(), r.logits.end(), mx) > 1 ? 1 : 0;
      }
      const Compared c = compare(*be, rows, V);
      for (int b = 0; b < B; b++) {
        CAPTURE(b);
        REQUIRE(c.cpu[size_t(b)].status == DSRT_OK);
        CHECK(c.gpu[size_t(b)].status == DSRT_OK);
        CHECK(c.gpu[size_t(b)].token == c.cpu[size_t(b)].token);
        rows_checked++;
      }
    }
  }
  MESSAGE(rows_checked << " greedy rows equal to the CPU's, " << tied << " of them with a tied maximum");
  CHECK(tied > rows_checked / 3);
}

TEST_CASE("GPU sampling, seeded: the CPU's token for the same u under every filter combination") {
  auto be = cuda();
  std::mt19937 rng(202);
  Rng stream(9);
  const char *names[] = {"temperature only", "top-k only", "top-p only", "min-p only", "top-k + top-p + min-p",
                         "penalties + bias + bans", "all of it"};
  for (int64_t V : {int64_t(500), kV3Vocab}) {
    for (int combo = 0; combo < 7; combo++) {
      CAPTURE(V);
      CAPTURE(names[combo]);
      const int B = V == kV3Vocab ? 16 : 64;
      std::vector<Row> rows(static_cast<size_t>(B));
      for (int b = 0; b < B; b++) {
        Row &r = rows[size_t(b)];
        r.logits = normal_row(V, rng, 2.0f + float(b % 3));  // continuous: no ties, the order is unambiguous
        r.p.temperature = 0.5f + 0.25f * float(b % 4);
        if (combo == 1 || combo == 4 || combo == 6) r.p.top_k = 1 + int32_t(rng() % 100);
        if (combo == 2 || combo == 4 || combo == 6) r.p.top_p = 0.3f + 0.1f * float(b % 7);
        if (combo == 3 || combo == 4 || combo == 6) r.p.min_p = 0.02f + 0.05f * float(b % 5);
        if (combo == 5 || combo == 6) {
          r.p.repetition_penalty = 1.3f;
          r.p.presence_penalty = 0.4f;
          r.p.frequency_penalty = 0.3f;
          r.p.penalty_window = 16;
          for (int j = 0; j < 40; j++) r.hist.push_back(int32_t(rng() % 200));
          // push some ids to the top so the penalties and bias decide among the likely ones
          for (int j = 0; j < 20; j++) r.logits[size_t(rng() % 200)] += 8.0f;
          r.p.logit_bias = {{int32_t(rng() % 200), 2.5f}, {int32_t(rng() % 200), -3.0f}, {7, 1.0f}, {7, 1.0f}};
          r.banned = {int32_t(rng() % 200), int32_t(V - 1)};
        }
        r.u = stream.uniform();
      }
      const Compared c = compare(*be, rows, V);
      int equal = 0, boundary = 0;
      for (int b = 0; b < B; b++) {
        CAPTURE(b);
        REQUIRE(c.cpu[size_t(b)].status == DSRT_OK);
        CHECK(c.gpu[size_t(b)].status == DSRT_OK);
        if (c.gpu[size_t(b)].token == c.cpu[size_t(b)].token) {
          equal++;
          continue;
        }
        const double d = boundary_distance(rows[size_t(b)], V);
        CHECK_MESSAGE(d < 1e-10, "token " << c.gpu[size_t(b)].token << " vs the CPU's " << c.cpu[size_t(b)].token
                                          << ", u " << rows[size_t(b)].u << " is " << d << " from a boundary");
        boundary++;
      }
      MESSAGE(names[combo] << ", V " << V << ": " << equal << " of " << B << " tokens equal, " << boundary
                           << " at a boundary");
    }
  }
}

TEST_CASE("GPU sampling: non-finite logits and impossible bias fail with the CPU sampler's codes and texts") {
  auto be = cuda();
  std::mt19937 rng(303);
  const int64_t V = 4000;
  std::vector<Row> rows;
  for (float t : {0.0f, 0.8f}) {
    for (int kind = 0; kind < 6; kind++) {
      Row r;
      r.logits = normal_row(V, rng, 1.0f);
      r.p.temperature = t;
      r.p.top_k = kind % 2 ? 10 : 0;
      r.u = 0.5;
      if (kind == 0) r.logits[1234] = NAN;
      if (kind == 1) r.logits[17] = INFINITY;
      if (kind == 2) {  // the model's logits all -inf: DSRT_ERR_INTERNAL
        std::fill(r.logits.begin(), r.logits.end(), -INFINITY);
      }
      if (kind == 3) {  // bans take the last finite id: DSRT_ERR_INVALID_ARGUMENT
        std::fill(r.logits.begin(), r.logits.end(), -INFINITY);
        r.logits[99] = 1.0f;
        r.banned = {99};
      }
      if (kind == 4) r.p.logit_bias = {{int32_t(V) + 3, 1.0f}};  // outside the vocabulary
      if (kind == 5) r.p.logit_bias = {{5, INFINITY}};           // a bias that makes +inf
      rows.push_back(r);
    }
    Row ok;  // a good row among them is unaffected
    ok.logits = normal_row(V, rng, 1.0f);
    ok.p.temperature = t;
    ok.u = 0.25;
    rows.push_back(ok);
  }
  const Compared c = compare(*be, rows, V);
  for (size_t i = 0; i < rows.size(); i++) {
    CAPTURE(i);
    CHECK(c.gpu[i].status == c.cpu[i].status);
    CHECK(c.gpu[i].error == c.cpu[i].error);
    if (c.cpu[i].status == DSRT_OK) {
      CHECK(c.gpu[i].token == c.cpu[i].token);
    } else {
      CHECK(c.gpu[i].token == -1);
      CHECK(!c.gpu[i].error.empty());
    }
  }
}

// With ties, which of the tied ids a u picks depends on where the sums put the boundaries; what must hold is
// the distribution. Many rows of one logits vector with fresh u each: the empirical frequencies against the
// CPU's distribution (total variation, and chi-square over the ids with enough mass).
TEST_CASE("GPU sampling: draws over tied logits follow the CPU's distribution (top-k cutting a tie, top-p, min-p)") {
  auto be = cuda();
  std::mt19937 rng(404);
  Rng stream(11);
  for (int64_t V : {int64_t(64), kV3Vocab}) {
    for (int combo = 0; combo < 3; combo++) {
      CAPTURE(V);
      CAPTURE(combo);
      Row base;
      base.logits = coarse_row(V, rng, 2);  // five levels: large tied groups
      if (V == kV3Vocab)  // the likely ids few enough to count: a small tied top, the rest far below
        for (auto &x : base.logits) x -= 20.0f;
      for (int j = 0; j < 24; j++) base.logits[size_t(rng() % V)] = float(j % 3);
      base.p.temperature = 1.0f;
      if (combo == 0) base.p.top_k = 10;  // cuts through the tied group at the cut: the lowest ids stay
      if (combo == 1) base.p.top_p = 0.6f;
      if (combo == 2) base.p.min_p = 0.2f, base.p.top_k = 15;
      const auto want = sampling_distribution(base.logits.data(), V, base.p, nullptr, 0, {});
      const int B = V == kV3Vocab ? 256 : 2048, launches = V == kV3Vocab ? 80 : 10;  // (1 MB of workspace per V3 row)
      std::vector<double> seen(size_t(V), 0.0);
      int64_t n = 0;
      int outside = 0;
      for (int l = 0; l < launches; l++) {
        std::vector<double> us(static_cast<size_t>(B));
        for (auto &u : us) u = stream.uniform();
        for (const int32_t t : gpu_draws(*be, base, V, us)) {
          REQUIRE(t >= 0);
          REQUIRE(t < V);
          outside += want[size_t(t)] > 0 ? 0 : 1;  // an id the CPU can never draw
          seen[size_t(t)] += 1;
          n++;
        }
      }
      CHECK(outside == 0);
      double tv = 0, chi2 = 0;
      int dof = -1;
      for (int64_t i = 0; i < V; i++) {
        const double f = seen[size_t(i)] / double(n);
        tv += 0.5 * std::fabs(f - want[size_t(i)]);
        const double e = want[size_t(i)] * double(n);
        if (e >= 20) {
          chi2 += (seen[size_t(i)] - e) * (seen[size_t(i)] - e) / e;
          dof++;
        }
      }
      // ~20000 draws over at most a few dozen ids: sampling noise in TV is ~0.01-0.02
      MESSAGE("V " << V << " combo " << combo << ": " << n << " draws, total variation " << tv << ", chi2 " << chi2
                   << " over " << dof << " degrees of freedom");
      CHECK(tv < 0.05);
      CHECK(dof >= 1);
      CHECK(chi2 < double(dof) + 6.0 * std::sqrt(2.0 * double(dof)) + 10.0);  // far in the tail (p << 0.001)
    }
  }
}

// End to end: one CUDA engine sampling on the device, one sampling on the host (device_sampling off): the same
// forward on the same GPU, so the same logits, and the same tokens for greedy and seeded turns with every
// filter, several sessions batched (and with MTP drafts where the preset has the layer: device- and host-sampled
// runs alike). Then the greedy turn against the CPU engine, teacher-forced: every GPU token
// is the CPU's argmax wherever the CPU's top two logits are more than 0.05 apart (the BF16 cache moves logits
// by ~3e-3; test_gpu.cpp's end-to-end case states the same tolerance).
TEST_CASE("GPU sampling end to end: device sampling emits the host sampler's tokens; greedy matches the CPU engine") {
  for (const std::string preset : {"no-qlora", "v3-mini"}) {
    CAPTURE(preset);
    const std::string dir = testing::tiny(preset);
    LoadOptions lo;
    lo.devices = {Device::cuda(0)};
    auto loaded = load_model(dir, lo);
    const int32_t V = int32_t(loaded.model->cfg.vocab_size);
    auto make = [&](bool device) {
      EngineOptions eo;
      eo.max_tokens = 4096;
      eo.backend_kind = BackendKind::Cuda;
      eo.device_sampling = device;
      return std::make_shared<Engine>(loaded.model, loaded.vocab, eo);
    };
    auto dev = make(true), host = make(false);
    REQUIRE(dev->device_sampling());
    REQUIRE(!host->device_sampling());
    std::vector<GenParams> settings;
    for (int k = 0; k < 7; k++) {
      GenParams g;
      g.max_new_tokens = 24;
      g.ignore_eos = true;
      g.has_seed = true;
      g.seed = 1000 + uint64_t(k);
      g.sampling.temperature = k == 0 ? 0.0f : 0.8f;
      if (k == 2 || k == 6) g.sampling.top_k = 20;
      if (k == 3 || k == 6) g.sampling.top_p = 0.8f;
      if (k == 4 || k == 6) g.sampling.min_p = 0.05f;
      if (k == 5 || k == 6) {
        g.sampling.repetition_penalty = 1.2f;
        g.sampling.presence_penalty = 0.3f;
        g.sampling.frequency_penalty = 0.2f;
        g.sampling.logit_bias = {{3, 1.5f}, {11, -INFINITY}};
      }
      settings.push_back(g);
    }
    // Every turn driven from this thread in turn, so that both engines batch the same rows in the same steps
    // (the GPU's GEMV cut depends on the batch: equal logits need equal batches): each step carries the pending
    // rows of every session, several sampled in one launch.
    auto run_all = [&](std::shared_ptr<Engine> &e) {
      std::vector<std::vector<int32_t>> out(settings.size());
      std::vector<std::shared_ptr<Session>> ss;
      for (size_t k = 0; k < settings.size(); k++) {
        ss.push_back(e->create_session(0, false, 5));
        const auto p = testing::prompt_tokens(V, 10 + int(k) * 7);
        ss.back()->append(p.data(), p.size());
        ss.back()->start(settings[k]);
      }
      std::vector<bool> done(settings.size(), false);
      for (size_t left = settings.size(); left > 0;)
        for (size_t k = 0; k < settings.size(); k++) {
          if (done[k]) continue;
          Event ev = ss[k]->next();
          if (ev.token >= 0) out[k].push_back(ev.token);
          if (ev.done) done[k] = true, left--;
        }
      return out;
    };
    const auto got = run_all(dev), want = run_all(host);
    for (size_t k = 0; k < settings.size(); k++) {
      CAPTURE(k);
      CHECK(got[k].size() == 24);
      CHECK(got[k] == want[k]);
    }
    CHECK(dev->stats().max_batch_seqs > 1);
    MESSAGE(preset << ": " << settings.size() << " turns of 24 tokens, device-sampled == host-sampled; max batch "
                   << dev->stats().max_batch_seqs);
    if (!loaded.model->w.mtp.empty()) {  // MTP: verification steps keep the host path, the others sample here
      auto mtp_engine = [&](bool device) {
        EngineOptions eo;
        eo.max_tokens = 4096;
        eo.backend_kind = BackendKind::Cuda;
        eo.mtp_drafts = 1;
        eo.device_sampling = device;
        return std::make_shared<Engine>(loaded.model, loaded.vocab, eo);
      };
      auto mtp_dev = mtp_engine(true), mtp_host = mtp_engine(false);
      REQUIRE(mtp_dev->device_sampling());
      const auto with_mtp = run_all(mtp_dev), with_mtp_host = run_all(mtp_host);
      for (size_t k = 0; k < settings.size(); k++) {
        CAPTURE(k);
        CHECK(with_mtp[k] == with_mtp_host[k]);
      }
      CHECK(mtp_dev->stats().mtp_drafted == mtp_host->stats().mtp_drafted);
      CHECK(mtp_dev->stats().mtp_accepted == mtp_host->stats().mtp_accepted);
      MESSAGE(preset << ": with MTP drafts (1): " << mtp_dev->stats().mtp_drafted << " drafted, "
                     << mtp_dev->stats().mtp_accepted << " accepted; device- and host-sampled tokens equal");
    }
    // Greedy against the CPU engine, teacher-forced on the GPU's tokens.
    auto cpu_loaded = load_model(dir, {});
    EngineOptions ceo;
    ceo.max_tokens = 4096;
    BackendOptions cbo;
    cbo.n_threads = 2;
    auto cpu_engine = std::make_shared<Engine>(  // with the GPU's cache dtype, as test_gpu.cpp's comparison
        cpu_loaded.model, cpu_loaded.vocab,
        std::make_unique<testing::ForwardingBackend>(make_cpu_backend(cbo), false, cuda()->default_kv_dtype(), true), ceo);
    const auto prompt = testing::prompt_tokens(V, 10);
    auto cs = cpu_engine->create_session(0, true, 5);
    std::vector<int32_t> seq = prompt;
    seq.insert(seq.end(), got[0].begin(), got[0].end() - 1);
    cs->append(seq.data(), seq.size());
    cs->eval(nullptr);
    const auto lv = cs->logits_view();
    REQUIRE(lv.rows == int64_t(seq.size()));
    int exact = 0, clear = 0;
    for (size_t i = 0; i < got[0].size(); i++) {
      const float *l = lv.data + (prompt.size() - 1 + i) * size_t(V);
      std::vector<float> sorted(l, l + V);
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      const int32_t top = int32_t(std::max_element(l, l + V) - l);
      exact += top == got[0][i];
      if (sorted[0] - sorted[1] > 0.05f) {
        clear++;
        CAPTURE(i);
        CHECK(got[0][i] == top);
      }
    }
    MESSAGE(preset << ": greedy GPU tokens the CPU engine's argmax " << exact << " of " << got[0].size() << " (" << clear
                   << " with a clear margin, all of those equal)");
  }
}
