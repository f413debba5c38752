#include "dist/host_staged_communicator.h"

#include <algorithm>

#include "backend/backend.h"
#include "core/status.h"

namespace dsrt {
namespace {

class HostStagedCommunicator final : public Communicator {
 public:
  HostStagedCommunicator(std::unique_ptr<Communicator> host, Backend &be) : host_(std::move(host)), be_(be) {}
  const Mapping &mapping() const override { return host_->mapping(); }

  void all_reduce_sum(Tensor x, Group g) override {
    Staged s(be_, x, true);
    host_->all_reduce_sum(s.host, g);
    s.back();
  }
  void all_gather_cols(Tensor local, Tensor out, Group g) override {
    Staged in(be_, local, true), o(be_, out, false);
    host_->all_gather_cols(in.host, o.host, g);
    o.back();
  }
  void all_to_all_v(Tensor send, const std::vector<int64_t> &send_counts, Tensor recv,
                    const std::vector<int64_t> &recv_counts, Group g) override {
    Staged in(be_, send, true), o(be_, recv, false);
    host_->all_to_all_v(in.host, send_counts, o.host, recv_counts, g);
    int64_t rows_in = 0;
    for (int64_t n : recv_counts) rows_in += n;
    o.back(rows_in);  // the received rows only: the rest of recv stays as it was, as over NCCL
  }
  void broadcast(std::string &bytes, int root) override { host_->broadcast(bytes, root); }
  void barrier() override { host_->barrier(); }
  void abort(const std::string &why) override { host_->abort(why); }

 private:
  // A tensor's host stand-in: the tensor itself when it is in host memory, else a host copy (its contents
  // when `read`) that back() writes to the device tensor.
  struct Staged {
    Backend &be;
    Tensor dev, host;
    std::vector<float> buf;
    Staged(Backend &b, Tensor t, bool read) : be(b), dev(t), host(t) {
      if (t.device.kind == Device::Host) return;
      if (t.device != be.device())
        failf(DSRT_ERR_INTERNAL, "a collective on ", t.device.str(), " memory through the backend of ", be.device().str());
      buf.resize((t.bytes() + sizeof(float) - 1) / sizeof(float));
      if (read) be.to_host(t, buf.data());
      host = Tensor{buf.data(), t.dtype, t.rows, t.cols, Device::host()};
    }
    // Writes the host copy's first `rows` rows (-1: all) to the device tensor.
    void back(int64_t rows = -1) {
      if (dev.device.kind == Device::Host) return;
      const int64_t n = rows < 0 ? dev.rows : std::min(rows, dev.rows);
      if (n > 0) be.from_host(dev.rows_view(0, n), buf.data());
    }
  };
  std::unique_ptr<Communicator> host_;
  Backend &be_;
};

}  // namespace

std::unique_ptr<Communicator> make_host_staged_communicator(std::unique_ptr<Communicator> host, Backend &backend) {
  return std::make_unique<HostStagedCommunicator>(std::move(host), backend);
}

std::vector<std::unique_ptr<Communicator>> make_host_staged_local_group(int tp, int ep, const std::vector<Backend *> &backends) {
  std::vector<std::unique_ptr<Communicator>> hosts = make_local_group(tp, ep), out;
  if (backends.size() != hosts.size())
    failf(DSRT_ERR_INTERNAL, "make_host_staged_local_group: ", backends.size(), " backends for ", hosts.size(), " ranks");
  for (size_t r = 0; r < hosts.size(); r++) out.push_back(make_host_staged_communicator(std::move(hosts[r]), *backends[r]));
  return out;
}

}  // namespace dsrt
