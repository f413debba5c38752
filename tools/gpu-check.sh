#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with .carry/ carried (made here by
# tools/reference/prepare-carry.sh). Writes everything under $OUT. Stages (default: all):
#   models  transformers' DeepseekV3ForCausalLM in fp32 on every tiny preset vs dsrt's logits and greedy
#           tokens (the test data in tests/data/reference/)
#   text    tokenizer ids and rendered chat templates from the reference libraries (tests/data/text/)
#   v3      dsrt bench --profile on the v3-layers preset (DeepSeek-V3 layer shapes, made there); V3_PROMPTS,
#           V3_BATCHES, V3_CTX, V3_GEN (comma lists) and V3_TIMEOUT choose the table; V3_ARGS adds options
#           (e.g. --max-batch-tokens 4096 --precision fp32)
#   decode  dsrt bench (no per-op events) on v3-layers, with CUDA graphs and without (DSRT_CUDA_GRAPHS=0):
#           step time, GPU time and host overhead; V3_BATCHES, V3_CTX, V3_GEN as for v3
#   ops     dsrt bench --ops --sweep: every GEMV shape of a V3 decode step against the copy rate
#   comm    dsrt bench --comm: NCCL's collectives on V3's shapes between every GPU of the machine (one: a
#           world of one), queued and host-waited; COMM_GPUS picks fewer
#   tests   the GPU suite alone (CUDA backend vs CPU, op by op and end to end)
#   offload dsrt bench with expert offload on v3-layers made with uniform and Zipf-skewed routing
#           (OFFLOAD_SKEWS, default "0 1"): per run SHARE:POLICY[:CPU] of OFFLOAD_RUNS, the routed experts'
#           bytes the GPU budget holds beside the non-expert weights and the default KV pool, the expert cache policy
#           (DSRT_EXPERT_CACHE) and where missed experts run (gpu, cold: --cold-experts-on-cpu, all:
#           --experts-on-cpu); OFFLOAD_BATCHES, OFFLOAD_GEN; OFFLOAD_ARGS adds options to every run;
#           OFFLOAD_LAYERS=N makes v3-layers with N hidden layers (make-tiny --layers: 1 dense, N-1 MoE)
#   cuda    the GPU suite, compute-sanitizer memcheck and
#           racecheck on it, and `dsrt bench --backend cuda` on the tiny presets. It runs the binaries in
#           .carry/gpu (built here for sm_90a with the same CUDA 13.0 toolkit: the GPU machine's image lacks
#           the Debian -dev packages the build needs) with the shared libraries tools/carry-gpu.sh copies.
# The exit status is non-zero when any stage fails (a test, a sanitizer, a bench, a reference comparison).
set -uo pipefail
: "${OUT:?run through the device tool}"
export PYTHONUNBUFFERED=1
stages="${*:-models text}"
# cuBLASLt (dlopen()ed by dsrt for the FP8 GEMM): the image has it in PyTorch's nvidia-* wheels.
lt_dir=$(python3 - <<'PY'
import glob, os, sys
for p in sys.path + ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]:
    hits = glob.glob(os.path.join(p, "nvidia", "*", "lib", "libcublasLt.so.1*")) + glob.glob(os.path.join(p, "libcublasLt.so.1*"))
    if hits:
        print(os.path.dirname(sorted(hits)[-1])); break
