#!/usr/bin/env bash
# Fills .carry/gpu (git-ignored) for a device run (tools/gpu-check.sh): the CUDA build's binaries and the
# Debian shared libraries they load that the GPU machine's image lacks (it has no Debian -dev packages).
# Build first: cmake --preset release && cmake --build build.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/gpu/bin .carry/gpu/lib
cp build/dsrt build/tests/dsrt_gpu_tests .carry/gpu/bin/
libdir=/lib/x86_64-linux-gnu
for l in libsentencepiece.so.0 libpcre2-8.so.0 libmimalloc.so.2 libcpp-httplib.so.0.11 libbrotlidec.so.1 \
         libbrotlienc.so.1 libbrotlicommon.so.1; do
  cp -L "$libdir/$l" .carry/gpu/lib/
done
# Gloo (ranks in several processes) and what it loads, when the build linked it (Debian puts it in /lib).
gloo=$(ldd build/dsrt | awk '/libgloo/ {print $3}')
if [ -n "$gloo" ]; then
  cp -L "$gloo" .carry/gpu/lib/
  for l in libhiredis.so.0.14 libibverbs.so.1 libnl-route-3.so.200 libnl-3.so.200; do cp -L "$libdir/$l" .carry/gpu/lib/; done
fi
# Every library the binaries need must be here or a system library the image has.
missing=$(LD_LIBRARY_PATH=.carry/gpu/lib ldd .carry/gpu/bin/* | grep "not found" || true)
[ -z "$missing" ] || { echo "unresolved: $missing"; exit 1; }
du -sh .carry/gpu
