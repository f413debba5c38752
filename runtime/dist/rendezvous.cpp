// The rendezvous: length-prefixed frames over TCP. A request is [u32 bytes][u32 op][fields], a reply
// [u32 bytes][u32 status][fields]; a field is [u32 length][bytes]. The server is one thread polling the
// listening socket and every connection; requests that wait (a hello before everyone is here, a get of a key
// nobody set yet) are parked with a deadline and answered when they can be.
#include "dist/rendezvous.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <condition_variable>
#include <set>

#include "core/log.h"
#include "core/status.h"

namespace dsrt {
namespace {

using Clock = std::chrono::steady_clock;
enum Op : uint32_t { kHello = 1, kSet = 2, kGet = 3, kWait = 4, kBye = 5 };
constexpr uint32_t kMaxFrame = 64u << 20;

int64_t ms_left(Clock::time_point deadline) {
  return std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
}

void put_u32(std::string &o, uint32_t v) { o.append(reinterpret_cast<const char *>(&v), 4); }
uint32_t get_u32(const char *p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

std::string frame(uint32_t head, const std::vector<std::string> &fields) {
  std::string body;
  put_u32(body, head);
  for (const std::string &f : fields) {
    put_u32(body, uint32_t(f.size()));
    body += f;
  }
  std::string o;
  put_u32(o, uint32_t(body.size()));
  return o + body;
}

// Parses a frame body (after the length) into head and fields; false when malformed.
bool parse(const std::string &body, uint32_t &head, std::vector<std::string> &fields) {
  if (body.size() < 4) return false;
  head = get_u32(body.data());
  size_t at = 4;
  while (at < body.size()) {
    if (body.size() - at < 4) return false;
    const uint32_t n = get_u32(body.data() + at);
    at += 4;
    if (body.size() - at < n) return false;
    fields.emplace_back(body.data() + at, n);
    at += n;
  }
  return true;
}

bool send_all(int fd, const std::string &s) {
  size_t at = 0;
  while (at < s.size()) {
    const ssize_t n = ::send(fd, s.data() + at, s.size() - at, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    at += size_t(n);
  }
  return true;
}

struct Addr {
  addrinfo *ai = nullptr;
  Addr(const std::string &host, int port, bool passive) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (passive) hints.ai_flags = AI_PASSIVE;
    const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &ai);
    if (rc != 0) failf(DSRT_ERR_IO, "coordinator ", host, ":", port, ": ", gai_strerror(rc));
  }
  ~Addr() {
    if (ai) freeaddrinfo(ai);
  }
};

std::string join_ranks(const std::vector<int> &v) {
  std::string s;
  for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

// ---------------------------------------------------------------- server
struct RendezvousServer::State {
  struct Conn {
    int fd = -1;
    std::string in;
    int rank = -1;          // after an accepted hello
    bool hello_waiting = false, gone = false;
    // a parked get or wait
    uint32_t op = 0;
    std::vector<std::string> keys;
    Clock::time_point deadline;
  };
  int listen_fd = -1;
  std::string where;
  RankHello leader;
  int64_t timeout_ms;
  Clock::time_point hello_deadline;
  std::map<std::string, std::string> kv;
  std::vector<Conn> conns;
  std::set<int> joined;      // ranks whose hello was accepted
  bool all_joined = false;
  uint32_t fatal_code = 0;   // first verdict against the group
  std::string fatal;
  int byes = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false, done = false;  // done: every rank said goodbye

  void reply(Conn &c, uint32_t code, const std::vector<std::string> &fields) {
    if (!send_all(c.fd, frame(code, fields))) c.gone = true;
  }
  void fail_group(uint32_t code, const std::string &msg) {
    if (fatal_code == 0) {
      fatal_code = code;
      fatal = msg;
      log(LogLevel::Warn, "dsrt rendezvous: " + msg);
    }
    for (Conn &c : conns)
      if (c.hello_waiting) {
        c.hello_waiting = false;
        reply(c, fatal_code, {fatal});
      }
  }
  // Checks one rank's hello against rank 0's; "" when it fits.
  std::string mismatch(const RankHello &h, uint32_t &code) const {
    code = DSRT_ERR_INVALID_ARGUMENT;
    if (h.world != leader.world)
      return "rank " + std::to_string(h.rank) + " was started for a world of " + std::to_string(h.world) +
             " ranks, rank 0 for " + std::to_string(leader.world);
    if (h.rank < 0 || h.rank >= leader.world)
      return "rank " + std::to_string(h.rank) + " is outside the world of " + std::to_string(leader.world) + " ranks";
    if (joined.count(h.rank)) return "two processes say they are rank " + std::to_string(h.rank) + " of " + std::to_string(leader.world);
    if (h.tp != leader.tp || h.ep != leader.ep || h.dp_attention != leader.dp_attention) {
      auto split = [](const RankHello &x) {
        return "tp " + std::to_string(x.tp) + " x ep " + std::to_string(x.ep) + (x.dp_attention ? " with data-parallel attention" : "");
      };
      return "rank " + std::to_string(h.rank) + " splits the model " + split(h) + ", rank 0 " + split(leader);
    }
    code = DSRT_ERR_VERSION_MISMATCH;
    if (h.version != leader.version)
      return "rank " + std::to_string(h.rank) + " runs dsrt " + h.version + ", rank 0 dsrt " + leader.version;
    if (h.checkpoint != leader.checkpoint)
      return "rank " + std::to_string(h.rank) + " loaded a different checkpoint (identity " + h.checkpoint.substr(0, 16) +
             "..., rank 0 " + leader.checkpoint.substr(0, 16) + "...)";
    code = 0;
    return "";
  }
  void handle(Conn &c, uint32_t op, std::vector<std::string> &f) {
    switch (op) {
      case kHello: {
        // (a seventh field, the attention split: an older dsrt sends six and then meets the version check)
        if (f.size() != 6 && f.size() != 7) return reply(c, DSRT_ERR_FORMAT, {"malformed hello"});
        RankHello h;
        try {
          h.rank = std::stoi(f[0]), h.world = std::stoi(f[1]), h.tp = std::stoi(f[2]), h.ep = std::stoi(f[3]);
        } catch (const std::exception &) {
          return reply(c, DSRT_ERR_FORMAT, {"malformed hello"});
        }
        h.version = f[4], h.checkpoint = f[5];
        h.dp_attention = f.size() == 7 && f[6] == "dp";
        if (fatal_code) return reply(c, fatal_code, {fatal});
        uint32_t code;
        const std::string why = mismatch(h, code);
        if (!why.empty()) {
          if (all_joined) return reply(c, code, {why + " (the group had already formed)"});
          return fail_group(code, why + " (rendezvous at " + where + ")"), reply(c, fatal_code, {fatal});
        }
        c.rank = h.rank;
        joined.insert(h.rank);
        c.hello_waiting = true;
        if (int(joined.size()) == leader.world) {
          all_joined = true;
          for (Conn &o : conns)
            if (o.hello_waiting) {
              o.hello_waiting = false;
              reply(o, 0, {});
            }
        }
        return;
      }
      case kSet:
        if (f.size() != 2) return reply(c, DSRT_ERR_FORMAT, {"malformed set"});
        kv[f[0]] = f[1];
        return reply(c, 0, {});
      case kGet:
      case kWait: {
        if (f.empty()) return reply(c, DSRT_ERR_FORMAT, {"malformed get"});
        const int64_t wait_ms = std::max<int64_t>(0, std::atoll(f[0].c_str()));
        c.op = op;
        c.keys.assign(f.begin() + 1, f.end());
        c.deadline = Clock::now() + std::chrono::milliseconds(wait_ms);
        return;
      }
      case kBye:
        c.gone = true;
        return reply(c, 0, {});
      default:
        return reply(c, DSRT_ERR_FORMAT, {"unknown request " + std::to_string(op)});
    }
  }
  // Answers parked gets and waits whose keys are there or whose time is up.
  void settle(Conn &c) {
    if (!c.op) return;
    const bool ready = std::all_of(c.keys.begin(), c.keys.end(), [&](const std::string &k) { return kv.count(k) > 0; });
    if (ready) {
      const uint32_t op = c.op;
      c.op = 0;
      if (op == kGet && c.keys.size() == 1) return reply(c, 0, {kv[c.keys[0]]});
      return reply(c, 0, {});
    }
    if (Clock::now() >= c.deadline) {
      c.op = 0;
      std::string missing;
      for (const std::string &k : c.keys)
        if (!kv.count(k)) missing += (missing.empty() ? "" : ", ") + k;
      reply(c, DSRT_ERR_IO, {"rendezvous at " + where + ": no rank set " + missing + " in time"});
    }
  }
};

RendezvousServer::RendezvousServer(const std::string &host, int port, const RankHello &leader, int64_t timeout_ms)
    : st_(std::make_unique<State>()) {
  State &s = *st_;
  s.where = host + ":" + std::to_string(port);
  s.leader = leader;
  s.timeout_ms = timeout_ms;
  s.hello_deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  Addr a(host, port, true);
  std::string err = "no address";
  for (addrinfo *p = a.ai; p; p = p->ai_next) {
    const int fd = ::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, p->ai_addr, p->ai_addrlen) == 0 && ::listen(fd, 256) == 0) {
      s.listen_fd = fd;
      break;
    }
    err = std::strerror(errno);
    ::close(fd);
  }
  if (s.listen_fd < 0) failf(DSRT_ERR_IO, "rank 0 cannot listen at the coordinator address ", s.where, ": ", err);
  thread_ = std::thread([this] { serve(); });
}

RendezvousServer::~RendezvousServer() {
  {
    std::lock_guard lk(st_->mu);
    st_->stop = true;
  }
  if (thread_.joinable()) thread_.join();
  for (auto &c : st_->conns) ::close(c.fd);
  if (st_->listen_fd >= 0) ::close(st_->listen_fd);
}

void RendezvousServer::finish() {
  std::unique_lock lk(st_->mu);
  st_->cv.wait_for(lk, std::chrono::milliseconds(st_->timeout_ms), [&] { return st_->done; });
}

void RendezvousServer::serve() {
  State &s = *st_;
  for (;;) {
    {
      std::lock_guard lk(s.mu);
      if (s.stop) return;
    }
    std::vector<pollfd> pf{{s.listen_fd, POLLIN, 0}};
    for (auto &c : s.conns) pf.push_back({c.fd, POLLIN, 0});
    const int n = ::poll(pf.data(), pf.size(), 20);
    if (n < 0 && errno != EINTR) {
      log(LogLevel::Warn, std::string("dsrt rendezvous: poll failed: ") + std::strerror(errno));
      return;
    }
    if (pf[0].revents & POLLIN) {
      const int fd = ::accept4(s.listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        s.conns.push_back({});
        s.conns.back().fd = fd;
      }
    }
    for (size_t i = 1; i < pf.size(); i++) {
      State::Conn &c = s.conns[i - 1];
      if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      const ssize_t got = ::recv(c.fd, buf, sizeof buf, 0);
      if (got <= 0) {
        if (got < 0 && errno == EINTR) continue;
        c.gone = true;
        continue;
      }
      c.in.append(buf, size_t(got));
      while (c.in.size() >= 4 && !c.gone) {
        const uint32_t len = get_u32(c.in.data());
        if (len > kMaxFrame) {
          c.gone = true;
          break;
        }
        if (c.in.size() < 4 + size_t(len)) break;
        const std::string body = c.in.substr(4, len);
        c.in.erase(0, 4 + size_t(len));
        uint32_t op;
        std::vector<std::string> f;
        if (!parse(body, op, f)) {
          c.gone = true;
          break;
        }
        s.handle(c, op, f);
      }
    }
    if (!s.all_joined && !s.fatal_code && Clock::now() >= s.hello_deadline) {
      std::vector<int> missing;
      for (int r = 0; r < s.leader.world; r++)
        if (!s.joined.count(r)) missing.push_back(r);
      s.fail_group(DSRT_ERR_IO, std::string(missing.size() == 1 ? "rank " : "ranks ") + join_ranks(missing) + " of " +
                                    std::to_string(s.leader.world) + " did not join within " +
                                    std::to_string(s.timeout_ms) + " ms (rendezvous at " + s.where + ")");
    }
    for (auto &c : s.conns) s.settle(c);
    // Closed connections go; a rank that left after its hello counts as done with the store.
    for (auto it = s.conns.begin(); it != s.conns.end();) {
      if (!it->gone) {
        ++it;
        continue;
      }
      if (it->rank >= 0) s.byes++;
      ::close(it->fd);
      it = s.conns.erase(it);
    }
    if (s.all_joined && s.byes >= s.leader.world) {
      std::lock_guard lk(s.mu);
      s.done = true;
      s.cv.notify_all();
    }
  }
}

// ---------------------------------------------------------------- client
RendezvousClient::RendezvousClient(const std::string &host, int port, int64_t timeout_ms)
    : where_(host + ":" + std::to_string(port)), timeout_ms_(timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  std::string err;
  for (;;) {
    Addr a(host, port, false);
    for (addrinfo *p = a.ai; p && fd_ < 0; p = p->ai_next) {
      const int fd = ::socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
      if (fd < 0) continue;
      if (::connect(fd, p->ai_addr, p->ai_addrlen) == 0) {
        fd_ = fd;
        break;
      }
      err = std::strerror(errno);
      ::close(fd);
    }
    if (fd_ >= 0) break;
    if (Clock::now() >= deadline)
      failf(DSRT_ERR_IO, "cannot reach the coordinator ", where_, " within ", timeout_ms, " ms: ", err,
            " (is rank 0 running, and is the address the one it listens at?)");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

RendezvousClient::~RendezvousClient() {
  if (fd_ >= 0) ::close(fd_);
}

std::vector<std::string> RendezvousClient::call(uint32_t op, const std::vector<std::string> &fields, int64_t wait_ms) {
  if (fd_ < 0) fail(DSRT_ERR_BAD_STATE, "the rendezvous connection is closed");
  if (!send_all(fd_, frame(op, fields))) failf(DSRT_ERR_IO, "the coordinator ", where_, " closed the connection");
  const auto deadline = Clock::now() + std::chrono::milliseconds(wait_ms);
  std::string in;
  for (;;) {
    if (in.size() >= 4) {
      const uint32_t len = get_u32(in.data());
      if (len > kMaxFrame) failf(DSRT_ERR_IO, "the coordinator ", where_, " sent a malformed reply");
      if (in.size() >= 4 + size_t(len)) {
        uint32_t code;
        std::vector<std::string> f;
        if (!parse(in.substr(4, len), code, f)) failf(DSRT_ERR_IO, "the coordinator ", where_, " sent a malformed reply");
        if (code != 0) fail(dsrt_status(code), f.empty() ? "rendezvous failed" : f[0]);
        return f;
      }
    }
    pollfd p{fd_, POLLIN, 0};
    const int64_t left = ms_left(deadline);
    const int n = ::poll(&p, 1, int(std::min<int64_t>(left, 1000)));
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {
      if (left == 0) failf(DSRT_ERR_IO, "the coordinator ", where_, " did not answer within ", wait_ms, " ms");
      continue;
    }
    char buf[65536];
    const ssize_t got = ::recv(fd_, buf, sizeof buf, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) failf(DSRT_ERR_IO, "the coordinator ", where_, " closed the connection (did rank 0 fail or exit?)");
    in.append(buf, size_t(got));
  }
}

void RendezvousClient::hello(const RankHello &me) {
  // The server answers by its own deadline (the same timeout, started earlier); a little more here.
  call(kHello,
       {std::to_string(me.rank), std::to_string(me.world), std::to_string(me.tp), std::to_string(me.ep), me.version,
        me.checkpoint, me.dp_attention ? "dp" : "tp"},
       timeout_ms_ + 5000);
}

void RendezvousClient::set(const std::string &key, const std::string &value) { call(kSet, {key, value}, timeout_ms_); }

std::string RendezvousClient::get(const std::string &key) {
  const auto f = call(kGet, {std::to_string(timeout_ms_), key}, timeout_ms_ + 5000);
  if (f.size() != 1) failf(DSRT_ERR_IO, "the coordinator ", where_, " sent a malformed reply");
  return f[0];
}

void RendezvousClient::wait(const std::vector<std::string> &keys, int64_t timeout_ms) {
  std::vector<std::string> f{std::to_string(timeout_ms)};
  f.insert(f.end(), keys.begin(), keys.end());
  call(kWait, f, timeout_ms + 5000);
}

std::string RendezvousClient::local_address() const {
  sockaddr_storage a{};
  socklen_t n = sizeof a;
  char host[NI_MAXHOST] = "127.0.0.1";
  if (fd_ >= 0 && ::getsockname(fd_, reinterpret_cast<sockaddr *>(&a), &n) == 0)
    ::getnameinfo(reinterpret_cast<sockaddr *>(&a), n, host, sizeof host, nullptr, 0, NI_NUMERICHOST);
  return host;
}

void RendezvousClient::bye() {
  if (fd_ < 0) return;
  try {
    call(kBye, {}, timeout_ms_);
  } catch (const Error &) {  // the server may already be gone: nothing is lost
  }
  ::close(fd_);
  fd_ = -1;
}

}  // namespace dsrt
