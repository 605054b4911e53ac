#!/usr/bin/env python3
"""PyTorch + PEFT reference for the fine-tuning benchmark.

A plain LoRA (r, alpha = r, dropout 0, all seven projections; what corda-finetune
--corda_mode false --lora_r R trains, and the same shapes as a CorDA adapter of rank r) on a
float32 model, AdamW (torch, lr 2e-5, betas 0.9/0.999, eps 1e-8, weight decay 0), gradient
clipping at 1.0 like the HF Trainer, batches of --batch examples of exactly --seq tokens built
from DATA/train.jsonl with the reference SFT tokenisation (prompt template, source masked with
-100, truncation at --seq), --threads threads. After --warmup steps, --steps steps are timed.

Prints JSON: seconds per step (median, mean, each), tokens/s (non-padding input tokens per
second, the same definition as corda-finetune's), forward / backward / optimizer seconds, peak
RSS (getrusage ru_maxrss).
"""
import argparse
import json
import os
import resource
import statistics
import time

PROMPT = ("Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Response:")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True, help="jsonl with query and response fields")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="transformers' per-decoder-layer activation checkpointing (use_reentrant=False)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU device check)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the frozen base weights (bfloat16 = the Trainer's --bf16 with a bf16 model)")
    a = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    import peft
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    res = {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads()}

    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    rows = [json.loads(l) for l in open(a.train) if l.strip()]
    ids_list, labels_list = [], []
    for row in rows:
        source = PROMPT.format_map({"instruction": row["query"]})
        full = source + row["response"] + "</s>"
        src = tok.encode(source).ids[: a.seq]
        ids = tok.encode(full).ids[: a.seq]
        labels = [-100] * len(src) + ids[len(src):]
        ids_list.append(ids)
        labels_list.append(labels)
    assert all(len(x) == a.seq for x in ids_list), "every training example must have --seq tokens"
    need = (a.warmup + a.steps) * a.batch
    while len(ids_list) < need:
        ids_list += ids_list
        labels_list += labels_list

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    res["gradient_checkpointing"] = a.gradient_checkpointing
    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res["device"], res["dtype"] = a.device, a.dtype
    config = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, bias="none", init_lora_weights=True,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    # LoRA factors (and so AdamW's state) in float32, as corda-finetune keeps them.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_parameters"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    res["rss_after_load_bytes"] = rss_bytes()

    step_s, fwd_s, bwd_s, opt_s, losses = [], [], [], [], []
    for step in range(a.warmup + a.steps):
        lo = step * a.batch
        input_ids = torch.tensor(ids_list[lo: lo + a.batch], device=a.device)
        labels = torch.tensor(labels_list[lo: lo + a.batch], device=a.device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.dtype == "bfloat16"):
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        sync()
        t1 = time.perf_counter()
        out.loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        losses.append(out.loss.item())
        if step >= a.warmup:
            step_s.append(t3 - t0)
            fwd_s.append(t1 - t0)
            bwd_s.append(t2 - t1)
            opt_s.append(t3 - t2)
    tokens = a.batch * a.seq
    med = statistics.median(step_s)
    res.update({
        "batch": a.batch, "seq": a.seq, "r": a.r, "warmup_steps": a.warmup, "timed_steps": a.steps,
        "step_seconds": step_s, "median_step_seconds": med, "mean_step_seconds": statistics.mean(step_s),
        "tokens_per_second": tokens / med,
        "forward_seconds": statistics.median(fwd_s), "backward_seconds": statistics.median(bwd_s),
        "optimizer_seconds": statistics.median(opt_s), "losses": losses,
        "peak_rss_bytes": rss_bytes(),
    })
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    s = json.dumps(res, indent=1)
    print(s)
    if a.out:
        with open(a.out, "w") as f:
            f.write(s)


if __name__ == "__main__":
    main()
