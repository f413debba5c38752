#include "engine/kv_pages.h"

#include <algorithm>

#include "backend/backend.h"

namespace dsrt {

KvPagePool::KvPagePool(int64_t n_pages) : n_pages_(n_pages), free_(size_t(n_pages)) {
  for (int64_t i = 0; i < n_pages; i++) free_[size_t(i)] = int32_t(n_pages - 1 - i);  // pop_back gives 0 first
}

int64_t KvPagePool::pages_for(int64_t n_tokens) { return (n_tokens + kPageTokens - 1) / kPageTokens; }

bool KvPagePool::grow(PageHolding &h, int64_t n_tokens) {
  const int64_t need = pages_for(n_tokens) - int64_t(h.pages.size());
  if (need <= 0) return true;
  const int64_t own = std::min(need, h.reserved);
  if (need - own > unreserved()) return false;
  for (int64_t i = 0; i < need; i++) {
    h.pages.push_back(free_.back());
    free_.pop_back();
  }
  h.reserved -= own;
  reserved_ -= own;
  return true;
}

void KvPagePool::shrink(PageHolding &h, int64_t keep_tokens) {
  const size_t keep = size_t(pages_for(keep_tokens));
  while (h.pages.size() > keep) {
    free_.push_back(h.pages.back());
    h.pages.pop_back();
  }
}

int64_t KvPagePool::reserve(PageHolding &h, int64_t pages) {
  const int64_t got = std::clamp<int64_t>(pages, 0, unreserved());
  h.reserved += got;
  reserved_ += got;
  return got;
}

void KvPagePool::unreserve(PageHolding &h) {
  reserved_ -= h.reserved;
  h.reserved = 0;
}

}  // namespace dsrt
