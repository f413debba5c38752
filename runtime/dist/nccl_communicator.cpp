#include "dist/nccl_communicator.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include "backend/backend.h"
#include "core/log.h"
#include "core/status.h"
#include "dist/collective_watchdog.h"
#include "dist/nccl_library.h"
#include "dist/rendezvous.h"

namespace dsrt {
namespace {

using Clock = std::chrono::steady_clock;

int reduce_type(DType t) {
  switch (t) {
    case DType::F32: return nccl::kFloat32;
    case DType::BF16: return nccl::kBfloat16;
    case DType::F16: return nccl::kFloat16;
    case DType::I32: return nccl::kInt32;
    default: failf(DSRT_ERR_INTERNAL, "all_reduce_sum: no sum over ", dtype_name(t), " tensors");
  }
}

// What every communicator of the process logs once at its start: which NCCL, and the variables that steer
// its choice of transport. NCCL does not report the transport it then picks through its API; NCCL_DEBUG=INFO
// makes it print that itself.
void log_start(const nccl::Api &api, const Mapping &m, int device, bool nvls_set, bool twins) {
  std::string s = "dsrt: NCCL " + nccl::version_string(api.version) + " (" + api.path + ") for " + m.str() + " on cuda:" +
                  std::to_string(device) + "; " + nccl::env_summary();
  s += twins ? "; collectives on blocking twins of the joined communicators"
             : "; collectives on the non-blocking communicators (DSRT_NCCL_NONBLOCKING=1: ~40 us more a call)";
  if (nvls_set) s += "; NVLink multicast off (dsrt set NCCL_NVLS_ENABLE=0; set it to 1 to allow NVLS)";
  s += "; NCCL_DEBUG=INFO shows the transports NCCL picks";
  log(LogLevel::Info, s);
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const nccl::Api &api, std::unique_ptr<Communicator> host, Backend &be, int64_t timeout_ms,
                   std::shared_ptr<std::atomic<bool>> group_failed)
      : api_(api), host_(std::move(host)), be_(be), timeout_(std::chrono::milliseconds(timeout_ms)),
        group_failed_(std::move(group_failed)) {
    if (be.device().kind != Device::Cuda) failf(DSRT_ERR_INTERNAL, "the NCCL communicator needs a CUDA backend, got ", be.name());
    device_ = be.device().index;
    be_.native_stream();  // binds this thread to the backend's device
    const char *nb = std::getenv("DSRT_NCCL_NONBLOCKING");
    twins_ = !(nb && std::string(nb) == "1");
    watch_ = std::make_unique<CollectiveWatchdog>(
        CollectiveWatchdog::Source{[this](void *mark) { return finished(mark); }, [this] { return async_error(); },
                                   [this](const std::string &why) { stop_group(why); }},
        timeout_);
  }
  ~NcclCommunicator() override {
    // Every queued collective runs to its end first (or the group fails: the watchdog aborts a hung one), so
    // that nothing is freed under the GPU.
    watch_->settle();
    watch_.reset();
    cudaSetDevice(device_);
    // Ranks of one process are torn down one after another on one thread, so none may wait for its peers:
    // they are aborted (every collective has completed, so nothing is lost). A rank alone in its process
    // takes NCCL's ordinary teardown.
    if (group_failed_) abort_nccl();
    if (!aborted_)
      for (nccl::Comm c : comms()) api_.CommDestroy(c);
    if (staging_) cudaFree(staging_);
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }

  const Mapping &mapping() const override { return host_->mapping(); }

  // Starts this rank's NCCL communicators: the world's, and the tensor-parallel group's when it is neither the
  // world nor this rank alone. Called inside ncclGroupStart/End when one thread starts several ranks.
  void start_world(const nccl::UniqueId &id) { call("ncclCommInitRankConfig", [&] { return init(&world_, mapping().world, id, mapping().rank); }); }
  void start_tensor(const nccl::UniqueId &id) { call("ncclCommInitRankConfig", [&] { return init(&tensor_, mapping().tp, id, mapping().tp_rank()); }); }
  bool own_tensor_group() const { return mapping().tp > 1 && mapping().tp < mapping().world; }
  // Waits until the communicators started above are ready (every rank of each group joined), or throws.
  void finish_start() {
    const auto deadline = Clock::now() + timeout_;
    settle(world_, "joining the world's NCCL communicator", deadline);
    if (own_tensor_group()) settle(tensor_, "joining the tensor-parallel group's NCCL communicator", deadline);
    else if (mapping().tp > 1) tensor_ = world_;
  }

