// How the CUDA backend's launches reach the GPU (design.md §5): recorded between two host syncs (a
// "segment"), then replayed from a CUDA graph when an identical segment ran before, captured into one the
// second time a segment is seen, run one by one otherwise. A decode step then costs the host one graph
// launch instead of a few hundred kernel launches.
//
// Identical means the same launches with the same arguments: every argument of every launch goes through
// the recorder (launch() takes a capture-free function and its arguments by value) and into the segment's
// signature, so two segments with one signature launch exactly the same kernels on the same addresses.
// What differs from step to step (token ids, positions, page tables, the attention plan) lives in device
// memory written by the segment's first copy (MetaStaging below), which the graph replays too.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <list>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include "kernels.h"

namespace dsrt {

// A 64-bit signature built argument by argument.
struct Signature {
  uint64_t h = 0x6a09e667f3bcc908ull;
  void mix(uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
  }
};
// Each argument kind the kernels take, hashed by value (never by object bytes: structs have padding).
template <class T>
inline void mix_arg(Signature &s, const T &v) {
  if constexpr (std::is_pointer_v<T>) {
    s.mix(uint64_t(reinterpret_cast<uintptr_t>(v)));
  } else if constexpr (std::is_same_v<T, float>) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    s.mix(u);
  } else if constexpr (std::is_same_v<T, double>) {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    s.mix(u);
  } else {
    static_assert(std::is_integral_v<T> || std::is_enum_v<T>, "add a mix_arg overload for this argument type");
    s.mix(uint64_t(int64_t(v)));
  }
}
inline void mix_arg(Signature &s, const kernels::DevMatrix &m) {
  mix_arg(s, m.data), mix_arg(s, m.dtype), mix_arg(s, m.rows), mix_arg(s, m.cols), mix_arg(s, m.scale),
      mix_arg(s, m.scale_cols);
}
inline void mix_arg(Signature &s, const kernels::KvCacheView &v) {
  mix_arg(s, v.base), mix_arg(s, v.n_layers), mix_arg(s, v.width), mix_arg(s, v.dtype);
}
inline void mix_arg(Signature &s, const kernels::RouteParams &p) {
  mix_arg(s, p.n_experts), mix_arg(s, p.top_k), mix_arg(s, p.n_group), mix_arg(s, p.topk_group), mix_arg(s, p.sigmoid),
      mix_arg(s, p.method), mix_arg(s, p.norm_topk_prob), mix_arg(s, p.routed_scaling_factor);
}
inline void mix_arg(Signature &s, const kernels::GemvSplit &g) { mix_arg(s, g.k_split), mix_arg(s, g.rows_per_warp); }

class LaunchRecorder {
 public:
  explicit LaunchRecorder(cudaStream_t stream) : stream_(stream) {}
  ~LaunchRecorder() { clear_graphs(); }
  LaunchRecorder(const LaunchRecorder &) = delete;
  LaunchRecorder &operator=(const LaunchRecorder &) = delete;

  // Deferred (the default): launches wait for flush(). Off: each runs at once (per-op profiling, where every
  // launch is bracketed by events).
  void set_deferred(bool on) {
    flush();
    deferred_ = on;
  }
  bool deferred() const { return deferred_; }
  // Graphs off: segments always run launch by launch (DSRT_CUDA_GRAPHS=0, and the eager half of the tests).
  void set_graphs(bool on) {
    flush();
    graphs_on_ = on;
  }

  // f(stream, args...) now or at the next flush; f must capture nothing (everything it uses is an argument,
  // so the signature sees it).
  template <class F, class... A>
  void launch(F f, A... args) {
    add(false, f, args...);
  }
  // As launch, but ahead of everything recorded so far in this segment (the metadata copies).
  template <class F, class... A>
  void launch_first(F f, A... args) {
    add(true, f, args...);
  }
  size_t pending() const { return pending_.size(); }
  // The current segment holds work that must not go into a graph (a library call with state of its own).
  void mark_uncapturable() { capturable_ = false; }

  // Runs what was recorded, in order: graph replay, capture or one by one.
  void flush();
  // Drops every graph (a buffer they point into was freed or moved).
  void clear_graphs();

  struct Stats {
    uint64_t replays = 0, captures = 0, eager_segments = 0;
  };
  const Stats &stats() const { return stats_; }

 private:
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    std::list<uint64_t>::iterator lru;
  };
  template <class F, class... A>
  void add(bool first, F f, A... args) {
    static_assert(std::is_empty_v<F>, "a recorded launch must not capture: pass what it needs as arguments");
    if (!deferred_) {
      f(stream_, args...);
      return;
    }
    sig_.mix(uint64_t(typeid(F).hash_code()));
    (mix_arg(sig_, args), ...);
    std::function<void(cudaStream_t)> fn = [f, args...](cudaStream_t s) { f(s, args...); };
    if (first)
      pending_.insert(pending_.begin(), std::move(fn));
    else
      pending_.push_back(std::move(fn));
  }

  static constexpr size_t kMaxGraphs = 64;
  cudaStream_t stream_;
  bool deferred_ = true, graphs_on_ = true, capturable_ = true;
  Signature sig_;
  std::vector<std::function<void(cudaStream_t)>> pending_;
  std::unordered_map<uint64_t, Graph> graphs_;
  std::list<uint64_t> lru_;                   // most recently used first
  std::unordered_map<uint64_t, uint32_t> seen_;  // segments run eagerly once, by signature
  Stats stats_;
};

// Per-step metadata (token ids, positions, cache slots, page tables, the attention plan) on its way to the
// device: written into pinned host chunks, each mirrored by a device chunk at the same offsets, and copied
// with one transfer per chunk at the start of the segment that reads it. Chunks never move within a step
// (a full chunk gets a successor), and an identical array uploaded twice in a step is stored once.
class MetaStaging {
 public:
  MetaStaging() = default;
  ~MetaStaging();
  MetaStaging(const MetaStaging &) = delete;
  MetaStaging &operator=(const MetaStaging &) = delete;

  // The device address that will hold these bytes once the copies recorded by flush_copies() have run.
  const void *put(const void *src, size_t bytes);
  // Records (into rec, ahead of the segment's launches) the copies of what was put since the last call.
  void flush_copies(LaunchRecorder &rec);
  // A new step: the previous one's copies have completed (the caller synced).
  void reset();

 private:
  struct Chunk {
    char *host = nullptr, *dev = nullptr;
    size_t cap = 0, used = 0, copied = 0;
  };
  struct Seen {
    size_t chunk, off, bytes;
  };
  std::vector<Chunk> chunks_;
  size_t cur_ = 0;
  std::unordered_multimap<uint64_t, Seen> seen_;  // content hash -> where it is
};

}  // namespace dsrt
