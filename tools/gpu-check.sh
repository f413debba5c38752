#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with .carry/ carried (made here by
# tools/reference/prepare-carry.sh). Writes everything under $OUT.
#  1. The independent reference: transformers' DeepseekV3ForCausalLM in fp32 on every tiny preset, compared
#     with dsrt's logits and greedy tokens; its outputs are the test data in tests/data/reference/.
#  2. The CUDA build and GPU suite arrive with the CUDA backend (issue "CUDA backend on one GPU").
set -uo pipefail
: "${OUT:?run through the device tool}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
models=""
for d in .carry/tiny/*/; do n=$(basename "$d"); models="$models $n=$d"; done
python3 tools/reference/hf_reference.py --out "$OUT" --dsrt .carry/dsrt $models 2>&1 | tee "$OUT/reference.log"
