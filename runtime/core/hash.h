// A fast non-cryptographic 64-bit hash: XXH64 (Yann Collet's xxHash, 64-bit variant), written here from its
// published specification so the library needs no extra dependency. It detects accidental change (session
// state checksums, the full-model identity); it is no defence against a forger, who can recompute it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dsrt {

// XXH64 of n bytes at p (any alignment). Equal to xxHash's XXH64(p, n, seed).
uint64_t hash64(const void *p, size_t n, uint64_t seed = 0);

}  // namespace dsrt
