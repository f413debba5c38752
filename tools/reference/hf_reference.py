#!/usr/bin/env python3
"""Independent reference logits for dsrt's tiny checkpoints, from Hugging Face transformers.

Runs where PyTorch and transformers are installed (the GPU machine; a CPU is enough). For each checkpoint
directory given, it dequantises the FP8 weights exactly as the spec defines (fp8 value x block scale, in
fp32), drops the MTP layer (transformers does not run it), loads the result into transformers'
DeepseekV3ForCausalLM in fp32 with eager attention, and computes
  - the logits of every position of a fixed prompt (float32 [T, vocab], written to OUT/ref_<name>.bin), and
  - 24 greedy tokens after that prompt (full recompute each step),
and writes them with the prompt and the library versions to OUT/reference.json. With --dsrt DIR, it also
compares against dsrt's own output for the same prompt (DIR/<name>.bin logits, DIR/<name>.json greedy ids)
and prints the relative L2 error per position and whether the greedy tokens match.

usage: hf_reference.py --out OUT [--dsrt DIR] NAME=CHECKPOINT_DIR ...
"""
import argparse, hashlib, json, math, os, sys, tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file


def prompt_tokens(vocab, n=80):
    # Fixed and deterministic: the same function is in tests/test_reference.cpp. 80 tokens cross a 64-token page.
    return [0] + [(i * 7919 + 13) % vocab for i in range(1, n)]


def dequantised_state(ckpt_dir, n_layers):
    idx_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx_path))["weight_map"].values()))
    raw = {}
    for f in files:
        raw.update(load_file(os.path.join(ckpt_dir, f)))
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= n_layers:
                continue  # the MTP layer
        if t.dtype == torch.float8_e4m3fn:
            s = raw[name + "_scale_inv"].float()
            rows, cols = t.shape
            full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            out[name] = t.float() * full
        else:
            out[name] = t.float()
    return out


def shard_digest(ckpt_dir):
    h = hashlib.sha256()
    for f in sorted(os.listdir(ckpt_dir)):
        if f.endswith(".safetensors"):
            h.update(open(os.path.join(ckpt_dir, f), "rb").read())
    return h.hexdigest()


def run_one(name, ckpt_dir, out_dir, dsrt_dir, report):
    cfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    n_layers = cfg["num_hidden_layers"]
    state = dequantised_state(ckpt_dir, n_layers)
    hf_cfg = dict(cfg)
    hf_cfg.pop("quantization_config", None)
    hf_cfg["torch_dtype"] = "float32"
    hf_cfg["num_nextn_predict_layers"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(hf_cfg, open(os.path.join(tmp, "config.json"), "w"))
        save_file(state, os.path.join(tmp, "model.safetensors"))
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    missing = list(info.get("missing_keys", []))
    unexpected = list(info.get("unexpected_keys", []))
    if missing:
        raise SystemExit(f"{name}: transformers left parameters uninitialised: {missing[:8]}")
    model.eval()
    vocab = cfg["vocab_size"]
    prompt = prompt_tokens(vocab)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(ids, use_cache=False).logits[0].float().contiguous()
        greedy = []
        seq = list(prompt)
        for _ in range(24):
            nxt = int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            greedy.append(nxt)
            seq.append(nxt)
    logits.numpy().astype("<f4").tofile(os.path.join(out_dir, f"ref_{name}.bin"))
    top2 = torch.topk(logits, 2, dim=-1).values
    entry = {"checkpoint_sha256": shard_digest(ckpt_dir), "vocab": vocab, "prompt": prompt,
             "greedy": greedy, "unexpected_keys": unexpected[:8],
             "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min())}
    if dsrt_dir:
        d = torch.from_numpy(__import__("numpy").fromfile(os.path.join(dsrt_dir, f"{name}.bin"), dtype="<f4"))
        d = d.view(len(prompt), vocab)
        rel = ((d - logits).norm(dim=-1) / logits.norm(dim=-1)).tolist()
        dg = json.load(open(os.path.join(dsrt_dir, f"{name}.json")))["greedy"]
        entry["dsrt_max_rel_l2"] = max(rel)
        entry["dsrt_rel_l2_first8"] = rel[:8]
        entry["dsrt_greedy_match"] = dg == greedy
        entry["dsrt_greedy"] = dg
        print(f"{name}: max rel L2 {max(rel):.3e} (worst position {rel.index(max(rel))}); "
              f"greedy match {dg == greedy}", flush=True)
    report[name] = entry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dsrt")
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    report = {"how": "tools/reference/hf_reference.py: transformers DeepseekV3ForCausalLM, fp32, eager attention, "
                     "CPU, on the FP8 weights dequantised as fp8 x block scale",
              "transformers": transformers.__version__, "torch": torch.__version__, "presets": {}}
    for spec in a.models:
        name, d = spec.split("=", 1)
        run_one(name, d, a.out, a.dsrt, report["presets"])
    json.dump(report, open(os.path.join(a.out, "reference.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
