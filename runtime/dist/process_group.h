// How this process becomes one rank of a group of processes (design.md §5): rank 0 serves the rendezvous at
// the coordinator address, every rank says hello there (dist/rendezvous.h: world size, rank, tp x ep, dsrt
// version and checkpoint identity, checked against rank 0's), then the ranks connect their transport (Gloo
// today) through the rendezvous store and meet at a barrier; the rendezvous then closes.
#pragma once
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "dist/launcher_env.h"

namespace dsrt {

// spec: resolved (resolve_dist_spec), world > 1. checkpoint: the model's identity. Throws dsrt::Error with
// the rendezvous's verdict, DSRT_ERR_IO when a rank cannot be reached in time, DSRT_ERR_UNSUPPORTED without
// Gloo in the build.
std::unique_ptr<Communicator> join_process_group(const DistSpec &spec, const std::string &checkpoint);

}  // namespace dsrt
