#include "backend/cuda/launch_recorder.h"

#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "core/status.h"

namespace dsrt {

void LaunchRecorder::flush() {
  if (pending_.empty()) {
    capturable_ = true;
    sig_ = {};
    return;
  }
  const uint64_t key = sig_.h;
  const bool capturable = capturable_ && graphs_on_;
  // Whatever happens below, the segment is consumed: a launch that throws must not be run again.
  std::vector<std::function<void(cudaStream_t)>> todo;
  todo.swap(pending_);
  pending_.reserve(todo.size());
  sig_ = {};
  capturable_ = true;
  if (capturable) {
    auto it = graphs_.find(key);
    if (it != graphs_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.lru);
      cuda_check(cudaGraphLaunch(it->second.exec, stream_), "graph launch");
      stats_.replays++;
      return;
    }
    // Captured the second time a segment is seen: one-off segments (a prefill chunk) are not worth a graph.
    if (seen_[key]++ >= 1) {
      cudaGraph_t g = nullptr;
      cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "graph capture");
      try {
        for (auto &f : todo) f(stream_);
      } catch (...) {
        cudaStreamEndCapture(stream_, &g);
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        throw;
      }
      cuda_check(cudaStreamEndCapture(stream_, &g), "graph capture");
      cudaGraphExec_t exec = nullptr;
      const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      cuda_check(e, "graph instantiate");
      if (graphs_.size() >= kMaxGraphs) {  // the least recently used goes
        const uint64_t old = lru_.back();
        lru_.pop_back();
        cudaGraphExecDestroy(graphs_[old].exec);
        graphs_.erase(old);
      }
      lru_.push_front(key);
      graphs_[key] = {exec, lru_.begin()};
      seen_.erase(key);
      cuda_check(cudaGraphLaunch(exec, stream_), "graph launch");
      stats_.captures++;
      return;
    }
    if (seen_.size() > 4096) seen_.clear();  // one-off segments accumulate during long prefills
  }
  for (auto &f : todo) f(stream_);
  stats_.eager_segments++;
}

void LaunchRecorder::clear_graphs() {
  for (auto &[_, g] : graphs_) cudaGraphExecDestroy(g.exec);
  graphs_.clear();
  lru_.clear();
  seen_.clear();
}

MetaStaging::~MetaStaging() {
  for (Chunk &c : chunks_) {
    cudaFreeHost(c.host);
    cudaFree(c.dev);
  }
}

const void *MetaStaging::put(const void *src, size_t bytes) {
  if (bytes == 0) bytes = 1;  // a valid address for an empty array
  Signature s;
  const unsigned char *p = static_cast<const unsigned char *>(src);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    s.mix(v);
  }
  for (; i < bytes; i++) s.mix(p[i]);
  s.mix(bytes);
  auto [a, b] = seen_.equal_range(s.h);
  for (auto it = a; it != b; ++it) {
    const Seen &w = it->second;
    if (w.bytes == bytes && std::memcmp(chunks_[w.chunk].host + w.off, src, bytes) == 0) return chunks_[w.chunk].dev + w.off;
  }
  const size_t need = (bytes + 255) / 256 * 256;
  while (cur_ < chunks_.size() && chunks_[cur_].used + need > chunks_[cur_].cap) cur_++;
  if (cur_ == chunks_.size()) {
    Chunk c;
    c.cap = std::max(need, size_t(1) << 20);
    cuda_check(cudaMallocHost(&c.host, c.cap), "pinned metadata staging");
    const cudaError_t e = cudaMalloc(&c.dev, c.cap);
    if (e != cudaSuccess) cudaFreeHost(c.host);
    cuda_check(e, "device metadata buffer");
    chunks_.push_back(c);
  }
  Chunk &c = chunks_[cur_];
  std::memcpy(c.host + c.used, src, bytes);
  seen_.emplace(s.h, Seen{cur_, c.used, bytes});
  const void *dst = c.dev + c.used;
  c.used += need;
  return dst;
}

void MetaStaging::flush_copies(LaunchRecorder &rec) {
  for (Chunk &c : chunks_) {
    if (c.copied == c.used) continue;
    rec.launch_first(
        [](cudaStream_t s, char *dst, const char *src, size_t n) {
          cuda_check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s), "metadata upload");
        },
        c.dev + c.copied, static_cast<const char *>(c.host + c.copied), c.used - c.copied);
    c.copied = c.used;
  }
}

void MetaStaging::reset() {
  for (Chunk &c : chunks_) c.used = c.copied = 0;
  cur_ = 0;
  seen_.clear();
}

}  // namespace dsrt
