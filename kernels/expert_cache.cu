// The GPU expert cache of expert offload (issue #11): per MoE layer, S device slots hold S of the layer's E
// routed experts; the rest are read from host memory over PCIe. The expert kernels find every expert through
// the layer's table (DevMatrix [3E]: gate, up, down), whose entries point at a slot or at the expert's
// host-mapped bytes. Deciding and copying happen on the device, after the router and before the expert
// kernels, in stream order: no host sync, so a decode step stays one CUDA graph.
//
// A miss costs its bytes over PCIe whether the expert kernel reads them in place (zero-copy) or a copy brings
// them into a slot first (then the kernel reads the slot at HBM speed), so admitting a miss costs almost
// nothing now; what it costs is the victim, which a later step may need again. Policies:
//   LRU: admit every miss, evict the least recently used slot;
//   LFU with decay: per expert a use count (rows routed to it) decayed by `decay` per call; admit a miss only
//   if its count exceeds the coldest slot's (else it is read in place), evict the coldest.
// A slot whose expert this call needs is never a victim.
#include "common.cuh"
#include "kernels.h"

namespace dsrt::kernels {

namespace {

constexpr int kAdmitThreads = 256;

__global__ void __launch_bounds__(kAdmitThreads) expert_cache_admit_kernel(ExpertCacheView c, const int32_t *ids,
                                                                          int64_t n_ids, int reads_per_pair) {
  extern __shared__ int32_t need[];  // [E]: rows of this call routed to each expert
  __shared__ uint32_t clock;
  __shared__ unsigned long long hits, misses, host_reads;
  const int E = c.n_experts, S = c.n_slots, tid = threadIdx.x, lane = tid % 32;
  for (int e = tid; e < E; e += blockDim.x) need[e] = 0;
  if (tid == 0) {
    clock = ++*c.clock;
    hits = misses = host_reads = 0;
    c.copies[0] = 0;
  }
  __syncthreads();
  for (int64_t i = tid; i < n_ids; i += blockDim.x) {
    const int32_t e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&need[e], 1);
  }
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) {
    c.freq[e] = c.freq[e] * c.decay + float(need[e]);
    if (need[e] == 0) continue;
    const int32_t s = c.slot_of[e];
    if (s >= 0) {
      c.stamp[s] = clock;
      atomicAdd(&hits, 1ull);
    } else {
      atomicAdd(&misses, 1ull);
    }
  }
  __syncthreads();
  if (tid >= 32) return;
  // Misses in ascending expert order, one warp: the victim is a warp-wide argmin over the slots.
  int n_copies = 0;
  for (int e = 0; e < E; e++) {
    if (need[e] == 0 || c.slot_of[e] >= 0) continue;
    float best = INFINITY;
    int best_s = -1;
    for (int s = lane; s < S; s += 32) {
      const int32_t v = c.expert_in[s];
      if (v >= 0 && need[v] > 0) continue;  // needed now (a hit, or admitted this call)
      const float key = v < 0 ? -INFINITY : c.policy == kExpertCacheLru ? float(c.stamp[s]) : c.freq[v];
      if (key < best) best = key, best_s = s;
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int os = __shfl_xor_sync(0xffffffffu, best_s, o);
      if (ob < best || (ob == best && os >= 0 && (best_s < 0 || os < best_s))) best = ob, best_s = os;
    }
    const bool admit = best_s >= 0 && (c.policy == kExpertCacheLru || best == -INFINITY || c.freq[e] > best);
    if (lane == 0) {
      if (admit) {
        const int32_t v = c.expert_in[best_s];
        if (v >= 0) {
          c.slot_of[v] = -1;
          for (int p = 0; p < 3; p++) c.table[p * E + v] = c.host[p * E + v];
        }
        c.slot_of[e] = best_s;
        c.expert_in[best_s] = e;
        c.stamp[best_s] = clock;
        for (int p = 0; p < 3; p++) {
          DevMatrix m = c.host[p * E + e];
          m.data = c.slot_data[best_s * 3 + p];
          c.table[p * E + e] = m;
        }
        c.copies[1 + 2 * n_copies] = e;
        c.copies[2 + 2 * n_copies] = best_s;
      } else {
        host_reads += reads_per_pair ? uint64_t(need[e]) : 1ull;
      }
    }
    n_copies += admit ? 1 : 0;
    __syncwarp();
  }
  if (lane == 0) {
    c.copies[0] = n_copies;
    const unsigned long long expert_bytes = 3ull * uint64_t(c.matrix_bytes);
    c.stats[kCacheHits] += hits;
    c.stats[kCacheMisses] += misses;
    c.stats[kCacheCopiedBytes] += uint64_t(n_copies) * expert_bytes;
    c.stats[kCacheHostReadBytes] += host_reads * expert_bytes;
  }
}

// Admitted experts' bytes from host memory into their slots: 16-byte loads spread over the whole grid so
// enough of them are in flight to fill PCIe (~1-2 us latency x ~55 GB/s needs ~100 KB outstanding).
__global__ void expert_cache_copy_kernel(ExpertCacheView c) {
  const int n = c.copies[0];
  if (n == 0) return;
  const int64_t words = c.matrix_bytes / 16, total = int64_t(n) * 3 * words;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t m = i / words, off = i - m * words;
    const int pair = int(m / 3), part = int(m % 3);
    const int e = c.copies[1 + 2 * pair], s = c.copies[2 + 2 * pair];
    const uint4 *src = static_cast<const uint4 *>(c.host[part * c.n_experts + e].data);
    uint4 *dst = static_cast<uint4 *>(c.slot_data[s * 3 + part]);
    dst[off] = __ldcs(src + off);
  }
  const int64_t tail = c.matrix_bytes % 16;
  if (tail && blockIdx.x == 0)  // (not on real shapes: a thread per matrix)
    for (int k = threadIdx.x; k < 3 * n; k += blockDim.x) {
    const int pair = k / 3, part = k % 3;
    const int e = c.copies[1 + 2 * pair], s = c.copies[2 + 2 * pair];
    const uint8_t *src = static_cast<const uint8_t *>(c.host[part * c.n_experts + e].data);
    uint8_t *dst = static_cast<uint8_t *>(c.slot_data[s * 3 + part]);
    for (int64_t b = c.matrix_bytes - tail; b < c.matrix_bytes; b++) dst[b] = src[b];
    }
}

}  // namespace

void expert_cache_admit(const ExpertCacheView &c, const int32_t *ids, int64_t n_ids, bool reads_per_pair, int n_sm,
                        cudaStream_t s) {
  expert_cache_admit_kernel<<<1, kAdmitThreads, size_t(c.n_experts) * sizeof(int32_t), s>>>(c, ids, n_ids,
                                                                                             reads_per_pair ? 1 : 0);
  expert_cache_copy_kernel<<<2 * n_sm, 1024, 0, s>>>(c);
}

}  // namespace dsrt::kernels