PY
)
[ -n "$lt_dir" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$lt_dir"
echo "cuBLASLt from: ${lt_dir:-not found}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
fail() { echo "FAILED: $*"; status=1; }
gpu_env() {
  export LD_LIBRARY_PATH="$PWD/.carry/gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  bin=.carry/gpu/bin
}
gpu_tests() {  # the GPU suite; its summary lines and every relative error it reports
  $bin/dsrt_gpu_tests "$@" >"$OUT/gpu_tests.log" 2>&1 || fail "dsrt_gpu_tests $*"
  grep -E "MESSAGE: .*(CUDA vs CPU|worst relative L2|relative L2 per sequence)|ERROR|test cases" "$OUT/gpu_tests.log" | cut -c1-220
}
for stage in $stages; do
  case "$stage" in
    models)
      models=""
      for d in .carry/tiny/*/; do [ -d "$d" ] && models="$models $(basename "$d")=$d"; done
      python3 tools/reference/hf_reference.py --out "$OUT" --dsrt .carry/dsrt $models 2>&1 | tee "$OUT/models.log"
      [ "${PIPESTATUS[0]}" = 0 ] || fail "models" ;;
    text)
      python3 tools/reference/text_reference.py --data tests/data/text --tokenizers .carry/tokenizers --out "$OUT" 2>&1 | tee "$OUT/text.log"
      [ "${PIPESTATUS[0]}" = 0 ] || fail "text" ;;
    tests)  # the GPU suite alone
      gpu_env
      $bin/dsrt info
      gpu_tests ;;
    offload)
      gpu_env
      layers_arg=${OFFLOAD_LAYERS:+--layers $OFFLOAD_LAYERS}
      for skew in ${OFFLOAD_SKEWS:-0 1}; do
        d=/tmp/v3-layers${OFFLOAD_LAYERS:+-$OFFLOAD_LAYERS}-skew$skew
        [ -f $d/config.json ] || /usr/bin/time -f "make-tiny v3-layers $layers_arg --route-skew $skew: %e s" \
          $bin/dsrt make-tiny --preset v3-layers $layers_arg --route-skew "$skew" --out $d
        # The checkpoint's routed-expert bytes (with their scales) and the rest, from the shards' headers, and
        # the default KV pool a budget keeps room for (runtime/model/model.cpp, kv_pool_spec: BF16, every layer
        # and MTP layer, min(max_position_embeddings, 16384) tokens in 64-token pages).
        read -r non_expert experts kv < <(python3 - "$d" <<'PY'
import glob, json, struct, sys
part = [0, 0]
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        for name, t in json.loads(fh.read(n)).items():
            if name != "__metadata__":
                part[".mlp.experts." in name] += t["data_offsets"][1] - t["data_offsets"][0]
c = json.load(open(sys.argv[1] + "/config.json"))
pages = -(-min(c["max_position_embeddings"], 16384) // 64)
layers = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)
print(part[0], part[1], pages * 64 * layers * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2)
PY
)
        for run in ${OFFLOAD_RUNS:-1:lfu 0.5:lfu 0.25:lfu 0.25:lru 0.25:off 0.1:lfu}; do
          IFS=: read -r share policy cpu <<<"$run"
          case "${cpu:-gpu}" in gpu) cpu_arg= ;; cold) cpu_arg=--cold-experts-on-cpu ;; all) cpu_arg=--experts-on-cpu ;; esac
          budget=$(python3 -c "print(int($non_expert + $kv + $share * $experts))")
          echo "== routing skew $skew: experts on the GPU $share, cache $policy, missed experts on the ${cpu:-gpu} (budget $budget B: $non_expert non-expert + $kv KV pool + share of $experts)" | tee -a "$OUT/offload.log"
          DSRT_EXPERT_CACHE=$policy timeout "${V3_TIMEOUT:-300}" $bin/dsrt bench --model $d --backend cuda --prompt 512 \
            --batch "${OFFLOAD_BATCHES:-1,8}" --ctx 128 --gen "${OFFLOAD_GEN:-32}" --gpu-memory "$budget" $cpu_arg ${OFFLOAD_ARGS:-} 2>&1 |
            tee -a "$OUT/offload.log" | grep -E "expert offload:|experts on the CPU:|^decode|^prefill|rror"
          [ "${PIPESTATUS[0]}" = 0 ] || fail "offload bench: skew $skew, share $share, $policy, ${cpu:-gpu}"
        done
        # A model of several MoE layers is 30-60 GB: one at a time on the machine's disk.
        [ -n "${OFFLOAD_LAYERS:-}" ] && rm -rf "$d"
      done ;;
    cuda)
      gpu_env
      $bin/dsrt info
      gpu_tests
      compute-sanitizer --tool memcheck --error-exitcode 3 $bin/dsrt_gpu_tests -tce="end to end*,op by op*" >"$OUT/memcheck.log" 2>&1 || fail "memcheck"
      grep -m3 -A6 "Invalid\|Error" "$OUT/memcheck.log"; tail -2 "$OUT/memcheck.log"
      compute-sanitizer --tool racecheck --error-exitcode 3 $bin/dsrt_gpu_tests -tc="MLA*,MoE*" -tce="*40000*" >"$OUT/racecheck.log" 2>&1 || fail "racecheck"
      grep -m3 -A6 "Warning\|Error" "$OUT/racecheck.log"; tail -2 "$OUT/racecheck.log"
      for p in partial-yarn no-qlora v3-mini bf16; do
        $bin/dsrt make-tiny --preset $p --out /tmp/tiny-$p 2>/dev/null
        $bin/dsrt bench --model /tmp/tiny-$p --backend cuda --prompt 64 --batch 1,8 --gen 16 2>&1 | tee -a "$OUT/bench.log"
        [ "${PIPESTATUS[0]}" = 0 ] || fail "bench $p"
      done ;;
    comm)
      gpu_env
      $bin/dsrt bench --comm ${COMM_GPUS:+--gpus $COMM_GPUS} 2>&1 | tee "$OUT/comm.log"
      [ "${PIPESTATUS[0]}" = 0 ] || fail "bench --comm" ;;
    ops)
      gpu_env
      $bin/dsrt bench --ops --sweep 2>&1 | tee "$OUT/ops.log"
      [ "${PIPESTATUS[0]}" = 0 ] || fail "bench --ops" ;;
    decode)
      gpu_env
      [ -f /tmp/v3-layers/config.json ] || /usr/bin/time -f "make-tiny v3-layers: %e s" $bin/dsrt make-tiny --preset v3-layers --out /tmp/v3-layers
      for graphs in 1 0; do
        DSRT_CUDA_GRAPHS=$graphs timeout "${V3_TIMEOUT:-400}" $bin/dsrt bench --model /tmp/v3-layers --backend cuda --prompt 512 \
          --batch ${V3_BATCHES:-1,8,32} --ctx ${V3_CTX:-128,4096} --gen ${V3_GEN:-32} 2>&1 | tee "$OUT/decode-graphs$graphs.log"
        [ "${PIPESTATUS[0]}" = 0 ] || fail "decode bench (graphs $graphs)"
      done ;;
    v3)  # DeepSeek-V3 layer shapes (~16 GB written to /tmp): decode and prefill beside their rooflines
      gpu_env
      [ -f /tmp/v3-layers/config.json ] || /usr/bin/time -f "make-tiny v3-layers: %e s" $bin/dsrt make-tiny --preset v3-layers --out /tmp/v3-layers
      timeout "${V3_TIMEOUT:-400}" $bin/dsrt bench --model /tmp/v3-layers --backend cuda --prompt ${V3_PROMPTS:-512,4096} \
        --batch ${V3_BATCHES:-1,8,32,128} --ctx ${V3_CTX:-128} --gen ${V3_GEN:-16} --profile ${V3_ARGS:-} 2>&1 | tee "$OUT/bench-v3.log"
      [ "${PIPESTATUS[0]}" = 0 ] || fail "bench v3-layers" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
[ "$status" = 0 ] && echo "gpu-check: every stage passed ($stages)" || echo "gpu-check: FAILED ($stages)"
exit "$status"
