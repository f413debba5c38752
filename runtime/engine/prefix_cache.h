// The prefix cache's index: full KV pages (64 tokens) keyed by a hash chain over token ids, so a prompt that
// starts like an earlier one (the same conversation's earlier turns, a common system prompt) finds the pages
// that already hold its latent values. Key of page k = hash(key of page k-1, ids of page k); the key of page 0
// chains from a fixed seed. A match is verified, never trusted to the hash: every entry keeps its 64 ids and
// the serial number of the entry it continues, and a walk accepts an entry only when both agree, so a hash
// collision can cost a cache miss but never share a page holding other tokens.
//
// The index only maps keys to pages; which pages are free, held or evictable is KvPagePool's business (it
// owns this index and its reference counts).
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"  // kPageTokens

namespace dsrt {

class PrefixIndex {
 public:
  // Where a walk along a token sequence stands: the pages matched so far, and the key and serial of the
  // last one (the root before the first page).
  struct Walk {
    std::vector<int32_t> pages;
    uint64_t key = kRootKey;
    uint64_t serial = 0;
  };
  static constexpr uint64_t kRootKey = 0x64737274'70726678ull;  // "dsrtprfx"

  static uint64_t chain(uint64_t prev_key, const int32_t *ids);
  // The root of chain family `family` (0: kRootKey): walks from different roots never meet, so the same tokens
  // may be cached once under each (KvPagePool: once per region, each rank its own copy).
  static Walk root(int family);

  // Whether a walk may go on to `page` (the walk so far, the page it would add).
  using Accept = std::function<bool(const Walk &, int32_t page)>;
  // Follows the cached pages matching tokens[0 .. n) page by page (full pages only), at most max_pages, from
  // `from` (a root); with accept, only as long as it accepts the next page (the walk ends before the first one
  // it refuses).
  Walk match(const int32_t *tokens, int64_t n, int64_t max_pages, const Accept &accept, const Walk &from) const;
  Walk match(const int32_t *tokens, int64_t n, int64_t max_pages, const Accept &accept = {}) const;  // (from the root)
  // The entry that continues w with the page of ids (64 of them), if cached: its page, or -1; on a hit w
  // advances. Verifies ids and parentage.
  int32_t step(Walk &w, const int32_t *ids) const;
  // Adds page as the continuation of w with these ids; false when its key is taken (by the same content from
  // another page, or by a hash collision): nothing added then. On success w advances.
  bool insert(Walk &w, const int32_t *ids, int32_t page);
  // The entry on page p goes; its descendants stay (unreachable from the root: they can no longer match and
  // are evicted in their turn).
  void erase_page(int32_t page);
  bool holds(int32_t page) const { return page_key_.count(page) != 0; }
  int64_t size() const { return int64_t(by_key_.size()); }
  std::vector<int32_t> pages() const;

 private:
  struct Entry {
    uint64_t parent_serial, serial;
    int32_t page;
    std::array<int32_t, kPageTokens> ids;
  };
  // The entry that continues w with the page of ids, verified (nullptr if none), and its key.
  const Entry *next(const Walk &w, const int32_t *ids, uint64_t &key) const;
  static void advance(Walk &w, uint64_t key, const Entry &e);
  std::unordered_map<uint64_t, Entry> by_key_;
  std::unordered_map<int32_t, uint64_t> page_key_;
  uint64_t next_serial_ = 1;
};

}  // namespace dsrt
