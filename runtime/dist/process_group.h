// How this process becomes one rank of a group of processes (design.md §5): rank 0 serves the rendezvous at
// the coordinator address, every rank says hello there (dist/rendezvous.h: world size, rank, tp x ep, dsrt
// version and checkpoint identity, checked against rank 0's), then the ranks connect their transport (Gloo,
// and NCCL for ranks on GPUs) through the rendezvous store and meet at a barrier; the rendezvous then closes.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "dist/launcher_env.h"

namespace dsrt {

class RendezvousClient;

// Ranks on GPUs: turns the joined Gloo communicator (which then carries the host bytes) into the rank's
// device communicator, exchanging what that needs through the rendezvous store before it closes
// (make_nccl_communicator).
using DeviceJoin = std::function<std::unique_ptr<Communicator>(RendezvousClient &store, std::unique_ptr<Communicator> host)>;

// spec: resolved (resolve_dist_spec), world > 1. checkpoint: the model's identity. device: set for ranks on
// GPUs. Throws dsrt::Error with the rendezvous's verdict, DSRT_ERR_IO when a rank cannot be reached in time,
// DSRT_ERR_UNSUPPORTED without Gloo in the build (or, from `device`, without NCCL).
std::unique_ptr<Communicator> join_process_group(const DistSpec &spec, const std::string &checkpoint,
                                                 const DeviceJoin &device = {});

}  // namespace dsrt
