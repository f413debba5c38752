#include "core/thread_pool.h"

#include <algorithm>
#include <system_error>

#include "core/fault.h"
#include "core/status.h"

namespace dsrt {

int ThreadPool::max_threads() { return DSRT_MAX_THREADS_PER_CORE * int(std::max(1u, std::thread::hardware_concurrency())); }

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  if (n_threads > max_threads())
    failf(DSRT_ERR_INVALID_ARGUMENT, "n_threads ", n_threads, " is more than ", max_threads(),
          " (DSRT_MAX_THREADS_PER_CORE x this machine's hardware threads)");
  n_threads_ = n_threads;
  workers_.reserve(size_t(n_threads_));
  try {
    for (int i = 1; i < n_threads_; i++) {
      if (fault::alloc_should_fail()) throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
      workers_.emplace_back([this, i] { worker_loop(i); });
    }
  } catch (const std::exception &e) {
    // The destructor does not run for a constructor that throws: stop and join what started here, or
    // those threads would outlive the pool they wait on.
    const size_t started = workers_.size();
    stop_and_join();
    failf(DSRT_ERR_OUT_OF_MEMORY, "started ", started + 1, " of ", n_threads_, " CPU threads (the caller's included); the next failed: ",
          e.what());
  }
}

ThreadPool::~ThreadPool() { stop_and_join(); }

void ThreadPool::stop_and_join() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto &t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::worker_loop(int) {
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock lk(mu_);
    cv_work_.wait(lk, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    while (next_chunk_ < n_chunks_) {
      int64_t c = next_chunk_++;
      auto *fn = job_;
      int64_t b = c * job_chunk_, e = std::min(job_n_, b + job_chunk_);
      lk.unlock();
      std::exception_ptr err;
      try {
        (*fn)(b, e);
      } catch (...) {
        err = std::current_exception();
      }
      lk.lock();
      if (err && !error_) error_ = err;
      if (++chunks_done_ == n_chunks_) cv_done_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)> &fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (n_threads_ == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  std::lock_guard run(run_mu_);
  // A few chunks per thread balances uneven work without much scheduling overhead.
  int64_t chunk = std::max(grain, (n + 4 * n_threads_ - 1) / (4 * n_threads_));
  std::unique_lock lk(mu_);
  job_ = &fn;
  job_n_ = n;
  job_chunk_ = chunk;
  n_chunks_ = (n + chunk - 1) / chunk;
  next_chunk_ = 0;
  chunks_done_ = 0;
  error_ = nullptr;
  generation_++;
  cv_work_.notify_all();
  while (next_chunk_ < n_chunks_) {
    int64_t c = next_chunk_++;
    int64_t b = c * chunk, e = std::min(n, b + chunk);
    lk.unlock();
    std::exception_ptr err;
    try {
      fn(b, e);
    } catch (...) {
      err = std::current_exception();
    }
    lk.lock();
    if (err && !error_) error_ = err;
    ++chunks_done_;
  }
  cv_done_.wait(lk, [&] { return chunks_done_ == n_chunks_; });
  job_ = nullptr;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace dsrt
