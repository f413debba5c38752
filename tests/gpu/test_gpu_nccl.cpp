// The NCCL communicator (dist/nccl_communicator.h) on the GPU. On one GPU: a world of one rank over NCCL,
// whose collectives are identities that run through NCCL on the backend's stream, after the backend's queued
// ops (on the blocking twins and on the non-blocking communicators); its errors and abort; and the forward's logits through a rank group with it, bitwise the plain CUDA
// backend's. With two GPUs or more: tp 2 and ep 2 in-process ranks (a GPU and a thread each) against one rank.
#include <doctest/doctest.h>
#include <unistd.h>

#if defined(DSRT_WITH_CUDA)  // (the NCCL communicator is built with the CUDA parts only)

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <tuple>

#include "../helpers.h"
#include "backend/backend.h"
#include "backend_io.h"
#include "core/status.h"
#include "dist/communicator.h"
#include "dist/gloo_communicator.h"
#include "dist/launcher_env.h"
#include "dist/nccl_communicator.h"
#include "dist/process_group.h"
#include "dist/rendezvous.h"
#include "dist/nccl_library.h"
#include "engine/ranks.h"
#include "engine/step.h"
#include "model/model.h"
#include "model/placement.h"

using namespace dsrt;

namespace {

std::unique_ptr<Backend> cuda(int device = 0) {
  BackendOptions o;
  o.device = device;
  return make_backend(BackendKind::Cuda, o);
}

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (float &x : v) x = nd(rng);
  return v;
}

// The error a call throws (code and text), or DSRT_OK.
template <class F>
std::pair<dsrt_status, std::string> error_of(F &&f) {
  try {
    f();
  } catch (const Error &e) {
    return {e.code(), e.what()};
  }
  return {DSRT_OK, ""};
}

void require_nccl() {
  std::string why;
  REQUIRE_MESSAGE(nccl::load(&why) != nullptr, "NCCL is needed for this test: ", why);
}

}  // namespace

TEST_CASE("NCCL world of 1: every collective is an identity, queued after the backend's ops; errors and abort") {
  require_nccl();
  struct Mode {  // collectives on the blocking twins (the default), or on the joined non-blocking communicators
    explicit Mode(bool nonblocking) {
      if (nonblocking) setenv("DSRT_NCCL_NONBLOCKING", "1", 1);
    }
    ~Mode() { unsetenv("DSRT_NCCL_NONBLOCKING"); }
  };
  std::unique_ptr<Mode> mode;
  SUBCASE("blocking twins") { mode = std::make_unique<Mode>(false); }
  SUBCASE("non-blocking communicators (DSRT_NCCL_NONBLOCKING=1)") { mode = std::make_unique<Mode>(true); }
  auto be = cuda();
  auto comms = make_nccl_local_group(1, 1, {be.get()}, 30000);
  REQUIRE(comms.size() == 1);
  Communicator &c = *comms[0];
  CHECK(c.mapping().world == 1);
  be->begin_step();

  // all_reduce_sum over the world and the (one-rank) tensor group: the values, bit for bit.
  const auto a = randn(3 * 1000, 1);
  Tensor x = testing::put(*be, a, 3, 1000);
  c.all_reduce_sum(x, Communicator::Group::World);
  c.all_reduce_sum(x, Communicator::Group::Tensor);
  CHECK(testing::get(*be, x) == a);

  // all_gather_cols into another tensor, behind an add the backend has only recorded: NCCL must see the sum.
  const auto b = randn(5 * 7, 2), d = randn(5 * 7, 3);
  Tensor local = testing::put(*be, b, 5, 7), addend = testing::put(*be, d, 5, 7);
  be->add(local, addend);
  Tensor out = be->alloc(5, 7);
  c.all_gather_cols(local, out, Communicator::Group::World);
  const auto sum = testing::get(*be, local), gathered = testing::get(*be, out);
  CHECK(gathered == sum);
  for (size_t i = 0; i < sum.size(); i++) CHECK(sum[i] == b[i] + d[i]);
  Tensor out2 = be->alloc(5, 7);
  c.all_gather_cols(local, out2, Communicator::Group::Tensor);
  CHECK(testing::get(*be, out2) == sum);

  // all_to_all_v: the rows sent to oneself arrive; the rows past them are untouched.
  const auto s = randn(6 * 16, 4), sentinel = std::vector<float>(6 * 16, -7.0f);
  Tensor send = testing::put(*be, s, 6, 16), recv = testing::put(*be, sentinel, 6, 16);
  c.all_to_all_v(send, {4}, recv, {4}, Communicator::Group::World);
  auto got = testing::get(*be, recv);
  CHECK(std::vector<float>(got.begin(), got.begin() + 4 * 16) == std::vector<float>(s.begin(), s.begin() + 4 * 16));
  CHECK(std::vector<float>(got.begin() + 4 * 16, got.end()) == std::vector<float>(2 * 16, -7.0f));
  Tensor recv0 = testing::put(*be, sentinel, 6, 16);
  c.all_to_all_v(send, {0}, recv0, {0}, Communicator::Group::World);  // nothing to move: nothing moves
  CHECK(testing::get(*be, recv0) == sentinel);

  std::string bytes = "a step's plain data";
  c.broadcast(bytes, 0);
  CHECK(bytes == "a step's plain data");
  c.barrier();

  // Misuse is an error naming the operation, not a wrong answer.
  std::vector<float> host(35);
  Tensor on_host{host.data(), DType::F32, 5, 7, Device::host()};
  auto [code, text] = error_of([&] { c.all_gather_cols(on_host, out, Communicator::Group::World); });
  CHECK(code == DSRT_ERR_INTERNAL);
  CHECK(text.find("all_gather_cols") != std::string::npos);
  std::tie(code, text) = error_of([&] { c.all_to_all_v(send, {7}, recv, {7}, Communicator::Group::World); });
  CHECK(code == DSRT_ERR_INTERNAL);

  // check(): the queued collectives above ran without an error (each was only queued: the watchdog followed it).
  CHECK(error_of([&] { c.check(); }).first == DSRT_OK);

  // abort: every later collective, and check(), throws DSRT_ERR_IO with the reason, at once.
  c.abort("the test stops the group");
  std::tie(code, text) = error_of([&] { c.check(); });
  CHECK(code == DSRT_ERR_IO);
  CHECK(text.find("the test stops the group") != std::string::npos);
  std::tie(code, text) = error_of([&] { c.all_reduce_sum(x, Communicator::Group::World); });
  CHECK(code == DSRT_ERR_IO);
  CHECK(text.find("the test stops the group") != std::string::npos);
}

