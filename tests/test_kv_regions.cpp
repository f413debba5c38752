// KvPagePool regions (engine/kv_pages.h): the pool cut into equal ranges of page ids, one per data-parallel
// attention rank. A holding keeps all its pages and its reservation in one region; free lists, idle cached pages
// and reservations are per region; each region caches its own prefix chains and a match keeps to one. With one
// region the pool is the plain one. These cases drive the pool directly (no engine, no model).
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "core/status.h"
#include "engine/kv_pages.h"

namespace {

using dsrt::KvPagePool;
using dsrt::PageHolding;
constexpr int64_t T = dsrt::kPageTokens;

// n tokens of their own (salt: another sequence).
std::vector<int32_t> tokens(int64_t n, int salt) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; i++) t.push_back(int32_t((i * 7919 + 131 * salt + 3) % 50000));
  return t;
}

dsrt_status error_of(const std::function<void()> &f) {
  try {
    f();
  } catch (const dsrt::Error &e) {
    return e.code();
  }
  return DSRT_OK;
}

// Every page of h lies in h's region.
bool in_own_region(const KvPagePool &pool, const PageHolding &h) {
  return std::all_of(h.pages.begin(), h.pages.end(), [&](int32_t p) { return pool.region_of(p) == h.region; });
}

// Every page of a match lies in one region.
bool one_region(const KvPagePool &pool, const std::vector<int32_t> &pages) {
  return std::all_of(pages.begin(), pages.end(),
                     [&](int32_t p) { return pool.region_of(p) == pool.region_of(pages[0]); });
}

}  // namespace

TEST_CASE("kv regions: one region is the plain pool") {
  KvPagePool pool(8);
  CHECK(pool.regions() == 1);
  CHECK(pool.region_pages() == 8);
  CHECK(pool.region_of(7) == 0);
  PageHolding a, b;
  REQUIRE(pool.grow(a, 3 * T));
  CHECK(a.pages == std::vector<int32_t>{0, 1, 2});  // lowest first, as always
  CHECK(a.region == 0);
  CHECK(pool.reserve(b, 10) == 5);  // as many as are unreserved
  CHECK(pool.unreserved() == 0);
  CHECK(pool.unreserved(0) == 0);
  CHECK(pool.affordable(b, 5));
  CHECK_FALSE(pool.affordable(b, 6));
  CHECK_FALSE(pool.grow(a, 4 * T));  // the rest is b's
  REQUIRE(pool.grow(b, 2 * T));
  CHECK(b.pages == std::vector<int32_t>{3, 4});
  CHECK(b.reserved == 3);
  CHECK(pool.used() == 5);

  // Publish, let go, and the idle pages are evicted least recently let go first when the pool runs short.
  const auto t = tokens(3 * T, 1);
  pool.publish(t.data(), 3, a);
  CHECK(pool.cached() == 3);
  pool.shrink(a, 0);
  CHECK(a.region == -1);
  CHECK(pool.idle() == 3);
  CHECK(pool.used() == 2);
  CHECK(pool.match(t.data(), 3 * T, 3).pages == std::vector<int32_t>{0, 1, 2});
  pool.unreserve(b);
  PageHolding c;
  REQUIRE(pool.grow(c, 4 * T));  // 3 free pages, then the oldest idle one: page 2 (a let go of its last first)
  CHECK(pool.cached() == 2);
  CHECK(pool.match(t.data(), 3 * T, 3).pages == std::vector<int32_t>{0, 1});
  pool.shrink(b, 0);
  pool.shrink(c, 0);
  pool.clear_cache();
  CHECK(pool.used() == 0);
  CHECK(pool.unreserved() == 8);

  CHECK(error_of([] { KvPagePool p(10, -1, 3); }) == DSRT_ERR_INTERNAL);  // not a multiple
  CHECK(error_of([] { KvPagePool p(8, -1, 0); }) == DSRT_ERR_INTERNAL);
}