  // The communicators the collectives run on: blocking twins of the joined ones (ncclCommSplit with
  // blocking = 1), since NCCL runs each call on a non-blocking communicator in a thread it starts for that
  // call (group.cc; ~40 us a call on an H200, docs/perf.md); or, with DSRT_NCCL_NONBLOCKING=1, the joined ones
  // themselves (every call then abortable, even one waiting for a peer inside NCCL). The splits run on the
  // joined (non-blocking) communicators, so they are polled with the join's timeout like the joins.
  void start_twin_world() {
    if (twins_) call("ncclCommSplit", [&] { return split(world_, mapping().rank, &run_world_); });
  }
  void start_twin_tensor() {
    if (twins_ && own_tensor_group()) call("ncclCommSplit", [&] { return split(tensor_, mapping().tp_rank(), &run_tensor_); });
  }
  void finish_twin(bool tensor) {
    if (!twins_) {
      (tensor ? run_tensor_ : run_world_) = tensor ? tensor_ : world_;
      return;
    }
    if (tensor && !own_tensor_group()) {
      run_tensor_ = mapping().tp > 1 ? run_world_ : nullptr;
      return;
    }
    settle(tensor ? tensor_ : world_, std::string("making the ") + (tensor ? "tensor-parallel group's" : "world's") +
           " blocking NCCL communicator", Clock::now() + timeout_);
    if (!(tensor ? run_tensor_ : run_world_)) failed("ncclCommSplit made no communicator");
  }

  // The first collectives of the communicators collectives run on, at start. NCCL connects a communicator's
  // peers for an algorithm in the call that first runs it (a blocking one waits there for its peers, where no
  // timeout reaches); done here, while the group joins, a later collective only queues work. All-reduces of
  // 4 B, 256 KB and 16 MB per communicator (the sizes at which NCCL's tuner picks its algorithms: ring, tree),
  // an all-gather, and a send and a receive with every other rank (all_to_all_v's peers). Inside a group when
  // one thread starts several ranks; followed by the watchdog like any collective (wait_started()), and the
  // calls themselves timed by it (they block on the host until the peers join). Not on non-blocking
  // communicators (each call there is polled and abortable, connection included).
  void prepare_warmup() {  // (outside the NCCL group: nothing inside it may throw)
    if (!twins_) return;
    const size_t n = kWarmupFloats + size_t(2 * mapping().world);
    float *buf = reinterpret_cast<float *>(staging(sizeof(float) * n));
    check_cuda(cudaMemsetAsync(buf, 0, sizeof(float) * n, static_cast<cudaStream_t>(be_.native_stream())), "warm-up buffer");
  }
  // The first error of the warm-up's calls (none throws: inside a group of several ranks a throw would leave
  // the group half queued).
  nccl::Result enqueue_warmup() {
    if (!twins_) return nccl::kSuccess;
    const int W = mapping().world, me = mapping().rank;
    float *buf = reinterpret_cast<float *>(staging_), *peer = buf + kWarmupFloats;
    cudaStream_t s = static_cast<cudaStream_t>(be_.native_stream());
    nccl::Result first = nccl::kSuccess;
    auto note = [&](nccl::Result r) {
      if (first == nccl::kSuccess && r != nccl::kSuccess && r != nccl::kInProgress) first = r;
    };
    std::vector<nccl::Comm> own{run_world_};
    if (run_tensor_ && run_tensor_ != run_world_) own.push_back(run_tensor_);
    for (nccl::Comm c : own) {
      for (size_t n : {size_t(1), size_t(64) << 10, kWarmupFloats})
        note(api_.AllReduce(buf, buf, n, nccl::kFloat32, nccl::kSum, c, s));
      note(api_.AllGather(peer + W, peer, 1, nccl::kFloat32, c, s));
    }
    if (W > 1) {
      note(api_.GroupStart());
      for (int r = 0; r < W; r++) {
        if (r == me) continue;
        note(api_.Send(peer + r, 1, nccl::kFloat32, r, run_world_, s));
        note(api_.Recv(peer + W + r, 1, nccl::kFloat32, r, run_world_, s));
      }
      note(api_.GroupEnd());
    }
    return first;
  }
  static constexpr size_t kWarmupFloats = size_t(4) << 20;  // 16 MB: the largest warm-up all-reduce
  void wait_started() {
    follow_on_stream("the warm-up collectives");
    if (!watch_->settle())
      failf(DSRT_ERR_IO, "rank ", mapping().rank, ": NCCL ", watch_->failure().empty() ? reason() : watch_->failure());
  }

