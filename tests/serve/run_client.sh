#!/usr/bin/env bash
# ctest entry serve.openai_client: the official OpenAI npm client (a client nobody here wrote) against
# `dsrt serve` on loopback. Usage: run_client.sh DSRT_BINARY MODEL_DIR NPM_DIR
# The package is looked for in NPM_DIR/node_modules (a build folder). It is installed there with npm only when
# DSRT_NPM_INSTALL=1 (CI sets it in .ci/run; it needs the npm registry); otherwise a missing package makes the
# test report "skipped" (exit 77), so an offline build never fails on it and never fetches silently.
set -euo pipefail
dsrt="$1" model="$2" npm_dir="$3"
here="$(cd "$(dirname "$0")" && pwd)"
command -v node >/dev/null || { echo "SKIPPED: node is not installed"; exit 77; }
if [ ! -f "$npm_dir/node_modules/openai/package.json" ]; then
  if [ "${DSRT_NPM_INSTALL:-0}" != 1 ]; then
    echo "SKIPPED: the openai npm package is not in $npm_dir (DSRT_NPM_INSTALL=1 installs it with npm)"
    exit 77
  fi
  command -v npm >/dev/null || { echo "npm is not installed"; exit 1; }
  mkdir -p "$npm_dir"
  cp "$here/package.json" "$npm_dir/package.json"
  (cd "$npm_dir" && npm install --no-audit --no-fund --loglevel=error)
fi
exec node "$here/client.mjs" "$dsrt" "$model" "$npm_dir"
