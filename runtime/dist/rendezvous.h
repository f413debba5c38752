// How ranks in several processes meet (design.md §5): a small TCP rendezvous that rank 0 serves at the
// coordinator's HOST:PORT. Every rank (rank 0 too) connects as a client and first says hello: its rank,
// the world size, the tp x ep split, the dsrt version and the checkpoint's identity. The server answers
// once every rank has arrived and agrees with rank 0, or with one error for all of them (wrong world size,
// duplicate rank, version or checkpoint mismatch, a rank still missing after the timeout). After the hello
// the connection is a key-value store (set, blocking get, wait) through which a transport exchanges its
// addresses: Gloo's full mesh today (dist/gloo_communicator.cpp adapts it to gloo::rendezvous::Store),
// an NCCL communicator's ncclUniqueId later. Nothing here knows about Gloo.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace dsrt {

struct RankHello {
  int rank = 0, world = 1, tp = 1, ep = 1;
  std::string version;     // dsrt's version string
  std::string checkpoint;  // the model's identity (Model::fingerprint)
  bool dp_attention = false;  // data-parallel attention (dist/mapping.h)
};

// Rank 0's side. Listens at construction (DSRT_ERR_IO naming the address when it cannot) and serves on its
// own thread until finish() or destruction.
class RendezvousServer {
 public:
  RendezvousServer(const std::string &host, int port, const RankHello &leader, int64_t timeout_ms);
  ~RendezvousServer();
  RendezvousServer(const RendezvousServer &) = delete;
  RendezvousServer &operator=(const RendezvousServer &) = delete;
  // Waits until every rank has said goodbye (or closed its connection), at most the timeout, then stops.
  void finish();

 private:
  struct State;
  void serve();
  std::unique_ptr<State> st_;
  std::thread thread_;
};

// One rank's connection to the rendezvous. Every call waits at most the timeout; failures throw dsrt::Error:
// DSRT_ERR_IO (unreachable, closed, timed out), or the server's verdict on the hello
// (DSRT_ERR_INVALID_ARGUMENT, DSRT_ERR_VERSION_MISMATCH, DSRT_ERR_IO for a missing rank).
class RendezvousClient {
 public:
  // Connects to host:port, retrying while nobody listens yet (rank 0 may start last).
  RendezvousClient(const std::string &host, int port, int64_t timeout_ms);
  ~RendezvousClient();
  RendezvousClient(const RendezvousClient &) = delete;
  RendezvousClient &operator=(const RendezvousClient &) = delete;

  // Returns when every rank has joined and agrees; throws the server's error otherwise.
  void hello(const RankHello &me);
  void set(const std::string &key, const std::string &value);
  // Waits until the key is set.
  std::string get(const std::string &key);
  void wait(const std::vector<std::string> &keys, int64_t timeout_ms);
  // Done with the store (the server stops once every rank said so).
  void bye();
  int64_t timeout_ms() const { return timeout_ms_; }
  // This end's IP address (numeric): the address of this host that reaches rank 0, which a transport can
  // advertise to the other ranks.
  std::string local_address() const;

 private:
  std::vector<std::string> call(uint32_t op, const std::vector<std::string> &fields, int64_t wait_ms);
  int fd_ = -1;
  std::string where_;
  int64_t timeout_ms_;
};

}  // namespace dsrt