  void all_reduce_sum(Tensor x, Group g) override {
    require_device(x, "all_reduce_sum");
    const int type = reduce_type(x.dtype);
    if (!comm_of(g)) return;  // this rank alone
    collective("all_reduce_sum", g, [&](nccl::Comm c, cudaStream_t s) {
      return api_.AllReduce(x.data, x.data, size_t(x.rows * x.cols), type, nccl::kSum, c, s);
    });
  }

  // NCCL gathers contiguous blocks of one size, and each rank's columns are a strided block of `out`: every
  // rank's block goes into a staging buffer padded to the widest rank's width (rank r's columns are
  // Mapping::split(out.cols, W, r), as every caller cuts them), then each block is copied into its columns.
  void all_gather_cols(Tensor local, Tensor out, Group g) override {
    require_device(local, "all_gather_cols");
    require_device(out, "all_gather_cols");
    if (local.rows != out.rows || local.dtype != out.dtype) fail(DSRT_ERR_INTERNAL, "all_gather_cols: rows or dtype differ");
    const size_t es = dtype_size(out.dtype);
    const int W = group_size(g), me = group_rank(g);
    if (local.cols != Mapping::split(out.cols, W, me).size())
      failf(DSRT_ERR_INTERNAL, "all_gather_cols: rank ", me, " of ", W, " holds ", local.cols, " of ", out.cols,
            " columns, not its Mapping::split share");
    if (!comm_of(g)) {  // this rank alone: its columns are the output
      if (local.data != out.data) copy_on_stream(out.data, local.data, out.bytes());
      return;
    }
    const int64_t maxw = Mapping::split(out.cols, W, 0).size();
    const size_t pitch = size_t(maxw) * es, block = pitch * size_t(out.rows);
    char *st = staging(block * size_t(W));
    collective("all_gather_cols", g, [&](nccl::Comm c, cudaStream_t s) {
      check_cuda(cudaMemcpy2DAsync(st + size_t(me) * block, pitch, local.data, size_t(local.cols) * es, size_t(local.cols) * es,
                                   size_t(local.rows), cudaMemcpyDeviceToDevice, s), "all_gather_cols staging");
      return api_.AllGather(st + size_t(me) * block, st, block, nccl::kUint8, c, s);
    });
    cudaStream_t s = static_cast<cudaStream_t>(be_.native_stream());
    int64_t c0 = 0;
    for (int r = 0; r < W; r++) {
      const int64_t w = Mapping::split(out.cols, W, r).size();
      if (w > 0)
        check_cuda(cudaMemcpy2DAsync(static_cast<char *>(out.data) + size_t(c0) * es, size_t(out.cols) * es, st + size_t(r) * block,
                                     pitch, size_t(w) * es, size_t(out.rows), cudaMemcpyDeviceToDevice, s), "all_gather_cols");
      c0 += w;
    }
  }

