#include "dist/launcher_env.h"

#include <cstdlib>

#include "core/status.h"

namespace dsrt {
namespace {

const char *env(const char *name) {
  const char *v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int env_int(const char *name) {
  const char *v = env(name);
  char *end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end || x < 0 || x > 1 << 20) failf(DSRT_ERR_INVALID_ARGUMENT, "environment variable ", name, "=\"", v, "\" is not a rank count");
  return int(x);
}

}  // namespace

void split_host_port(const std::string &hp, std::string &host, int &port) {
  const size_t colon = hp.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == hp.size())
    failf(DSRT_ERR_INVALID_ARGUMENT, "coordinator \"", hp, "\" is not HOST:PORT");
  host = hp.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const std::string p = hp.substr(colon + 1);
  char *end = nullptr;
  const long v = std::strtol(p.c_str(), &end, 10);
  if (*end || v < 1 || v > 65535) failf(DSRT_ERR_INVALID_ARGUMENT, "coordinator \"", hp, "\": port ", p, " is not in 1..65535");
  port = int(v);
}

int local_device_index(int rank, int n_devices) {
  if (n_devices < 1) failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", rank, " needs a GPU and this host has none");
  for (const char *name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    if (!env(name)) continue;
    const int local = env_int(name);
    if (local >= n_devices)
      failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", rank, ": local rank ", local, " (", name, ") but this host has ", n_devices,
            " GPUs: start at most one rank per GPU on each host");
    return local;
  }
  return rank % n_devices;
}

DistSpec resolve_dist_spec(DistSpec s) {
  std::string from = "the arguments";
  if (s.coordinator.empty() && env("DSRT_COORDINATOR")) s.coordinator = env("DSRT_COORDINATOR");
  if (s.coordinator.empty() && env("MASTER_ADDR") && env("MASTER_PORT"))
    s.coordinator = std::string(env("MASTER_ADDR")) + ":" + env("MASTER_PORT");
  if (!s.coordinator.empty() && (s.world == 0 || s.rank < 0)) {
    struct Launcher {
      const char *rank, *size, *name;
    };
    for (const Launcher &l : {Launcher{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "mpirun"},
                              Launcher{"SLURM_PROCID", "SLURM_NTASKS", "srun"},
                              Launcher{"RANK", "WORLD_SIZE", "torchrun"}}) {
      if (!env(l.rank) || !env(l.size)) continue;
      if (s.world == 0) s.world = env_int(l.size);
      if (s.rank < 0) s.rank = env_int(l.rank);
      from = std::string(l.name) + "'s " + l.rank + " and " + l.size;
      break;
    }
  }
  if (s.world == 0) {  // one process: its tp x ep ranks (if any) are threads, not checked here
    if (s.rank > 0) failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", s.rank, " without a world size (give the world, or start under a launcher)");
    s.world = 1;
    s.rank = 0;
    return s;
  }
  if (s.rank < 0) failf(DSRT_ERR_INVALID_ARGUMENT, "a world of ", s.world, " ranks but no rank for this process");
  if (s.world < 1) failf(DSRT_ERR_INVALID_ARGUMENT, "a world of ", s.world, " ranks (from ", from, ")");
  if (s.rank >= s.world) failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", s.rank, " is outside a world of ", s.world, " ranks (from ", from, ")");
  if (s.dp_attention && s.tp == 0 && s.ep == 0) s.tp = 1, s.ep = s.world;
  if (s.tp == 0 && s.ep == 0) s.tp = s.world, s.ep = 1;
  else if (s.tp == 0) s.tp = s.ep > 0 && s.world % s.ep == 0 ? s.world / s.ep : 0;
  else if (s.ep == 0) s.ep = s.world % s.tp == 0 ? s.world / s.tp : 0;
  if (s.tp < 1 || s.ep < 1 || int64_t(s.tp) * s.ep != s.world)
    failf(DSRT_ERR_INVALID_ARGUMENT, "tp ", s.tp, " x ep ", s.ep, " does not make a world of ", s.world, " ranks");
  if (s.world > 1) {
    if (s.coordinator.empty())
      failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", s.rank, " of ", s.world,
            ": no coordinator (give HOST:PORT of rank 0, or set DSRT_COORDINATOR or MASTER_ADDR and MASTER_PORT)");
    std::string host;
    int port;
    split_host_port(s.coordinator, host, port);
  }
  s.timeout_ms = dist_timeout_ms(s.timeout_ms);
  return s;
}

int64_t dist_timeout_ms(int64_t given) {
  if (given > 0) return given;
  if (const char *t = env("DSRT_DIST_TIMEOUT_MS")) {
    char *end = nullptr;
    const long long v = std::strtoll(t, &end, 10);
    if (*end || v < 1) failf(DSRT_ERR_INVALID_ARGUMENT, "DSRT_DIST_TIMEOUT_MS=\"", t, "\" is not a positive number of milliseconds");
    return v;
  }
  return kDefaultDistTimeoutMs;
}

}  // namespace dsrt
