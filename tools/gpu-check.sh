#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with .carry/ carried (made here by
# tools/reference/prepare-carry.sh). Writes everything under $OUT. Stages (default: all):
#   models  transformers' DeepseekV3ForCausalLM in fp32 on every tiny preset vs dsrt's logits and greedy
#           tokens (the test data in tests/data/reference/)
#   text    tokenizer ids and rendered chat templates from the reference libraries (tests/data/text/)
# The CUDA build and GPU suite join as a stage with the CUDA backend.
set -uo pipefail
: "${OUT:?run through the device tool}"
export PYTHONUNBUFFERED=1
stages="${*:-models text}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for stage in $stages; do
  case "$stage" in
    models)
      models=""
      for d in .carry/tiny/*/; do [ -d "$d" ] && models="$models $(basename "$d")=$d"; done
      python3 tools/reference/hf_reference.py --out "$OUT" --dsrt .carry/dsrt $models 2>&1 | tee "$OUT/models.log" ;;
    text)
      python3 tools/reference/text_reference.py --data tests/data/text --tokenizers .carry/tokenizers --out "$OUT" 2>&1 | tee "$OUT/text.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