TEST_CASE("kv regions: grow picks the emptiest region and keeps a holding in it") {
  KvPagePool pool(16, -1, 4);
  CHECK(pool.regions() == 4);
  CHECK(pool.region_pages() == 4);
  CHECK(pool.region_of(3) == 0);
  CHECK(pool.region_of(4) == 1);
  CHECK(pool.region_of(15) == 3);
  PageHolding h[5];
  for (int i = 0; i < 4; i++) {  // each takes the region with the most unreserved pages (ties: the lowest)
    REQUIRE(pool.grow(h[i], 2 * T));
    CHECK(h[i].region == i);
    CHECK(h[i].pages == std::vector<int32_t>{int32_t(4 * i), int32_t(4 * i + 1)});
  }
  CHECK(pool.unreserved(0) == 2);
  REQUIRE(pool.grow(h[4], 1));  // all regions equal again: the lowest
  CHECK(h[4].region == 0);
  CHECK(h[4].pages == std::vector<int32_t>{2});
  REQUIRE(pool.grow(h[0], 3 * T));  // its region's last page
  CHECK(h[0].pages == std::vector<int32_t>{0, 1, 3});
  // Region 0 is full: h[0] cannot grow although 6 pages are free elsewhere.
  CHECK(pool.unreserved() == 6);
  CHECK_FALSE(pool.grow(h[0], 4 * T));
  CHECK(h[0].pages.size() == 3);
  CHECK(pool.take(h[0]) == -1);
  CHECK_FALSE(pool.affordable(h[0], 1));
  for (auto &x : h) CHECK(in_own_region(pool, x));
  for (auto &x : h) pool.shrink(x, 0);
  for (auto &x : h) CHECK(x.region == -1);
  CHECK(pool.used() == 0);
}

TEST_CASE("kv regions: a holding filling one region leaves the other to the next") {
  KvPagePool pool(8, -1, 2);
  PageHolding a, b, c;
  REQUIRE(pool.grow(a, 4 * T));
  CHECK(a.region == 0);
  CHECK(pool.unreserved(0) == 0);
  REQUIRE(pool.grow(b, 1));  // region 1 has all the room
  CHECK(b.region == 1);
  CHECK(b.pages == std::vector<int32_t>{4});
  REQUIRE(pool.grow(b, 4 * T));
  CHECK(b.pages == std::vector<int32_t>{4, 5, 6, 7});
  CHECK_FALSE(pool.grow(c, 1));
  CHECK(c.region == -1);  // nothing given: no region
  CHECK(c.pages.empty());
  // a lets go of two pages: they are free in region 0, and the next holding goes there.
  pool.shrink(a, 2 * T);
  CHECK(a.region == 0);
  REQUIRE(pool.grow(c, 2 * T));
  CHECK(c.region == 0);
  CHECK(c.pages == std::vector<int32_t>{2, 3});  // (a let go of its last page first: the lowest comes back first)
  CHECK(in_own_region(pool, a));
  CHECK(in_own_region(pool, b));
  CHECK(in_own_region(pool, c));
}

