#!/usr/bin/env bash
# Builds dsrt (CUDA parts too when nvcc is found) and runs every test that needs no GPU; then the same suite
# under AddressSanitizer + UndefinedBehaviorSanitizer; then every libFuzzer target for a short run.
#   tools/test.sh            all three
#   DSRT_QUICK=1 tools/test.sh   the plain suite only
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
jobs="$(nproc)"
cmake --preset release
cmake --build build -j "$jobs"
(cd build && ctest --output-on-failure -j "$jobs")
[ -n "${DSRT_QUICK:-}" ] && exit 0
cmake --preset asan
cmake --build build-asan -j "$jobs"
ctest --preset asan -j "$jobs"
DSRT_FUZZ_SEED="${DSRT_FUZZ_SEED:-1}" DSRT_FUZZ_FIXED_RUNS=1 tools/fuzz.sh "${DSRT_FUZZ_SECONDS:-30}"
