#include "engine/kv_pages.h"

#include <algorithm>

#include "backend/backend.h"
#include "core/status.h"

namespace dsrt {

KvPagePool::KvPagePool(int64_t n_pages, int64_t cache_limit, int regions)
    : n_pages_(n_pages), refs_(size_t(n_pages), 0), cache_limit_(cache_limit), idle_tick_(size_t(n_pages), 0) {
  if (regions < 1 || n_pages % regions != 0)
    failf(DSRT_ERR_INTERNAL, "KV page pool: ", n_pages, " pages do not make ", regions, " equal regions");
  region_pages_ = n_pages / regions;
  regions_.resize(size_t(regions));
  for (int r = 0; r < regions; r++) {
    std::vector<int32_t> &free = regions_[size_t(r)].free;
    free.resize(size_t(region_pages_));
    const int64_t last = (r + 1) * region_pages_ - 1;
    for (int64_t i = 0; i < region_pages_; i++) free[size_t(i)] = int32_t(last - i);  // pop_back: lowest first
  }
}

int64_t KvPagePool::pages_for(int64_t n_tokens) { return (n_tokens + kPageTokens - 1) / kPageTokens; }

int64_t KvPagePool::used() const {
  int64_t n = n_pages_;
  for (const Region &g : regions_) n -= int64_t(g.free.size()) + int64_t(g.idle.size());
  return n;
}

int64_t KvPagePool::unreserved() const {
  int64_t n = 0;
  for (const Region &g : regions_) n += g.unreserved();
  return n;
}

int64_t KvPagePool::idle() const {
  int64_t n = 0;
  for (const Region &g : regions_) n += int64_t(g.idle.size());
  return n;
}

int KvPagePool::region_for(const PageHolding &h) const {
  if (h.region >= 0) return h.region;
  int best = 0;
  for (int r = 1; r < regions(); r++)
    if (unreserved(r) > unreserved(best)) best = r;
  return best;
}

bool KvPagePool::charge_one(PageHolding &h, int r) {
  if (h.reserved > 0) {  // (h has a region then: r)
    h.reserved--;
    regions_[size_t(r)].reserved--;
  } else if (unreserved(r) < 1) {
    return false;
  }
  h.region = r;
  return true;
}

void KvPagePool::settle(PageHolding &h) {
  if (h.pages.empty() && h.reserved == 0) h.region = -1;
}

void KvPagePool::make_idle(int32_t page) {
  idle_tick_[size_t(page)] = ++clock_;
  regions_[size_t(region_of(page))].idle.insert({clock_, page});
}

void KvPagePool::unidle(int32_t page) {
  uint64_t &t = idle_tick_[size_t(page)];
  if (t == 0) return;
  regions_[size_t(region_of(page))].idle.erase({t, page});
  t = 0;
}

bool KvPagePool::evict_one(int r) {
  const auto &idle = regions_[size_t(r)].idle;
  if (idle.empty()) return false;
  const int32_t page = idle.begin()->second;
  unidle(page);
  index_.erase_page(page);
  unref(page);  // the cache's reference: the page is free now
  return true;
}

bool KvPagePool::evict_oldest() {
  int oldest = -1;  // the region whose least recently let go idle page is the oldest of all
  for (int r = 0; r < regions(); r++) {
    const auto &idle = regions_[size_t(r)].idle;
    if (!idle.empty() && (oldest < 0 || *idle.begin() < *regions_[size_t(oldest)].idle.begin())) oldest = r;
  }
  return oldest >= 0 && evict_one(oldest);
}

int32_t KvPagePool::take_available(int r) {
  std::vector<int32_t> &free = regions_[size_t(r)].free;
  if (free.empty() && !evict_one(r)) fail(DSRT_ERR_INTERNAL, "KV page pool: no page available where one was counted");
  const int32_t p = free.back();
  free.pop_back();
  refs_[size_t(p)] = 1;
  return p;
}

bool KvPagePool::grow(PageHolding &h, int64_t n_tokens) {
  const int64_t need = pages_for(n_tokens) - int64_t(h.pages.size());
  if (need <= 0) return true;
  const int r = region_for(h);
  const int64_t own = std::min(need, h.reserved);
  if (need - own > unreserved(r)) return false;
  h.region = r;
  h.reserved -= own;  // first: what it takes from its reservation is no longer counted as reserved
  regions_[size_t(r)].reserved -= own;
  for (int64_t i = 0; i < need; i++) h.pages.push_back(take_available(r));
  return true;
}

int32_t KvPagePool::take(PageHolding &h) {
  const int r = region_for(h);
  return charge_one(h, r) ? take_available(r) : -1;
}

void KvPagePool::unref(int32_t page) {
  int32_t &r = refs_[size_t(page)];
  if (r <= 0) fail(DSRT_ERR_INTERNAL, "KV page pool: a page was let go more often than taken");
  if (--r == 0) {
    regions_[size_t(region_of(page))].free.push_back(page);
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
  settle(h);
}

int64_t KvPagePool::reserve(PageHolding &h, int64_t pages) {
  const int r = region_for(h);
  const int64_t got = std::clamp<int64_t>(pages, 0, unreserved(r));
  if (got == 0) return 0;  // (a holding without a region stays without one)
  h.region = r;
  h.reserved += got;
  regions_[size_t(r)].reserved += got;
  return got;
}

void KvPagePool::unreserve(PageHolding &h) {
  if (h.reserved > 0) regions_[size_t(h.region)].reserved -= h.reserved;
  h.reserved = 0;
  settle(h);
}

void KvPagePool::share(const PageHolding &from, PageHolding &to, int64_t n) {
  const size_t k = size_t(std::clamp<int64_t>(n, 0, int64_t(from.pages.size())));
  if (k == 0) return;
  if (to.region >= 0 && to.region != from.region)
    fail(DSRT_ERR_INTERNAL, "KV page pool: pages shared into a holding of another region");
  to.region = from.region;
  for (size_t i = 0; i < k; i++) {
    refs_[size_t(from.pages[i])]++;
    to.pages.push_back(from.pages[i]);
  }
}

void KvPagePool::adopt(PageHolding &h, int32_t page) {
  const int r = region_of(page);
  if (h.region >= 0 && h.region != r)
    fail(DSRT_ERR_INTERNAL, "KV page pool: a cached page of another region was adopted");
  if (is_idle(page)) {  // costs an available page, as taking a free one would
    if (!charge_one(h, r)) fail(DSRT_ERR_INTERNAL, "KV page pool: a cached page was taken without room for it");
    unidle(page);
  }
  h.region = r;
  refs_[size_t(page)]++;
  h.pages.push_back(page);
}

PrefixIndex::Walk KvPagePool::match(const int32_t *tokens, int64_t n, int64_t max_pages, int region) const {
  if (!cache_enabled()) return {};
  if (region < 0 && regions() > 1) {  // the longest match of any region (the first such)
    PrefixIndex::Walk best;
    for (int r = 0; r < regions(); r++)
      if (PrefixIndex::Walk w = match(tokens, n, max_pages, r); w.pages.size() > best.pages.size()) best = std::move(w);
    return best;
  }
  // Each region caches its own chains (one rank's cache): the walk starts from its root, and its pages are its.
  const int r = std::max(region, 0);
  return index_.match(tokens, n, max_pages, [&](const PrefixIndex::Walk &, int32_t page) { return region_of(page) == r; },
                      PrefixIndex::root(r));
}

void KvPagePool::publish(const int32_t *tokens, int64_t n_full, const PageHolding &h) {
  if (!cache_enabled()) return;
  n_full = std::min<int64_t>(n_full, int64_t(h.pages.size()));
  if (n_full <= 0) return;
  PrefixIndex::Walk w = PrefixIndex::root(region_of(h.pages[0]));  // (h's region's own chains)
  for (int64_t k = 0; k < n_full; k++) {
    const int32_t *ids = tokens + k * kPageTokens;
    const int32_t page = h.pages[size_t(k)];
    if (index_.step(w, ids) >= 0) continue;  // cached already in this region (this page, or one with its content)
    if (index_.holds(page)) return;  // cached under another chain (its parent entry was replaced): stop here
    const int64_t limit = cache_limit_ < 0 ? n_pages_ : cache_limit_;
    if (index_.size() >= limit && !evict_oldest()) return;
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
  while (cache_limit_ > 0 && index_.size() > cache_limit_ && evict_oldest()) {
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
