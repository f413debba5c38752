// `dsrt bench --ops`: every weight-streaming op of a DeepSeek-V3 decode step at batch 1, on V3's shapes with
// random weights, timed on the GPU backend as a decode step runs it (launches recorded and replayed from a
// CUDA graph), each beside the device copy rate: the GEMV kernels' share of the bandwidth roofline.
// Then the BF16 lm_head at decode batches of 8 to 256 rows as a step runs it (FP8 activations on): the swap-AB
// BF16 kernel up to kCudaBf16SwapAbMaxRows, cuBLASLt above (DSRT_BF16_MMA=0: every size on cuBLASLt).
// --sweep also times every cut of the GEMV kernel (K slices x rows per warp) per shape, the data behind the
// kernel's choice (kernels/linear.cu, gemv_split).
#include "bench_ops.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/fp8_matmul.h"
#include "backend/cpu/host_bandwidth.h"
#include "backend/cpu/host_experts.h"
#include "core/thread_pool.h"
#include "core/status.h"

namespace dsrt::tools {
namespace {

// Random weights in a checkpoint dtype (values of a plausible size; no NaN codes).
struct RandomWeight {
  std::vector<uint8_t> bytes;
  std::vector<float> scale;
  Weight w;
  RandomWeight(int64_t rows, int64_t cols, DType dt, uint64_t seed) {
    w.dtype = dt;
    w.rows = rows;
    w.cols = cols;
    bytes.resize(size_t(rows * cols) * dtype_size(dt));
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      uint64_t v = x;
      if (dt == DType::F8_E4M3) v &= 0xf7f7f7f7f7f7f7f7ull;  // exponent <= 14 of 15: never the NaN code
      if (dt == DType::BF16) v = (v & 0x807f807f807f807full) | 0x3c003c003c003c00ull;  // +-[2^-7, 2^-6)
      std::memcpy(&bytes[i], &v, 8);
    }
    if (dt == DType::F8_E4M3) {
      w.scale_cols = (cols + 127) / 128;
      scale.assign(size_t(((rows + 127) / 128) * w.scale_cols), 1e-3f);
      w.scale = scale.data();
    }
    w.data = bytes.data();
  }
};

struct Shape {
  const char *name;
  int64_t rows, cols;
  DType dtype;
};

// DeepSeek-V3's matrices (config of DeepSeek-V3/R1: hidden 7168, q_lora 1536, 128 heads of 192 / 128,
// kv_lora 512 + rope 64, dense FFN 18432, expert FFN 2048, vocabulary 129280; BF16 head).
const Shape kShapes[] = {
    {"q_a_proj 7168->1536", 1536, 7168, DType::F8_E4M3},
    {"q_b_proj 1536->24576", 24576, 1536, DType::F8_E4M3},
    {"kv_a_proj 7168->576", 576, 7168, DType::F8_E4M3},
    {"o_proj 16384->7168", 7168, 16384, DType::F8_E4M3},
    {"dense gate/up 7168->18432", 18432, 7168, DType::F8_E4M3},
    {"dense down 18432->7168", 7168, 18432, DType::F8_E4M3},
    {"shared gate/up 7168->2048", 2048, 7168, DType::F8_E4M3},
    {"shared down 2048->7168", 7168, 2048, DType::F8_E4M3},
    {"router 7168->256 (BF16)", 256, 7168, DType::BF16},
    {"lm_head 7168->129280 (BF16)", 129280, 7168, DType::BF16},
};

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
double process_cpu_s() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Seconds per call of fn, as a decode step runs it: `reps` calls recorded back to back and launched
// together; the first two rounds run them one by one and capture the CUDA graph, the next ones replay it.
// setup() makes the inputs (uploads sync; not timed) at the start of each round's step.
template <class S, class F>
double time_calls(Backend &be, int reps, S setup, F fn) {
  double best = 1e30;
  float sink = 0;
  for (int round = 0; round < 5; round++) {
    be.begin_step();
    Tensor probe = be.alloc(1, 1);
    setup();
    const double t0 = now_s();
    for (int i = 0; i < reps; i++) fn(i);
    be.to_host(probe, &sink);  // the sync
    if (round >= 2) best = std::min(best, (now_s() - t0) / reps);
  }
  return best;
}

// n routed experts of V3's shape (gate, up [2048, 7168], down [7168, 2048]; FP8), their bytes kept in `owner`.
std::vector<FfnWeights> random_experts(int n, std::vector<std::unique_ptr<RandomWeight>> &owner) {
  std::vector<FfnWeights> experts(static_cast<size_t>(n));
  for (int e = 0; e < n; e++) {
    owner.push_back(std::make_unique<RandomWeight>(2048, 7168, DType::F8_E4M3, 100 + 3 * e));
    experts[size_t(e)].gate = owner.back()->w;
    owner.push_back(std::make_unique<RandomWeight>(2048, 7168, DType::F8_E4M3, 101 + 3 * e));
    experts[size_t(e)].up = owner.back()->w;
    owner.push_back(std::make_unique<RandomWeight>(7168, 2048, DType::F8_E4M3, 102 + 3 * e));
    experts[size_t(e)].down = owner.back()->w;
  }
  return experts;
}

// --backend cpu: the CPU backend's linear and moe_experts on V3's shapes, one call at a time after the last-level
// cache has been flushed (a 256 MiB read), each beside the host's DRAM read rate measured here, then expert
// offload's CPU path (HostExperts). The BF16 lm_head (1.85 GB) is left out: in offload it stays on the GPU.
int bench_ops_cpu(const BenchOpsOptions &o) {
  ThreadPool pool(o.threads);
  const double bw = host_read_bandwidth(pool);
  std::printf("CPU kernels on DeepSeek-V3's decode shapes (batch %d, random weights, %d threads, FP8 path %s)\n"
              "host DRAM read rate %.1f GB/s (%d threads streaming 512 MiB)\n",
              o.rows, pool.size(), fp8::path_name(fp8::Path::Auto), bw / 1e9, pool.size());
  BackendOptions bo;
  bo.n_threads = o.threads;
  auto be = make_backend(BackendKind::Cpu, bo);
  const size_t flush_bytes = size_t(256) << 20;
  std::vector<uint64_t> flush(flush_bytes / 8, 1);
  volatile unsigned long long sink = 0;
  const int reps = std::max(3, std::min(o.reps, 8));
  // Seconds of one call (the best of reps), each after a cache flush. busy: the process's CPU time over
  // threads x wall time in that call (under 100%: the threads waited for cores other processes held).
  double busy = 0;
  auto time_one = [&](auto &&call) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
      sink = sink + host_stream_read(pool, flush.data(), flush_bytes);
      const double t0 = now_s(), c0 = process_cpu_s();
      call(r);
      const double t = now_s() - t0;
      if (t < best) best = t, busy = (process_cpu_s() - c0) / (t * pool.size());
    }
    return best;
  };
  std::printf("  %-30s %9s %9s %8s %7s %6s\n", "shape", "MB", "ms", "GB/s", "% DRAM", "busy");
  double sum_bytes = 0, sum_s = 0;
  for (size_t i = 0; i < std::size(kShapes); i++) {
    const Shape &sh = kShapes[i];
    if (sh.rows * sh.cols * int64_t(dtype_size(sh.dtype)) > (int64_t(1) << 30)) continue;  // lm_head
    RandomWeight rw(sh.rows, sh.cols, sh.dtype, i + 1);
    be->begin_step();
    Tensor x = be->alloc(o.rows, sh.cols), y = be->alloc(o.rows, sh.rows);
    for (int64_t j = 0; j < o.rows * sh.cols; j++) x.f32()[j] = 0.01f * float(j % 17) - 0.08f;
    const double s = time_one([&](int) { be->linear(x, rw.w, y); });
    const double bytes = double(sh.rows * sh.cols) * double(dtype_size(sh.dtype));
    if (sh.dtype == DType::F8_E4M3) sum_bytes += bytes, sum_s += s;
    std::printf("  %-30s %9.1f %9.3f %8.2f %6.1f%% %5.0f%%\n", sh.name, bytes / 1e6, s * 1e3, bytes / s / 1e9, 100.0 * bytes / s / bw,
                100.0 * busy);
  }
  constexpr int kExperts = 16, kTopK = 8;
  std::vector<std::unique_ptr<RandomWeight>> ew;
  const std::vector<FfnWeights> experts = random_experts(kExperts, ew);
  {  // the routed experts of the batch: top-8 of 16 V3-shaped experts per row, as moe_experts runs them
    be->begin_step();
    Tensor x = be->alloc(o.rows, 7168), ids = be->alloc(o.rows, kTopK, DType::I32), tw = be->alloc(o.rows, kTopK),
           y = be->alloc(o.rows, 7168);
    for (int64_t j = 0; j < o.rows * 7168; j++) x.f32()[j] = 0.01f * float(j % 17) - 0.08f;
    std::vector<bool> used(kExperts, false);
    for (int t = 0; t < o.rows; t++)  // row t takes experts (t + 2k) mod 16: rows share some, as batches do
      for (int k = 0; k < kTopK; k++) {
        const int e = (t + 2 * k) % kExperts;
        ids.i32()[t * kTopK + k] = e;
        tw.f32()[t * kTopK + k] = 0.125f;
        used[size_t(e)] = true;
      }
    const double n_used = double(std::count(used.begin(), used.end(), true));
    const double bytes = n_used * 3 * 2048 * 7168;
    const double s = time_one([&](int) { be->moe_experts(x, experts, ids, tw, y); });
    sum_bytes += bytes, sum_s += s;
    char name[64];
    std::snprintf(name, sizeof name, "experts %d x (7168->2048->7168)", int(n_used));
    std::printf("  %-30s %9.1f %9.3f %8.2f %6.1f%% %5.0f%%\n", name, bytes / 1e6, s * 1e3, bytes / s / 1e9, 100.0 * bytes / s / bw,
                100.0 * busy);
  }
  std::printf("  %-30s %9.1f %9.3f %8.2f %6.1f%%\n", "all FP8 above", sum_bytes / 1e6, sum_s * 1e3, sum_bytes / sum_s / 1e9,
              100.0 * sum_bytes / sum_s / bw);
  // Expert offload's CPU path (HostExperts): 8 experts of one layer, each with 1 token (a decode step) and with 8
  // tokens (8 tokens routed alike: the upper end of what offload leaves to the CPU), fp32 activations.
  HostExperts he(o.threads);
  for (int rows : {1, 8}) {
    std::vector<float> hx(size_t(rows) * 7168), hw(size_t(rows * kTopK), 0.125f), hy(size_t(rows) * 7168);
    std::vector<int32_t> hid(size_t(rows * kTopK));
    for (size_t j = 0; j < hx.size(); j++) hx[j] = 0.01f * float(j % 17) - 0.08f;
    for (size_t j = 0; j < hid.size(); j++) hid[j] = int32_t(j % kTopK);
    const double s = time_one([&](int) {
      he.run(hx.data(), rows, 7168, hid.data(), hw.data(), kTopK, experts, nullptr, false, hy.data());
    });
    const double bytes = double(he.last_weight_bytes());
    char name[64];
    std::snprintf(name, sizeof name, "host experts 8 x %d token%s", rows, rows > 1 ? "s" : "");
    std::printf("  %-30s %9.1f %9.3f %8.2f %6.1f%% %5.0f%%\n", name, bytes / 1e6, s * 1e3, bytes / s / 1e9, 100.0 * bytes / s / bw,
                100.0 * busy);
  }
  std::printf("  host experts compute-bound: %.1f GFLOP/s (HostExperts::measure_flops, the cost model's cpu_flops)\n",
              he.measure_flops() / 1e9);
  return 0;
}

}  // namespace

