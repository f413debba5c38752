// The Gloo communicator. all_reduce_sum gathers every rank's buffer (gloo::allgather) and sums in rank order
// on each rank, as the in-process group does: every rank computes the same additions in the same order, so
// they hold bitwise the same result (Gloo's own allreduce sums chunks in ring order, which differs per chunk).
// all_gather_cols is gloo::allgatherv of the ranks' column blocks, all_to_all_v gloo::alltoallv, the step's
// bytes go by gloo::broadcast (its size first), barrier is gloo::barrier.
#include "dist/gloo_communicator.h"

#include "core/status.h"
#include "dist/rendezvous.h"

#if DSRT_WITH_GLOO
#include <gloo/allgather.h>
#include <gloo/allgatherv.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <signal.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#endif

namespace dsrt {

#if DSRT_WITH_GLOO
namespace {

// gloo::rendezvous::Store over our rendezvous connection, with a key prefix per group.
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  StoreAdapter(RendezvousClient &c, std::string prefix) : c_(c), prefix_(std::move(prefix)) {}
  void set(const std::string &key, const std::vector<char> &data) override {
    c_.set(prefix_ + key, std::string(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string &key) override {
    const std::string v = c_.get(prefix_ + key);
    return {v.begin(), v.end()};
  }
  void wait(const std::vector<std::string> &keys) override { wait(keys, std::chrono::milliseconds(c_.timeout_ms())); }
  void wait(const std::vector<std::string> &keys, const std::chrono::milliseconds &timeout) override {
    std::vector<std::string> k;
    for (const std::string &x : keys) k.push_back(prefix_ + x);
    c_.wait(k, timeout.count() > 0 ? timeout.count() : c_.timeout_ms());
  }

 private:
  RendezvousClient &c_;
  std::string prefix_;
};

// How long an idle follower waits for rank 0's next step: as long as rank 0 lives (its death closes the
// connection, which ends the wait at once).
constexpr std::chrono::milliseconds kIdleWait = std::chrono::hours(24 * 30);

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(const Mapping &m, int64_t timeout_ms) : map_(m), timeout_(timeout_ms) {}

  void connect(RendezvousClient &store, const std::string &hostname) {
    gloo::transport::tcp::attr attr;
    if (const char *iface = std::getenv("DSRT_GLOO_IFACE"); iface && *iface) attr.iface = iface;
    else attr.hostname = hostname;
    try {
      dev_ = gloo::transport::tcp::CreateDevice(attr);
      world_ = std::make_shared<gloo::rendezvous::Context>(map_.rank, map_.world);
      world_->setTimeout(timeout_);
      StoreAdapter ws(store, "world/");
      world_->connectFullMesh(ws, dev_);
      if (map_.tp > 1) {
        tensor_ = std::make_shared<gloo::rendezvous::Context>(map_.tp_rank(), map_.tp);
        tensor_->setTimeout(timeout_);
        StoreAdapter ts(store, "tp" + std::to_string(map_.ep_rank()) + "/");
        tensor_->connectFullMesh(ts, dev_);
      }
    } catch (const Error &) {
      throw;
    } catch (const std::exception &e) {
      failf(DSRT_ERR_IO, "rank ", map_.rank, ": connecting the ranks over Gloo (TCP, ", hostname, ") failed: ", e.what());
    }
  }

  const Mapping &mapping() const override { return map_; }

  void all_reduce_sum(Tensor x, Group g) override {
    require_host(x, "all_reduce_sum");
    auto ctx = context(g);
    if (!ctx) return;
    const size_t n = size_t(x.rows * x.cols), W = size_t(ctx->size);
    if (n == 0) return;
    gathered_.resize(n * W);
    run("all_reduce_sum", g, [&] {
      gloo::AllgatherOptions o(ctx);
      o.setInput(static_cast<float *>(x.data), n);
      o.setOutput(gathered_.data(), n * W);
      o.setTimeout(timeout_);
      gloo::allgather(o);
    });
    float *dst = static_cast<float *>(x.data);
    for (size_t j = 0; j < n; j++) {
      float acc = 0.0f;
      for (size_t r = 0; r < W; r++) acc += gathered_[r * n + j];
      dst[j] = acc;
    }
  }

  void all_gather_cols(Tensor local, Tensor out, Group g) override {
    require_host(local, "all_gather_cols");
    require_host(out, "all_gather_cols");
    auto ctx = context(g);
    const size_t es = dtype_size(out.dtype);
    if (!ctx) {
      if (local.data != out.data) {
        if (local.cols != out.cols || local.rows != out.rows) fail(DSRT_ERR_INTERNAL, "all_gather_cols: one rank's columns are the output");
        std::memcpy(out.data, local.data, size_t(out.rows * out.cols) * es);
      }
      return;
    }
    const int W = ctx->size;
    // Every rank's width first (they may differ by one), then the blocks.
    std::vector<int64_t> widths(static_cast<size_t>(W));
    int64_t mine = local.cols;
    run("all_gather_cols", g, [&] {
      gloo::AllgatherOptions o(ctx);
      o.setInput(&mine, 1);
      o.setOutput(widths.data(), size_t(W));
      o.setTimeout(timeout_);
      gloo::allgather(o);
    });
    int64_t total = 0;
    std::vector<size_t> counts(static_cast<size_t>(W));
    for (int r = 0; r < W; r++) {
      total += widths[size_t(r)];
      counts[size_t(r)] = size_t(widths[size_t(r)] * out.rows) * es;
    }
    if (total != out.cols) failf(DSRT_ERR_INTERNAL, "all_gather_cols: the ranks' columns (", total, ") do not fill the output (", out.cols, ")");
    bytes_.resize(size_t(out.rows * out.cols) * es);
    run("all_gather_cols", g, [&] {
      gloo::AllgathervOptions o(ctx);
      o.setInput(static_cast<char *>(local.data), size_t(local.rows * local.cols) * es);
      o.setOutput(bytes_.data(), counts);
      o.setTimeout(timeout_);
      gloo::allgatherv(o);
    });
    size_t at = 0;
    int64_t c0 = 0;
    for (int r = 0; r < W; r++) {
      const int64_t c = widths[size_t(r)];
      for (int64_t i = 0; i < out.rows; i++)
        std::memcpy(static_cast<char *>(out.data) + size_t(i * out.cols + c0) * es, bytes_.data() + at + size_t(i * c) * es, size_t(c) * es);
      at += counts[size_t(r)];
      c0 += c;
    }
  }

  void all_to_all_v(Tensor send, const std::vector<int64_t> &send_counts, Tensor recv,
                    const std::vector<int64_t> &recv_counts, Group g) override {
    require_host(send, "all_to_all_v");
    require_host(recv, "all_to_all_v");
    auto ctx = context(g);
    const int W = ctx ? ctx->size : 1;
    if (int(send_counts.size()) != W || int(recv_counts.size()) != W)
      fail(DSRT_ERR_INTERNAL, "all_to_all_v: one count per rank of the group");
    const int64_t row = send.cols * int64_t(dtype_size(send.dtype));
    if (!ctx) {
      if (send.data != recv.data) std::memcpy(recv.data, send.data, size_t(send_counts[0] * row));
      return;
    }
    std::vector<int64_t> sb(static_cast<size_t>(W)), rb(static_cast<size_t>(W));
    int64_t rows_in = 0;
    for (int r = 0; r < W; r++) {
      sb[size_t(r)] = send_counts[size_t(r)] * row;
      rb[size_t(r)] = recv_counts[size_t(r)] * row;
      rows_in += recv_counts[size_t(r)];
    }
    if (rows_in > recv.rows) fail(DSRT_ERR_INTERNAL, "all_to_all_v: more rows come in than the output holds");
    run("all_to_all_v", g, [&] {
      gloo::AlltoallvOptions o(ctx);
      o.setInput(static_cast<char *>(send.data), sb);
      o.setOutput(static_cast<char *>(recv.data), rb);
      o.setTimeout(timeout_);
      gloo::alltoallv(o);
    });
  }

  void broadcast(std::string &bytes, int root) override {
    auto ctx = context(Group::World);
    if (!ctx) return;
    uint64_t n = bytes.size();
    // A follower waits for rank 0's next step as long as rank 0 lives; the bytes then follow at once. Bytes
    // from another rank (a cache read) come at once too.
    const auto first = map_.rank == root || root != 0 ? timeout_ : kIdleWait;
    run("broadcast", Group::World, [&] {
      gloo::BroadcastOptions o(ctx);
      o.setRoot(root);
      o.setOutput(&n, 1);  // the root sends from its output buffer (no input: no copy onto itself)
      o.setTimeout(first);
      gloo::broadcast(o);
    });
    if (map_.rank != root) bytes.resize(size_t(n));
    if (n == 0) return;
    run("broadcast", Group::World, [&] {
      gloo::BroadcastOptions o(ctx);
      o.setRoot(root);
      o.setOutput(bytes.data(), bytes.size());
      o.setTimeout(timeout_);
      gloo::broadcast(o);
    });
  }

  void barrier() override {
    auto ctx = context(Group::World);
    if (!ctx) return;
    run("barrier", Group::World, [&] {
      gloo::BarrierOptions o(ctx);
      o.setTimeout(timeout_);
      gloo::barrier(o);
    });
  }

  void abort(const std::string &why) override {
    std::lock_guard lk(mu_);
    if (!aborted_) {
      aborted_ = true;
      why_ = why;
    }
    // Closing this rank's connections tells the other processes now, not after their timeout. A collective
    // still running on another thread keeps its own reference to its context.
    world_.reset();
    tensor_.reset();
  }

  ~GlooCommunicator() override {
    world_.reset();
    tensor_.reset();
    dev_.reset();
  }

 private:
  static void require_host(const Tensor &t, const char *op) {
    if (t.device.kind != Device::Host) failf(DSRT_ERR_INTERNAL, op, ": the Gloo communicator exchanges host memory, got ", t.device.str());
  }
  // The group's context, null when the group is this rank alone. Throws once aborted.
  std::shared_ptr<gloo::Context> context(Group g) {
    std::lock_guard lk(mu_);
    if (aborted_) failf(DSRT_ERR_IO, "the rank group stopped: ", why_);
    if (g == Group::World) return map_.world > 1 ? std::shared_ptr<gloo::Context>(world_) : nullptr;
    return map_.tp > 1 ? std::shared_ptr<gloo::Context>(tensor_) : nullptr;
  }
  template <class F>
  void run(const char *op, Group g, F &&f) {
    try {
      f();
    } catch (const std::exception &e) {
      const std::string why = std::string("rank ") + std::to_string(map_.rank) + ": " + op + " over the " +
                              (g == Group::World ? "world" : "tensor-parallel group") + " failed (a rank died, hung or left): " + e.what();
      abort(why);
      fail(DSRT_ERR_IO, why);
    }
  }

  Mapping map_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<gloo::transport::Device> dev_;
  std::shared_ptr<gloo::rendezvous::Context> world_, tensor_;
  std::vector<float> gathered_;
  std::vector<char> bytes_;
  std::mutex mu_;
  bool aborted_ = false;
  std::string why_;
};

}  // namespace

bool gloo_available() { return true; }
void require_gloo() {}

std::unique_ptr<Communicator> make_gloo_communicator(RendezvousClient &store, const Mapping &m, int64_t timeout_ms) {
  m.validate();
  // A write to a peer that died must be an error, not SIGPIPE killing this process: ignore SIGPIPE unless the
  // application handles it already.
  struct sigaction old {};
  if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  auto c = std::make_unique<GlooCommunicator>(m, timeout_ms);
  c->connect(store, store.local_address());
  return c;
}

#else

bool gloo_available() { return false; }

void require_gloo() {
  fail(DSRT_ERR_UNSUPPORTED, "this build of dsrt has no Gloo (install libgloo-dev and reconfigure): ranks in several "
                             "processes are unsupported; tp x ep ranks in one process still work");
}

std::unique_ptr<Communicator> make_gloo_communicator(RendezvousClient &, const Mapping &, int64_t) {
  require_gloo();
  return nullptr;
}

#endif

}  // namespace dsrt
