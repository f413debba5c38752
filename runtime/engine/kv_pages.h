// The engine's pool of latent-cache pages (64 tokens each, every cache layer): a free list, reservations,
// reference counts and the prefix cache.
//
// Reservations: a generation turn reserves, when it starts, the pages its token budget may need (as far as
// the pool has them unreserved); pages reserved by one session are never handed to another, so a newcomer's
// prefill cannot end a running turn early for lack of pages.
//
// Sharing: a page may have several holders (sessions' page tables, and the prefix cache); refs_ counts them.
// A page is written only by a holder that holds it alone: a session that is about to write into a shared page
// first takes a fresh one and copies it (copy-on-write, StepRunner). Full pages are published to the prefix
// cache (PrefixIndex) as sessions fill them; a later prompt that starts with the same tokens takes them
// instead of prefilling. A cached page nobody else holds is "idle": it counts as available, and is evicted
// (least recently let go first) when the pool needs a page. The availability invariant behind reservations
// is free + idle >= reserved: taking an idle cached page into a session costs one available page, exactly
// like taking a free one.
//
// Regions (data-parallel attention): the pool may be cut into `regions` equal ranges of page ids, region r being
// pages [r P, (r+1) P) with P = total / regions; each region is one rank's device pool, which keeps the cache of
// only the sequences on that rank. A holding's pages therefore all live in one region (PageHolding::region) for
// as long as it holds any page or reservation: every operation that gives it pages or a reservation acts within
// that region, and one that gives a holding without a region its first picks one (the region with the most
// unreserved pages, or that of the pages it shares or adopts). Free lists, idle pages and reservations are kept
// per region, and the invariant holds in each (free_r + idle_r >= reserved_r): a region that runs short evicts
// its own idle pages, never another's. Each region caches its own prefix chains (PrefixIndex::root(region)):
// a prefix used on two ranks is cached once on each, and a match keeps to one region. The cache's size limit
// is global. With one region (the default) all of this is the plain pool described above.
#pragma once
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "engine/prefix_cache.h"

namespace dsrt {

// What one session holds: its page table and the pages promised to it but not taken yet, in one region (-1:
// none yet; it goes back to -1 when the holding has neither pages nor a reservation left).
struct PageHolding {
  std::vector<int32_t> pages;
  int64_t reserved = 0;
  int region = -1;
};

// A copy-on-write of one page of a holding: page table entry `index` was `from` (shared) and becomes `to` (a
// fresh page that gets from's contents before the step writes into it).
struct PageCopy {
  size_t index;
  int32_t from, to;
};

class KvPagePool {
 public:
  // cache_limit: most pages the prefix cache may hold (-1: the whole pool, 0: no prefix cache). regions: how many
  // equal regions the pages are cut into (n_pages must be a multiple).
  explicit KvPagePool(int64_t n_pages, int64_t cache_limit = -1, int regions = 1);
  int64_t total() const { return n_pages_; }
  int regions() const { return int(regions_.size()); }
  int64_t region_pages() const { return region_pages_; }
  int region_of(int32_t page) const { return int(page / region_pages_); }
  // Pages some session holds (idle cached pages are not counted: they are available).
  int64_t used() const;
  // Available pages (free or idle cached) nobody has reserved: in all regions / in one.
  int64_t unreserved() const;
  int64_t unreserved(int region) const { return regions_[size_t(region)].unreserved(); }

  static int64_t pages_for(int64_t n_tokens);
  // Grows h's page table to cover n_tokens with fresh pages (in h's region), from its reservation first, then
  // from unreserved pages (evicting idle cached ones when no page is free). false (and nothing taken) when the
  // region cannot.
  bool grow(PageHolding &h, int64_t n_tokens);
  // Lets go of the pages past those covering keep_tokens.
  void shrink(PageHolding &h, int64_t keep_tokens);
  // Reserves up to `pages` more for h, as many as are unreserved in its region; returns how many it got.
  int64_t reserve(PageHolding &h, int64_t pages);
  void unreserve(PageHolding &h);

  // Sharing.
  int32_t refs(int32_t page) const { return refs_[size_t(page)]; }
  bool shared(int32_t page) const { return refs_[size_t(page)] > 1; }
  // `to` (empty) becomes another holder of the first n pages of `from` (in from's region): no page is taken.
  void share(const PageHolding &from, PageHolding &to, int64_t n);
  // A fresh page for h (counted like grow, in its region), not put in its table: -1 when the region has none.
  int32_t take(PageHolding &h);
  // Whether h can take n more available pages (its reservation, then unreserved ones in its region, or in the
  // region it would get).
  bool affordable(const PageHolding &h, int64_t n) const { return n <= h.reserved + unreserved(region_for(h)); }
  void unref(int32_t page);
  // The pages of h that would become available if h let go of them (held by it alone, or by it and the cache).
  int64_t releasable(const PageHolding &h) const;
  // The pages of h from table index `first` on that other holders share.
  int64_t shared_from(const PageHolding &h, size_t first) const;

  // The prefix cache.
  bool cache_enabled() const { return cache_limit_ != 0; }
  int64_t cache_limit() const { return cache_limit_; }
  // -1: the whole pool; 0: off (the cached pages nobody holds are freed, the others leave the cache);
  // n > 0: at most n pages (idle ones evicted down to it as far as possible).
  void set_cache_limit(int64_t limit);
  // Every page leaves the cache (pages sessions hold stay theirs).
  void clear_cache();
  int64_t cached() const { return index_.size(); }
  int64_t idle() const;
  // The cached pages matching tokens[0 .. n) from the start, full pages only, at most max_pages, from
  // `region`'s chains (-1: the longest match of any region, the first such).
  PrefixIndex::Walk match(const int32_t *tokens, int64_t n, int64_t max_pages, int region = -1) const;
  // Whether taking `page` into a session costs an available page (it is idle).
  bool is_idle(int32_t page) const { return idle_tick_[size_t(page)] != 0; }
  // h becomes a holder of the cached page (appended to its table; h takes the page's region): from its
  // reservation first when the page is idle. The caller has checked that the page's region can afford it.
  void adopt(PageHolding &h, int32_t page);
  // Publishes h's first n_full pages (full, final, holding tokens[0 .. 64 n_full)) to its region's chains, as
  // far as they are not cached there yet and the cache has room.
  void publish(const int32_t *tokens, int64_t n_full, const PageHolding &h);

 private:
  struct Region {
    std::vector<int32_t> free;
    std::set<std::pair<uint64_t, int32_t>> idle;  // (tick when let go, page): eviction order
    int64_t reserved = 0;
    int64_t unreserved() const { return int64_t(free.size()) + int64_t(idle.size()) - reserved; }
  };
  // h's region, or the one it would get: the region with the most unreserved pages (the lowest of equals).
  int region_for(const PageHolding &h) const;
  // h (in region r from now on) gives up one page of its reservation, or counts one unreserved page of r.
  bool charge_one(PageHolding &h, int r);
  void settle(PageHolding &h);  // h's region goes when it holds nothing
  int32_t take_available(int r);  // a free page of r, or an evicted idle one of r (refs 1 when returned)
  bool evict_one(int r);          // the least recently let go idle page of r
  bool evict_oldest();            // ... of any region
  void make_idle(int32_t page);
  void unidle(int32_t page);

  int64_t n_pages_;
  int64_t region_pages_;
  std::vector<Region> regions_;
  std::vector<int32_t> refs_;
  int64_t cache_limit_;
  PrefixIndex index_;
  std::vector<uint64_t> idle_tick_;  // per page, 0 when not idle
  uint64_t clock_ = 0;
};

}  // namespace dsrt