  // ncclSend/ncclRecv per peer inside one NCCL group; rows for rank r sit after the rows for ranks < r.
  void all_to_all_v(Tensor send, const std::vector<int64_t> &send_counts, Tensor recv,
                    const std::vector<int64_t> &recv_counts, Group g) override {
    require_device(send, "all_to_all_v");
    require_device(recv, "all_to_all_v");
    const int W = group_size(g);
    if (int(send_counts.size()) != W || int(recv_counts.size()) != W) fail(DSRT_ERR_INTERNAL, "all_to_all_v: one count per rank of the group");
    const size_t row = size_t(send.cols) * dtype_size(send.dtype);
    if (size_t(recv.cols) * dtype_size(recv.dtype) != row) fail(DSRT_ERR_INTERNAL, "all_to_all_v: send and receive rows differ in size");
    int64_t rows_out = 0, rows_in = 0;
    for (int r = 0; r < W; r++) {
      if (send_counts[size_t(r)] < 0 || recv_counts[size_t(r)] < 0) fail(DSRT_ERR_INTERNAL, "all_to_all_v: a negative count");
      rows_out += send_counts[size_t(r)];
      rows_in += recv_counts[size_t(r)];
    }
    if (rows_out > send.rows) fail(DSRT_ERR_INTERNAL, "all_to_all_v: more rows go out than the input holds");
    if (rows_in > recv.rows) fail(DSRT_ERR_INTERNAL, "all_to_all_v: more rows come in than the output holds");
    if (!comm_of(g)) {
      if (send.data != recv.data && send_counts[0] > 0) copy_on_stream(recv.data, send.data, size_t(send_counts[0]) * row);
      return;
    }
    collective("all_to_all_v", g, [&](nccl::Comm c, cudaStream_t s) {
      nccl::Result first = api_.GroupStart();
      if (first != nccl::kSuccess) return first;
      size_t so = 0, ro = 0;
      for (int r = 0; r < W; r++) {
        const size_t sn = size_t(send_counts[size_t(r)]) * row, rn = size_t(recv_counts[size_t(r)]) * row;
        nccl::Result a = nccl::kSuccess, b = nccl::kSuccess;
        if (sn) a = api_.Send(static_cast<const char *>(send.data) + so, sn, nccl::kUint8, r, c, s);
        if (rn) b = api_.Recv(static_cast<char *>(recv.data) + ro, rn, nccl::kUint8, r, c, s);
        if (first == nccl::kSuccess) first = a != nccl::kSuccess ? a : b;
        so += sn;
        ro += rn;
      }
      const nccl::Result end = api_.GroupEnd();  // always closes the group, even after a failed call inside it
      return first != nccl::kSuccess && first != nccl::kInProgress ? first : end;
    });
  }

  void broadcast(std::string &bytes, int root) override { host_->broadcast(bytes, root); }
  void barrier() override { host_->barrier(); }

  // From any thread. A collective being queued on another thread sees the request when its call returns and
  // aborts the NCCL communicators itself (they must not be freed under it); otherwise they are aborted here.
  void abort(const std::string &why) override {
    note_failure(why);
    if (op_mu_.try_lock()) {
      abort_nccl();
      op_mu_.unlock();
    }
    host_->abort(why);
  }

  // The watchdog's verdict, then NCCL's own asynchronous errors (the step's collectives have run: see
  // Communicator::check).
  void check() override {
    std::lock_guard op(op_mu_);
    if (abort_requested_ || aborted_) failf(DSRT_ERR_IO, "the rank group stopped: ", reason());
    for (nccl::Comm c : comms()) {
      nccl::Result st = nccl::kSuccess;
      if (api_.CommGetAsyncError(c, &st) == nccl::kSuccess && st != nccl::kSuccess && st != nccl::kInProgress)
        failed(std::string("after the step: ") + api_.GetErrorString(st));
    }
  }

 private:
  nccl::Result init(nccl::Comm *c, int n, const nccl::UniqueId &id, int rank) {
    nccl::Config cfg;
    cfg.blocking = 0;  // every call returns at once; completion is polled with a deadline (the file comment)
    be_.native_stream();
    return api_.CommInitRankConfig(c, n, id, rank, &cfg);
  }

  nccl::Result split(nccl::Comm parent, int key, nccl::Comm *out) {
    nccl::Config cfg;
    cfg.blocking = 1;
    be_.native_stream();
    return api_.CommSplit(parent, 0, key, out, &cfg);
  }
  // Every distinct communicator held, twins first.
  std::vector<nccl::Comm> comms() const {
    std::vector<nccl::Comm> v;
    for (nccl::Comm c : {run_tensor_, run_world_, tensor_, world_})
      if (c && std::find(v.begin(), v.end(), c) == v.end()) v.push_back(c);
    return v;
  }

