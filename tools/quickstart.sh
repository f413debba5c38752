#!/usr/bin/env bash
# Installs the build dependencies (Debian 12), builds dsrt (the `dsrt` command, libdsrt.so and the C sample),
# and generates text with it. With no model directory given it first makes a tiny random
# DeepSeek-V3-architecture checkpoint: its words are nonsense, but every part of the runtime runs.
#   tools/quickstart.sh [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release | grep -E "^-- dsrt:" || true
cmake --build build --target dsrt_cli dsrt dsrt_example_c dsrt_chat
model="${1:-}"
if [ -z "$model" ]; then
  model=build/tiny-v3-mini
  [ -f "$model/config.json" ] || build/dsrt make-tiny --preset v3-mini --out "$model"
  echo
  echo "Made $model: a tiny model with DeepSeek-V3's architecture and RANDOM weights (a few MB)."
  echo "Everything runs as it would on a real checkpoint, but the text it writes is nonsense."
fi
echo
echo "== dsrt inspect --model $model"
build/dsrt inspect --model "$model"
echo
echo "== dsrt generate --model $model --prompt \"Once upon a time\" -n 32 --verbose"
build/dsrt generate --model "$model" --prompt "Once upon a time" -n 32 --temperature 0 --verbose
echo
echo "Built: build/dsrt (the command), build/libdsrt.so (the C library), build/dsrt_example_c (a C program"
echo "using it), build/dsrt_chat. Next, try:"
printf '  %-56s # %s\n' "build/dsrt chat --model $model" "an interactive chat (/help inside)" \
  "build/dsrt generate --help" "every option, with its default" \
  "cmake --install build --prefix ~/.local" "the library, dsrt.h, dsrt.pc, the CMake package"