int bench_ops(const BenchOpsOptions &o) {
  if (o.cpu) return bench_ops_cpu(o);
  const double bw = device_copy_bandwidth(o.device);
  if (bw <= 0) fail(DSRT_ERR_NO_DEVICE, "dsrt bench --ops needs a CUDA GPU");
  std::printf("GEMV kernels on DeepSeek-V3's decode shapes (batch %d, random weights), copy rate %.0f GB/s\n", o.rows, bw / 1e9);
  std::vector<std::unique_ptr<RandomWeight>> ws;
  for (const Shape &s : kShapes) ws.push_back(std::make_unique<RandomWeight>(s.rows, s.cols, s.dtype, ws.size() + 1));
  // Routed experts: 32 of V3's shape, 8 per token (different ones each call, as consecutive layers would).
  constexpr int kExperts = 32, kTopK = 8;
  std::vector<std::unique_ptr<RandomWeight>> ew;
  const std::vector<FfnWeights> experts = random_experts(kExperts, ew);
  const double expert_bytes = double(kTopK) * 3 * 2048 * 7168;

  struct Cut {
    int k_split, rows_per_warp;
  };
  std::vector<Cut> cuts = {{0, 0}};  // the kernel's own choice first
  if (o.sweep)
    for (int g : {1, 2, 4, 8})
      for (int r : {1, 2, 4}) cuts.push_back({g, r});
  std::vector<std::vector<double>> gbs(cuts.size());
  for (size_t c = 0; c < cuts.size(); c++) {
    BackendOptions bo;
    bo.device = o.device;
    bo.gemv_k_split = cuts[c].k_split;
    bo.gemv_rows_per_warp = cuts[c].rows_per_warp;
    auto be = make_backend(BackendKind::Cuda, bo);
    for (size_t i = 0; i < ws.size(); i++) {
      const Weight &w = ws[i]->w;
      Tensor x, y;
      const std::vector<float> xh(size_t(o.rows * w.cols), 0.01f);
      const double s = time_calls(
          *be, o.reps,
          [&] {
            x = be->alloc(o.rows, w.cols);
            y = be->alloc(o.rows, w.rows);
            be->from_host(x, xh.data());
          },
          [&](int) { be->linear(x, w, y); });
      const double bytes = double(w.rows * w.cols) * double(dtype_size(w.dtype));
      gbs[c].push_back(bytes / s / 1e9);
      if (c == 0)
        std::printf("  %-30s %9.1f MB %8.1f us %7.0f GB/s %5.1f%%\n", kShapes[i].name, bytes / 1e6, s * 1e6,
                    bytes / s / 1e9, 100.0 * bytes / s / bw);
    }
    if (c == 0) {  // the routed experts of one token: gate/up, SwiGLU, down and the weighted sum
      Tensor x, tw, y;
      std::vector<Tensor> ids(size_t(o.reps));
      const std::vector<float> xh(7168, 0.01f), wh(kTopK, 0.125f);
      const double s = time_calls(
          *be, o.reps,
          [&] {
            x = be->alloc(1, 7168);
            tw = be->alloc(1, kTopK);
            y = be->alloc(1, 7168);
            be->from_host(x, xh.data());
            be->from_host(tw, wh.data());
            for (int i = 0; i < o.reps; i++) {  // a different set of 8 experts for each call
              std::vector<int32_t> h(kTopK);
              for (int k = 0; k < kTopK; k++) h[size_t(k)] = int32_t((i * 5 + k * 4) % kExperts);
              ids[size_t(i)] = be->alloc(1, kTopK, DType::I32);
              be->from_host(ids[size_t(i)], h.data());
            }
          },
          [&](int i) { be->moe_experts(x, experts, ids[size_t(i)], tw, y); });
      std::printf("  %-30s %9.1f MB %8.1f us %7.0f GB/s %5.1f%%\n", "experts 8 x (7168->2048->7168)", expert_bytes / 1e6,
                  s * 1e6, expert_bytes / s / 1e9, 100.0 * expert_bytes / s / bw);
    }
  }
  {  // The BF16 lm_head at decode batches, as a step with FP8 activations runs it: Fp8Gemm::run_bf16 (x rounded to
     // bf16, then dsrt's swap-AB BF16 kernel up to kCudaBf16SwapAbMaxRows rows - kernels/gemm_bf16_mma.cu -
     // cuBLASLt above).
    const std::string lt = cublaslt_status();
    BackendOptions bo;
    bo.device = o.device;
    bo.fp8_activations = true;
    auto be = make_backend(BackendKind::Cuda, bo);
    const Weight &w = ws.back()->w;  // lm_head 7168->129280 (BF16)
    const char *env = std::getenv("DSRT_BF16_MMA");
    const bool mma_off = env && std::string(env) == "0";  // (run_bf16's switch)
    const double bytes = double(w.rows * w.cols) * double(dtype_size(w.dtype));
    if (lt.rfind("cuBLASLt ", 0) != 0)
      std::printf("  (%s: BF16 linears of many rows stay on the GEMV path)\n", lt.c_str());
    for (int rows : {8, 32, 64, 128, 256}) {
      Tensor x, y;
      const std::vector<float> xh(size_t(rows * w.cols), 0.01f);
      const double s = time_calls(
          *be, std::min(o.reps, 20),
          [&] {
            x = be->alloc(rows, w.cols);
            y = be->alloc(rows, w.rows);
            be->from_host(x, xh.data());
          },
          [&](int) { be->linear(x, w, y); });
      char name[64];
      std::snprintf(name, sizeof name, "lm_head x %d rows (%s)", rows,
                    rows > kCudaBf16SwapAbMaxRows || mma_off ? "cuBLASLt" : "swap-AB");
      std::printf("  %-30s %9.1f MB %8.1f us %7.0f GB/s %5.1f%%\n", name, bytes / 1e6, s * 1e6, bytes / s / 1e9,
                  100.0 * bytes / s / bw);
    }
  }
  if (o.sweep) {
    std::printf("\n  GB/s per cut (K slices x rows per warp; 'auto' = the kernel's choice):\n  %-30s %7s", "shape", "auto");
    for (size_t c = 1; c < cuts.size(); c++) std::printf("  %dx%d", cuts[c].k_split, cuts[c].rows_per_warp);
    std::printf("\n");
    for (size_t i = 0; i < ws.size(); i++) {
      std::printf("  %-30s %7.0f", kShapes[i].name, gbs[0][i]);
      for (size_t c = 1; c < cuts.size(); c++) std::printf(" %5.0f", gbs[c][i]);
      std::printf("\n");
    }
  }
  return 0;
}

}  // namespace dsrt::tools