  void check_cuda(cudaError_t e, const char *what) {
    if (e != cudaSuccess) failf(DSRT_ERR_INTERNAL, "CUDA: ", what, ": ", cudaGetErrorString(e));
  }
  void require_device(const Tensor &t, const char *op) const {
    if (t.device.kind != Device::Cuda || t.device.index != device_)
      failf(DSRT_ERR_INTERNAL, op, ": the NCCL communicator of cuda:", device_, " got a tensor on ", t.device.str());
  }
  int group_size(Group g) const { return g == Group::World ? mapping().world : mapping().tp; }
  int group_rank(Group g) const { return g == Group::World ? mapping().rank : mapping().tp_rank(); }
  // The group's NCCL communicator; null when the group is this rank alone (the world always has one, even of
  // one rank). Throws once aborted.
  nccl::Comm comm_of(Group g) {
    if (abort_requested_ || aborted_) failf(DSRT_ERR_IO, "the rank group stopped: ", reason());
    if (g == Group::World) return run_world_;
    return mapping().tp > 1 ? run_tensor_ : nullptr;
  }
  std::string reason() {
    std::lock_guard lk(mu_);
    return why_;
  }
  char *staging(size_t bytes) {
    if (bytes > staging_bytes_) {
      // (the previous gather's copies out of the old buffer may still be queued)
      check_cuda(cudaStreamSynchronize(static_cast<cudaStream_t>(be_.native_stream())), "staging");
      if (staging_) cudaFree(staging_);
      staging_ = nullptr;
      staging_bytes_ = 0;
      check_cuda(cudaMalloc(&staging_, bytes), "all_gather_cols staging buffer");
      staging_bytes_ = bytes;
    }
    return static_cast<char *>(staging_);
  }
  void copy_on_stream(void *dst, const void *src, size_t bytes) {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(be_.native_stream())), "copy");
  }

  // An NCCL call's result: success, in progress (polled until it settles), or an error that stops the group.
  template <class F>
  void call(const char *what, F &&f) {
    const nccl::Result r = f();
    if (r == nccl::kSuccess || r == nccl::kInProgress) return;  // (in progress: finish_start or the collective settles it)
    failed(std::string(what) + ": " + api_.GetErrorString(r));
  }

  // Polls `c` until its non-blocking work has settled; throws (aborting the group) on an error, an abort
  // request or the deadline.
  void settle(nccl::Comm c, const std::string &what, Clock::time_point deadline) {
    for (int spins = 0;; spins++) {
      nccl::Result st = nccl::kSuccess;
      const nccl::Result r = api_.CommGetAsyncError(c, &st);
      if (r != nccl::kSuccess) failed(what + ": ncclCommGetAsyncError: " + api_.GetErrorString(r));
      if (st == nccl::kSuccess) return;
      if (st != nccl::kInProgress) failed(what + ": " + api_.GetErrorString(st));
      poll_pause(what, deadline, spins);
    }
  }
  void poll_pause(const std::string &what, Clock::time_point deadline, int spins) {
    if (abort_requested_ || (group_failed_ && *group_failed_)) failed(what + ": the group was aborted (" + reason() + ")");
    if (Clock::now() > deadline)
      failed(what + ": no progress in " + std::to_string(timeout_.count()) + " ms (a rank died, hung or did not join)");
    // A collective on NVLink takes microseconds: spin first, then leave the core to others.
    if (spins < 2000) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  // Queues one collective on the backend's stream (behind the ops that made its inputs) and returns: the
  // watchdog follows it to its end through an event recorded behind it.
  template <class F>
  void collective(const char *op, Group g, F &&enqueue) {
    std::lock_guard op_lock(op_mu_);
    const nccl::Comm c = comm_of(g);
    std::string what = std::string(op) + " over the " + (g == Group::World ? "world" : "tensor-parallel group");
    cudaStream_t s = static_cast<cudaStream_t>(be_.native_stream());
    watch_->enter_call(op);  // (a blocking call may wait on the host for a peer: the watchdog times it)
    const nccl::Result r = enqueue(c, s);
    watch_->leave_call();
    if (aborted_ || abort_requested_) failed(what + ": the group was aborted (" + reason() + ")");
    if (r != nccl::kSuccess && r != nccl::kInProgress) failed(what + ": " + api_.GetErrorString(r));
    settle(c, what, Clock::now() + timeout_);  // (queued: non-blocking calls may return before they are)
    if (abort_requested_) failed(what + ": the group was aborted (" + reason() + ")");
    follow_on_stream(std::move(what));
  }
  // An event behind the work queued so far, for the watchdog to follow.
  void follow_on_stream(std::string what) {
    auto mark = static_cast<cudaEvent_t>(watch_->spare());
    if (!mark) {
      check_cuda(cudaEventCreateWithFlags(&mark, cudaEventDisableTiming), "cudaEventCreate");
      events_.push_back(mark);
    }
    check_cuda(cudaEventRecord(mark, static_cast<cudaStream_t>(be_.native_stream())), "cudaEventRecord");
    watch_->follow(mark, std::move(what));
  }

  // The watchdog's queries (its thread).
  bool finished(void *mark) {
    const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(mark));
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) failf(DSRT_ERR_INTERNAL, "CUDA: ", cudaGetErrorString(e));
    return false;
  }
  std::string async_error() {
    std::unique_lock op(op_mu_, std::try_to_lock);  // (not beside a call on these communicators, nor their abort)
    if (!op.owns_lock()) return "";
    if (abort_requested_ || (group_failed_ && *group_failed_)) return "the group was aborted (" + reason() + ")";
    for (nccl::Comm c : comms()) {  // (none once aborted: abort_requested_ is set before)
      nccl::Result st = nccl::kSuccess;
      if (api_.CommGetAsyncError(c, &st) == nccl::kSuccess && st != nccl::kSuccess && st != nccl::kInProgress)
        return api_.GetErrorString(st);
    }
    return "";
  }
  // The watchdog found a collective failed or overdue, or a call stuck: stop the group as failed() does, from
  // its thread. The other ranks hear of it first (the host communicator's abort). A call blocked inside NCCL
  // holds op_mu_: after 2 s the communicators are aborted without it, as PyTorch's watchdog does, so that the
  // blocked call sees NCCL's abort flag and returns (the rank's thread touches no handle after an abort).
  void stop_group(const std::string &what) {
    const std::string why = "rank " + std::to_string(mapping().rank) + ": NCCL " + what;
    note_failure(why);
    host_->abort(why);
    log(LogLevel::Error, "dsrt: " + why);
    const bool locked = op_mu_.try_lock_for(std::chrono::seconds(2));
    abort_nccl();
    if (locked) op_mu_.unlock();
  }
  void note_failure(const std::string &why) {
    {
      std::lock_guard lk(mu_);
      if (why_.empty()) why_ = why;
    }
    abort_requested_ = true;
    if (group_failed_) *group_failed_ = true;
  }

  // Aborts everything and throws DSRT_ERR_IO naming the failure. Called with op_mu_ held by this thread (a
  // collective or a start), never concurrently with another NCCL call on these communicators.
  [[noreturn]] void failed(const std::string &what) {
    const std::string why = "rank " + std::to_string(mapping().rank) + ": NCCL " + what;
    note_failure(why);
    abort_nccl();
    host_->abort(why);
    fail(DSRT_ERR_IO, why);
  }
  void abort_nccl() {
    if (aborted_.exchange(true)) return;
    cudaSetDevice(device_);
    for (nccl::Comm c : comms()) api_.CommAbort(c);
  }

  const nccl::Api &api_;
  std::unique_ptr<Communicator> host_;
  Backend &be_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<std::atomic<bool>> group_failed_;  // shared by the ranks of one process (null across processes)
  int device_ = 0;
  nccl::Comm world_ = nullptr, tensor_ = nullptr;          // joined (non-blocking)
  nccl::Comm run_world_ = nullptr, run_tensor_ = nullptr;  // what collectives run on (start_twin_*)
  bool twins_ = true;                                      // blocking twins (not DSRT_NCCL_NONBLOCKING=1)
  std::vector<cudaEvent_t> events_;  // every mark made (the watchdog hands finished ones back)
  void *staging_ = nullptr;
  size_t staging_bytes_ = 0;
  std::timed_mutex op_mu_;  // held by the collective (or start) in flight
  std::mutex mu_;     // why_
  std::string why_;
  std::atomic<bool> abort_requested_{false};
  // The NCCL communicators were aborted (under op_mu_, or by the watchdog when a call blocked in NCCL holds it).
  // The handles are kept (never null after the start): every use looks at this first.
  std::atomic<bool> aborted_{false};
  std::unique_ptr<CollectiveWatchdog> watch_;  // (last: its thread calls the members above)

  friend std::unique_ptr<Communicator> dsrt::make_nccl_communicator(RendezvousClient &, std::unique_ptr<Communicator>,
                                                                    Backend &, int64_t);
  friend std::vector<std::unique_ptr<Communicator>> dsrt::make_nccl_local_group(int, int, const std::vector<Backend *> &, int64_t);
};