// The path a rank in its own process takes (dsrt worker, --world/--rank): the rendezvous, Gloo for the host
// bytes, then make_nccl_communicator (the joined communicator, its blocking twin, the warm-up) through the
// rendezvous store; a world of one on this GPU.
TEST_CASE("NCCL through the rendezvous, as a rank in its own process: a world of one") {
  require_nccl();
  REQUIRE_MESSAGE(gloo_available(), "Gloo is needed for this test");
  auto be = cuda();
  DistSpec spec;
  spec.world = 1;
  spec.rank = 0;
  spec.tp = spec.ep = 1;
  spec.coordinator = "127.0.0.1:" + std::to_string(20000 + int(getpid()) % 20000);
  spec.timeout_ms = 30000;
  auto comm = join_process_group(spec, "the test's checkpoint", [&](RendezvousClient &store, std::unique_ptr<Communicator> host) {
    return make_nccl_communicator(store, std::move(host), *be, spec.timeout_ms);
  });
  REQUIRE(comm);
  CHECK(comm->mapping().world == 1);
  be->begin_step();
  const auto a = randn(2 * 7168, 9);
  Tensor x = testing::put(*be, a, 2, 7168);
  comm->all_reduce_sum(x, Communicator::Group::World);
  const auto s = randn(3 * 64, 10);
  Tensor send = testing::put(*be, s, 3, 64), recv = be->alloc(3, 64);
  comm->all_to_all_v(send, {3}, recv, {3}, Communicator::Group::World);
  CHECK(testing::get(*be, x) == a);
  CHECK(testing::get(*be, recv) == s);
  CHECK(error_of([&] { comm->check(); }).first == DSRT_OK);
  comm->abort("the test stops the group");
  auto [code, text] = error_of([&] { comm->check(); });
  CHECK(code == DSRT_ERR_IO);
  CHECK(text.find("the test stops the group") != std::string::npos);
}

