#include "dist.h"

#include "commands.h"

namespace dsrt::cli {

void add_dist_options(CLI::App &app, DistOptions &o) {
  app.add_option("--world", o.world, "ranks in all processes (start the command W times; on the CUDA backend a GPU each)")
      ->check(CLI::Range(1, 1 << 16))
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)  // a launcher script's override wins
      ->type_name("W");
  app.add_option("--rank", o.rank, "this process's rank, 0..W-1: rank 0 writes the output, the others print nothing")
      ->check(CLI::Range(0, 1 << 16))
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)
      ->type_name("R");
  app.add_option("--coordinator", o.coordinator,
                 "HOST:PORT where rank 0 listens (default $DSRT_COORDINATOR, else $MASTER_ADDR:$MASTER_PORT); rank and "
                 "world default to mpirun's, srun's or torchrun's variables")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)
      ->type_name("HOST:PORT");
}

tools::DistArgs dist_args(const CLI::App &cmd, const ModelOptions &mo, const EngineOptions &eo, const DistOptions &d) {
  tools::DistArgs a;
  a.model = mo.model;
  a.coordinator = d.coordinator;
  a.world = d.world;
  a.rank = d.rank;
  a.tp = cmd.count("--tp") ? eo.tp : 0;
  a.ep = cmd.count("--ep") ? eo.ep : 0;
  a.dp_attention = eo.dp_attention;
  a.threads = mo.threads;
  a.backend = mo.backend;
  return a;
}

int run_as_rank(const CLI::App &cmd, const ModelOptions &mo, const EngineOptions &eo, const DistOptions &d,
                const char *command, const std::function<int(const dsrt_dist_params *)> &rank0) {
  const tools::DistArgs a = dist_args(cmd, mo, eo, d);  // (dist_params points into it)
  if (tools::is_follower(a)) return tools::run_worker(a, command);
  const dsrt_dist_params p = tools::dist_params(a);
  return rank0(&p);
}

void add_worker(CLI::App &app, int &rc) {
  struct WorkerOptions {
    ModelOptions model;
    EngineOptions engine;
    DistOptions dist;
  };
  auto o = std::make_shared<WorkerOptions>();
  auto *cmd = app.add_subcommand("worker", "a follower rank of ranks in several processes");
  cmd->footer(
      "Runs follower rank R (1..W-1) of the engine that rank 0 runs (dsrt eval|generate ... --rank 0, or a program\n"
      "on dsrt_engine_create_dist); exits 0 when rank 0 is done, 1 when the group fails.");
  cmd->add_option("-m,--model", o->model.model, "checkpoint directory (the one rank 0 loads)")
      ->required()
      ->check(CLI::ExistingDirectory);
  add_threads_option(*cmd, o->model.threads);
  add_backend_option(*cmd, o->model.backend);  // (as rank 0's)
  cmd->add_option("--tp", o->engine.tp, "tensor-parallel ranks (as rank 0)")->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--ep", o->engine.ep, "expert-parallel ranks (as rank 0)")->check(CLI::Range(1, 1 << 16));
  cmd->add_flag("--dp-attention", o->engine.dp_attention, "data-parallel attention (as rank 0)");
  add_dist_options(*cmd, o->dist);
  cmd->callback([o, cmd, &rc] {
    const tools::DistArgs a = dist_args(*cmd, o->model, o->engine, o->dist);
    rc = tools::run_worker(a, "worker");
  });
}

}  // namespace dsrt::cli
