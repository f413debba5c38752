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
// waited longer than it.
void CollectiveWatchdog::run() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || (!pending_.empty() && failure_.empty()); });
    if (stop_) return;
    const Item it = pending_.front();
    lk.unlock();
    bool done = false;
    std::string why;
    try {
      done = src_.finished(it.mark);
      if (!done) {
        const std::string e = src_.error();
        if (!e.empty()) why = it.what + ": " + e;
        else if (Clock::now() - it.queued > timeout_)
          why = it.what + ": not finished " + std::to_string(timeout_.count()) +
                " ms after it was queued (a rank died, hung or did not join)";
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
    cv_.wait_for(lk, poll_, [&] { return stop_; });
  }
}

}  // namespace dsrt
