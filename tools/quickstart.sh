#!/usr/bin/env bash
# Installs the build dependencies (Debian 12), builds dsrt, and generates tokens with it. With no model
# directory given it first makes a tiny random DeepSeek-V3-architecture checkpoint.
#   tools/quickstart.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target dsrt_cli
model="${1:-}"
if [ -z "$model" ]; then
  model=build/tiny-v3-mini
  [ -f "$model/config.json" ] || build/dsrt make-tiny --preset v3-mini --out "$model"
fi
build/dsrt inspect --model "$model"
echo "greedy ids after the prompt 0,5,17,42:"
build/dsrt generate --model "$model" --tokens 0,5,17,42 -n 24 --temperature 0 --print-ids
