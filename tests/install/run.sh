#!/bin/sh
# Installs dsrt into a temporary prefix, then builds the installed C sample (share/doc/dsrt/samples/c) as a
# consumer would: once with CMake (find_package(dsrt CONFIG)), once with pkg-config; runs both on a model
# with no LD_LIBRARY_PATH (the library is found through the RPATH each build records).
#   run.sh BUILD_DIR SOURCE_DIR MODEL_DIR WORK_DIR
set -eu
build=$1 src=$2 model=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
prefix="$work/prefix"
cmake --install "$build" --prefix "$prefix" >"$work/install.log"
for f in include/dsrt.h bin/dsrt; do
  [ -e "$prefix/$f" ] || { echo "not installed: $f"; exit 1; }
done
lib=$(find "$prefix" -name 'libdsrt.so.*.*.*' | head -n1)
[ -n "$lib" ] || { echo "libdsrt.so.X.Y.Z not installed"; exit 1; }
libdir=$(dirname "$lib")
[ -L "$libdir/libdsrt.so" ] && [ -L "$libdir/libdsrt.so.0" ] || { echo "libdsrt SONAME links missing"; exit 1; }
sample=$(find "$prefix/share/doc" -path '*/samples/c/generate.c' | head -n1)
[ -n "$sample" ] || { echo "the C sample was not installed into share/doc"; exit 1; }
unset LD_LIBRARY_PATH

echo "== CMake consumer"
cmake -S "$src/tests/install" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCONSUMER_SOURCE="$sample" \
  -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log"
cmake --build "$work/cmake" >>"$work/cmake.log"
out1=$("$work/cmake/consumer" "$model" 6)
echo "$out1"

echo "== pkg-config consumer"
export PKG_CONFIG_PATH="$libdir/pkgconfig"
pkg-config --exists dsrt
[ "$(pkg-config --modversion dsrt)" = "$(sed -n 's/^project(dsrt VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")" ]
cc -o "$work/pc-consumer" "$sample" $(pkg-config --cflags --libs dsrt)
out2=$("$work/pc-consumer" "$model" 6)
echo "$out2"

echo "== the installed dsrt tool"
"$prefix/bin/dsrt" --version
out3=$("$prefix/bin/dsrt" generate -m "$model" --tokens 0,5,17,42 -n 6 --temperature 0 --threads 2)
echo "$out3"
[ -n "$out1" ] && [ "$out1" = "$out2" ] && [ "$out1" = "$out3" ] || { echo "the three programs disagree"; exit 1; }
echo "install OK"
