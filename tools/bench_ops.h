// `dsrt bench --ops`: the GEMV kernels on DeepSeek-V3's decode shapes against the copy rate (bench_ops.cpp);
// with --backend cpu, the CPU kernels against the host's DRAM read rate.
#pragma once

namespace dsrt::tools {

struct BenchOpsOptions {
  int device = 0;
  int rows = 1;      // activation rows (the decode batch)
  int reps = 50;     // calls per timed round
  bool sweep = false;  // also every cut of the GEMV kernel
  bool cpu = false;    // the CPU backend's kernels (fp8_matmul.cpp) against the host's DRAM read rate
  int threads = 0;     // CPU threads (0: all)
};
int bench_ops(const BenchOpsOptions &o);

}  // namespace dsrt::tools
