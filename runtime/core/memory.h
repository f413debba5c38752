// Host memory for activations, caches and scratch: mimalloc's heap, called directly, so the host
// application's malloc/new are never replaced.
#pragma once
#include <mimalloc.h>

#include <cstddef>
#include <new>
#include <vector>

#include "core/fault.h"

namespace dsrt {

template <class T>
struct MiAllocator {
  using value_type = T;
  MiAllocator() noexcept = default;
  template <class U>
  MiAllocator(const MiAllocator<U> &) noexcept {}
  T *allocate(size_t n) {
    void *p = fault::alloc_should_fail() ? nullptr : mi_malloc_aligned(n * sizeof(T), 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T *>(p);
  }
  void deallocate(T *p, size_t) noexcept { mi_free(p); }
  template <class U>
  bool operator==(const MiAllocator<U> &) const noexcept { return true; }
};

template <class T>
using HostVec = std::vector<T, MiAllocator<T>>;

}  // namespace dsrt
