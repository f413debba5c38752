// The command line of ranks in several processes (docs/engine.md, "Ranks in several processes"): `dsrt eval|generate
// ... --world W --rank R --coordinator HOST:PORT` is rank 0 (it writes the outputs) or a follower (runs the
// worker, prints nothing on stdout), and `dsrt worker` is a follower explicitly.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

#include "dist_cli.h"
#include "options.h"

namespace dsrt::cli {

struct DistOptions {
  std::string coordinator;
  int world = 0, rank = -1;  // 0 / -1: from the launcher's environment (mpirun, srun, torchrun) when a
                             // coordinator is known, else one process
};
void add_dist_options(CLI::App &app, DistOptions &o);
// --tp / --ep count only where `cmd` was given them: left out, the split follows from the world (tp = world).
tools::DistArgs dist_args(const CLI::App &cmd, const ModelOptions &mo, const EngineOptions &eo, const DistOptions &d);
// Runs `rank0(params)` when this process is rank 0 (or alone), the follower worker otherwise; returns the
// exit status.
int run_as_rank(const CLI::App &cmd, const ModelOptions &mo, const EngineOptions &eo, const DistOptions &d,
                const char *command, const std::function<int(const dsrt_dist_params *)> &rank0);

}  // namespace dsrt::cli
