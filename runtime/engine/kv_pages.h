// The engine's pool of latent-cache pages (64 tokens each, every cache layer): a free list plus
// reservations. A generation turn reserves, when it starts, the pages its token budget may need (as far as
// the pool has them unreserved); pages reserved by one session are never handed to another, so a newcomer's
// prefill cannot end a running turn early for lack of pages.
#pragma once
#include <cstdint>
#include <vector>

namespace dsrt {

// What one session holds: its page table and the pages promised to it but not taken yet.
struct PageHolding {
  std::vector<int32_t> pages;
  int64_t reserved = 0;
};

class KvPagePool {
 public:
  explicit KvPagePool(int64_t n_pages);
  int64_t total() const { return n_pages_; }
  int64_t used() const { return n_pages_ - int64_t(free_.size()); }
  // Free pages nobody has reserved.
  int64_t unreserved() const { return int64_t(free_.size()) - reserved_; }

  static int64_t pages_for(int64_t n_tokens);
  // Grows h's page table to cover n_tokens, from its reservation first, then from unreserved pages.
  // false (and nothing taken) when the pool cannot.
  bool grow(PageHolding &h, int64_t n_tokens);
  // Returns the pages past those covering keep_tokens.
  void shrink(PageHolding &h, int64_t keep_tokens);
  // Reserves up to `pages` more for h, as many as are unreserved; returns how many it got.
  int64_t reserve(PageHolding &h, int64_t pages);
  void unreserve(PageHolding &h);

 private:
  int64_t n_pages_;
  std::vector<int32_t> free_;
  int64_t reserved_ = 0;
};

}  // namespace dsrt
