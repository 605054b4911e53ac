#!/usr/bin/env python3
"""Benchmark inputs for a model directory written by corda-demo (standard library only).

1. Replaces MODEL/tokenizer.json by a word-level tokenizer with as many entries as the model's
   vocab_size (`<unk>`=0, `<s>`=1, `</s>`=2, then letter-only words), keeping the demo
   tokenizer's BOS post-processor. The demo vocabulary has ~250 words, so calibration text drawn
   from it would give every layer-0 covariance a rank of at most ~250 (every damping loop then
   doubles many times); with a Llama-2-sized vocabulary (32000) the inputs are full-rank like
   real text.
2. Writes DATA/calib.jsonl: N rows {"text": ...} of random words, each exactly SEQ tokens once
   the BOS is added (corda-preprocess --calib_sampling rows --calib_max_length SEQ and
   peft_preprocess.py read the same file with the same tokenizer.json, so both see the same ids).
3. Writes DATA/train.jsonl: rows {"query", "response"} long enough that the reference SFT
   tokenisation truncated at SEQ gives exactly SEQ tokens per example (for corda-finetune and
   peft_train.py).
"""
import argparse
import json
import os
import random


def word(i: int) -> str:
    """A letter-only word for index i (base-26), prefixed so no word is a real one."""
    s = ""
    i += 1
    while i > 0:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return "q" + s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory from corda-demo (tokenizer.json is replaced)")
    ap.add_argument("--data", required=True, help="output directory for calib.jsonl and train.jsonl")
    ap.add_argument("--calib_samples", type=int, default=64)
    ap.add_argument("--train_rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    cfg = json.load(open(os.path.join(a.model, "config.json")))
    vocab_size = int(cfg["vocab_size"])
    tok_path = os.path.join(a.model, "tokenizer.json")
    tok = json.load(open(tok_path))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words = []
    for i in range(vocab_size - 3):
        w = word(i)
        vocab[w] = i + 3
        words.append(w)
    tok["model"]["vocab"] = vocab
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    with open(tok_path, "w") as f:
        json.dump(tok, f)

    rng = random.Random(a.seed)
    os.makedirs(a.data, exist_ok=True)
    with open(os.path.join(a.data, "calib.jsonl"), "w") as f:
        for _ in range(a.calib_samples):
            # BOS + (SEQ - 1) words = SEQ tokens; a few more words so truncation decides.
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(a.seq + 8))}) + "\n")
    with open(os.path.join(a.data, "train.jsonl"), "w") as f:
        for _ in range(a.train_rows):
            q = " ".join(rng.choice(words) for _ in range(32))
            r = " ".join(rng.choice(words) for _ in range(a.seq * 2))
            f.write(json.dumps({"query": q, "response": r}) + "\n")
    print(f"tokenizer: {vocab_size} words; {a.calib_samples} calibration rows and {a.train_rows} training rows "
          f"of {a.seq} tokens in {a.data}")


if __name__ == "__main__":
    main()
