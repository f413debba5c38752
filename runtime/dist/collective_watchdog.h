// CollectiveWatchdog: follows a rank's collectives after the host has queued them and moved on, so that a rank
// that died or hangs fails the group within a timeout although no thread waits on any single collective
// (design.md §5, "Faults"). The transport marks each collective as it queues it (on a GPU: a CUDA event
// recorded behind it on the stream); the watchdog's thread looks at the oldest unfinished mark, at the
// transport's asynchronous error while any mark is pending, and at the time: a mark not finished `timeout`
// after it was queued, an error, or a mark whose query throws makes it call the transport's `fail` once (which
// aborts the group: on NCCL, ncclCommAbort, which also ends the kernels waiting for a dead peer, so every host
// wait on the stream returns). It then follows nothing more. The transport's thread also says when it is inside
// a call that may block on the host (a blocking NCCL call connecting to a peer): a call that lasts longer than
// the timeout fails the group the same way (the watchdog looks at least every 50 ms, pending marks or not).
//
// The transport's own thread reads failure() where results matter (Communicator::check); what ran on the GPU
// after an aborted collective is garbage the step must not return.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace dsrt {

class CollectiveWatchdog {
 public:
  // What the watched transport provides; called on the watchdog's thread, never two at a time.
  struct Source {
    std::function<bool(void *mark)> finished;          // has the work up to `mark` finished? (may throw)
    std::function<std::string()> error;                // the transport's asynchronous error; "" when none
    std::function<void(const std::string &why)> fail;  // stop the group (called once)
  };

  CollectiveWatchdog(Source source, std::chrono::milliseconds timeout,
                     std::chrono::microseconds poll = std::chrono::microseconds(500));
  ~CollectiveWatchdog();  // stops its thread; marks still pending are not followed further
  CollectiveWatchdog(const CollectiveWatchdog &) = delete;
  CollectiveWatchdog &operator=(const CollectiveWatchdog &) = delete;

  // A collective named `what` was queued now; `mark` finishes when it does. Marks finish in the order given.
  void follow(void *mark, std::string what);
  // The transport's thread enters / leaves a call that may block on the host (lock-free: two atomic stores).
  // `what` must outlive the call.
  void enter_call(const char *what);
  void leave_call();
  // A mark given to follow() whose work finished (for reuse), or null.
  void *spare();
  // Why the group failed ("" while it has not): set before `fail` is called.
  std::string failure() const;
  // Waits until every followed mark finished (true) or the group failed (false). Bounded: each mark finishes
  // or fails within the timeout after it was queued.
  bool settle();
  size_t pending() const;

 private:
  struct Item {
    void *mark = nullptr;
    std::string what;
    std::chrono::steady_clock::time_point queued;
  };
  void run();

  Source src_;
  std::chrono::milliseconds timeout_;
  std::chrono::microseconds poll_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> pending_;
  std::vector<void *> spare_;
  std::string failure_;
  bool stop_ = false;
  std::atomic<int64_t> call_since_ns_{0};  // steady-clock time the current call began; 0: none
  std::atomic<const char *> call_what_{nullptr};
  std::thread thread_;  // (last: it starts once the members above exist)
};

}  // namespace dsrt
