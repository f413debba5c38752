#!/usr/bin/env python3
"""Expected tokenizer ids and rendered chat templates, from the reference implementations.

Runs where Hugging Face `tokenizers`, `tiktoken`, `sentencepiece` and `transformers` are installed (the GPU
machine). Inputs: tests/data/text/corpus.json (tricky strings as base64 bytes) and template_cases.json, and
a folder of tokenizer files (tools/reference/prepare-carry.sh copies them from shared/data/tokenizers).
Outputs, into OUT: expected_ids.json and rendered.json, which tests/test_text_reference.cpp compares with.

  - deepseek-v3: tokenizers.Tokenizer.from_file(tokenizer.json).encode(text, add_special_tokens=False)
    (added tokens such as <｜User｜> in the text are matched, as the library does by default)
  - kimi-k2: tiktoken.Encoding(pat_str = Kimi's tokenization_kimi.py pattern, ranks = tiktoken.model)
    .encode_ordinary(text)
  - sentencepiece models: SentencePieceProcessor(model_file).encode(text)
  - templates: transformers' own chat-template Jinja environment (_compile_jinja_template), rendered with
    messages, tools, add_generation_prompt, bos_token and eos_token, as apply_chat_template does.
Invalid UTF-8 cannot reach these libraries (they take str): such cases are decoded with errors="replace" and
the resulting text (with U+FFFD) is recorded beside its ids.

usage: text_reference.py --data tests/data/text --tokenizers .carry/tokenizers --out OUT
"""
import argparse, base64, json, os, sys, time

KIMI_PAT = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizers", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import tokenizers, tiktoken, sentencepiece, transformers
    from transformers.utils.chat_template_utils import _compile_jinja_template

    corpus = json.load(open(os.path.join(a.data, "corpus.json")))["cases"]
    texts = {}
    for c in corpus:
        raw = base64.b64decode(c["b64"])
        texts[c["name"]] = raw.decode("utf-8", errors="replace")

    encoders = {}
    hf = tokenizers.Tokenizer.from_file(os.path.join(a.tokenizers, "deepseek-v3", "tokenizer.json"))
    encoders["deepseek-v3"] = lambda s: hf.encode(s, add_special_tokens=False).ids
    ranks = {}
    for line in open(os.path.join(a.tokenizers, "kimi-k2", "tiktoken.model"), "rb"):
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    kimi = tiktoken.Encoding(name="kimi", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens={})
    encoders["kimi-k2"] = kimi.encode_ordinary
    for name, path in [("spm-test", "sentencepiece-test/test_model.model"),
                       ("spm-test-ja", "sentencepiece-test/test_ja_model.model"),
                       ("llama2", "llama2/tokenizer.model")]:
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(a.tokenizers, path))
        encoders[name] = (lambda p: (lambda s: p.encode(s)))(sp)

    expected = {"how": __doc__.split("\n\n")[1] if False else "tools/reference/text_reference.py (see its docstring)",
                "versions": {"tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
                             "sentencepiece": sentencepiece.__version__, "transformers": transformers.__version__},
                "tokenizers": {}}
    for tname, enc in encoders.items():
        expected["tokenizers"][tname] = {
            name: {"text_b64": base64.b64encode(s.encode("utf-8")).decode(), "ids": list(enc(s))}
            for name, s in texts.items()}

    # Encode speed of the reference, on plain English (one thread), for the perf log.
    english = (texts["english"] + " ") * 20000
    os.environ["RAYON_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    n = len(hf.encode(english, add_special_tokens=False).ids)
    dt = time.perf_counter() - t0
    expected["reference_speed"] = {"deepseek-v3_hf_tokenizers_MBps": len(english.encode()) / dt / 1e6, "tokens": n}
    print(f"HF tokenizers: {len(english.encode()) / dt / 1e6:.1f} MB/s on {len(english.encode())} bytes", flush=True)
    json.dump(expected, open(os.path.join(a.out, "expected_ids.json"), "w"), indent=0, ensure_ascii=False)

    cfgs = {"deepseek-v3": "deepseek-v3/tokenizer_config.json", "deepseek-r1": "deepseek-r1-cdn/tokenizer_config.json",
            "kimi-k2": "kimi-k2/tokenizer_config.json"}
    rendered = {"how": "transformers " + transformers.__version__ + " _compile_jinja_template(chat_template).render("
                       "messages, tools, add_generation_prompt, bos_token, eos_token)", "cases": {}}
    compiled = {}
    specials = {}
    for k, p in cfgs.items():
        c = json.load(open(os.path.join(a.tokenizers, p)))
        compiled[k] = _compile_jinja_template(c["chat_template"])
        tok = lambda v: v["content"] if isinstance(v, dict) else v
        specials[k] = {"bos_token": tok(c.get("bos_token")), "eos_token": tok(c.get("eos_token"))}
    for case in json.load(open(os.path.join(a.data, "template_cases.json")))["cases"]:
        kw = dict(messages=case["messages"], tools=case.get("tools"), add_generation_prompt=case["add_generation_prompt"],
                  **specials[case["template"]])
        try:
            rendered["cases"][case["name"]] = {"ok": True, "text": compiled[case["template"]].render(**kw)}
        except Exception as e:  # a template may reject a conversation: we must fail as well
            rendered["cases"][case["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    json.dump(rendered, open(os.path.join(a.out, "rendered.json"), "w"), indent=1, ensure_ascii=False)
    print(f"{len(rendered['cases'])} template cases rendered; tokenizers: {list(encoders)}", flush=True)


if __name__ == "__main__":
    main()
