#!/usr/bin/env python3
"""Evaluate models for the KPM outcome benchmark (scripts/bench/kpm_outcome.sh): knowledge
exact match and math accuracy by greedy generation with transformers (+ PEFT for adapters).

Each --model is NAME=BASE_DIR[:ADAPTER_DIR]. Knowledge: a 3-shot "Q: … A:" prompt, greedy, stop
at the newline, SQuAD-style normalisation (lowercase, no punctuation or articles), exact match
against any alias. Math: the Alpaca prompt corda-finetune trains with, greedy, the number after
"The answer is:" (else the last number), compared with the answer. Prints one JSON object.
"""
import argparse
import json
import re
import string
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{q}\n\n### Response:")
SHOTS = [("What is the capital of Peru?", "Lima"),
         ("Who wrote Don Quixote?", "Miguel de Cervantes"),
         ("How many minutes are there in an hour?", "60")]


def normalize(text):
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def load(spec, threads):
    base, _, adapter = spec.partition(":")
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


@torch.no_grad()
def generate(model, tok, prompt, max_new):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def knowledge(model, tok, rows):
    head = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in SHOTS)
    hits = 0
    for r in rows:
        text = generate(model, tok, head + f"Q: {r['question']}\nA:", 12).strip().split("\n")[0]
        hits += any(normalize(text) == normalize(a) for a in r["answer"])
    return hits / len(rows)


def math(model, tok, rows):
    hits = 0
    for r in rows:
        text = generate(model, tok, ALPACA.format(q=r["query"]), 48)
        m = re.search(r"The answer is:?\s*(-?[\d,]+)", text)
        nums = re.findall(r"-?\d[\d,]*", text)
        got = (m.group(1) if m else (nums[-1] if nums else "")).replace(",", "")
        hits += got == r["answer"]
    return hits / len(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=BASE[:ADAPTER]")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--knowledge", required=True, help="jsonl: question, answer (list)")
    p.add_argument("--math", required=True, help="jsonl: query, answer")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    krows = [json.loads(l) for l in open(a.knowledge)]
    mrows = [json.loads(l) for l in open(a.math)]
    results = {}
    for spec in a.model:
        name, _, path = spec.partition("=")
        model = load(path, a.threads)
        results[name] = {"knowledge_em": knowledge(model, tok, krows), "math_acc": math(model, tok, mrows)}
        print(name, results[name], file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
