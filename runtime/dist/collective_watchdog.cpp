#include "dist/collective_watchdog.h"

#include <exception>

namespace dsrt {

using Clock = std::chrono::steady_clock;

CollectiveWatchdog::CollectiveWatchdog(Source source, std::chrono::milliseconds timeout, std::chrono::microseconds poll)
    : src_(std::move(source)), timeout_(timeout), poll_(poll), thread_([this] { run(); }) {}

CollectiveWatchdog::~CollectiveWatchdog() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void CollectiveWatchdog::follow(void *mark, std::string what) {
  {
    std::lock_guard lk(mu_);
    pending_.push_back(Item{mark, std::move(what), Clock::now()});
  }
  cv_.notify_all();
}

void *CollectiveWatchdog::spare() {
  std::lock_guard lk(mu_);
  if (spare_.empty()) return nullptr;
  void *m = spare_.back();
  spare_.pop_back();
  return m;
}

std::string CollectiveWatchdog::failure() const {
  std::lock_guard lk(mu_);
  return failure_;
}

void CollectiveWatchdog::enter_call(const char *what) {
  call_what_.store(what, std::memory_order_relaxed);
  call_since_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count(),
                       std::memory_order_release);
}

void CollectiveWatchdog::leave_call() { call_since_ns_.store(0, std::memory_order_release); }

size_t CollectiveWatchdog::pending() const {
  std::lock_guard lk(mu_);
  return pending_.size();
}

bool CollectiveWatchdog::settle() {
  std::unique_lock lk(mu_);
  cv_.wait(lk, [&] { return pending_.empty() || !failure_.empty() || stop_; });
  return failure_.empty() && pending_.empty();
}

// The oldest pending mark is the only one looked at: marks finish in order, and a later one cannot have
// waited longer than it. A call in progress is looked at on every pass.
void CollectiveWatchdog::run() {
  std::unique_lock lk(mu_);
  for (;;) {
    // Idle (nothing pending): wake every 50 ms for a call that may be stuck on the host.
    cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return stop_ || (!pending_.empty() && failure_.empty()); });
    if (stop_) return;
    if (!failure_.empty()) continue;
    const bool have_mark = !pending_.empty();
    const Item it = have_mark ? pending_.front() : Item{};
    lk.unlock();
    bool done = false;
    std::string why;
    try {
      const int64_t since = call_since_ns_.load(std::memory_order_acquire);
      const auto now = Clock::now();
      if (since && now.time_since_epoch() - std::chrono::nanoseconds(since) > timeout_) {
        const char *what = call_what_.load(std::memory_order_relaxed);
        why = std::string(what ? what : "a call") + ": still inside it " + std::to_string(timeout_.count()) +
              " ms after it began (a peer died, hung or did not join)";
      } else if (have_mark) {
        done = src_.finished(it.mark);
        if (!done) {
          const std::string e = src_.error();
          if (!e.empty()) why = it.what + ": " + e;
          else if (now - it.queued > timeout_)
            why = it.what + ": not finished " + std::to_string(timeout_.count()) +
                  " ms after it was queued (a rank died, hung or did not join)";
        }
      }
    } catch (const std::exception &e) {
      why = it.what + ": " + e.what();
    }
    if (!why.empty()) {
      lk.lock();
      failure_ = why;
      cv_.notify_all();  // (settle)
      lk.unlock();
      try {
        src_.fail(why);
      } catch (...) {  // (the failure is recorded; the group's other parts report theirs)
      }
      lk.lock();
      continue;
    }
    lk.lock();
    if (done) {
      pending_.pop_front();
      spare_.push_back(it.mark);
      if (pending_.empty()) cv_.notify_all();  // (settle)
      continue;
    }
    if (have_mark) cv_.wait_for(lk, poll_, [&] { return stop_; });
  }
}

}  // namespace dsrt
