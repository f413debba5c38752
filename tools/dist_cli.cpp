#include "dist_cli.h"

#include <cstdio>

#include "dist/launcher_env.h"

namespace dsrt::tools {

dsrt_dist_params dist_params(const DistArgs &a) {
  dsrt_dist_params p;
  dsrt_dist_params_init(&p, sizeof p);
  p.world = a.world;
  p.rank = a.rank;
  p.coordinator = a.coordinator.empty() ? nullptr : a.coordinator.c_str();
  p.tp = a.tp;
  p.ep = a.ep;
  p.dp_attention = a.dp_attention ? 1 : 0;
  return p;
}

bool is_follower(const DistArgs &a) {
  DistSpec s;
  s.world = a.world;
  s.rank = a.rank;
  s.coordinator = a.coordinator;
  s.tp = a.tp;
  s.ep = a.ep;
  s.dp_attention = a.dp_attention;
  s = resolve_dist_spec(s);
  return s.world > 1 && s.rank > 0;
}

int run_worker(const DistArgs &a, const char *command) {
  auto report = [&](dsrt_status st) {
    std::fprintf(stderr, "dsrt %s: %s: %s\n", command, dsrt_status_string(st), dsrt_last_error());
    return 1;
  };
  if (a.model.empty()) {
    std::fprintf(stderr, "dsrt %s: missing --model\n", command);
    return 1;
  }
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.backend = a.backend;
  mp.n_threads = a.threads;
  dsrt_model *m = nullptr;
  if (dsrt_status st = dsrt_model_load(a.model.c_str(), &mp, &m); st != DSRT_OK) return report(st);
  const dsrt_dist_params p = dist_params(a);
  const dsrt_status st = dsrt_worker_run(m, &p);
  dsrt_model_free(m);
  return st == DSRT_OK ? 0 : report(st);
}

}  // namespace dsrt::tools