TEST_CASE("kv regions: reservations are per region") {
  KvPagePool pool(8, -1, 2);
  PageHolding a, b, c, d;
  CHECK(pool.reserve(a, 3) == 3);
  CHECK(a.region == 0);
  CHECK(pool.unreserved(0) == 1);
  CHECK(pool.unreserved(1) == 4);  // reserving in region 0 leaves region 1 as it was
  CHECK(pool.unreserved() == 5);
  CHECK(pool.reserve(b, 2) == 2);  // region 1 has more room now
  CHECK(b.region == 1);
  CHECK(pool.unreserved(1) == 2);
  // A reservation is taken from the holding's region only: at most what that region has unreserved.
  CHECK(pool.reserve(a, 5) == 1);
  CHECK(a.reserved == 4);
  CHECK(pool.unreserved(0) == 0);
  CHECK(pool.reserve(a, 1) == 0);
  CHECK(pool.unreserved() == 2);
  // affordable: the holding's reservation and its region's unreserved pages (the best region for a new one).
  CHECK(pool.affordable(a, 4));
  CHECK_FALSE(pool.affordable(a, 5));
  CHECK(pool.affordable(b, 4));
  CHECK_FALSE(pool.affordable(b, 5));
  CHECK(pool.affordable(c, 2));
  CHECK_FALSE(pool.affordable(c, 3));
  // Growing takes the holding's reservation first and never another's.
  REQUIRE(pool.grow(a, 4 * T));
  CHECK(a.reserved == 0);
  CHECK(a.pages == std::vector<int32_t>{0, 1, 2, 3});
  CHECK_FALSE(pool.grow(c, 3 * T));  // region 1 has 2 unreserved (b's 2 stay b's)
  CHECK(c.region == -1);
  REQUIRE(pool.grow(c, 2 * T));
  CHECK(c.region == 1);
  CHECK(pool.unreserved(1) == 0);
  REQUIRE(pool.grow(b, 2 * T));  // its reservation is still there
  CHECK(b.reserved == 0);
  CHECK(pool.reserve(d, 1) == 0);  // the pool is full: no reservation, no region
  CHECK(d.region == -1);
  // A holding keeps its region while it has a reservation, and lets it go with the last of both.
  pool.shrink(a, 0);
  CHECK(a.region == -1);
  CHECK(pool.reserve(a, 1) == 1);
  CHECK(a.region == 0);
  pool.shrink(a, 0);
  CHECK(a.region == 0);  // (no pages, but still a reservation)
  pool.unreserve(a);
  CHECK(a.region == -1);
  CHECK(pool.unreserved(0) == 4);
}

TEST_CASE("kv regions: idle cached pages are evicted only in the region that needs a page") {
  KvPagePool pool(8, -1, 2);
  const auto t = tokens(2 * T, 1), u = tokens(2 * T, 2);
  PageHolding a, b;
  REQUIRE(pool.grow(a, 2 * T));
  REQUIRE(pool.grow(b, 2 * T));
  REQUIRE(a.region == 0);
  REQUIRE(b.region == 1);
  pool.publish(t.data(), 2, a);
  pool.publish(u.data(), 2, b);
  pool.shrink(a, 0);
  pool.shrink(b, 0);
  CHECK(pool.cached() == 4);
  CHECK(pool.idle() == 4);
  CHECK(pool.used() == 0);
  CHECK(pool.unreserved(0) == 4);  // idle pages count as available in their region
  CHECK(pool.unreserved(1) == 4);
  // Region 0's idle pages were let go first (the oldest in the pool), yet region 1 evicts its own.
  PageHolding r0, c;
  CHECK(pool.reserve(r0, 1) == 1);  // region 0 (a tie) has one page less: c goes to region 1
  REQUIRE(pool.grow(c, 3 * T));
  CHECK(c.region == 1);
  CHECK(c.pages == std::vector<int32_t>{6, 7, 5});  // the free pages, then the idle one b let go of first
  CHECK(pool.cached() == 3);
  CHECK(pool.idle() == 3);
  CHECK(pool.is_idle(0));
  CHECK(pool.is_idle(1));
  CHECK(pool.match(t.data(), 2 * T, 2).pages == std::vector<int32_t>{0, 1});
  CHECK(pool.match(u.data(), 2 * T, 2).pages == std::vector<int32_t>{4});
  // take() for c: region 1's last page, the idle one.
  CHECK(pool.take(c) == 4);
  CHECK(pool.cached() == 2);
  CHECK(pool.take(c) == -1);  // region 1 is full; region 0's idle pages are not c's to take
  CHECK(pool.match(t.data(), 2 * T, 2).pages == std::vector<int32_t>{0, 1});
  CHECK(pool.unreserved(0) == 3);
}

