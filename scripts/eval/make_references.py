#!/usr/bin/env python3
"""Reference outputs of transformers for corda-eval's parity tests (tests/fixtures/eval/*.json).

For each model: the token ids of tests/data/public_domain.txt, the mean NLL of every
non-overlapping window (`model(ids, labels=ids).loss`, float32, as the perplexity protocol), and
the greedy continuations of a batch of prompts of different lengths (left padding,
`generate(do_sample=False)`), so the Rust side can check tokenization, perplexity and KV-cache
generation without torch.

    /tmp/venv-torch/bin/python scripts/eval/make_references.py [--smol /tmp/smol/hf]

The SmolLM2 reference runs on the float32 Hugging Face conversion of the GGUF file in
../shared/models/smollm2-135m-instruct (made by its gguf2hf.py); the Rust test loads the GGUF.
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join(ROOT, "tests", "data", "public_domain.txt")
KNOWLEDGE = os.path.join(ROOT, "tests", "data", "knowledge.jsonl")
MATH = os.path.join(ROOT, "tests", "data", "math.jsonl")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response:")


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def qa_prompt(shots, question):
    def q(s):
        s = s.strip()
        return s if s.endswith("?") else s + "?"
    out = "".join(f"Q: {q(s['question'])}\nA: {s['answer'][0].strip()}\n\n" for s in shots)
    return out + f"Q: {q(question)}\nA:"


def prompts():
    k = rows(KNOWLEDGE)
    m = rows(MATH)
    return [
        qa_prompt(k[:2], k[10]["question"]),
        qa_prompt([], k[11]["question"]),
        qa_prompt(k[:5], k[12]["question"]),
        ALPACA.format(m[0]["query"]),
    ]


def reference(model_dir, seq_len, max_new_tokens):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    text = open(TEXT).read()
    ids = tok(text)["input_ids"]
    n = len(ids) // seq_len
    nll = []
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
            nll.append(model(x, labels=x).loss.item())
    ps = prompts()
    tok.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    if tok.pad_token_id is None:
        tok.pad_token_id = pad
    enc = tok(ps, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos)
    width = enc["input_ids"].shape[1]
    new = []
    for row in out[:, width:].tolist():
        cut = []
        for t in row:
            cut.append(t)
            if t in eos:
                break
        new.append(cut)
    prompt_ids = [tok(p)["input_ids"] for p in ps]
    return {
        "generated_by": "scripts/eval/make_references.py (transformers "
                        + __import__("transformers").__version__ + ", torch " + torch.__version__ + ")",
        "text_file": "tests/data/public_domain.txt",
        "text_ids": ids,
        "seq_len": seq_len,
        "window_nll": nll,
        "prompts": ps,
        "prompt_ids": prompt_ids,
        "eos_ids": eos,
        "pad_id": pad,
        "max_new_tokens": max_new_tokens,
        "new_tokens": new,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smol", default="/tmp/smol/hf")
    args = ap.parse_args()
    out = os.path.join(ROOT, "tests", "fixtures", "eval")
    os.makedirs(out, exist_ok=True)
    tiny = os.path.join(ROOT, "tests", "fixtures", "peft-tiny-llama", "base-model")
    jobs = [("peft-tiny-llama.json", tiny, 128, 24), ("smollm2-135m.json", args.smol, 128, 40)]
    for name, model_dir, seq_len, max_new in jobs:
        ref = reference(model_dir, seq_len, max_new)
        with open(os.path.join(out, name), "w") as f:
            json.dump(ref, f)
            f.write("\n")
        print(name, "windows", len(ref["window_nll"]), "nll", ref["window_nll"][:3],
              "new", [len(t) for t in ref["new_tokens"]])


if __name__ == "__main__":
    main()
