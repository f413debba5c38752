#include "backend/cpu/host_bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/memory.h"
#include "core/status.h"
#include "core/thread_pool.h"

namespace dsrt {
namespace {

// Eight independent sums of 64-bit words: vectorised by the compiler, one load per 8 bytes at most.
uint64_t sum_words(const uint64_t *p, size_t n) {
  uint64_t s[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; u++) s[u] += p[i + u];
  for (; i < n; i++) s[0] += p[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

unsigned long long host_stream_read(ThreadPool &pool, const void *p, size_t bytes) {
  const uint64_t *w = static_cast<const uint64_t *>(p);
  const int64_t n_words = int64_t(bytes / 8);
  constexpr int64_t kSlice = 1 << 17;  // 1 MiB per chunk
  std::vector<uint64_t> part(size_t((n_words + kSlice - 1) / kSlice), 0);
  pool.parallel_for(int64_t(part.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; c++)
      part[size_t(c)] = sum_words(w + c * kSlice, size_t(std::min(kSlice, n_words - c * kSlice)));
  });
  unsigned long long s = 0;
  for (uint64_t v : part) s += v;
  return s;
}

double host_read_bandwidth(ThreadPool &pool, size_t bytes, int rounds) {
  bytes &= ~size_t(63);
  uint64_t *buf = static_cast<uint64_t *>(mi_malloc_aligned(bytes, 64));
  if (!buf) fail(DSRT_ERR_OUT_OF_MEMORY, "host_read_bandwidth: cannot allocate " + std::to_string(bytes) + " bytes");
  // First touch by the threads that read (pages land where they will be read on NUMA hosts).
  const int64_t n_pages = int64_t(bytes >> 12);
  pool.parallel_for(n_pages, 64, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) std::memset(reinterpret_cast<char *>(buf) + (i << 12), int(i & 0x7f), 4096);
  });
  double best = 0;
  volatile unsigned long long sink = 0;
  for (int r = 0; r < rounds; r++) {
    const double t0 = now_s();
    sink = sink + host_stream_read(pool, buf, bytes);
    best = std::max(best, double(bytes) / (now_s() - t0));
  }
  mi_free(buf);
  return best;
}

}  // namespace dsrt
