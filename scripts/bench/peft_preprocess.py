#!/usr/bin/env python3
"""PEFT reference for the preprocess benchmark: `preprocess_corda` + `get_peft_model`.

Reads the same model directory and the same calibration file (DATA/calib.jsonl, tokenised with
the model's tokenizer.json by the `tokenizers` library, BOS added, truncated to --seq) as
corda-preprocess, and prints one JSON object:

  load_seconds            AutoModelForCausalLM.from_pretrained (float32)
  forward_only_seconds    the calibration forward pass alone (no hooks), measured first
                          (after one warm-up sample)
  calibration_seconds     PEFT's calib_cov_distribution (forward + covariance hooks)
  covariance_seconds      calibration_seconds - forward_only_seconds (the hooks' cost)
  decomposition_seconds   PEFT's collect_eigens (damping loop with inverses, W @ C, SVD)
  inverse_seconds, svd_seconds   the torch.linalg.inv / torch.linalg.svd calls inside it
  crop_seconds            crop_corda_eigens
  get_peft_model_seconds  get_peft_model (corda_init: A, B and the residual of every module)
  save_seconds            save_pretrained of the residual model and the adapter (with --save_dir)
  total_seconds           preprocess_corda + get_peft_model (+ save when asked)
  peak_rss_bytes          getrusage ru_maxrss at the end (the process's high-water mark)
  peak_gpu_bytes          torch.cuda.max_memory_allocated (with --device cuda)

Calibration runs one sample per forward pass, as PEFT's hook requires (it squeezes dim 0).
"""
import argparse
import json
import os
import resource
import sys
import time


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="jsonl with a text field per row")
    ap.add_argument("--text_field", default="text", help="the field of each row to tokenize")
    ap.add_argument("--n", type=int, default=16, help="calibration samples")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sample")
    ap.add_argument("--rows", action="store_true",
                    help="one sample per row, truncated to --seq (real questions are short)")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--mode", default="kpm", choices=["kpm", "ipm"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save_dir", default=None, help="also save the residual model + adapter here")
    ap.add_argument("--skip_forward_only", action="store_true", help="do not time a hook-free forward pass")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU device check)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()

    t_import = time.perf_counter()
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    import peft
    import peft.tuners.lora.corda as corda_mod
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res = {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
           "import_seconds": time.perf_counter() - t_import}

    # Identical token ids to corda-preprocess --calib_sampling rows --calib_max_length SEQ.
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    rows = [json.loads(l) for l in open(a.calib) if l.strip()][: a.n]
    samples = [tok.encode(r[a.text_field]).ids[: a.seq] for r in rows]
    if len(samples) < a.n or (not a.rows and any(len(s) != a.seq for s in samples)):
        sys.exit(f"calibration file gives {len(samples)} samples of lengths {sorted({len(s) for s in samples})}, "
                 f"need {a.n} x {a.seq}")
    res["samples"] = len(samples)
    res["tokens"] = sum(len(s) for s in samples)
    res["first_ids"] = samples[0][:8]

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).to(a.device)
    model.eval()
    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    res["load_seconds"] = time.perf_counter() - t
    res["rss_after_load_bytes"] = rss_bytes()
    res["device"], res["dtype"] = a.device, a.dtype

    inputs = [torch.tensor([s], dtype=torch.long, device=a.device) for s in samples]

    @torch.no_grad()
    def run_model():
        for ids in inputs:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        sync()

    if not a.skip_forward_only:
        with torch.no_grad():  # one warm-up sample (first-call allocations), then the timed pass
            model(input_ids=inputs[0], attention_mask=torch.ones_like(inputs[0]))
        t = time.perf_counter()
        run_model()
        res["forward_only_seconds"] = time.perf_counter() - t

    # Time PEFT's phases by wrapping its module-level functions (looked up at call time).
    timers = {"calibration_seconds": 0.0, "decomposition_seconds": 0.0, "crop_seconds": 0.0,
              "inverse_seconds": 0.0, "svd_seconds": 0.0, "inverse_calls": 0, "svd_calls": 0}

    def timed(fn, key):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timers[key] += time.perf_counter() - t0
        return wrapper

    corda_mod.calib_cov_distribution = timed(corda_mod.calib_cov_distribution, "calibration_seconds")
    corda_mod.collect_eigens = timed(corda_mod.collect_eigens, "decomposition_seconds")
    corda_mod.crop_corda_eigens = timed(corda_mod.crop_corda_eigens, "crop_seconds")
    inv, svd = torch.linalg.inv, torch.linalg.svd

    def inv_t(*args, **kw):
        timers["inverse_calls"] += 1
        return timed(inv, "inverse_seconds")(*args, **kw)

    def svd_t(*args, **kw):
        timers["svd_calls"] += 1
        return timed(svd, "svd_seconds")(*args, **kw)

    torch.linalg.inv, torch.linalg.svd = inv_t, svd_t

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(init_lora_weights="corda", target_modules=targets, r=a.r, lora_alpha=a.r,
                        lora_dropout=0.0, corda_config=CordaConfig(corda_method=a.mode))
    t0 = time.perf_counter()
    corda_mod.preprocess_corda(model, config, run_model=run_model)
    res["preprocess_corda_seconds"] = time.perf_counter() - t0
    torch.linalg.inv, torch.linalg.svd = inv, svd
    t = time.perf_counter()
    pmodel = get_peft_model(model, config)
    res["get_peft_model_seconds"] = time.perf_counter() - t
    if a.save_dir:
        t = time.perf_counter()
        # As examples/corda_finetuning/preprocess.py --save_model does.
        pmodel.peft_config["default"].init_lora_weights = True
        pmodel.save_pretrained(os.path.join(a.save_dir, "corda_init"))
        pmodel.unload().save_pretrained(a.save_dir)
        res["save_seconds"] = time.perf_counter() - t
    res["total_seconds"] = time.perf_counter() - t0
    res.update(timers)
    if "forward_only_seconds" in res:
        res["covariance_seconds"] = res["calibration_seconds"] - res["forward_only_seconds"]
    res["peak_rss_bytes"] = rss_bytes()
    if cuda:
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    s = json.dumps(res, indent=1)
    print(s)
    if a.out:
        with open(a.out, "w") as f:
            f.write(s)


if __name__ == "__main__":
    main()
