// The ranks an engine runs its forward on (design.md §5): one per device share of the Mapping, each with its
// own backend, communicator and ModelShard. Rank 0 is driven by the engine's step thread; every other rank
// runs a follower loop that receives each step (plain data) from rank 0 and runs the same forward in
// lockstep. Here the followers are threads of this process (CPU ranks); ranks in other processes are the
// same loop behind another Communicator.
#pragma once
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "engine/step.h"
#include "model/shard.h"

namespace dsrt {

class RankGroup {
 public:
  // tp * ep ranks of `model`, each with a backend made by make_backend(rank). Throws
  // DSRT_ERR_INVALID_ARGUMENT when the mapping does not divide the model.
  RankGroup(const Model &model, int tp, int ep, const std::function<std::unique_ptr<Backend>(int rank)> &make_backend);
  ~RankGroup();  // stops the followers

  int world() const { return int(ranks_.size()); }
  Backend &leader() { return *ranks_[0].backend; }
  Communicator &leader_comm() { return *ranks_[0].comm; }
  const ModelShard &leader_shard() const { return ranks_[0].shard; }
  // Runs fn on every rank's backend, from the calling thread, between steps (followers are then waiting for
  // the next step and do not touch their backends): KV pool set-up, page copies, state restore.
  void for_each_backend(const std::function<void(Backend &)> &fn);
  // One forward step on every rank; rank 0's logits of step.logit_rows to logits_out (host).
  void forward(const Step &step, float *logits_out, Tensor *hidden_out = nullptr);

 private:
  struct Rank {
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Communicator> comm;
    ModelShard shard;
    std::thread thread;
  };
  void follow(Rank &r);
  std::vector<Rank> ranks_;
};

}  // namespace dsrt
