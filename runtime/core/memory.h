// Host memory for activations, caches and scratch: mimalloc's heap, reached only through its mi_ functions,
// so the host application's malloc/new are never replaced. libmimalloc is loaded privately at first use
// (memory.cpp): linked as a DT_NEEDED library, its malloc and operator new would join the process's global
// symbol scope and replace the host's (a C host's operator new resolved to mimalloc's, which aborts on
// out of memory instead of throwing).
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
    if (n > size_t(-1) / 2 / sizeof(T)) throw std::bad_alloc();
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

// Hands memory freed by dsrt back to the system (mimalloc keeps freed segments for reuse, glibc keeps freed
// heap pages): called when the last model is freed, when nothing of dsrt's is left to reuse them.
void release_host_memory();

// Where the mi_ functions come from: "mimalloc" (libmimalloc loaded privately) or "libc" (it could not be
// loaded: the same calls served by posix_memalign/free). For tests and dsrt_system_info.
const char *host_allocator_name();

}  // namespace dsrt
