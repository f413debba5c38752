// The mi_ functions dsrt calls, defined here as forwards into a privately loaded libmimalloc (dlopen with
// RTLD_LOCAL: its symbols stay out of the global scope, so the host's malloc and operator new stay the
// host's). These definitions are hidden in libdsrt.so (version script: only dsrt_* leave it).
#include <dlfcn.h>
#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include "core/memory.h"

#ifndef DSRT_MIMALLOC_SONAME
#define DSRT_MIMALLOC_SONAME "libmimalloc.so.2"
#endif

namespace dsrt {
namespace {

void *libc_malloc_aligned(size_t n, size_t align) {
  void *p = nullptr;
  return posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, n ? n : 1) == 0 ? p : nullptr;
}
void *libc_zalloc_aligned(size_t n, size_t align) {
  void *p = libc_malloc_aligned(n, align);
  if (p) std::memset(p, 0, n);
  return p;
}
void libc_collect(bool) {}

struct Mimalloc {
  const char *name = "libc";
  void *(*malloc_aligned)(size_t, size_t) = libc_malloc_aligned;
  void *(*zalloc_aligned)(size_t, size_t) = libc_zalloc_aligned;
  void (*free)(void *) = std::free;
  void (*collect)(bool) = libc_collect;
};

const Mimalloc &mimalloc() {
  static const Mimalloc m = [] {
    Mimalloc r;
    void *h = dlopen(DSRT_MIMALLOC_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!h) return r;
    auto ma = reinterpret_cast<void *(*)(size_t, size_t)>(dlsym(h, "mi_malloc_aligned"));
    auto za = reinterpret_cast<void *(*)(size_t, size_t)>(dlsym(h, "mi_zalloc_aligned"));
    auto fr = reinterpret_cast<void (*)(void *)>(dlsym(h, "mi_free"));
    auto co = reinterpret_cast<void (*)(bool)>(dlsym(h, "mi_collect"));
    if (!ma || !za || !fr || !co) return r;  // all or nothing: memory must go back to whoever gave it
    r = {"mimalloc", ma, za, fr, co};
    return r;
  }();
  return m;
}

}  // namespace

void release_host_memory() {
  mimalloc().collect(true);
  malloc_trim(0);
}

const char *host_allocator_name() { return mimalloc().name; }

}  // namespace dsrt

extern "C" {
void *mi_malloc_aligned(size_t size, size_t alignment) noexcept { return dsrt::mimalloc().malloc_aligned(size, alignment); }
void *mi_zalloc_aligned(size_t size, size_t alignment) noexcept { return dsrt::mimalloc().zalloc_aligned(size, alignment); }
void mi_free(void *p) noexcept { dsrt::mimalloc().free(p); }
void mi_collect(bool force) noexcept { dsrt::mimalloc().collect(force); }
}
