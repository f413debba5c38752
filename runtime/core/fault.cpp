#include "core/fault.h"

namespace dsrt::fault {

namespace {
std::atomic<int64_t> g_budget{-1};  // < 0: disarmed
std::atomic<int64_t> g_seen{0};
}  // namespace

void arm_alloc_failure(int64_t n) {
  g_seen.store(0);
  g_budget.store(n);
}
void disarm() { g_budget.store(-1); }
int64_t allocations_seen() { return g_seen.load(); }

bool alloc_should_fail() {
  g_seen.fetch_add(1, std::memory_order_relaxed);
  int64_t b = g_budget.load(std::memory_order_relaxed);
  if (b < 0) return false;
  if (b == 0) return true;
  return g_budget.fetch_sub(1) <= 0;
}

}  // namespace dsrt::fault
