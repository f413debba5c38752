// Collectives on device tensors through host memory: each one copies its device tensors to the host (the
// rank's backend's to_host, which waits for the ops that made them), runs the host communicator's collective
// (the in-process group, or Gloo), and copies the result back. Correct on any backend and any transport, and
// as slow as a device->host->device round trip and a host sum per collective: for in-process GPU ranks when
// NCCL is not installed, and for ranks that share a GPU (NCCL refuses two ranks on one device), which is how a
// machine of one GPU tests tensor parallelism on GPUs. Host tensors go to the host communicator as they are.
#pragma once
#include <memory>
#include <vector>

#include "dist/communicator.h"

namespace dsrt {

class Backend;

// `host` carries the collectives; `backend` (which must outlive the result) owns the device tensors.
std::unique_ptr<Communicator> make_host_staged_communicator(std::unique_ptr<Communicator> host, Backend &backend);

// tp * ep in-process ranks, rank r's device tensors on backends[r]: make_local_group(tp, ep) behind each.
std::vector<std::unique_ptr<Communicator>> make_host_staged_local_group(int tp, int ep, const std::vector<Backend *> &backends);

}  // namespace dsrt
