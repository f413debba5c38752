// Communicator: the collectives a parallel forward needs (design.md §5), over the ranks of a Mapping. A small
// versioned interface with one implementation per transport: in-process threads (tests, CPU ranks; this
// file's make_local_group), Gloo across processes, NCCL across GPUs. Every rank calls the same collectives
// in the same order; a rank that fails aborts the group, and every other rank's pending or next collective
// then throws instead of waiting forever. A transport may return from a collective once it is queued (NCCL
// on a GPU stream): its failure then shows in check(), which callers call where results leave the step.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "dist/mapping.h"

namespace dsrt {

class Communicator {
 public:
  static constexpr int kVersion = 2;  // 2: check()
  // Which ranks a collective spans: the whole world, or this rank's tensor-parallel group.
  enum class Group { World, Tensor };

  virtual ~Communicator() = default;
  virtual const Mapping &mapping() const = 0;

  // x = sum over the group's ranks of x, in place; every rank gets bitwise the same result.
  virtual void all_reduce_sum(Tensor x, Group g) = 0;
  // out [rows, sum of the ranks' cols] = the ranks' `local` [rows, cols_r] side by side, in rank order.
  virtual void all_gather_cols(Tensor local, Tensor out, Group g) = 0;
  // Rows exchange: this rank sends send.rows_view(send_offsets[r], send_counts[r]) to rank r and receives
  // recv_counts[r] rows from rank r into recv at recv_offsets[r] (row counts; offsets into the tensors).
  virtual void all_to_all_v(Tensor send, const std::vector<int64_t> &send_counts, Tensor recv,
                            const std::vector<int64_t> &recv_counts, Group g) = 0;
  // Host bytes from `root` to every rank of the world (a step's plain data).
  virtual void broadcast(std::string &bytes, int root) = 0;
  virtual void barrier() = 0;
  // Wakes every rank's pending collective with an error (DSRT_ERR_INTERNAL naming `why`); used when a rank
  // fails mid-step or the group shuts down.
  virtual void abort(const std::string &why) = 0;
  // Throws (DSRT_ERR_IO naming it) when a collective queued earlier has failed by now or the group was
  // aborted. Called after each step: once the host has waited for the step's results, a failure of any
  // collective they depend on shows here (one still running on a rank that did not wait shows at its next
  // collective or check). A transport whose collectives have finished when they return has nothing to add.
  virtual void check() {}
};

// The world of one rank: every collective is a no-op.
std::unique_ptr<Communicator> make_single_communicator();
// `world` ranks in one process (one thread per rank). Tensors must be in host memory; returns one
// communicator per rank, ranks laid out as in `shape` (tp, ep).
std::vector<std::unique_ptr<Communicator>> make_local_group(int tp, int ep);

}  // namespace dsrt