// The rank group as the engine drives it (weights, KV pool, two steps), with one rank over NCCL and with the
// plain single communicator: the same kernels on the same inputs, so the same bits.
TEST_CASE("NCCL world of 1: a rank group's logits equal the plain CUDA backend's bitwise on every preset") {
  require_nccl();
  for (const std::string &preset : testing::preset_names()) {
    CAPTURE(preset);
    auto model = Model::load(testing::tiny(preset), {});
    const int32_t V = int32_t(model->cfg.vocab_size);
    const auto prompt = testing::prompt_tokens(V, 80);
    auto run = [&](bool over_nccl) {
      RankGroup::MakeComms comms;
      if (over_nccl) comms = [](const std::vector<Backend *> &bes) { return make_nccl_local_group(1, 1, bes, 30000); };
      RankGroup g(*model, 1, 1, [](int) { return cuda(); }, comms);
      std::vector<const Weight *> used;
      for (const Weight *w : model->w.all)
        if (w->data && model->placement.part.at(size_t(w->id)) != Placement::Part::Mtp) used.push_back(w);
      g.for_each_backend([&](Backend &be) { be.prepare_weights(model->device_weights, used, {}); });
      KvCacheSpec spec;
      spec.n_layers = model->cfg.num_hidden_layers + int64_t(model->w.mtp.size());
      spec.width = model->cfg.kv_cache_width();
      spec.max_pages = 4;
      spec.dtype = DType::BF16;
      g.kv_init(spec);
      std::vector<float> logits;
      for (int step = 0; step < 2; step++) {
        Step st;
        const int32_t n_past = step ? 80 : 0, n_new = step ? 1 : 80;
        const int32_t pages[2] = {2, 0};
        st.batch.add_seq(n_new, n_past, pages, 2);  // before its rows: they start at the batch's current end
        for (int32_t i = 0; i < n_new; i++) {
          st.batch.tokens.push_back(step ? 7 : prompt[size_t(i)]);
          st.batch.positions.push_back(n_past + i);
        }
        st.logit_rows = {n_new - 1};
        std::vector<float> l(static_cast<size_t>(V));
        g.forward(st, l.data());
        logits.insert(logits.end(), l.begin(), l.end());
      }
      return logits;
    };
    const auto plain = run(false), nccl = run(true);
    REQUIRE(plain.size() == nccl.size());
    CHECK(std::memcmp(plain.data(), nccl.data(), plain.size() * sizeof(float)) == 0);
  }
}

// A GPU and a thread per rank, NCCL between them: the model split by experts equals one rank as the CPU's
// in-process ranks do (tests/test_parallel.cpp), fp32 activations on both sides. (Tensor parallelism on GPUs
// is refused at creation until the CUDA backend uploads weight parts: engine/ranks.h, check_gpu_split.)
TEST_CASE("in-process expert-parallel ranks on 2 and 4 GPUs equal one GPU on every preset") {
  std::string why;
  const int gpus = cuda_devices(&why);
  if (gpus < 2) {
    MESSAGE("skipped: " << gpus << " GPU(s) here; this case needs 2 (4 for tp 2 x ep 2)");
    return;
  }
  require_nccl();
  auto run = [](const std::string &dir, int tp, int ep, const std::vector<int32_t> &prompt) {
    dsrt_model_params mp;
    dsrt_model_params_init(&mp, sizeof mp);
    mp.backend = DSRT_BACKEND_CUDA;
    dsrt_model *m = nullptr;
    REQUIRE(dsrt_model_load(dir.c_str(), &mp, &m) == DSRT_OK);
    dsrt_engine_params ep_;
    dsrt_engine_params_init(&ep_, sizeof ep_);
    ep_.tp = tp;
    ep_.ep = ep;
    ep_.precision = DSRT_PRECISION_FP32;
    dsrt_engine *e = nullptr;
    const dsrt_status st = dsrt_engine_create(m, &ep_, &e);
    REQUIRE_MESSAGE(st == DSRT_OK, dsrt_last_error());
    dsrt_session_params sp;
    dsrt_session_params_init(&sp, sizeof sp);
    sp.logits_all = 1;
    dsrt_session *s = nullptr;
    REQUIRE(dsrt_session_create(e, &sp, &s) == DSRT_OK);
    REQUIRE(dsrt_session_append_tokens(s, prompt.data(), prompt.size()) == DSRT_OK);
    REQUIRE(dsrt_session_eval(s, nullptr) == DSRT_OK);
    const float *lg;
    size_t rows, vocab;
    REQUIRE(dsrt_session_logits(s, &lg, &rows, &vocab) == DSRT_OK);
    std::vector<float> out(lg, lg + rows * vocab);
    dsrt_session_free(s);
    dsrt_engine_free(e);
    dsrt_model_free(m);
    return out;
  };
  for (const std::string &preset : testing::preset_names()) {
    CAPTURE(preset);
    const std::string dir = testing::tiny(preset);
    const auto prompt = testing::prompt_tokens(testing::Model(dir).vocab(), 21);
    const auto one = run(dir, 1, 1, prompt);
    const int64_t experts = Model::load(dir, {})->cfg.n_routed_experts;
    for (int ep : {2, 4}) {
      if (ep > gpus || experts % ep) continue;
      CAPTURE(ep);
      const auto par = run(dir, 1, ep, prompt);
      REQUIRE(par.size() == one.size());
      CHECK(testing::rel_l2(par.data(), one.data(), one.size()) <= 1e-5);
    }
  }
}

#endif  // DSRT_WITH_CUDA
