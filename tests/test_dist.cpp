// Ranks in several processes (docs/engine.md, "Ranks in several processes"): the launcher environment, the
// rendezvous's verdicts, and the real `dsrt` binary started once per rank on loopback (Gloo over TCP): the
// same logits (within 1e-5) and greedy tokens as one rank for tp 2, ep 2 and tp 2 x ep 2; clean errors for a
// wrong world size, another checkpoint and a missing rank; a follower that dies or hangs fails rank 0's turn
// (tokens emitted before are kept), and a follower whose rank 0 dies exits non-zero. Without Gloo in the
// build, multi-process runs must fail with DSRT_ERR_UNSUPPORTED saying so. Last, the watchdog that follows
// the collectives a transport queued.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <set>
#include <cstddef>
#include <functional>
#include <random>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/status.h"
#include "dist/collective_watchdog.h"
#include "dist/communicator.h"
#include "dist/gloo_communicator.h"
#include "dist/process_group.h"
#include "dist/launcher_env.h"
#include "dist/nccl_library.h"
#include "dist/rendezvous.h"
#include "backend/backend.h"
#include "engine/engine.h"
#include "engine/load.h"
#include "engine/ranks.h"
#include "model/model.h"
#include "helpers.h"

extern char **environ;

using namespace testing;
using Clock = std::chrono::steady_clock;

namespace {

// A port nobody listens at now (the kernel's pick); a run that still collides retries with another.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr *>(&a), sizeof a) == 0);
  socklen_t n = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr *>(&a), &n) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

// One `dsrt` process with stdout and stderr in files.
struct Proc {
  pid_t pid = -1;
  fs::path out, err;
  int code = -1;  // exit status once reaped; 128 + signal when killed
  bool reaped = false;

  // Waits up to ms; false when still running.
  bool wait(int64_t ms) {
    const auto end = Clock::now() + std::chrono::milliseconds(ms);
    while (!reaped) {
      int st = 0;
      const pid_t r = ::waitpid(pid, &st, WNOHANG);
      if (r == pid) {
        reaped = true;
        code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        break;
      }
      if (Clock::now() >= end) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
  }
  void kill_now() {
    if (!reaped) {
      ::kill(pid, SIGKILL);
      wait(10000);
    }
  }
  std::string stdout_text() const { return fs::exists(out) ? slurp(out) : ""; }
  std::string stderr_text() const { return fs::exists(err) ? slurp(err) : ""; }
  ~Proc() { kill_now(); }
};

std::unique_ptr<Proc> spawn(const std::vector<std::string> &args, const fs::path &dir, const std::string &name,
                            const std::vector<std::string> &env = {}) {
  auto p = std::make_unique<Proc>();
  p->out = dir / (name + ".out");
  p->err = dir / (name + ".err");
  std::vector<std::string> argv_s{DSRT_CLI_PATH};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char *> argv;
  for (auto &s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char **e = environ; *e; e++) env_s.push_back(*e);
  env_s.insert(env_s.end(), env.begin(), env.end());
  std::vector<char *> envp;
  for (auto &s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, p->out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, p->err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const int rc = posix_spawn(&p->pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  REQUIRE(rc == 0);
  return p;
}

// Starts `world` ranks of one command (rank r gets --world, --rank, --coordinator and extra_of(r)) and waits for
// all of them; retries on a fresh port when rank 0 could not listen (another test took the port meanwhile).
std::vector<std::unique_ptr<Proc>> run_ranks(int world, const std::vector<std::string> &common,
                                             const std::function<std::vector<std::string>(int)> &extra_of,
                                             const std::string &name, const std::vector<std::string> &env = {},
                                             int64_t wait_ms = 60000) {
  const fs::path dir = fresh_dir(name);
  for (int attempt = 0;; attempt++) {
    const std::string coord = "127.0.0.1:" + std::to_string(free_port());
    std::vector<std::unique_ptr<Proc>> ps;
    for (int r = 0; r < world; r++) {
      std::vector<std::string> a = common;
      a.insert(a.end(), {"--world", std::to_string(world), "--rank", std::to_string(r), "--coordinator", coord});
      const auto x = extra_of(r);
      a.insert(a.end(), x.begin(), x.end());
      ps.push_back(spawn(a, dir, "rank" + std::to_string(r) + "-" + std::to_string(attempt), env));
    }
    for (auto &p : ps) {
      const bool done = p->wait(wait_ms);
      CHECK_MESSAGE(done, "a rank did not finish within " << wait_ms << " ms: " << p->stderr_text());
    }
    if (attempt < 4 && ps[0]->code != 0 && ps[0]->stderr_text().find("cannot listen") != std::string::npos) continue;
    return ps;
  }
}

std::vector<float> floats(const fs::path &p) {
  const std::string b = slurp(p);
  std::vector<float> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), v.size() * 4);
  return v;
}

std::vector<std::string> none(int) { return {}; }

struct Split {
  int tp, ep;
  bool dp = false;  // data-parallel attention
  std::vector<std::string> args() const {
    std::vector<std::string> a{"--tp", std::to_string(tp), "--ep", std::to_string(ep)};
    if (dp) a.push_back("--dp-attention");
    return a;
  }
};

}  // namespace

