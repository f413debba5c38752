// `dsrt bench --comm`: the collectives a DeepSeek-V3 step runs, on V3's shapes, over NCCL between this
// machine's GPUs as the engine's in-process ranks run them (dist/nccl_communicator.h: a GPU and a thread per
// rank; on one GPU, a world of one whose collectives still go through NCCL). Each is timed three ways: queued
// back to back as a step queues them (the watchdog following them), with the host waiting for each before
// the next (what every collective cost before the communicator stopped waiting), and queued on the
// non-blocking communicators (DSRT_NCCL_NONBLOCKING=1: NCCL starts a thread per call). Beside each, the bytes it
// moves and the bandwidths as nccl-tests reports them (algorithm: bytes / time; bus: what each link carries).
// The last lines turn the all-reduce figure into milliseconds per token of a tensor-parallel decode step.
#include "bench_comm.h"

#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"
#include "dist/mapping.h"
#if DSRT_WITH_CUDA
#include <cuda_runtime.h>

#include "dist/nccl_communicator.h"
#endif

namespace dsrt::tools {

#if DSRT_WITH_CUDA
namespace {

constexpr int64_t kHidden = 7168, kVocab = 129280, kLayers = 61;  // DeepSeek-V3

struct Case {
  std::string name;
  double bytes = 0;       // what one call moves per rank (nccl-tests' "size")
  double bus_factor = 0;  // bus bandwidth = algorithm bandwidth x this
  // Queues one call on rank r (its backend, its communicator, the tensors made by `make`).
  std::function<void(int r)> make, call;
};

struct Timing {
  double queued_us = 0, waited_us = 0, nonblocking_us = 0;
};

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int bench_comm(const BenchCommOptions &o) {
  std::string why;
  const int n = cuda_devices(&why);
  if (n < 1) failf(DSRT_ERR_NO_DEVICE, "bench --comm needs a GPU: ", why);
  const int W = o.world > 0 ? o.world : n;
  if (W > n) failf(DSRT_ERR_INVALID_ARGUMENT, "bench --comm --world ", W, ": this machine has ", n, " GPUs");
  std::vector<std::unique_ptr<Backend>> bes;
  std::vector<Backend *> ptrs;
  for (int r = 0; r < W; r++) {
    BackendOptions bo;
    bo.device = r;
    bo.cuda_graphs = false;
    bes.push_back(make_backend(BackendKind::Cuda, bo));
    ptrs.push_back(bes.back().get());
  }
  // tp = W: the tensor-parallel group is the world, as in a tensor-parallel step. (Made per mode below.)
  std::vector<std::unique_ptr<Communicator>> comms;
  const double ring = W > 1 ? 2.0 * (W - 1) / W : 0.0, spread = W > 1 ? double(W - 1) / W : 0.0;

  // Each rank's tensors per case (made on its own thread: its device is current there).
  std::vector<std::vector<Tensor>> ts(static_cast<size_t>(W));
  std::vector<Case> cases;
  using G = Communicator::Group;
  for (int64_t rows : {1, 8, 32, 128}) {
    Case c;
    c.name = "all_reduce_sum [" + std::to_string(rows) + " x 7168] f32 (TP hidden state)";
    c.bytes = double(rows * kHidden * 4);
    c.bus_factor = ring;
    c.make = [&, rows](int r) { ts[size_t(r)] = {bes[size_t(r)]->alloc(rows, kHidden)}; };
    c.call = [&](int r) { comms[size_t(r)]->all_reduce_sum(ts[size_t(r)][0], G::World); };
    cases.push_back(c);
  }
  for (int64_t rows : {1, 8}) {
    Case c;
    c.name = "all_gather_cols [" + std::to_string(rows) + " x 129280] f32 (vocab-parallel head)";
    c.bytes = double(rows * kVocab * 4);
    c.bus_factor = spread;
    c.make = [&, rows](int r) {
      ts[size_t(r)] = {bes[size_t(r)]->alloc(rows, Mapping::split(kVocab, W, r).size()), bes[size_t(r)]->alloc(rows, kVocab)};
    };
    c.call = [&](int r) { comms[size_t(r)]->all_gather_cols(ts[size_t(r)][0], ts[size_t(r)][1], G::World); };
    cases.push_back(c);
  }
  for (int64_t rows : {1, 8, 32}) {
    Case c;
    c.name = "all_to_all_v " + std::to_string(rows) + " rows x 7168 f32 to each rank (routed rows)";
    c.bytes = double(rows * W * kHidden * 4);
    c.bus_factor = spread;
    c.make = [&, rows](int r) { ts[size_t(r)] = {bes[size_t(r)]->alloc(rows * W, kHidden), bes[size_t(r)]->alloc(rows * W, kHidden)}; };
    c.call = [&, rows](int r) {
      const std::vector<int64_t> each(size_t(W), rows);
      comms[size_t(r)]->all_to_all_v(ts[size_t(r)][0], each, ts[size_t(r)][1], each, G::World);
    };
    cases.push_back(c);
  }

  std::vector<Timing> timing(cases.size());
  // One mode: blocking twins (the default) queued and host-waited, or the non-blocking communicators queued.
  auto run_mode = [&](bool nonblocking) {
    if (nonblocking) setenv("DSRT_NCCL_NONBLOCKING", "1", 1);
    else unsetenv("DSRT_NCCL_NONBLOCKING");
    comms = make_nccl_local_group(W, 1, ptrs, 60000);
    std::vector<std::exception_ptr> errors(static_cast<size_t>(W));
    std::barrier<> bar(W);
    auto rank = [&](int r) {
      try {
        Backend &be = *bes[size_t(r)];
        cudaStream_t s = static_cast<cudaStream_t>(be.native_stream());
        auto sync = [&] {
          const cudaError_t e = cudaStreamSynchronize(s);
          if (e != cudaSuccess) failf(DSRT_ERR_INTERNAL, "CUDA: ", cudaGetErrorString(e));
        };
        for (size_t i = 0; i < cases.size(); i++) {
          be.begin_step();
          cases[i].make(r);
          for (int k = 0; k < 10; k++) cases[i].call(r);  // warm-up
          sync();
          for (int waited = 0; waited < (nonblocking ? 1 : 2); waited++) {
            bar.arrive_and_wait();
            const double t0 = now_s();
            for (int k = 0; k < o.reps; k++) {
              cases[i].call(r);
              if (waited) sync();
            }
            sync();
            comms[size_t(r)]->check();
            bar.arrive_and_wait();
            const double us = (now_s() - t0) / o.reps * 1e6;
            if (r == 0) (nonblocking ? timing[i].nonblocking_us : waited ? timing[i].waited_us : timing[i].queued_us) = us;
          }
        }
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
        comms[size_t(r)]->abort("rank " + std::to_string(r) + " of bench --comm failed");
        bar.arrive_and_drop();
      }
    };
    std::vector<std::thread> threads;
    for (int r = 1; r < W; r++) threads.emplace_back(rank, r);
    rank(0);
    for (auto &th : threads) th.join();
    comms.clear();
    unsetenv("DSRT_NCCL_NONBLOCKING");
    for (auto &e : errors)
      if (e) std::rethrow_exception(e);
  };
  run_mode(false);
  run_mode(true);

  std::printf("NCCL collectives on %d GPU%s (a rank and a thread each), %d calls per round\n", W, W > 1 ? "s" : "", o.reps);
  std::printf("queued: back to back on the blocking twins (as a step runs them); waited: the host waits for each;\n"
              "non-blocking: queued on the joined non-blocking communicators (DSRT_NCCL_NONBLOCKING=1)\n");
  std::printf("%-66s %9s %10s %10s %13s %10s %10s\n", "collective", "MB/rank", "queued us", "waited us", "non-blocking",
              "algbw GB/s", "busbw GB/s");
  for (size_t i = 0; i < cases.size(); i++) {
    const double alg = cases[i].bytes / (timing[i].queued_us * 1e-6) / 1e9;
    std::printf("%-66s %9.3f %10.1f %10.1f %13.1f %10.1f %10.1f\n", cases[i].name.c_str(), cases[i].bytes / 1e6,
                timing[i].queued_us, timing[i].waited_us, timing[i].nonblocking_us, alg, alg * cases[i].bus_factor);
  }
  // A tensor-parallel decode step at batch 1: two hidden-state all-reduces per layer (attention out, FFN out).
  const double per_call = 2.0 * kLayers / 1e3;
  std::printf("tp %d decode at batch 1: %d all-reduces of [1 x 7168] per token: %.2f ms queued, %.2f ms host-waited, "
              "%.2f ms on the non-blocking communicators\n",
              W, int(2 * kLayers), per_call * timing[0].queued_us, per_call * timing[0].waited_us, per_call * timing[0].nonblocking_us);
  return 0;
}
#else
int bench_comm(const BenchCommOptions &) {
  fail(DSRT_ERR_UNSUPPORTED, "bench --comm needs a build of dsrt with CUDA (and NCCL at run time)");
}
#endif

}  // namespace dsrt::tools