nccl::UniqueId new_id(const nccl::Api &api) {
  nccl::UniqueId id{};
  const nccl::Result r = api.GetUniqueId(&id);
  if (r != nccl::kSuccess) failf(DSRT_ERR_IO, "ncclGetUniqueId: ", api.GetErrorString(r));
  return id;
}
std::string id_bytes(const nccl::UniqueId &id) { return std::string(id.internal, sizeof id.internal); }
nccl::UniqueId id_of(const std::string &bytes) {
  nccl::UniqueId id{};
  if (bytes.size() != sizeof id.internal) failf(DSRT_ERR_FORMAT, "an ncclUniqueId of ", bytes.size(), " bytes from the rendezvous");
  std::memcpy(id.internal, bytes.data(), sizeof id.internal);
  return id;
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(RendezvousClient &store, std::unique_ptr<Communicator> host,
                                                     Backend &backend, int64_t timeout_ms) {
  const nccl::Api &api = nccl::require("ranks on several GPUs");
  const bool nvls_set = nccl::default_nvls_off();
  const Mapping m = host->mapping();
  auto c = std::make_unique<NcclCommunicator>(api, std::move(host), backend, timeout_ms, nullptr);
  // Rank 0's choice of blocking twins (DSRT_NCCL_NONBLOCKING) holds for every rank: the splits are collectives.
  if (m.rank == 0) store.set("nccl/twins", c->twins_ ? "1" : "0");
  else c->twins_ = store.get("nccl/twins") == "1";
  log_start(api, m, c->device_, nvls_set, c->twins_);
  if (m.rank == 0) store.set("nccl/world", id_bytes(new_id(api)));
  const std::string tp_key = "nccl/tp/" + std::to_string(m.ep_rank());
  if (c->own_tensor_group() && m.tp_rank() == 0) store.set(tp_key, id_bytes(new_id(api)));
  {
    std::lock_guard op(c->op_mu_);
    c->start_world(id_of(store.get("nccl/world")));
    if (c->own_tensor_group()) {
      // One init at a time: a failure then names the group that did not join.
      c->settle(c->world_, "joining the world's NCCL communicator", Clock::now() + c->timeout_);
      c->start_tensor(id_of(store.get(tp_key)));
    }
    c->finish_start();
    c->start_twin_world();
    c->finish_twin(false);
    c->start_twin_tensor();
    c->finish_twin(true);
    c->prepare_warmup();
    c->watch_->enter_call("the warm-up collectives");
    const nccl::Result r = c->enqueue_warmup();
    c->watch_->leave_call();
    if (r != nccl::kSuccess) c->failed(std::string("the warm-up collectives: ") + api.GetErrorString(r));
  }
  c->wait_started();  // (op_mu_ free: the watchdog looks at NCCL's errors meanwhile)
  return c;
}

std::vector<std::unique_ptr<Communicator>> make_nccl_local_group(int tp, int ep, const std::vector<Backend *> &backends,
                                                                 int64_t timeout_ms) {
  const nccl::Api &api = nccl::require(tp * ep > 1 ? "ranks on several GPUs" : "an NCCL communicator");
  const bool nvls_set = nccl::default_nvls_off();
  auto hosts = tp * ep > 1 ? make_local_group(tp, ep) : std::vector<std::unique_ptr<Communicator>>{};
  if (hosts.empty()) hosts.push_back(make_single_communicator());
  if (backends.size() != hosts.size()) failf(DSRT_ERR_INTERNAL, "make_nccl_local_group: ", backends.size(), " backends for ", hosts.size(), " ranks");
  auto failed = std::make_shared<std::atomic<bool>>(false);
  std::vector<NcclCommunicator *> cs;
  std::vector<std::unique_ptr<Communicator>> out;  // (destroyed after the handler below: they then abort)
  try {
    for (size_t r = 0; r < hosts.size(); r++) {
      const Mapping m = hosts[r]->mapping();
      auto c = std::make_unique<NcclCommunicator>(api, std::move(hosts[r]), *backends[r], timeout_ms, failed);
      for (size_t q = 0; q < r; q++)
        if (cs[q]->device_ == c->device_) failf(DSRT_ERR_INVALID_ARGUMENT, "ranks ", q, " and ", r, " are both on cuda:", c->device_, ": NCCL needs a GPU per rank");
      if (r == 0) log_start(api, m, c->device_, nvls_set, c->twins_);
      cs.push_back(c.get());
      out.push_back(std::move(c));
    }
    // One thread starts every rank: the inits of one communicator go inside one NCCL group, each with its
    // rank's device current (NcclCommunicator::init binds it).
    auto start_all = [&](const std::function<void(NcclCommunicator &)> &start) {
      nccl::Result r = api.GroupStart();
      if (r != nccl::kSuccess) failf(DSRT_ERR_IO, "ncclGroupStart: ", api.GetErrorString(r));
      try {
        for (NcclCommunicator *c : cs) start(*c);
      } catch (...) {
        api.GroupEnd();
        throw;
      }
      for (NcclCommunicator *c : cs) c->watch_->enter_call("starting NCCL (ncclGroupEnd)");  // (blocking twins wait here)
      r = api.GroupEnd();
      for (NcclCommunicator *c : cs) c->watch_->leave_call();
      if (r != nccl::kSuccess && r != nccl::kInProgress) failf(DSRT_ERR_IO, "starting NCCL: ncclGroupEnd: ", api.GetErrorString(r));
    };
    const nccl::UniqueId world_id = new_id(api);
    start_all([&](NcclCommunicator &c) { c.start_world(world_id); });
    for (NcclCommunicator *c : cs) c->settle(c->world_, "joining the world's NCCL communicator", Clock::now() + c->timeout_);
    if (cs[0]->own_tensor_group()) {
      std::vector<nccl::UniqueId> ids;
      for (int g = 0; g < ep; g++) ids.push_back(new_id(api));
      start_all([&](NcclCommunicator &c) { c.start_tensor(ids[size_t(c.mapping().ep_rank())]); });
    }
    for (NcclCommunicator *c : cs) c->finish_start();
    start_all([&](NcclCommunicator &c) { c.start_twin_world(); });
    for (NcclCommunicator *c : cs) c->finish_twin(false);
    if (cs[0]->own_tensor_group()) start_all([&](NcclCommunicator &c) { c.start_twin_tensor(); });
    for (NcclCommunicator *c : cs) c->finish_twin(true);
    for (NcclCommunicator *c : cs) c->prepare_warmup();
    nccl::Result warm = nccl::kSuccess;
    start_all([&](NcclCommunicator &c) {
      if (const nccl::Result r = c.enqueue_warmup(); warm == nccl::kSuccess) warm = r;
    });
    if (warm != nccl::kSuccess) failf(DSRT_ERR_IO, "NCCL: the warm-up collectives: ", api.GetErrorString(warm));
    for (NcclCommunicator *c : cs) c->wait_started();
  } catch (...) {
    *failed = true;
    throw;
  }
  return out;
}

}  // namespace dsrt
