// The command line's side of ranks in several processes (docs/engine.md, "Ranks in several processes"), kept
// apart from the option parser: `dsrt eval|generate ... --world W --rank R --coordinator HOST:PORT` is rank 0
// (the engine, which writes the outputs) or a follower (runs the worker, prints nothing on stdout, exits 0
// when rank 0 is done), and `dsrt worker` is a follower explicitly.
#pragma once
#include <string>

#include "dsrt.h"

namespace dsrt::tools {

// The options as given (--world, --rank, --coordinator, --tp, --ep, --threads, --model); unset: 0, -1, "".
struct DistArgs {
  std::string model, coordinator;
  int world = 0, rank = -1, tp = 0, ep = 0, threads = 0;
  bool dp_attention = false;
  int backend = DSRT_BACKEND_CPU;  // dsrt_backend the worker loads the model on (as rank 0 does)
};

// For dsrt_engine_create_dist / dsrt_worker_run; points into `a`.
dsrt_dist_params dist_params(const DistArgs &a);
// This process is rank 1..W-1 of several (from the options, else the launcher's environment: mpirun, srun,
// torchrun; see dist/launcher_env.h). Throws dsrt::Error on inconsistent options.
bool is_follower(const DistArgs &a);
// Loads the model on a.backend and runs the follower rank until rank 0 stops the group. Returns the
// process's exit code (0: rank 0 finished; 1: an error, one line on stderr).
int run_worker(const DistArgs &a, const char *command);

}  // namespace dsrt::tools
