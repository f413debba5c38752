// In-process ranks: one thread per rank, collectives through shared memory. Each group (the world, each
// tensor-parallel group) has a hub: ranks publish pointers, meet at a barrier, read each other's buffers,
// and meet again before anyone may reuse them. Sums run in rank order into one shared buffer, so every rank
// gets bitwise the same result (ranks must agree exactly: they route tokens from the reduced hidden states).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>

#include "core/status.h"
#include "dist/communicator.h"

namespace dsrt {
namespace {

struct AbortState {
  std::atomic<bool> aborted{false};
  std::mutex mu;
  std::string why;
};

class Hub {
 public:
  Hub(int n, std::shared_ptr<AbortState> a) : ptrs_(size_t(n)), counts_(size_t(n)), n_(n), abort_(std::move(a)) {}
  int size() const { return n_; }

  // Waits until all n members arrived; the last one runs `last` (under the hub's lock) first.
  void arrive_and_wait(const std::function<void()> &last = {}) {
    std::unique_lock lk(mu_);
    check_abort();
    const uint64_t my = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      if (last) last();
      gen_++;
      cv_.notify_all();
      return;
    }
    cv_.wait(lk, [&] { return gen_ != my || abort_->aborted.load(); });
    if (gen_ == my) check_abort();
  }
  void wake() {
    std::lock_guard lk(mu_);
    cv_.notify_all();
  }

  std::vector<const void *> ptrs_;           // published by each member before the first barrier
  std::vector<std::vector<int64_t>> counts_;  // per member: row counts or column widths
  std::vector<float> acc_;                    // the shared sum

 private:
  void check_abort() {
    if (!abort_->aborted.load()) return;
    std::lock_guard lk(abort_->mu);
    fail(DSRT_ERR_INTERNAL, "the rank group stopped: " + abort_->why);
  }
  int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;
  int arrived_ = 0;
  std::shared_ptr<AbortState> abort_;
};

void require_host(const Tensor &t, const char *op) {
  if (t.device.kind != Device::Host) failf(DSRT_ERR_INTERNAL, op, ": in-process ranks exchange host memory, got ", t.device.str());
}

class LocalCommunicator final : public Communicator {
 public:
  LocalCommunicator(Mapping m, std::shared_ptr<Hub> world, std::shared_ptr<Hub> tensor,
                    std::shared_ptr<AbortState> a, std::vector<std::shared_ptr<Hub>> all)
      : map_(m), world_(std::move(world)), tensor_(std::move(tensor)), abort_(std::move(a)), all_(std::move(all)) {}
  const Mapping &mapping() const override { return map_; }

  void all_reduce_sum(Tensor x, Group g) override {
    require_host(x, "all_reduce_sum");
    Hub &hub = *group(g);
    const int me = index_in(g);
    if (hub.size() == 1) return;
    const size_t n = size_t(x.rows * x.cols);
    hub.ptrs_[size_t(me)] = x.data;
    hub.arrive_and_wait([&] { hub.acc_.assign(n, 0.0f); });
    // This member sums its share of the elements, in rank order.
    const size_t per = (n + size_t(hub.size()) - 1) / size_t(hub.size());
    const size_t e0 = std::min(n, per * size_t(me)), e1 = std::min(n, e0 + per);
    for (int r = 0; r < hub.size(); r++) {
      const float *src = static_cast<const float *>(hub.ptrs_[size_t(r)]);
      for (size_t j = e0; j < e1; j++) hub.acc_[j] += src[j];
    }
    hub.arrive_and_wait();
    std::memcpy(x.data, hub.acc_.data(), n * sizeof(float));
  }

  void all_gather_cols(Tensor local, Tensor out, Group g) override {
    require_host(local, "all_gather_cols");
    require_host(out, "all_gather_cols");
    Hub &hub = *group(g);
    const int me = index_in(g);
    hub.ptrs_[size_t(me)] = local.data;
    hub.counts_[size_t(me)] = {local.cols};
    hub.arrive_and_wait();
    int64_t c0 = 0;
    const size_t es = dtype_size(out.dtype);
    for (int r = 0; r < hub.size(); r++) {
      const int64_t c = hub.counts_[size_t(r)][0];
      if (c0 + c > out.cols) fail(DSRT_ERR_INTERNAL, "all_gather_cols: the ranks' columns exceed the output");
      const char *src = static_cast<const char *>(hub.ptrs_[size_t(r)]);
      for (int64_t i = 0; i < out.rows; i++)
        std::memcpy(static_cast<char *>(out.data) + size_t(i * out.cols + c0) * es, src + size_t(i * c) * es, size_t(c) * es);
      c0 += c;
    }
    if (c0 != out.cols) fail(DSRT_ERR_INTERNAL, "all_gather_cols: the ranks' columns do not fill the output");
    hub.arrive_and_wait();
  }

