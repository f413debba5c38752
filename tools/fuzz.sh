#!/usr/bin/env bash
# Builds the libFuzzer targets (CMake preset `fuzz`: clang, ASan + UBSan) and runs each for SECONDS
# (default 30) from its seed corpus in tests/fuzz/corpus/. Findings go to build-fuzz/findings/TARGET/ and make
# the script fail. usage: tools/fuzz.sh [SECONDS] [TARGET...]
# DSRT_FUZZ_SEED fixes libFuzzer's seed (0 = random).
# DSRT_FUZZ_FIXED_RUNS=1 (what tools/test.sh, hence CI, uses) runs each target a fixed number of inputs instead
# of for SECONDS: with a fixed seed and a fresh corpus directory the run is then the same on every machine, so
# CI's verdict can be reproduced exactly before a push. The counts take about 20 s each on a 2-core CI box;
# open-ended campaigns (docs/reliability.md) use SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
targets="${*:-safetensors index config generation_config tokenizer_json tokenizer_config chat_template session_state tokenize}"
cmake --preset fuzz >/dev/null
cmake --build build-fuzz -j "$(nproc)" --target $(for t in $targets; do printf 'fuzz_%s ' "$t"; done)
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
status=0 passed=0 failed=0
for t in $targets; do
  work=build-fuzz/corpus/$t findings=build-fuzz/findings/$t
  mkdir -p "$work" "$findings"
  cp -n tests/fuzz/corpus/$t/* "$work/" 2>/dev/null || true
  log=build-fuzz/fuzz_$t.log
  budget=(-max_total_time="$secs")
  if [ -n "${DSRT_FUZZ_FIXED_RUNS:-}" ]; then
    case $t in
      safetensors) n=80000 ;; index) n=25000 ;; config) n=300000 ;; generation_config) n=100000 ;;
      tokenizer_json) n=45000 ;; tokenizer_config) n=35000 ;; chat_template) n=60000 ;; session_state) n=1200 ;;
      tokenize) n=150000 ;; *) n=20000 ;;
    esac
    budget=(-runs="$n" -max_total_time=600)  # the time cap only guards against a hang
  fi
  if build-fuzz/tests/fuzz/fuzz_$t "$work" "${budget[@]}" -seed="${DSRT_FUZZ_SEED:-0}" -max_len=65536 -timeout=20 -rss_limit_mb=4096 \
       -artifact_prefix="$findings/" -print_final_stats=1 >"$log" 2>&1; then
    runs=$(grep -m1 -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "fuzz_$t: $runs runs, corpus $(ls "$work" | wc -l) inputs, no findings"
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "fuzz_$t: FINDING (see $log and $findings/)"
    tail -30 "$log"
    status=1
  fi
done
echo "fuzz: $passed passed, $failed failed"
exit $status
