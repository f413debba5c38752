// Ranks on GPUs (design.md §5): the Communicator whose tensor collectives run over NCCL (dist/nccl_library.h,
// loaded at run time) on the GPU memory of a rank's CUDA backend, queued on that backend's stream
// (Backend::native_stream) behind the ops that produced their inputs. The host bytes of the step messages
// and the barrier go through a host communicator of the same group instead: Gloo between processes, the
// in-process group between threads. A follower then waits for rank 0's next step as long as rank 0 lives
// (Gloo sees it die) without a GPU kernel spinning for hours, and a dead rank 0 is noticed by its followers.
//
// Never a hang: the ranks join non-blocking communicators (ncclConfig blocking = 0), every call polled with
// the group's timeout. Collectives then run on blocking twins split from them (ncclCommSplit, also polled):
// NCCL runs every call on a non-blocking communicator in a thread of its own started for that call, ~40 us a
// collective (docs/perf.md), where a blocking call only queues work, once the twin's peers are connected; the
// start connects them (warm-up all-reduces at three sizes, an all-gather, a send and receive with every rank)
// while the group joins. A blocking call that still waits on the host (a peer to connect) is timed by the
// watchdog like a queued collective. DSRT_NCCL_NONBLOCKING=1 (rank 0's setting, for all ranks) keeps every
// collective on the non-blocking communicators instead.
//
// The host does not wait for a collective to run: it queues it and goes on queuing the step's kernels. A
// CollectiveWatchdog thread per rank follows each collective to its end through an event recorded behind it,
// with ncclCommGetAsyncError looked at meanwhile; a collective not finished within the timeout, an NCCL error
// or abort() aborts the NCCL communicators (ncclCommAbort, which also ends kernels waiting for a peer, so every
// host wait on the stream returns) and the host communicator. Later collectives then throw DSRT_ERR_IO naming
// the failure at once, and check() does after the step (the rank group calls it once the step's results are
// on the host: what ran after an aborted collective is garbage).
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
