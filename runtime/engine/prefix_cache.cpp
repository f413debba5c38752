#include "engine/prefix_cache.h"

#include <algorithm>
#include <cstring>

#include "core/hash.h"

namespace dsrt {

uint64_t PrefixIndex::chain(uint64_t prev_key, const int32_t *ids) {
  unsigned char buf[8 + kPageTokens * sizeof(int32_t)];
  std::memcpy(buf, &prev_key, 8);
  std::memcpy(buf + 8, ids, kPageTokens * sizeof(int32_t));
  return hash64(buf, sizeof buf);
}

const PrefixIndex::Entry *PrefixIndex::next(const Walk &w, const int32_t *ids, uint64_t &key) const {
  key = chain(w.key, ids);
  auto it = by_key_.find(key);
  if (it == by_key_.end()) return nullptr;
  const Entry &e = it->second;
  if (e.parent_serial != w.serial || !std::equal(e.ids.begin(), e.ids.end(), ids)) return nullptr;  // a collision
  return &e;
}

void PrefixIndex::advance(Walk &w, uint64_t key, const Entry &e) {
  w.pages.push_back(e.page);
  w.key = key;
  w.serial = e.serial;
}

int32_t PrefixIndex::step(Walk &w, const int32_t *ids) const {
  uint64_t key;
  const Entry *e = next(w, ids, key);
  if (!e) return -1;
  advance(w, key, *e);
  return e->page;
}

PrefixIndex::Walk PrefixIndex::root(int family) {
  Walk w;
  if (family > 0) {  // (a page of ids that no tokenizer makes: the family number, then -1s)
    std::array<int32_t, kPageTokens> ids;
    ids.fill(-1);
    ids[0] = family;
    w.key = chain(kRootKey, ids.data());
  }
  return w;
}

PrefixIndex::Walk PrefixIndex::match(const int32_t *tokens, int64_t n, int64_t max_pages, const Accept &accept) const {
  return match(tokens, n, max_pages, accept, Walk{});
}

PrefixIndex::Walk PrefixIndex::match(const int32_t *tokens, int64_t n, int64_t max_pages, const Accept &accept,
                                     const Walk &from) const {
  Walk w = from;
  const int64_t full = std::min(n / kPageTokens, max_pages);
  for (int64_t k = 0; k < full; k++) {
    uint64_t key;
    const Entry *e = next(w, tokens + k * kPageTokens, key);
    if (!e || (accept && !accept(w, e->page))) break;  // (w stays the walk up to its last accepted page)
    advance(w, key, *e);
  }
  return w;
}

bool PrefixIndex::insert(Walk &w, const int32_t *ids, int32_t page) {
  const uint64_t key = chain(w.key, ids);
  if (by_key_.count(key) || page_key_.count(page)) return false;
  Entry e;
  e.parent_serial = w.serial;
  e.serial = next_serial_++;
  e.page = page;
  std::copy(ids, ids + kPageTokens, e.ids.begin());
  by_key_.emplace(key, e);
  page_key_.emplace(page, key);
  advance(w, key, e);
  return true;
}

void PrefixIndex::erase_page(int32_t page) {
  auto it = page_key_.find(page);
  if (it == page_key_.end()) return;
  by_key_.erase(it->second);
  page_key_.erase(it);
}

std::vector<int32_t> PrefixIndex::pages() const {
  std::vector<int32_t> v;
  v.reserve(page_key_.size());
  for (const auto &[page, key] : page_key_) v.push_back(page);
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace dsrt
