#!/usr/bin/env bash
# Builds dsrt (CUDA parts too when nvcc is found) and runs every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
cd build && ctest --output-on-failure -j "$(nproc)"
