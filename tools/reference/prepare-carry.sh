#!/usr/bin/env bash
# Makes the tiny checkpoints and dsrt's own logits/greedy ids for them into .carry/ (git-ignored), the folder
# the GPU machine's run receives; tools/gpu-check.sh there compares them with transformers.
set -euo pipefail
cd "$(dirname "$0")/../.."
dsrt=build/dsrt
rm -rf .carry && mkdir -p .carry/tiny .carry/dsrt
for p in partial-yarn no-qlora v3-mini bf16; do
  $dsrt make-tiny --preset "$p" --out ".carry/tiny/$p" --seed 1 2>/dev/null
  V=$(python3 -c "import json;print(json.load(open('.carry/tiny/$p/config.json'))['vocab_size'])")
  T=$(python3 -c "print(','.join(str(x) for x in [0]+[(i*7919+13)%$V for i in range(1,80)]))")
  $dsrt eval --model ".carry/tiny/$p" --tokens "$T" --logits-out ".carry/dsrt/$p.bin" 2>/dev/null
  echo "{\"greedy\": [$($dsrt generate --model ".carry/tiny/$p" --tokens "$T" -n 24 --print-ids)]}" > ".carry/dsrt/$p.json"
done
# The real tokenizer files for tools/reference/text_reference.py.
shared=../shared/data/tokenizers
mkdir -p .carry/tokenizers
for d in deepseek-v3 deepseek-r1-cdn kimi-k2 sentencepiece-test llama2; do cp -r "$shared/$d" .carry/tokenizers/; done
du -sh .carry
