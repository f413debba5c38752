// Test hook: fail the N-th host allocation that dsrt makes through its own allocation points (mimalloc
// vectors, scratch arenas, KV pages, shard mappings, tokenizer tables, thread starts), so tests can prove that running out
// of memory returns DSRT_ERR_OUT_OF_MEMORY and leaves models and sessions usable. Off unless a test arms it.
#pragma once
#include <atomic>
#include <cstdint>

namespace dsrt::fault {

// After `n` more allocations succeed, every further one fails until disarm() (n < 0: off).
void arm_alloc_failure(int64_t n);
void disarm();
// Called at each allocation point: true when this allocation must fail.
bool alloc_should_fail();
// How many allocation points were passed since the last arm (to size an injection sweep).
int64_t allocations_seen();

}  // namespace dsrt::fault
