// The host's DRAM read rate: every thread of a pool streams its slice of a buffer much larger than the
// last-level cache (the rate the CPU expert path and the offload cost model compare against).
#pragma once
#include <cstddef>

namespace dsrt {

class ThreadPool;

// Bytes per second, the best of `rounds` passes over a `bytes` buffer (allocated, touched, freed here).
double host_read_bandwidth(ThreadPool &pool, size_t bytes = size_t(512) << 20, int rounds = 5);

// Reads `bytes` of p with every thread of the pool (what host_read_bandwidth times); returns a checksum so
// the reads are not optimised away. Also the cache flush of benchmarks.
unsigned long long host_stream_read(ThreadPool &pool, const void *p, size_t bytes);

}  // namespace dsrt
