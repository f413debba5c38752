// Ranks on GPUs (design.md §5): the Communicator whose tensor collectives run over NCCL (dist/nccl_library.h,
// loaded at run time) on the GPU memory of a rank's CUDA backend, queued on that backend's stream
// (Backend::native_stream) behind the ops that produced their inputs. The host bytes of the step messages
// and the barrier go through a host communicator of the same group instead: Gloo between processes, the
// in-process group between threads. A follower then waits for rank 0's next step as long as rank 0 lives
// (Gloo sees it die) without a GPU kernel spinning for hours, and a dead rank 0 is noticed by its followers.
//
// Never a hang: the communicators are non-blocking (ncclConfig blocking = 0). Every NCCL call and every
// collective's completion on the GPU is waited for by polling, at most the group's timeout, with
// ncclCommGetAsyncError looked at meanwhile; a timeout, an NCCL error or abort() aborts the NCCL
// communicators (ncclCommAbort, which also stops kernels waiting for a peer) and the host communicator, and
// the collective throws DSRT_ERR_IO naming it; later collectives throw at once. The price: the host waits for
// each collective to finish on the GPU before queuing more work (the step's other host syncs, such as the
// routed experts' ids, already make it wait once per MoE layer).
//
// Only in builds with CUDA (DSRT_WITH_CUDA).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "dist/communicator.h"

namespace dsrt {

class Backend;
class RendezvousClient;

// One rank of a group of processes, m = host->mapping(): joins the NCCL communicator of the world (and of its
// tensor-parallel group when that is neither the world nor the rank alone). The ncclUniqueIds go through
// `store` (rank 0 makes the world's; the first rank of each tensor-parallel group makes its group's). `backend`
// is the rank's CUDA backend; it must outlive the communicator. Throws DSRT_ERR_UNSUPPORTED without a usable
// NCCL, DSRT_ERR_IO when the ranks do not all join within timeout_ms.
std::unique_ptr<Communicator> make_nccl_communicator(RendezvousClient &store, std::unique_ptr<Communicator> host,
                                                     Backend &backend, int64_t timeout_ms);

// tp * ep ranks in this process, rank r on backends[r] (each its own GPU), driven by one thread each; the
// host bytes go through make_local_group(tp, ep). One communicator per rank, in rank order. A world of one
// (tp = ep = 1) is a real NCCL communicator of one rank: its collectives run through NCCL as with more.
std::vector<std::unique_ptr<Communicator>> make_nccl_local_group(int tp, int ep, const std::vector<Backend *> &backends,
                                                                 int64_t timeout_ms);

}  // namespace dsrt