TEST_CASE("kv regions: the prefix cache's size limit is global") {
  KvPagePool pool(8, 2, 2);
  const auto t = tokens(2 * T, 1), u = tokens(T, 2);
  PageHolding a, b;
  REQUIRE(pool.grow(a, 2 * T));
  REQUIRE(pool.grow(b, 1));
  REQUIRE(b.region == 1);
  pool.publish(t.data(), 2, a);
  pool.shrink(a, 0);  // both idle, page 1 let go first
  pool.publish(u.data(), 1, b);  // the cache is full: the oldest idle page of the pool (region 0's) goes
  CHECK(pool.cached() == 2);
  CHECK(pool.match(t.data(), 2 * T, 2).pages == std::vector<int32_t>{0});
  CHECK(pool.match(u.data(), T, 1).pages == std::vector<int32_t>{4});
}

TEST_CASE("kv regions: share and adopt keep the region and refuse a page of another") {
  KvPagePool pool(8, -1, 2);
  const auto t = tokens(2 * T, 1);
  PageHolding a, b, c, d;
  REQUIRE(pool.grow(a, 2 * T));
  REQUIRE(pool.grow(b, 1));
  REQUIRE(a.region == 0);
  REQUIRE(b.region == 1);
  pool.share(a, c, 2);  // a fork: c takes a's region
  CHECK(c.region == 0);
  CHECK(c.pages == a.pages);
  CHECK(pool.refs(0) == 2);
  CHECK(error_of([&] { pool.share(a, b, 1); }) == DSRT_ERR_INTERNAL);
  CHECK(b.pages == std::vector<int32_t>{4});
  pool.share(a, d, 0);  // nothing shared: no region
  CHECK(d.region == -1);
  // A copy-on-write page for c comes from c's region.
  const int32_t copy = pool.take(c);
  CHECK(pool.region_of(copy) == 0);
  pool.unref(copy);

  pool.publish(t.data(), 2, a);
  pool.shrink(a, 0);
  pool.shrink(c, 0);
  CHECK(c.region == -1);
  REQUIRE(pool.is_idle(0));
  REQUIRE(pool.is_idle(1));
  // Adopting a cached page gives a holding without a region the page's, and costs that region one page.
  const int64_t before0 = pool.unreserved(0), before1 = pool.unreserved(1);
  pool.adopt(d, 0);
  CHECK(d.region == 0);
  CHECK(pool.unreserved(0) == before0 - 1);
  CHECK(pool.unreserved(1) == before1);
  CHECK(error_of([&] { pool.adopt(b, 1); }) == DSRT_ERR_INTERNAL);  // b is in region 1
  CHECK(b.pages == std::vector<int32_t>{4});
  CHECK(pool.is_idle(1));
  pool.adopt(d, 1);
  CHECK(d.pages == std::vector<int32_t>{0, 1});
  CHECK(in_own_region(pool, d));
  pool.shrink(d, 0);
  CHECK(d.region == -1);
  CHECK(pool.idle() == 2);
}

