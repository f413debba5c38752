// `dsrt bench --comm`: the collectives of a DeepSeek-V3 step over NCCL between this machine's GPUs (bench_comm.cpp).
#pragma once

namespace dsrt::tools {

struct BenchCommOptions {
  int world = 0;   // GPUs, one rank each (0: every GPU of the machine)
  int reps = 200;  // calls per timed round
};
int bench_comm(const BenchCommOptions &o);

}  // namespace dsrt::tools
