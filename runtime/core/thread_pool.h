// A fixed set of worker threads running parallel_for over index ranges; the calling thread works too.
#pragma once
#include <condition_variable>
#include <exception>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dsrt {

class ThreadPool {
 public:
  // n_threads <= 0: all hardware threads. More than max_threads() is DSRT_ERR_INVALID_ARGUMENT; a thread
  // that cannot start is DSRT_ERR_OUT_OF_MEMORY after the ones already started have been joined.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool &) = delete;
  ThreadPool &operator=(const ThreadPool &) = delete;

  int size() const { return n_threads_; }
  // DSRT_MAX_THREADS_PER_CORE (dsrt.h) x the machine's hardware threads.
  static int max_threads();
  // Calls fn(begin, end) on disjoint chunks covering [0, n), each at least `grain` long (except the last).
  // Blocks until all chunks are done; an exception thrown by fn (the first one) is rethrown here after every
  // chunk has finished. Calls from several threads are serialised.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)> &fn);

 private:
  void worker_loop(int id);
  void stop_and_join();
  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one parallel_for at a time
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int64_t, int64_t)> *job_ = nullptr;
  int64_t job_n_ = 0, job_chunk_ = 0;
  int64_t next_chunk_ = 0, n_chunks_ = 0, chunks_done_ = 0;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
  bool stop_ = false;
};

}  // namespace dsrt