TEST_CASE("kv regions: each region caches its own chains; a match never spans two regions") {
  KvPagePool pool(8, -1, 2);
  const auto t = tokens(4 * T, 1);
  PageHolding a, b;
  REQUIRE(pool.grow(a, 2 * T));
  REQUIRE(pool.grow(b, 4 * T));
  REQUIRE(a.region == 0);
  REQUIRE(b.region == 1);
  pool.publish(t.data(), 2, a);  // the chain's first two pages, in region 0
  // b holds the same tokens and two more: region 1 caches its own copy of the chain, all four pages.
  pool.publish(t.data(), 4, b);
  CHECK(pool.cached() == 6);
  CHECK(pool.match(t.data(), 4 * T, 4, 0).pages == std::vector<int32_t>{0, 1});
  CHECK(pool.match(t.data(), 4 * T, 4, 1).pages == std::vector<int32_t>{4, 5, 6, 7});
  CHECK(pool.match(t.data(), 4 * T, 4).pages == std::vector<int32_t>{4, 5, 6, 7});  // (the longest of any region)
  CHECK(pool.match(t.data(), 2 * T, 2).pages == std::vector<int32_t>{0, 1});        // (a tie: the first region's)
  // Publishing again adds nothing: each page's chain is cached in its region already.
  pool.publish(t.data(), 2, a);
  pool.publish(t.data(), 4, b);
  CHECK(pool.cached() == 6);
  // A chain of region 1's own: from region 1, or from no region, never from region 0.
  const auto u = tokens(4 * T, 2);
  PageHolding c;
  REQUIRE(pool.grow(c, T));
  REQUIRE(c.region == 0);
  pool.unref(b.pages[3]);  // (b lets go of its last page, still cached: idle)
  b.pages.pop_back();
  PageHolding d;
  d.region = 1;
  REQUIRE(pool.grow(d, T));
  REQUIRE(d.region == 1);
  pool.publish(u.data(), 1, d);
  CHECK(pool.match(u.data(), T, 1, 1).pages == d.pages);
  CHECK(pool.match(u.data(), T, 1).pages == d.pages);
  CHECK(pool.match(u.data(), T, 1, 0).pages.empty());
  for (int region : {-1, 0, 1}) CHECK(one_region(pool, pool.match(t.data(), 4 * T, 4, region).pages));
}

TEST_CASE("prefix index: walks from different roots never meet") {
  dsrt::PrefixIndex ix;
  const auto t = tokens(2 * T, 4);
  dsrt::PrefixIndex::Walk w0 = dsrt::PrefixIndex::root(0), w1 = dsrt::PrefixIndex::root(1);
  CHECK(w0.key == dsrt::PrefixIndex::kRootKey);
  CHECK(w1.key != w0.key);
  REQUIRE(ix.insert(w0, t.data(), 10));
  CHECK(ix.match(t.data(), 2 * T, 2).pages == std::vector<int32_t>{10});
  CHECK(ix.match(t.data(), 2 * T, 2, {}, dsrt::PrefixIndex::root(1)).pages.empty());
  REQUIRE(ix.insert(w1, t.data(), 20));  // the same tokens under root 1: an entry of its own
  REQUIRE(ix.insert(w1, t.data() + T, 21));
  CHECK(ix.match(t.data(), 2 * T, 2, {}, dsrt::PrefixIndex::root(1)).pages == std::vector<int32_t>{20, 21});
  CHECK(ix.match(t.data(), 2 * T, 2).pages == std::vector<int32_t>{10});
}

TEST_CASE("kv regions: the index walk ends before the first page it is not to take") {
  // A chain that spans regions (the index does not know them; the pool's match keeps to one): pages 0, 1, 5, 6.
  dsrt::PrefixIndex ix;
  const auto t = tokens(4 * T, 3);
  const std::vector<int32_t> pages = {0, 1, 5, 6};
  dsrt::PrefixIndex::Walk w;
  for (size_t k = 0; k < pages.size(); k++) REQUIRE(ix.insert(w, t.data() + int64_t(k) * T, pages[k]));
  CHECK(ix.match(t.data(), 4 * T, 4).pages == pages);
  const auto below4 = [](const dsrt::PrefixIndex::Walk &, int32_t page) { return page < 4; };
  const auto m = ix.match(t.data(), 4 * T, 4, below4);
  CHECK(m.pages == std::vector<int32_t>{0, 1});
  // The walk it returns stands after its last page: stepping on from it finds the next entry.
  dsrt::PrefixIndex::Walk on = m;
  CHECK(ix.step(on, t.data() + 2 * T) == 5);
  CHECK(ix.match(t.data(), 4 * T, 4, [](const dsrt::PrefixIndex::Walk &, int32_t) { return false; }).pages.empty());
}
