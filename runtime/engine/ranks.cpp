#include "engine/ranks.h"

#include "core/log.h"
#include "core/status.h"

namespace dsrt {

RankGroup::RankGroup(const Model &model, int tp, int ep,
                     const std::function<std::unique_ptr<Backend>(int rank)> &make_backend) {
  Mapping shape{tp * ep, 0, tp, ep};
  shape.check_divides(model.cfg);
  std::vector<std::unique_ptr<Communicator>> comms;
  if (shape.world == 1) comms.push_back(make_single_communicator());
  else comms = make_local_group(tp, ep);
  ranks_.resize(size_t(shape.world));
  for (int r = 0; r < shape.world; r++) {
    Rank &k = ranks_[size_t(r)];
    k.comm = std::move(comms[size_t(r)]);
    k.shard = ModelShard::bind(model, k.comm->mapping());
    k.backend = make_backend(r);
  }
  for (int r = 1; r < shape.world; r++) {
    Rank &k = ranks_[size_t(r)];
    k.thread = std::thread([this, &k] { follow(k); });
  }
  if (shape.world > 1) log(LogLevel::Info, "dsrt: " + std::to_string(shape.world) + " in-process ranks (tp " +
                                               std::to_string(tp) + " x ep " + std::to_string(ep) + ")");
}

RankGroup::~RankGroup() {
  if (ranks_.size() > 1) {
    Step stop;
    stop.kind = Step::Kind::Stop;
    std::string bytes = stop.encode();
    try {
      ranks_[0].comm->broadcast(bytes, 0);
    } catch (const std::exception &) {  // the group already failed: its followers have left
    }
  }
  for (Rank &r : ranks_)
    if (r.thread.joinable()) r.thread.join();
}

void RankGroup::follow(Rank &r) {
  for (;;) {
    try {
      std::string bytes;
      r.comm->broadcast(bytes, 0);
      const Step step = Step::decode(bytes);
      if (step.kind == Step::Kind::Stop) return;
      dsrt::forward(r.shard, *r.backend, *r.comm, step.batch, step.logit_rows, step.policy, nullptr);
    } catch (const std::exception &e) {
      r.comm->abort("rank " + std::to_string(r.comm->mapping().rank) + ": " + e.what());
      return;
    }
  }
}

void RankGroup::for_each_backend(const std::function<void(Backend &)> &fn) {
  for (Rank &r : ranks_) fn(*r.backend);
}

void RankGroup::forward(const Step &step, float *logits_out, Tensor *hidden_out) {
  Rank &r = ranks_[0];
  try {
    if (ranks_.size() > 1) {
      std::string bytes = step.encode();
      r.comm->broadcast(bytes, 0);
    }
    dsrt::forward(r.shard, *r.backend, *r.comm, step.batch, step.logit_rows, step.policy, logits_out, hidden_out);
  } catch (const std::exception &e) {
    r.comm->abort(std::string("rank 0: ") + e.what());
    throw;
  }
}

}  // namespace dsrt
