#include "model/identity.h"

#include <algorithm>
#include <atomic>
#include <system_error>
#include <thread>
#include <vector>

#include "core/hash.h"
#include "model/model.h"

namespace dsrt {

namespace {
// Bytes hashed as one unit: big tensors are split so that the work spreads over threads; the identity is the
// hash of the chunks' hashes in order, seeded with the hash of the cheap fingerprint.
constexpr uint64_t kChunk = uint64_t(64) << 20;
constexpr unsigned kMaxThreads = 16;

struct Chunk {
  const uint8_t *p;
  uint64_t n;
};

uint64_t compute(const Model &m) {
  std::vector<Chunk> chunks;
  auto add = [&](const uint8_t *p, uint64_t n) {
    do {  // an empty tensor still counts: one empty chunk
      const uint64_t k = std::min(n, kChunk);
      chunks.push_back({p, k});
      p += k;
      n -= k;
    } while (n > 0);
  };
  for (const Weight *w : m.w.all) {
    if (!w->info) continue;
    add(w->info->data, w->info->nbytes);
    if (w->scale)  // bind_weights checked the scale tensor's shape: [ceil(rows/128), ceil(cols/128)] fp32
      add(reinterpret_cast<const uint8_t *>(w->scale), uint64_t((w->rows + 127) / 128) * uint64_t(w->scale_cols) * 4);
  }
  std::vector<uint64_t> h(chunks.size() + 1);
  h.back() = chunks.size();
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < chunks.size();) h[i] = hash64(chunks[i].p, chunks[i].n);
  };
  uint64_t total = 0;
  for (const Chunk &c : chunks) total += c.n;
  std::vector<std::thread> threads;
  threads.reserve(kMaxThreads);  // emplace_back below can then only fail to start a thread
  const unsigned want = total > kChunk ? std::min({std::max(std::thread::hardware_concurrency(), 1u), kMaxThreads,
                                                   unsigned(std::min<size_t>(chunks.size(), kMaxThreads))})
                                       : 1;
  for (unsigned t = 1; t < want; t++) {
    try {
      threads.emplace_back(work);
    } catch (const std::system_error &) {
      break;  // fewer threads: the caller's own thread finishes the work
    }
  }
  work();
  for (auto &t : threads) t.join();
  return hash64(h.data(), h.size() * sizeof(uint64_t), hash64(m.fingerprint.data(), m.fingerprint.size()));
}
}  // namespace

uint64_t model_identity(const Model &m) {
  std::call_once(m.identity.once, [&] { m.identity.value = compute(m); });
  return m.identity.value;
}

}  // namespace dsrt