TEST_CASE("launcher environment: explicit values, mpirun, srun, torchrun") {
  auto clear = [] {
    for (const char *v : {"DSRT_COORDINATOR", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                          "SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE", "DSRT_DIST_TIMEOUT_MS"})
      unsetenv(v);
  };
  clear();
  dsrt::DistSpec s = dsrt::resolve_dist_spec({});
  CHECK(s.world == 1);
  CHECK(s.rank == 0);
  s = dsrt::resolve_dist_spec({4, 3, 2, 0, "127.0.0.1:1234", 0});
  CHECK(s.world == 4);
  CHECK(s.rank == 3);
  CHECK(s.tp == 2);
  CHECK(s.ep == 2);
  CHECK(s.timeout_ms == dsrt::kDefaultDistTimeoutMs);
  // torchrun: everything from its variables
  setenv("MASTER_ADDR", "10.0.0.7", 1);
  setenv("MASTER_PORT", "29500", 1);
  setenv("RANK", "1", 1);
  setenv("WORLD_SIZE", "2", 1);
  setenv("DSRT_DIST_TIMEOUT_MS", "2500", 1);
  s = dsrt::resolve_dist_spec({});
  CHECK(s.world == 2);
  CHECK(s.rank == 1);
  CHECK(s.coordinator == "10.0.0.7:29500");
  CHECK(s.tp == 2);
  CHECK(s.ep == 1);
  CHECK(s.timeout_ms == 2500);
  clear();
  // mpirun: rank and size from Open MPI, the coordinator from DSRT_COORDINATOR; ep given, tp follows
  setenv("OMPI_COMM_WORLD_RANK", "3", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
  setenv("DSRT_COORDINATOR", "node0:7000", 1);
  dsrt::DistSpec given;
  given.ep = 4;
  s = dsrt::resolve_dist_spec(given);
  CHECK(s.world == 4);
  CHECK(s.rank == 3);
  CHECK(s.tp == 1);
  CHECK(s.ep == 4);
  CHECK(s.coordinator == "node0:7000");
  clear();
  // srun: without a coordinator its variables do not make a group (a plain run inside an allocation)
  setenv("SLURM_PROCID", "0", 1);
  setenv("SLURM_NTASKS", "8", 1);
  CHECK(dsrt::resolve_dist_spec({}).world == 1);
  setenv("DSRT_COORDINATOR", "head:6000", 1);
  s = dsrt::resolve_dist_spec({});
  CHECK(s.world == 8);
  CHECK(s.rank == 0);
  clear();
  // errors name the numbers
  auto err = [](dsrt::DistSpec g) {
    try {
      dsrt::resolve_dist_spec(g);
    } catch (const dsrt::Error &e) {
      CHECK(e.code() == DSRT_ERR_INVALID_ARGUMENT);
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(err({2, 2, 0, 0, "h:1", 0}).find("rank 2 is outside a world of 2") != std::string::npos);
  CHECK(err({4, 0, 3, 0, "h:1", 0}).find("does not make a world of 4") != std::string::npos);
  CHECK(err({2, 1, 0, 0, "", 0}).find("no coordinator") != std::string::npos);
  CHECK(err({2, 1, 0, 0, "h:99999", 0}).find("not in 1..65535") != std::string::npos);
  CHECK(err({2, 1, 0, 0, "nocolon", 0}).find("not HOST:PORT") != std::string::npos);
}

TEST_CASE("rendezvous: every rank agreeing meets; the store; each disagreement is one error for all") {
  const dsrt::RankHello leader{0, 2, 2, 1, "0.1.0 (test)", "abc123"};
  auto meet = [&](dsrt::RankHello other, int64_t timeout_ms, std::string &err0, std::string &err1, dsrt_status &code1) {
    const int port = free_port();
    dsrt::RendezvousServer server("127.0.0.1", port, leader, timeout_ms);
    std::thread t([&] {
      try {
        dsrt::RendezvousClient c("127.0.0.1", port, timeout_ms);
        c.hello(other);
        c.set("k1", "from rank 1");
        CHECK(c.get("k0") == "from rank 0");
        c.bye();
      } catch (const dsrt::Error &e) {
        err1 = e.what();
        code1 = e.code();
      }
    });
    try {
      dsrt::RendezvousClient c("127.0.0.1", port, timeout_ms);
      c.hello(leader);
      c.set("k0", "from rank 0");
      c.wait({"k1"}, timeout_ms);
      CHECK(c.get("k1") == "from rank 1");
      c.bye();
      server.finish();
    } catch (const dsrt::Error &e) {
      err0 = e.what();
    }
    t.join();
  };
  std::string e0, e1;
  dsrt_status c1 = DSRT_OK;
  meet({1, 2, 2, 1, "0.1.0 (test)", "abc123"}, 5000, e0, e1, c1);
  CHECK(e0 == "");
  CHECK(e1 == "");

  struct Case {
    dsrt::RankHello h;
    dsrt_status code;
    const char *text;
  };
  for (const Case &k : {Case{{1, 3, 2, 1, "0.1.0 (test)", "abc123"}, DSRT_ERR_INVALID_ARGUMENT, "world of 3 ranks, rank 0 for 2"},
                        Case{{0, 2, 2, 1, "0.1.0 (test)", "abc123"}, DSRT_ERR_INVALID_ARGUMENT, "two processes say they are rank 0 of 2"},
                        Case{{1, 2, 1, 2, "0.1.0 (test)", "abc123"}, DSRT_ERR_INVALID_ARGUMENT, "tp 1 x ep 2, rank 0 tp 2 x ep 1"},
                        Case{{1, 2, 2, 1, "0.2.0 (test)", "abc123"}, DSRT_ERR_VERSION_MISMATCH, "runs dsrt 0.2.0 (test), rank 0 dsrt 0.1.0 (test)"},
                        Case{{1, 2, 2, 1, "0.1.0 (test)", "def456"}, DSRT_ERR_VERSION_MISMATCH, "different checkpoint"}}) {
    CAPTURE(k.text);
    e0 = e1 = "";
    c1 = DSRT_OK;
    meet(k.h, 5000, e0, e1, c1);
    CHECK(c1 == k.code);
    CHECK(e1.find(k.text) != std::string::npos);
    CHECK(e0 == e1);  // rank 0 fails with the same verdict
  }
  // A rank that never comes: rank 0's hello fails after the timeout, naming the missing rank.
  const int port = free_port();
  const auto t0 = Clock::now();
  dsrt::RendezvousServer server("127.0.0.1", port, leader, 600);
  dsrt::RendezvousClient c("127.0.0.1", port, 600);
  try {
    c.hello(leader);
    FAIL("hello returned without rank 1");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_IO);
    CHECK(std::string(e.what()).find("rank 1 of 2 did not join within 600 ms") != std::string::npos);
  }
  CHECK(Clock::now() - t0 < std::chrono::seconds(5));
  // Nobody listening: the client gives up after its timeout.
  try {
    dsrt::RendezvousClient lost("127.0.0.1", free_port(), 300);
    FAIL("connected to nobody");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_IO);
    CHECK(std::string(e.what()).find("cannot reach the coordinator") != std::string::npos);
  }
}

TEST_CASE("ranks in 2 and 4 processes give one rank's logits and greedy tokens (dsrt eval/generate)") {
  const std::string toks = "0,7,19,23,101,5,77,2,9,300";
  for (const std::string preset : {"v3-mini", "partial-yarn"}) {
    CAPTURE(preset);
    const std::string dir = tiny(preset);
    const fs::path d = fresh_dir("dist-" + preset);
    const std::vector<std::string> eval{"eval", "--model", dir, "--tokens", toks, "--backend", "cpu", "--threads", "1"};
    const std::vector<std::string> gen{"generate", "--model", dir, "--tokens", toks, "-n", "10", "--backend", "cpu", "--threads", "1", "--print-ids"};
    auto one_eval = spawn([&] { auto a = eval; a.insert(a.end(), {"--logits-out", (d / "one.bin").string()}); return a; }(), d, "one-eval");
    REQUIRE(one_eval->wait(60000));
    REQUIRE(one_eval->code == 0);
    auto one_gen = spawn(gen, d, "one-gen");
    REQUIRE(one_gen->wait(60000));
    REQUIRE(one_gen->code == 0);
    const std::vector<float> ref = floats(d / "one.bin");
    const std::string ref_ids = one_gen->stdout_text();
    REQUIRE(ref.size() > 1000);
    REQUIRE(ref_ids.size() > 10);
    for (Split sp : {Split{2, 1}, Split{1, 2}, Split{2, 2}, Split{1, 2, true}}) {
      const int world = sp.tp * sp.ep;
      CAPTURE(sp.tp);
      CAPTURE(sp.ep);
      CAPTURE(sp.dp);
      if (!dsrt::gloo_available()) {
        auto ps = run_ranks(world, eval, [&](int) { return std::vector<std::string>{"--logits-out", (d / "x.bin").string()}; }, "nogloo");
        CHECK(ps[0]->code == 1);
        CHECK(ps[0]->stderr_text().find("DSRT_ERR_UNSUPPORTED") != std::string::npos);
        CHECK(ps[0]->stderr_text().find("Gloo") != std::string::npos);
        continue;
      }
      const std::string split = "tp" + std::to_string(sp.tp) + "ep" + std::to_string(sp.ep) + (sp.dp ? "dp" : "");
      const fs::path out = d / (split + ".bin");
      auto ps = run_ranks(
          world, eval,
          [&](int r) {
            // only rank 0 writes; the followers get another path, which must stay absent
            auto a = sp.args();
            a.insert(a.end(), {"--logits-out", r == 0 ? out.string() : (d / (split + "-follower.bin")).string()});
            return a;
          },
          "eval-" + split);
      for (int r = 0; r < world; r++) {
        CAPTURE(r);
        CHECK_MESSAGE(ps[size_t(r)]->code == 0, ps[size_t(r)]->stderr_text());
        if (r > 0) CHECK(ps[size_t(r)]->stdout_text() == "");
      }
      CHECK(!fs::exists(d / (split + "-follower.bin")));
      const std::vector<float> par = floats(out);
      REQUIRE(par.size() == ref.size());
      CHECK(rel_l2(par.data(), ref.data(), ref.size()) <= 1e-5);
      auto gs = run_ranks(world, gen, [&](int) { return sp.args(); },
                          "gen-" + split);
      for (int r = 0; r < world; r++) {
        CAPTURE(r);
        CHECK_MESSAGE(gs[size_t(r)]->code == 0, gs[size_t(r)]->stderr_text());
        CHECK(gs[size_t(r)]->stdout_text() == (r == 0 ? ref_ids : ""));
      }
      if (preset == std::string("v3-mini") && world == 4) {  // MTP drafts: every rank runs the module's passes too
        auto ms = run_ranks(world, gen, [&](int) { return std::vector<std::string>{"--tp", "2", "--ep", "2", "--mtp"}; },
                            "gen-mtp-" + split);
        for (int r = 0; r < world; r++) {
          CAPTURE(r);
          CHECK_MESSAGE(ms[size_t(r)]->code == 0, ms[size_t(r)]->stderr_text());
          CHECK(ms[size_t(r)]->stdout_text() == (r == 0 ? ref_ids : ""));
        }
      }
    }
  }
}

TEST_CASE("ranks that do not agree, or do not come, fail cleanly with the numbers") {
  if (!dsrt::gloo_available()) return;  // covered by the UNSUPPORTED check above
  const std::string dir = tiny("v3-mini");
  const std::vector<std::string> gen{"generate", "--model", dir, "--tokens", "0,5,17", "-n", "4", "--backend", "cpu", "--threads", "1"};
  // rank 1 thinks the world has 4 ranks
  {
    auto ps = run_ranks(2, gen, [](int r) { return r == 1 ? std::vector<std::string>{"--world", "4", "--tp", "2", "--ep", "2"} : std::vector<std::string>{}; },
                        "wrong-world");
    for (auto &p : ps) {
      CHECK(p->code == 1);
      CHECK(p->stdout_text() == "");
    }
    CHECK(ps[0]->stderr_text().find("DSRT_ERR_INVALID_ARGUMENT") != std::string::npos);
    CHECK(ps[0]->stderr_text().find("rank 1 was started for a world of 4 ranks, rank 0 for 2") != std::string::npos);
  }
  // rank 1 runs attention data-parallel, rank 0 not
  {
    auto ps = run_ranks(2, gen, [](int r) {
      std::vector<std::string> a{"--ep", "2"};
      if (r == 1) a.push_back("--dp-attention");
      return a;
    }, "dp-mismatch");
    for (auto &p : ps) CHECK(p->code == 1);
    CHECK(ps[0]->stderr_text().find("rank 1 splits the model tp 1 x ep 2 with data-parallel attention, rank 0 tp 1 x ep 2") !=
          std::string::npos);
  }
  // rank 1 loaded another checkpoint (same shapes, other weights)
  {
    const fs::path other = fresh_dir("other-ckpt");
    dsrt::tools::make_tiny_model(*dsrt::tools::find_tiny_preset("v3-mini"), other.string(), 2);
    auto ps = run_ranks(2, {"generate", "--tokens", "0,5,17", "-n", "4", "--backend", "cpu", "--threads", "1"},
                        [&](int r) { return std::vector<std::string>{"--model", r == 0 ? dir : other.string()}; }, "other-ckpt");
    for (auto &p : ps) CHECK(p->code == 1);
    CHECK(ps[0]->stderr_text().find("DSRT_ERR_VERSION_MISMATCH") != std::string::npos);
    CHECK(ps[0]->stderr_text().find("rank 1 loaded a different checkpoint") != std::string::npos);
  }
  // rank 2 of 3 never starts: ranks 0 and 1 give up after DSRT_DIST_TIMEOUT_MS, naming it
  {
    const fs::path d = fresh_dir("missing");
    const std::string coord = "127.0.0.1:" + std::to_string(free_port());
    std::vector<std::unique_ptr<Proc>> ps;
    const auto t0 = Clock::now();
    for (int r = 0; r < 2; r++) {
      auto a = gen;
      a.insert(a.end(), {"--world", "3", "--rank", std::to_string(r), "--coordinator", coord, "--tp", "1", "--ep", "1"});
      ps.push_back(spawn(a, d, "rank" + std::to_string(r), {"DSRT_DIST_TIMEOUT_MS=1500"}));
    }
    for (auto &p : ps) REQUIRE(p->wait(30000));
    CHECK(Clock::now() - t0 < std::chrono::seconds(25));
    for (auto &p : ps) CHECK(p->code == 1);
    // tp 1 x ep 1 does not make 3 ranks: that is refused before anyone waits
    CHECK(ps[0]->stderr_text().find("does not make a world of 3") != std::string::npos);
    ps.clear();
    for (int r = 0; r < 2; r++) {
      auto a = gen;
      a.insert(a.end(), {"--world", "4", "--rank", std::to_string(r), "--coordinator", coord, "--tp", "2", "--ep", "2"});
      ps.push_back(spawn(a, d, "rank" + std::to_string(r) + "b", {"DSRT_DIST_TIMEOUT_MS=1500"}));
    }
    const auto t1 = Clock::now();
    for (auto &p : ps) REQUIRE(p->wait(30000));
    CHECK(Clock::now() - t1 < std::chrono::seconds(25));
    for (auto &p : ps) {
      CHECK(p->code == 1);
      CHECK(p->stdout_text() == "");
    }
    CHECK(ps[0]->stderr_text().find("DSRT_ERR_IO") != std::string::npos);
    CHECK(ps[0]->stderr_text().find("ranks 2, 3 of 4 did not join within 1500 ms") != std::string::npos);
    CHECK(ps[1]->stderr_text().find("did not join") != std::string::npos);
  }
}

namespace {

// Waits until the process's stderr holds `text` (DSRT_LOG_LEVEL=info lines); false after ms or if it exited.
bool wait_for_log(Proc &p, const std::string &text, int64_t ms) {
  const auto end = Clock::now() + std::chrono::milliseconds(ms);
  while (Clock::now() < end) {
    if (p.stderr_text().find(text) != std::string::npos) return true;
    if (p.wait(0)) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

}  // namespace

TEST_CASE("a follower that dies or hangs fails rank 0's turn, keeping the tokens before; rank 0's death ends the followers") {
  if (!dsrt::gloo_available()) return;
  const std::string dir = tiny("v3-mini");
  // Rank 0 is this process (the C API), rank 1 a `dsrt worker`: the test decides when the worker dies.
  for (const int sig : {SIGKILL, SIGSTOP}) {
    CAPTURE(sig);
    const fs::path d = fresh_dir("fault");
    const std::string coord = "127.0.0.1:" + std::to_string(free_port());
    auto worker = spawn({"worker", "--model", dir, "--coordinator", coord, "--rank", "1", "--world", "2", "--threads", "1"}, d, "worker");
    Model m(dir);
    dsrt_engine_params ep;
    dsrt_engine_params_init(&ep, sizeof ep);
    ep.max_tokens = 256;
    dsrt_dist_params dp;
    dsrt_dist_params_init(&dp, sizeof dp);
    dp.world = 2;
    dp.rank = 0;
    dp.coordinator = coord.c_str();
    dp.timeout_ms = 1500;
    dsrt_engine *e = nullptr;
    REQUIRE(dsrt_engine_create_dist(m.m, &ep, &dp, &e) == DSRT_OK);
    dsrt_session *s = nullptr;
    REQUIRE(dsrt_session_create(e, nullptr, &s) == DSRT_OK);
    const std::vector<int32_t> prompt{0, 5, 17, 42};
    REQUIRE(dsrt_session_append_tokens(s, prompt.data(), prompt.size()) == DSRT_OK);
    dsrt_gen_params gp = greedy_params(m, 50);
    REQUIRE(dsrt_session_start(s, &gp) == DSRT_OK);
    int got = 0;
    for (; got < 3; got++) {
      dsrt_event ev;
      ev.struct_size = sizeof ev;
      REQUIRE(dsrt_session_next(s, &ev) == DSRT_OK);
      REQUIRE(ev.type != DSRT_EVENT_DONE);
    }
    ::kill(worker->pid, sig);
    const auto t0 = Clock::now();
    dsrt_status st = DSRT_OK;
    // The turn ends with a DONE event whose finish reason is ERROR and whose status is the step's failure.
    int after = 0, finish = -1;
    for (int i = 0; i < 50 && st == DSRT_OK; i++) {
      dsrt_event ev;
      ev.struct_size = sizeof ev;
      REQUIRE(dsrt_session_next(s, &ev) == DSRT_OK);
      if (ev.type == DSRT_EVENT_DONE) {
        finish = ev.finish_reason;
        st = ev.status;
        break;
      }
      after++;
    }
    CAPTURE(after);
    CHECK(finish == DSRT_FINISH_ERROR);
    CHECK(st == DSRT_ERR_IO);
    CHECK(std::string(dsrt_last_error()).find("rank") != std::string::npos);
    CHECK(Clock::now() - t0 < std::chrono::seconds(15));
    dsrt_session_stats ss;
    ss.struct_size = sizeof ss;
    CHECK(dsrt_session_stats_get(s, &ss) == DSRT_OK);
    CHECK(ss.generated_tokens >= got);  // what was emitted before the fault stays
    // The group stays failed: the next step fails at once.
    const int32_t more = 3;
    CHECK(dsrt_session_append_tokens(s, &more, 1) == DSRT_OK);
    CHECK(dsrt_session_eval(s, nullptr) == DSRT_ERR_IO);
    dsrt_session_free(s);
    dsrt_engine_free(e);
    if (sig == SIGSTOP) {
      ::kill(worker->pid, SIGCONT);  // it finds its connection gone and leaves with an error
      REQUIRE(worker->wait(15000));
      CHECK(worker->code == 1);
    }
  }
  // Rank 0 dies mid-run: its follower exits non-zero (and at once, not after a timeout).
  {
    const fs::path d = fresh_dir("leader-dies");
    const std::string coord = "127.0.0.1:" + std::to_string(free_port());
    std::string toks = "0";
    for (int i = 1; i < 300; i++) toks += "," + std::to_string((i * 37) % 2000);
    const std::vector<std::string> common{"eval", "--model", dir, "--tokens", toks, "--backend", "cpu", "--threads", "1",
                                          "--max-batch-tokens", "1", "--world", "2", "--coordinator", coord,
                                          "--logits-out", (d / "x.bin").string()};
    auto a0 = common, a1 = common;
    a0.insert(a0.end(), {"--rank", "0"});
    a1.insert(a1.end(), {"--rank", "1"});
    auto r0 = spawn(a0, d, "rank0", {"DSRT_LOG_LEVEL=info"});
    auto r1 = spawn(a1, d, "rank1", {"DSRT_LOG_LEVEL=info", "DSRT_DIST_TIMEOUT_MS=60000"});
    REQUIRE(wait_for_log(*r0, "joined as rank 0", 30000));
    ::kill(r0->pid, SIGKILL);
    const auto t0 = Clock::now();
    REQUIRE(r1->wait(30000));
    CHECK(Clock::now() - t0 < std::chrono::seconds(10));
    CHECK(r1->code == 1);
    CHECK(r1->stdout_text() == "");
    CHECK(r1->stderr_text().find("DSRT_ERR_IO") != std::string::npos);
  }
}

// Data-parallel attention with rank 1 in another process: sessions on both ranks (a second prompt while the
// first session holds rank 0's pages goes to rank 1), a fork and a truncation there (page copies the follower
// makes in its own pool), a state loaded into a session (the follower writes it when the pages are its own);
// the tokens one rank gives; saving a session whose cache is in the follower's process (the follower reads it
// and sends it) and loading it into a new session.
TEST_CASE("data-parallel attention across 2 processes: sessions on the follower's rank, forks, state, one rank's tokens") {
  if (!dsrt::gloo_available()) return;
  const std::string dir = tiny("v3-mini");
  Model m(dir);
  const auto p1 = prompt_tokens(m.vocab(), 100), p2 = prompt_tokens(m.vocab(), 70);
  auto scenario = [&](bool two, std::vector<dsrt_status> &saves) {
    std::vector<std::vector<int32_t>> out;
    const fs::path d = fresh_dir("dp2");
    const std::string coord = "127.0.0.1:" + std::to_string(free_port());
    std::unique_ptr<Proc> worker;
    if (two)
      worker = spawn({"worker", "--model", dir, "--coordinator", coord, "--rank", "1", "--world", "2", "--threads", "1",
                      "--ep", "2", "--dp-attention"}, d, "worker");
    dsrt_engine_params ep;
    dsrt_engine_params_init(&ep, sizeof ep);
    ep.max_tokens = 512;
    ep.ep = two ? 2 : 1;
    ep.dp_attention = two ? 1 : 0;
    dsrt_dist_params dp;
    dsrt_dist_params_init(&dp, sizeof dp);
    dp.world = two ? 2 : 1;
    dp.rank = 0;
    dp.coordinator = coord.c_str();
    dp.timeout_ms = 20000;
    dsrt_engine *e = nullptr;
    REQUIRE(dsrt_engine_create_dist(m.m, &ep, &dp, &e) == DSRT_OK);
    const dsrt_gen_params gp = greedy_params(m, 6);
    auto session = [&](const std::vector<int32_t> &prompt) {
      dsrt_session *s = nullptr;
      REQUIRE(dsrt_session_create(e, nullptr, &s) == DSRT_OK);
      REQUIRE(dsrt_session_append_tokens(s, prompt.data(), prompt.size()) == DSRT_OK);
      return s;
    };
    dsrt_session *a = session(p1), *b = session(p2);
    REQUIRE(dsrt_session_start(a, &gp) == DSRT_OK);  // a reserves first: rank 0; b then goes to rank 1
    REQUIRE(dsrt_session_start(b, &gp) == DSRT_OK);
    out.push_back(pull(a, &gp).tokens);
    out.push_back(pull(b, &gp).tokens);
    dsrt_session *b2 = nullptr;
    REQUIRE(dsrt_session_fork(b, &b2) == DSRT_OK);
    REQUIRE(dsrt_session_truncate(b, 60) == DSRT_OK);  // into a page b2 shares: copied before it is written
    out.push_back(pull(b, &gp).tokens);
    out.push_back(pull(b2, &gp).tokens);
    void *buf = nullptr;
    size_t n = 0;
    for (dsrt_session *s : {a, b}) {
      const dsrt_status st = dsrt_session_state_save(s, &buf, &n);
      saves.push_back(st);
      if (st != DSRT_OK) {
        MESSAGE(dsrt_last_error());
        continue;
      }
      dsrt_session *c = nullptr;
      REQUIRE(dsrt_session_create(e, nullptr, &c) == DSRT_OK);
      REQUIRE(dsrt_session_state_load(c, buf, n) == DSRT_OK);
      dsrt_free(buf);
      out.push_back(pull(c, &gp).tokens);
      dsrt_session_free(c);
    }
    for (dsrt_session *s : {a, b, b2}) dsrt_session_free(s);
    dsrt_engine_free(e);
    if (worker) {
      REQUIRE(worker->wait(30000));
      CHECK_MESSAGE(worker->code == 0, worker->stderr_text());
    }
    return out;
  };
  std::vector<dsrt_status> saves_one, saves_two;
  const auto one = scenario(false, saves_one), two = scenario(true, saves_two);
  CHECK(saves_one == std::vector<dsrt_status>{DSRT_OK, DSRT_OK});
  CHECK(saves_two == std::vector<dsrt_status>{DSRT_OK, DSRT_OK});  // (b's cache comes from rank 1's process)
  REQUIRE(two.size() == 6);
  REQUIRE(one.size() == 6);
  for (size_t i = 0; i < 6; i++) CHECK(two[i] == one[i]);
}

TEST_CASE("C API: dsrt_dist_params defaults and argument errors") {
  CHECK(dsrt_struct_size(DSRT_STRUCT_DIST_PARAMS) == sizeof(dsrt_dist_params));
  dsrt_dist_params p;
  dsrt_dist_params_init(&p, sizeof p);
  CHECK(p.struct_size == sizeof p);
  CHECK(p.world == 0);
  CHECK(p.rank == -1);
  CHECK(p.coordinator == nullptr);
  for (const char *v : {"DSRT_COORDINATOR", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"}) unsetenv(v);
  Model m(tiny("no-qlora"));
  CHECK(dsrt_worker_run(m.m, &p) == DSRT_ERR_INVALID_ARGUMENT);  // a world of 1 has no followers
  p.world = 2;
  p.rank = 0;
  p.coordinator = "127.0.0.1:1";
  CHECK(dsrt_worker_run(m.m, &p) == DSRT_ERR_INVALID_ARGUMENT);  // rank 0 is the engine
  CHECK(std::string(dsrt_last_error()).find("rank 0 creates the engine") != std::string::npos);
  p.rank = 1;
  dsrt_engine *e = nullptr;
  CHECK(dsrt_engine_create_dist(m.m, nullptr, &p, &e) == DSRT_ERR_INVALID_ARGUMENT);  // a follower makes no engine
  CHECK(e == nullptr);
  p.world = 1;
  p.rank = 0;
  CHECK(dsrt_engine_create_dist(m.m, nullptr, &p, &e) == DSRT_OK);  // a world of 1 is a plain engine
  dsrt_engine_free(e);
}

TEST_CASE("Gloo collectives across ranks give what the in-process group gives; abort reaches the others") {
  if (!dsrt::gloo_available()) return;
  struct Split {
    int tp, ep;
  };
  for (Split sp : {Split{2, 1}, Split{2, 2}, Split{1, 4}}) {
    const int W = sp.tp * sp.ep;
    CAPTURE(W);
    CAPTURE(sp.tp);
    // Each rank's inputs, from the rank alone.
    auto values = [](int rank, size_t n, float scale) {
      std::vector<float> v(n);
      std::mt19937 g(uint32_t(rank * 7919 + int(n)));
      std::normal_distribution<float> d(0.0f, scale);
      for (float &x : v) x = d(g);
      return v;
    };
    struct Result {
      std::vector<float> world_sum, tensor_sum, gathered, exchanged;
      std::string step;
    };
    // The ranks' collectives on `comms[r]`, one thread per rank.
    auto run = [&](std::vector<std::unique_ptr<dsrt::Communicator>> &comms) {
      std::vector<Result> out(static_cast<size_t>(W));
      std::vector<std::thread> t;
      std::vector<std::string> errors(static_cast<size_t>(W));
      for (int r = 0; r < W; r++)
        t.emplace_back([&, r] {
          try {
            dsrt::Communicator &c = *comms[size_t(r)];
            Result &o = out[size_t(r)];
            o.world_sum = values(r, 3 * 37, 1e3f);  // large values: the order of the sum shows
            c.all_reduce_sum({o.world_sum.data(), dsrt::DType::F32, 3, 37, dsrt::Device::host()}, dsrt::Communicator::Group::World);
            o.tensor_sum = values(r + 100, 2 * 5, 1.0f);
            c.all_reduce_sum({o.tensor_sum.data(), dsrt::DType::F32, 2, 5, dsrt::Device::host()}, dsrt::Communicator::Group::Tensor);
            // uneven column blocks: 7 columns over the tp group
            const dsrt::Range cols = dsrt::Mapping::split(7, sp.tp, c.mapping().tp_rank());
            std::vector<float> local = values(r + 200, size_t(3 * cols.size()), 1.0f);
            o.gathered.assign(3 * 7, 0.0f);
            c.all_gather_cols({local.data(), dsrt::DType::F32, 3, cols.size(), dsrt::Device::host()},
                              {o.gathered.data(), dsrt::DType::F32, 3, 7, dsrt::Device::host()}, dsrt::Communicator::Group::Tensor);
            // rank r sends (r + k) % 3 rows of width 4 to rank k
            std::vector<int64_t> sc(static_cast<size_t>(W)), rc(static_cast<size_t>(W));
            int64_t ns = 0, nr = 0;
            for (int k = 0; k < W; k++) {
              ns += sc[size_t(k)] = (r + k) % 3;
              nr += rc[size_t(k)] = (k + r) % 3;
            }
            std::vector<float> send = values(r + 300, size_t(ns * 4), 1.0f);
            o.exchanged.assign(size_t(nr * 4), 0.0f);
            c.all_to_all_v({send.data(), dsrt::DType::F32, ns, 4, dsrt::Device::host()}, sc,
                           {o.exchanged.data(), dsrt::DType::F32, nr, 4, dsrt::Device::host()}, rc, dsrt::Communicator::Group::World);
            o.step = r == 0 ? std::string(100000, 'x') + "step" : "";
            c.broadcast(o.step, 0);
            c.barrier();
          } catch (const std::exception &e) {
            errors[size_t(r)] = e.what();
          }
        });
      for (auto &x : t) x.join();
      for (int r = 0; r < W; r++) CHECK(errors[size_t(r)] == "");
      return out;
    };
    std::vector<std::unique_ptr<dsrt::Communicator>> local = dsrt::make_local_group(sp.tp, sp.ep), gloo(static_cast<size_t>(W));
    const std::string coord = "127.0.0.1:" + std::to_string(free_port());
    {
      std::vector<std::thread> t;
      std::vector<std::string> errors(static_cast<size_t>(W));
      for (int r = 0; r < W; r++)
        t.emplace_back([&, r] {
          try {
            gloo[size_t(r)] = dsrt::join_process_group({W, r, sp.tp, sp.ep, coord, 5000}, "ckpt");
          } catch (const std::exception &e) {
            errors[size_t(r)] = e.what();
          }
        });
      for (auto &x : t) x.join();
      for (int r = 0; r < W; r++) REQUIRE(errors[size_t(r)] == "");
    }
    const std::vector<Result> want = run(local), got = run(gloo);
    for (int r = 0; r < W; r++) {
      CAPTURE(r);
      CHECK(got[size_t(r)].world_sum == want[size_t(r)].world_sum);  // bitwise: the same sums in the same order
      CHECK(got[size_t(r)].world_sum == got[0].world_sum);
      CHECK(got[size_t(r)].tensor_sum == want[size_t(r)].tensor_sum);
      CHECK(got[size_t(r)].gathered == want[size_t(r)].gathered);
      CHECK(got[size_t(r)].exchanged == want[size_t(r)].exchanged);
      CHECK(got[size_t(r)].step == want[0].step);
    }
    // One rank aborts: the others' next collective fails at once (its connections are closed), not after
    // the 5 s timeout, and so does the aborted rank's own.
    gloo[size_t(W - 1)]->abort("test abort");
    const auto t0 = Clock::now();
    std::vector<std::thread> t;
    std::vector<dsrt_status> codes(static_cast<size_t>(W), DSRT_OK);
    for (int r = 0; r < W; r++)
      t.emplace_back([&, r] {
        try {
          gloo[size_t(r)]->barrier();
        } catch (const dsrt::Error &e) {
          codes[size_t(r)] = e.code();
        }
      });
    for (auto &x : t) x.join();
    CHECK(Clock::now() - t0 < std::chrono::milliseconds(4000));
    for (int r = 0; r < W; r++) CHECK(codes[size_t(r)] == DSRT_ERR_IO);
  }
}

// NCCL is opened at run time: what a machine without it, or with a wrong library in its place, gets.
TEST_CASE("NCCL loading: a clean error without it or with a wrong library; the version and path when present") {
  std::string why;
  CHECK(dsrt::nccl::load_from({"/nonexistent/libnccl.so.2"}, &why) == nullptr);
  CHECK(why.find("NCCL not found") != std::string::npos);
  CHECK(why.find("/nonexistent/libnccl.so.2") != std::string::npos);
  CHECK(why.find("DSRT_NCCL_LIBRARY") != std::string::npos);
  why.clear();
  CHECK(dsrt::nccl::load_from({"libc.so.6"}, &why) == nullptr);  // loads, but is no NCCL
  CHECK(why.find("lacks ncclGetVersion") != std::string::npos);
  CHECK(dsrt::nccl::version_string(22809) == "2.28.9");
  CHECK(dsrt::nccl::version_string(21800) == "2.18.0");
  why.clear();
  if (auto api = dsrt::nccl::load_from({"libnccl.so.2"}, &why)) {  // this machine has NCCL
    CHECK(api->version >= dsrt::nccl::kMinVersion);
    CHECK(api->path.find("libnccl") != std::string::npos);
    CHECK(api->GetErrorString(dsrt::nccl::Result(0)) != nullptr);
    MESSAGE("NCCL " << dsrt::nccl::version_string(api->version) << " at " << api->path);
  } else {
    MESSAGE("no NCCL here: " << why);
    CHECK(!why.empty());
  }
}

TEST_CASE("NCCL environment: the knobs logged at start; NVLS off unless the user set it") {
  const char *saved = std::getenv("NCCL_NVLS_ENABLE");
  const std::string keep = saved ? saved : "";
  setenv("NCCL_NET_PLUGIN", "none", 1);
  unsetenv("NCCL_SOCKET_IFNAME");
  unsetenv("NCCL_NVLS_ENABLE");
  const std::string s = dsrt::nccl::env_summary();
  CHECK(s.find("NCCL_NET_PLUGIN=none") != std::string::npos);
  CHECK(s.find("NCCL_SOCKET_IFNAME unset") != std::string::npos);
  CHECK(s.find("NCCL_NET") != std::string::npos);
  CHECK(s.find("NCCL_IB_HCA") != std::string::npos);
  CHECK(dsrt::nccl::default_nvls_off());
  CHECK(std::string(std::getenv("NCCL_NVLS_ENABLE")) == "0");
  setenv("NCCL_NVLS_ENABLE", "1", 1);  // asked for: left alone
  CHECK(!dsrt::nccl::default_nvls_off());
  CHECK(std::string(std::getenv("NCCL_NVLS_ENABLE")) == "1");
  unsetenv("NCCL_NET_PLUGIN");
  if (saved) setenv("NCCL_NVLS_ENABLE", keep.c_str(), 1);
  else unsetenv("NCCL_NVLS_ENABLE");
  // The config handed to NCCL is its 2.14 layout, which every later NCCL reads by size and version.
  const dsrt::nccl::Config cfg;
  CHECK(cfg.size == sizeof(dsrt::nccl::Config));
  CHECK(cfg.magic == 0xcafebeefu);
  CHECK(cfg.version == 21400u);
  CHECK(cfg.blocking == dsrt::nccl::Config::kUndefInt);
  CHECK(offsetof(dsrt::nccl::Config, blocking) == 16);
  CHECK(offsetof(dsrt::nccl::Config, net_name) == 32);
}

TEST_CASE("the GPU of a rank in its own process: the launcher's local rank, else rank modulo the GPUs") {
  auto clear = [] {
    for (const char *v : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) unsetenv(v);
  };
  clear();
  CHECK(dsrt::local_device_index(0, 8) == 0);
  CHECK(dsrt::local_device_index(13, 8) == 5);  // second host of 8 GPUs
  CHECK(dsrt::local_device_index(3, 1) == 0);
  setenv("LOCAL_RANK", "2", 1);
  CHECK(dsrt::local_device_index(10, 8) == 2);
  setenv("SLURM_LOCALID", "6", 1);  // Slurm's before torchrun's
  CHECK(dsrt::local_device_index(10, 8) == 6);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);  // Open MPI's first
  CHECK(dsrt::local_device_index(10, 8) == 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "8", 1);  // more ranks on this host than GPUs
  try {
    dsrt::local_device_index(10, 8);
    FAIL("no error");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(std::string(e.what()).find("local rank 8 (OMPI_COMM_WORLD_LOCAL_RANK) but this host has 8 GPUs") != std::string::npos);
  }
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "x", 1);
  CHECK_THROWS_AS(dsrt::local_device_index(0, 8), dsrt::Error);
  clear();
  CHECK_THROWS_AS(dsrt::local_device_index(0, 0), dsrt::Error);
}

// Where several GPUs cannot run (a build without CUDA, a machine with fewer GPUs), asking for them is one
// clear error at engine creation, and a GPU follower process fails before it waits for anyone.
TEST_CASE("ranks on several GPUs where they cannot run: a clean error") {
  std::string why;
  const int gpus = dsrt::cuda_devices(&why);
  if (gpus >= 2) {
    MESSAGE("this machine has " << gpus << " GPUs: the GPU suite runs ranks on them");
    return;
  }
  auto model = dsrt::Model::load(tiny("no-qlora"), {});
  dsrt::EngineOptions eo;
  eo.backend_kind = dsrt::BackendKind::Cuda;
  eo.tp = 2;  // no-qlora's experts (128 columns, FP8) at tp 2 cut their scale blocks: said before anything starts
  try {
    auto e = std::make_shared<dsrt::Engine>(model, nullptr, eo);
    FAIL("tp 2 on GPUs started");
  } catch (const dsrt::Error &e) {
    CHECK(e.code() == DSRT_ERR_UNSUPPORTED);
    const std::string m = e.what();
    CAPTURE(m);
    CHECK(m.find("FP8 scale block") != std::string::npos);
    CHECK(m.find("split by experts: tp 1, ep 2") != std::string::npos);
  }
  eo.tp = 1;
  eo.ep = 2;
  try {
    auto e = std::make_shared<dsrt::Engine>(model, nullptr, eo);
    FAIL("an engine of 2 GPU ranks started with " << gpus << " GPUs");
  } catch (const dsrt::Error &e) {
#if DSRT_WITH_CUDA
    CHECK(e.code() == DSRT_ERR_INVALID_ARGUMENT);
    CHECK(std::string(e.what()).find("this machine has " + std::to_string(gpus) + " GPUs") != std::string::npos);
#else
    CHECK(e.code() == DSRT_ERR_UNSUPPORTED);
    CHECK(std::string(e.what()).find("need a build of dsrt with CUDA") != std::string::npos);
#endif
  }
  if (gpus == 0) {
    dsrt::DistSpec spec{2, 1, 1, 2, "127.0.0.1:1", 60000};
    const auto t0 = Clock::now();
    try {
      dsrt::run_follower_process(*model, spec, dsrt::BackendKind::Cuda, {});
      FAIL("a GPU follower ran without a GPU");
    } catch (const dsrt::Error &e) {
      CHECK((e.code() == DSRT_ERR_NO_DEVICE || e.code() == DSRT_ERR_UNSUPPORTED));
    }
    CHECK(Clock::now() - t0 < std::chrono::seconds(10));  // not after the rendezvous's 60 s
  }
}

// The watchdog that follows queued collectives (dist/collective_watchdog.h, NCCL's on a GPU), with flags for
// the transport's marks: the GPU's events are not needed to check its verdicts.
namespace {
struct FakeTransport {
  std::atomic<bool> marks[4] = {};  // mark i finished
  std::atomic<int> fails{0};
  std::string why;  // the text `fail` got (written once, on the watchdog's thread)
  std::function<std::string()> error = [] { return std::string(); };
  // `fail` runs after failure() is set: wait for it (at most 5 s).
  int fails_seen() {
    for (auto t0 = Clock::now(); fails == 0 && Clock::now() - t0 < std::chrono::seconds(5);)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return fails;
  }
  dsrt::CollectiveWatchdog::Source source() {
    return {[](void *m) { return static_cast<std::atomic<bool> *>(m)->load(); }, [this] { return error(); },
            [this](const std::string &w) {
              why = w;
              fails++;
            }};
  }
};
}  // namespace

TEST_CASE("collective watchdog: marks finish in order and come back; an overdue one, an error, a throwing query or a stuck call fail once") {
  using namespace std::chrono_literals;
  SUBCASE("finishing marks: settle, spare marks, no failure; one that takes a while within the timeout is fine") {
    FakeTransport t;
    dsrt::CollectiveWatchdog w(t.source(), 2000ms);
    CHECK(w.spare() == nullptr);
    for (auto &m : t.marks) w.follow(&m, "all_reduce_sum over the world");
    CHECK(w.pending() == 4);
    std::thread later([&] {
      std::this_thread::sleep_for(100ms);
      for (auto &m : t.marks) m = true;
    });
    CHECK(w.settle());
    later.join();
    CHECK(w.pending() == 0);
    std::set<void *> back;
    while (void *m = w.spare()) back.insert(m);
    CHECK(back.size() == 4);
    CHECK(back.count(&t.marks[2]) == 1);
    CHECK(w.failure().empty());
    CHECK(t.fails == 0);
  }
  SUBCASE("a mark not finished within the timeout: fail once, naming the collective; nothing followed after") {
    FakeTransport t;
    dsrt::CollectiveWatchdog w(t.source(), 50ms);
    const auto t0 = Clock::now();
    w.follow(&t.marks[0], "all_to_all_v over the world");
    CHECK_FALSE(w.settle());
    const auto took = Clock::now() - t0;
    CHECK(took >= 50ms);
    CHECK(took < 5s);
    CHECK(t.fails_seen() == 1);
    CHECK(w.failure() == t.why);
    CHECK(t.why.find("all_to_all_v over the world") != std::string::npos);
    CHECK(t.why.find("50 ms") != std::string::npos);
    w.follow(&t.marks[1], "all_reduce_sum over the world");  // the group has failed: not followed
    std::this_thread::sleep_for(120ms);
    CHECK(t.fails == 1);
    CHECK_FALSE(w.settle());
  }
  SUBCASE("the transport's asynchronous error fails the group at once") {
    FakeTransport t;
    std::atomic<bool> broken{false};
    t.error = [&] { return broken ? std::string("remote process exited or there was a network error") : std::string(); };
    dsrt::CollectiveWatchdog w(t.source(), 60000ms);
    w.follow(&t.marks[0], "all_gather_cols over the tensor-parallel group");
    std::this_thread::sleep_for(20ms);
    CHECK(w.failure().empty());  // pending, no error yet
    const auto t0 = Clock::now();
    broken = true;
    CHECK_FALSE(w.settle());
    CHECK(Clock::now() - t0 < 5s);
    CHECK(t.fails_seen() == 1);
    CHECK(t.why.find("all_gather_cols over the tensor-parallel group: remote process exited") != std::string::npos);
  }
  SUBCASE("a query that throws is a failure with its text") {
    FakeTransport t;
    dsrt::CollectiveWatchdog::Source s = t.source();
    s.finished = [](void *) -> bool { throw std::runtime_error("CUDA: an illegal memory access was encountered"); };
    dsrt::CollectiveWatchdog w(s, 60000ms);
    w.follow(&t.marks[0], "all_reduce_sum over the world");
    CHECK_FALSE(w.settle());
    CHECK(t.fails_seen() == 1);
    CHECK(w.failure().find("illegal memory access") != std::string::npos);
  }
  SUBCASE("a call stuck on the host past the timeout fails the group with nothing pending; a short one does not") {
    FakeTransport t;
    dsrt::CollectiveWatchdog w(t.source(), 150ms);
    w.enter_call("all_reduce_sum");
    std::this_thread::sleep_for(60ms);
    w.leave_call();
    std::this_thread::sleep_for(200ms);
    CHECK(w.failure().empty());
    const auto t0 = Clock::now();
    w.enter_call("all_to_all_v");
    CHECK(t.fails_seen() == 1);
    const auto took = Clock::now() - t0;
    CHECK(took >= 150ms);
    CHECK(took < 5s);
    CHECK(t.why.find("all_to_all_v: still inside it 150 ms") != std::string::npos);
    w.leave_call();
  }
  SUBCASE("destroyed with marks pending: its thread stops without waiting for them") {
    FakeTransport t;
    const auto t0 = Clock::now();
    {
      dsrt::CollectiveWatchdog w(t.source(), 60000ms);
      w.follow(&t.marks[0], "all_reduce_sum over the world");
    }
    CHECK(Clock::now() - t0 < 5s);
    CHECK(t.fails == 0);
  }
}
