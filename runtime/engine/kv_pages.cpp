#include "engine/kv_pages.h"

#include <algorithm>

#include "backend/backend.h"
#include "core/status.h"

namespace dsrt {

KvPagePool::KvPagePool(int64_t n_pages, int64_t cache_limit)
    : n_pages_(n_pages), free_(size_t(n_pages)), refs_(size_t(n_pages), 0), cache_limit_(cache_limit),
      idle_tick_(size_t(n_pages), 0) {
  for (int64_t i = 0; i < n_pages; i++) free_[size_t(i)] = int32_t(n_pages - 1 - i);  // pop_back gives 0 first
}

int64_t KvPagePool::pages_for(int64_t n_tokens) { return (n_tokens + kPageTokens - 1) / kPageTokens; }

void KvPagePool::make_idle(int32_t page) {
  idle_tick_[size_t(page)] = ++clock_;
  idle_.insert({clock_, page});
}

void KvPagePool::unidle(int32_t page) {
  uint64_t &t = idle_tick_[size_t(page)];
  if (t == 0) return;
  idle_.erase({t, page});
  t = 0;
}

bool KvPagePool::evict_one() {
  if (idle_.empty()) return false;
  const int32_t page = idle_.begin()->second;
  unidle(page);
  index_.erase_page(page);
  unref(page);  // the cache's reference: the page is free now
  return true;
}

int32_t KvPagePool::take_available() {
  if (free_.empty() && !evict_one()) fail(DSRT_ERR_INTERNAL, "KV page pool: no page available where one was counted");
  const int32_t p = free_.back();
  free_.pop_back();
  refs_[size_t(p)] = 1;
  return p;
}

bool KvPagePool::grow(PageHolding &h, int64_t n_tokens) {
  const int64_t need = pages_for(n_tokens) - int64_t(h.pages.size());
  if (need <= 0) return true;
  const int64_t own = std::min(need, h.reserved);
  if (need - own > unreserved()) return false;
  h.reserved -= own;  // first: what it takes from its reservation is no longer counted as reserved
  reserved_ -= own;
  for (int64_t i = 0; i < need; i++) h.pages.push_back(take_available());
  return true;
}

int32_t KvPagePool::take(PageHolding &h) {
  if (h.reserved > 0) {
    h.reserved--;
    reserved_--;
  } else if (unreserved() < 1) {
    return -1;
  }
  return take_available();
}

void KvPagePool::unref(int32_t page) {
  int32_t &r = refs_[size_t(page)];
  if (r <= 0) fail(DSRT_ERR_INTERNAL, "KV page pool: a page was let go more often than taken");
  if (--r == 0) {
    free_.push_back(page);
  } else if (r == 1 && index_.holds(page)) {
    make_idle(page);  // only the cache holds it now
  }
}

int64_t KvPagePool::releasable(const PageHolding &h) const {
  int64_t n = 0;
  for (int32_t p : h.pages) n += refs_[size_t(p)] == 1 || (refs_[size_t(p)] == 2 && index_.holds(p)) ? 1 : 0;
  return n;
}

int64_t KvPagePool::shared_from(const PageHolding &h, size_t first) const {
  int64_t n = 0;
  for (size_t i = first; i < h.pages.size(); i++) n += shared(h.pages[i]) ? 1 : 0;
  return n;
}

void KvPagePool::shrink(PageHolding &h, int64_t keep_tokens) {
  const size_t keep = size_t(pages_for(keep_tokens));
  while (h.pages.size() > keep) {  // the last page first: a conversation's deepest pages are evicted first
    unref(h.pages.back());
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

void KvPagePool::share(const PageHolding &from, PageHolding &to, int64_t n) {
  const size_t k = size_t(std::clamp<int64_t>(n, 0, int64_t(from.pages.size())));
  for (size_t i = 0; i < k; i++) {
    refs_[size_t(from.pages[i])]++;
    to.pages.push_back(from.pages[i]);
  }
}

void KvPagePool::adopt(PageHolding &h, int32_t page) {
  if (is_idle(page)) {  // costs an available page, as taking a free one would
    if (h.reserved > 0) {
      h.reserved--;
      reserved_--;
    } else if (unreserved() < 1) {
      fail(DSRT_ERR_INTERNAL, "KV page pool: a cached page was taken without room for it");
    }
    unidle(page);
  }
  refs_[size_t(page)]++;
  h.pages.push_back(page);
}

PrefixIndex::Walk KvPagePool::match(const int32_t *tokens, int64_t n, int64_t max_pages) const {
  if (!cache_enabled()) return {};
  return index_.match(tokens, n, max_pages);
}

void KvPagePool::publish(const int32_t *tokens, int64_t n_full, const PageHolding &h) {
  if (!cache_enabled()) return;
  n_full = std::min<int64_t>(n_full, int64_t(h.pages.size()));
  PrefixIndex::Walk w;
  for (int64_t k = 0; k < n_full; k++) {
    const int32_t *ids = tokens + k * kPageTokens;
    if (index_.step(w, ids) >= 0) continue;  // cached already (this page, or another with the same content)
    const int32_t page = h.pages[size_t(k)];
    if (index_.holds(page)) return;  // cached under another chain (its parent entry was replaced): stop here
    const int64_t limit = cache_limit_ < 0 ? n_pages_ : cache_limit_;
    if (index_.size() >= limit && !evict_one()) return;
    if (!index_.insert(w, ids, page)) return;  // a hash collision: the chain stops being cached here
    refs_[size_t(page)]++;  // the cache's reference (the session holds it too: not idle)
  }
}

void KvPagePool::set_cache_limit(int64_t limit) {
  cache_limit_ = limit < 0 ? -1 : limit;
  if (cache_limit_ == 0) {
    clear_cache();
    return;
  }
  while (cache_limit_ > 0 && index_.size() > cache_limit_ && evict_one()) {
  }
}

void KvPagePool::clear_cache() {
  for (int32_t page : index_.pages()) {
    unidle(page);
    index_.erase_page(page);
    unref(page);
  }
}

}  // namespace dsrt