  void all_to_all_v(Tensor send, const std::vector<int64_t> &send_counts, Tensor recv,
                    const std::vector<int64_t> &recv_counts, Group g) override {
    require_host(send, "all_to_all_v");
    require_host(recv, "all_to_all_v");
    Hub &hub = *group(g);
    const int me = index_in(g);
    if (int(send_counts.size()) != hub.size() || int(recv_counts.size()) != hub.size())
      fail(DSRT_ERR_INTERNAL, "all_to_all_v: one count per rank of the group");
    hub.ptrs_[size_t(me)] = send.data;
    hub.counts_[size_t(me)] = send_counts;
    hub.arrive_and_wait();
    const size_t row = size_t(recv.cols) * dtype_size(recv.dtype);
    int64_t at = 0;
    for (int r = 0; r < hub.size(); r++) {
      const std::vector<int64_t> &theirs = hub.counts_[size_t(r)];
      int64_t off = 0;
      for (int k = 0; k < me; k++) off += theirs[size_t(k)];
      if (theirs[size_t(me)] != recv_counts[size_t(r)] || at + recv_counts[size_t(r)] > recv.rows)
        failf(DSRT_ERR_INTERNAL, "all_to_all_v: rank ", r, " sends ", theirs[size_t(me)], " rows, rank ", me, " expects ",
              recv_counts[size_t(r)]);
      std::memcpy(static_cast<char *>(recv.data) + size_t(at) * row,
                  static_cast<const char *>(hub.ptrs_[size_t(r)]) + size_t(off) * row, size_t(recv_counts[size_t(r)]) * row);
      at += recv_counts[size_t(r)];
    }
    hub.arrive_and_wait();
  }

  void broadcast(std::string &bytes, int root) override {
    Hub &hub = *world_;
    if (hub.size() == 1) return;
    if (map_.rank == root) hub.ptrs_[0] = &bytes;
    hub.arrive_and_wait();
    if (map_.rank != root) bytes = *static_cast<const std::string *>(hub.ptrs_[0]);
    hub.arrive_and_wait();
  }

  void barrier() override { world_->arrive_and_wait(); }

  void abort(const std::string &why) override {
    {
      std::lock_guard lk(abort_->mu);
      if (abort_->aborted.load()) return;
      abort_->why = why;
      abort_->aborted.store(true);
    }
    for (auto &h : all_) h->wake();
  }

 private:
  Hub *group(Group g) { return g == Group::World ? world_.get() : tensor_.get(); }
  int index_in(Group g) const { return g == Group::World ? map_.rank : map_.tp_rank(); }
  Mapping map_;
  std::shared_ptr<Hub> world_, tensor_;
  std::shared_ptr<AbortState> abort_;
  std::vector<std::shared_ptr<Hub>> all_;
};

class SingleCommunicator final : public Communicator {
 public:
  const Mapping &mapping() const override { return map_; }
  void all_reduce_sum(Tensor, Group) override {}
  void all_gather_cols(Tensor local, Tensor out, Group) override {
    if (local.data != out.data) fail(DSRT_ERR_INTERNAL, "all_gather_cols on one rank: the output is the input");
  }
  void all_to_all_v(Tensor send, const std::vector<int64_t> &, Tensor recv, const std::vector<int64_t> &, Group) override {
    if (send.data != recv.data) fail(DSRT_ERR_INTERNAL, "all_to_all_v on one rank: the output is the input");
  }
  void broadcast(std::string &, int) override {}
  void barrier() override {}
  void abort(const std::string &) override {}

 private:
  Mapping map_;
};

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

std::vector<std::unique_ptr<Communicator>> make_local_group(int tp, int ep) {
  Mapping shape{tp * ep, 0, tp, ep};
  shape.validate();
  auto abort = std::make_shared<AbortState>();
  auto world = std::make_shared<Hub>(shape.world, abort);
  std::vector<std::shared_ptr<Hub>> all{world}, tensor;
  for (int g = 0; g < ep; g++) all.push_back(tensor.emplace_back(std::make_shared<Hub>(tp, abort)));
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < shape.world; r++) {
    Mapping m = shape;
    m.rank = r;
    out.push_back(std::make_unique<LocalCommunicator>(m, world, tensor[size_t(m.ep_rank())], abort, all));
  }
  return out;
}

}  // namespace dsrt
