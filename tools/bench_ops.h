// `dsrt bench --ops`: the GEMV kernels on DeepSeek-V3's decode shapes against the copy rate (bench_ops.cpp).
#pragma once

namespace dsrt::tools {

struct BenchOpsOptions {
  int device = 0;
  int rows = 1;      // activation rows (the decode batch)
  int reps = 50;     // calls per timed round
  bool sweep = false;  // also every cut of the GEMV kernel
};
int bench_ops(const BenchOpsOptions &o);

}  // namespace dsrt::tools
