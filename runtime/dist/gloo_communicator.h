// Ranks in several processes (and hosts) over Gloo's TCP transport (design.md §5): the Communicator of a
// rank that joined through the rendezvous (dist/rendezvous.h, dist/process_group.h). Every collective waits
// at most the group's timeout; a peer that died (its sockets close) or hangs (the timeout) makes the
// collective throw DSRT_ERR_IO naming the operation, and the communicator is then aborted: later collectives
// throw at once. abort() also closes this rank's connections, so the other processes see it at once
// instead of waiting for their timeout.
#pragma once
#include <memory>

#include "dist/communicator.h"

namespace dsrt {

class RendezvousClient;

// True when this build has Gloo (libgloo-dev at configure time).
bool gloo_available();
// Throws DSRT_ERR_UNSUPPORTED (saying how to get it) when the build has no Gloo.
void require_gloo();
// Connects this rank (m.rank of m.world) to every other rank of the world and of its tensor-parallel group,
// exchanging addresses through `store`. Without Gloo in the build: DSRT_ERR_UNSUPPORTED.
std::unique_ptr<Communicator> make_gloo_communicator(RendezvousClient &store, const Mapping &m, int64_t timeout_ms);

}  // namespace dsrt
