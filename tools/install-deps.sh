#!/usr/bin/env bash
# The Debian 12 packages dsrt builds and tests with. The CUDA toolkit (13, in /usr/local/cuda) is optional.
set -euo pipefail
run() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
pkgs="cmake ninja-build g++ pkg-config binutils libmimalloc-dev nlohmann-json3-dev libcli11-dev libcpp-httplib-dev doctest-dev libsentencepiece-dev libpcre2-dev libgloo-dev mono-mcs mono-runtime golang-go clang libclang-rt-14-dev"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  run apt-get update
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
fi
