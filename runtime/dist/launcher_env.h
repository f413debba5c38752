// Who am I in a group of processes (design.md §5): world size, rank, the coordinator's address and the
// tp x ep split, from explicit values first, then from what the usual launchers set:
//   mpirun (Open MPI)   OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE
//   srun (Slurm)        SLURM_PROCID, SLURM_NTASKS
//   torchrun and kin    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
// The coordinator (rank 0's rendezvous, HOST:PORT) comes from the caller, else DSRT_COORDINATOR, else
// MASTER_ADDR:MASTER_PORT. A launcher's rank and world count only when a coordinator is known: a plain
// `dsrt generate` inside an sbatch allocation stays one process.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace dsrt {

struct DistSpec {
  int world = 0;            // 0: not given
  int rank = -1;            // -1: not given
  int tp = 0, ep = 0;       // 0: not given (tp = world / ep, ep = world / tp, or tp = world, ep = 1)
  std::string coordinator;  // HOST:PORT of rank 0's rendezvous
  int64_t timeout_ms = 0;   // 0: DSRT_DIST_TIMEOUT_MS, else kDefaultDistTimeoutMs
  bool dp_attention = false;  // data-parallel attention (dist/mapping.h): then tp 1, ep = world

  bool several() const { return world > 1; }
};

// How long a collective, the rendezvous and the joining of the ranks may wait for another rank (a dead or
// hung peer becomes an error after this).
constexpr int64_t kDefaultDistTimeoutMs = 120000;

// `given` when positive, else DSRT_DIST_TIMEOUT_MS, else kDefaultDistTimeoutMs (in-process ranks on GPUs wait
// for each other this long too).
int64_t dist_timeout_ms(int64_t given);

// Fills what `given` leaves open from the environment (above) and checks it: world >= 1, 0 <= rank < world,
// tp * ep == world, a coordinator HOST:PORT when world > 1. Throws DSRT_ERR_INVALID_ARGUMENT naming the
// numbers and where they came from. A spec that names no world and finds no launcher is world 1, rank 0,
// with tp and ep left as given (one process; its tp x ep ranks, if any, are threads).
DistSpec resolve_dist_spec(DistSpec given);

// The GPU of this process's rank when every rank is a process with a GPU of its own (design.md §5): the
// launcher's local rank (mpirun's OMPI_COMM_WORLD_LOCAL_RANK, Slurm's SLURM_LOCALID, torchrun's LOCAL_RANK),
// else rank % n_devices (ranks placed host by host, n_devices per host). Throws DSRT_ERR_INVALID_ARGUMENT when
// the local rank has no GPU (n_devices or more: more ranks on this host than GPUs) or n_devices < 1.
int local_device_index(int rank, int n_devices);

// "host:port" (or "[v6addr]:port") -> host, port. Throws DSRT_ERR_INVALID_ARGUMENT.
void split_host_port(const std::string &hp, std::string &host, int &port);

}  // namespace dsrt
