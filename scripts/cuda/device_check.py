#!/usr/bin/env python3
"""Helpers of scripts/cuda/device_check.sh (standard library + torch; no transformers needed).

  env                      the machine: GPU, driver, torch, nvcc, Python (JSON)
  make-model DIR ...       a random Llama-shaped model (config.json, model.safetensors, the
                           fixture's tokenizer files) made with torch, on the GPU when there is one
  matmul --device D        measured matmul rates (bf16, fp32, tf32 for n x n, and the XᵀX shape)
  gpu-peak OUT -- CMD...   run CMD, sampling its GPU memory (nvidia-smi) every 50 ms; JSON to OUT
  compare-preprocess A B   max relative differences between two corda-preprocess outputs:
                           residual weights and s·B·A per module (sign-free), covariances
  compare-losses A B       two trainer_state.json: the logged losses and their largest difference
  summarize DIR            DIR/steps/*.json -> DIR/device_check.json and DIR/device_check.md
"""
import json
import os
import struct
import subprocess
import sys
import time

DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
          "I64": ("int64", 8)}


def read_safetensors(path):
    """name -> float32 torch tensor (CPU)."""
    import torch
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        dt = getattr(torch, DTYPES[info["dtype"]][0])
        t = torch.frombuffer(bytearray(data[b:e]), dtype=dt) if e > b else torch.zeros(0, dtype=dt)
        out[name] = t.reshape(info["shape"]).float()
    return out


def write_safetensors(path, tensors):
    """tensors: name -> torch tensor (any device); written in their dtype."""
    import torch
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        raw = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def cmd_env(_args):
    res = {"python": sys.version.split()[0], "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, cmd in [("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"]),
                     ("nvcc", ["nvcc", "--version"]), ("cpu", ["sh", "-c", "lscpu | grep 'Model name'"]),
                     ("glibc", ["ldd", "--version"])]:
        try:
            res[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[-1 if key == "nvcc" else 0]
        except Exception as e:  # recorded, not fatal
            res[key] = f"unavailable: {e}"
    try:
        import torch
        res["torch"] = torch.__version__
        res["torch_cuda"] = torch.version.cuda
        res["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            res["gpu"] = torch.cuda.get_device_name(0)
            res["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except Exception as e:
        res["torch"] = f"unavailable: {e}"
    print(json.dumps(res, indent=1))


def write_word_tokenizer(d):
    """A word-level tokenizer like corda-demo's (`<unk>`, `<s>`, `</s>`, whitespace words, `<s>`
    in front of every text); scripts/bench/make_inputs.py then fills its vocabulary."""
    special = [("<unk>", 0), ("<s>", 1), ("</s>", 2)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in special]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"},
           "post_processor": {"type": "TemplateProcessing",
                              "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                       {"Sequence": {"id": "B", "type_id": 0}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
           "decoder": None,
           "model": {"type": "WordLevel", "vocab": {t: i for t, i in special}, "unk_token": "<unk>"}}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "model_max_length": 4096,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)


def cmd_make_model(a):
    import argparse
    import torch
    p = argparse.ArgumentParser(prog="make-model")
    p.add_argument("dir")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(a)
    os.makedirs(a.dir, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, a.dtype)
    g = torch.Generator(device=dev).manual_seed(a.seed)
    h, i = a.hidden, a.inter

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dt)

    t = {"model.embed_tokens.weight": rnd(a.vocab, h), "model.norm.weight": torch.ones(h, dtype=dt),
         "lm_head.weight": rnd(a.vocab, h)}
    for l in range(a.layers):
        p_ = f"model.layers.{l}."
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            t[p_ + f"self_attn.{n}.weight"] = rnd(h, h)
        t[p_ + "mlp.gate_proj.weight"] = rnd(i, h)
        t[p_ + "mlp.up_proj.weight"] = rnd(i, h)
        t[p_ + "mlp.down_proj.weight"] = rnd(h, i)
        t[p_ + "input_layernorm.weight"] = torch.ones(h, dtype=dt)
        t[p_ + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dt)
    write_safetensors(os.path.join(a.dir, "model.safetensors"), t)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "hidden_size": h, "intermediate_size": i, "max_position_embeddings": 4096,
           "num_attention_heads": a.heads, "num_hidden_layers": a.layers, "num_key_value_heads": a.heads,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": a.dtype,
           "vocab_size": a.vocab, "use_cache": False}
    with open(os.path.join(a.dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    write_word_tokenizer(a.dir)
    params = sum(x.numel() for x in t.values())
    print(json.dumps({"dir": a.dir, "parameters": params, "layers": a.layers, "hidden": h, "inter": i,
                      "heads": a.heads, "vocab": a.vocab, "dtype": a.dtype, "made_on": dev}))


def cmd_matmul(a):
    import argparse
    import torch
    p = argparse.ArgumentParser(prog="matmul")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=16384, help="rows of the XᵀX shape")
    a = p.parse_args(a)
    dev = a.device
    res = {"device": dev}

    def rate(fn, flop, reps=10):
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return flop * reps / (time.perf_counter() - t) / 1e12

    n = a.n
    for name, dt, tf32 in [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False), ("tf32", torch.float32, True)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(n, n, device=dev, dtype=dt)
        y = torch.randn(n, n, device=dev, dtype=dt)
        res[f"{name}_tflops_n{n}"] = round(rate(lambda: x @ y, 2 * n ** 3, 3 if dev == "cpu" else 10), 2)
        for d in (4096, 11008):
            if dev == "cpu" and d > 4096:
                continue
            xs = torch.randn(a.tokens, d, device=dev, dtype=dt)
            res[f"{name}_xtx_tflops_d{d}"] = round(rate(lambda: xs.t() @ xs, 2 * a.tokens * d * d, 2 if dev == "cpu" else 10), 2)
            del xs
        del x, y
    torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps(res, indent=1))


def gpu_used_mib(pid):
    """(this process tree's MiB, the whole GPU's MiB) from nvidia-smi, or (None, None)."""
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=5).stdout
        total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True, timeout=5).stdout
    except Exception:
        return None, None
    mine = 0
    for line in apps.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) == pid:
            mine += int(parts[1]) if parts[1].isdigit() else 0
    try:
        return mine, int(total.strip().splitlines()[0])
    except Exception:
        return mine, None


def cmd_gpu_peak(a):
    out, cmd = a[0], a[a.index("--") + 1:]
    _, base = gpu_used_mib(-1)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_proc, peak_total = 0, 0
    while proc.poll() is None:
        mine, total = gpu_used_mib(proc.pid)
        if mine is not None:
            peak_proc = max(peak_proc, mine)
        if total is not None:
            peak_total = max(peak_total, total)
        time.sleep(0.05)
    res = {"cmd": cmd, "rc": proc.returncode, "seconds": time.perf_counter() - t0,
           "peak_gpu_mib_process": peak_proc if base is not None else None,
           "peak_gpu_mib_over_baseline": (peak_total - base) if base is not None else None}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    sys.exit(proc.returncode)


def rel(a, b):
    scale = max(b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def cmd_compare_preprocess(a):
    import torch
    x, y = a[0], a[1]
    res = {"a": x, "b": y}
    wa, wb = read_safetensors(os.path.join(x, "model.safetensors")), read_safetensors(os.path.join(y, "model.safetensors"))
    res["residual_max_rel"] = max(rel(wa[k], wb[k]) for k in wb)
    aa = read_safetensors(os.path.join(x, "corda_init", "adapter_model.safetensors"))
    ab = read_safetensors(os.path.join(y, "corda_init", "adapter_model.safetensors"))
    worst = 0.0
    for k in ab:
        if "lora_A" in k:
            kb = k.replace("lora_A", "lora_B")
            worst = max(worst, rel(aa[kb] @ aa[k], ab[kb] @ ab[k]))
    res["adapter_BA_max_rel"] = worst
    res["modules"] = sum(1 for k in ab if "lora_A" in k)
    for name in ["cov.safetensors"]:
        pa, pb = os.path.join(os.path.dirname(x), os.path.basename(x) + "-" + name), os.path.join(os.path.dirname(y), os.path.basename(y) + "-" + name)
        if os.path.exists(pa) and os.path.exists(pb):
            ca, cb = read_safetensors(pa), read_safetensors(pb)
            res["covariance_max_rel"] = max(rel(ca[k], cb[k]) for k in cb if ca[k].numel())
    print(json.dumps(res, indent=1))


def cmd_compare_losses(a):
    def losses(p):
        h = json.load(open(p))["log_history"]
        return [e["loss"] for e in h if "loss" in e]
    la, lb = losses(a[0]), losses(a[1])
    res = {"a": la, "b": lb, "steps": min(len(la), len(lb)),
           "max_abs_diff": max((abs(p - q) for p, q in zip(la, lb)), default=None),
           "max_rel_diff": max((abs(p - q) / max(abs(q), 1e-12) for p, q in zip(la, lb)), default=None)}
    print(json.dumps(res, indent=1))


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def cmd_summarize(a):
    d = a[0]
    steps_dir = os.path.join(d, "steps")
    res = {"steps": {}}
    stems = sorted({n.rsplit(".", 1)[0] for n in os.listdir(steps_dir) if n.endswith((".status", ".json"))})
    for step in stems:
        entry = {}
        for ext, key in ((".status", "status"), (".json", "result")):
            pj = os.path.join(steps_dir, step + ext)
            if os.path.exists(pj):
                try:
                    entry[key] = json.load(open(pj))
                except Exception as e:
                    entry[key + "_error"] = str(e)
        res["steps"][step] = entry
    derived = {}
    s = res["steps"]

    def get(step, *keys):
        v = s.get(step, {}).get("result")
        for k in keys:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v

    layers = get("make_model", "layers")
    ours_wall = get("ours_pre_7b", "wall_seconds")
    peft_total = get("peft_pre_7b", "total_seconds")
    if layers and ours_wall:
        derived["ours_preprocess_seconds_per_layer"] = ours_wall / layers
    if layers and peft_total:
        derived["peft_preprocess_seconds_per_layer"] = peft_total / layers
    if ours_wall and peft_total:
        derived["preprocess_time_ratio_ours_over_peft"] = ours_wall / peft_total
    for k in ("ours_pre_7b_gpu", "ours_ft_7b_gpu"):
        if get(k, "peak_gpu_mib_process") is not None:
            derived[k.replace("_gpu", "") + "_peak_gpu_mib"] = get(k, "peak_gpu_mib_process")
    for k in ("peft_pre_7b", "peft_ft_7b"):
        if get(k, "peak_gpu_bytes") is not None:
            derived[k + "_peak_gpu_mib"] = get(k, "peak_gpu_bytes") / 2 ** 20
    ours_ft_mem, peft_ft_mem = get("ours_ft_7b_gpu", "peak_gpu_mib_process"), get("peft_ft_7b", "peak_gpu_bytes")
    if ours_ft_mem and peft_ft_mem:
        derived["finetune_peak_gpu_ratio_ours_over_peft"] = ours_ft_mem * 2 ** 20 / peft_ft_mem
    ours_mem = get("ours_pre_7b_gpu", "peak_gpu_mib_process")
    peft_mem = get("peft_pre_7b", "peak_gpu_bytes")
    if ours_mem and peft_mem:
        derived["preprocess_peak_gpu_ratio_ours_over_peft"] = ours_mem * 2 ** 20 / peft_mem
    ours_tps = get("ours_ft_7b", "tokens_per_second")
    peft_tps = get("peft_ft_7b", "tokens_per_second")
    if ours_tps and peft_tps:
        derived["finetune_tokens_per_second_ratio_ours_over_peft"] = ours_tps / peft_tps
    cov = next((ph["seconds"] for ph in (get("ours_pre_7b", "phases") or [])
                if ph.get("phase") == "calibration forward + covariance"), None)
    tokens = get("ours_pre_7b", "tokens")
    hidden, inter = get("make_model", "hidden"), get("make_model", "inter")
    if cov and tokens and hidden and layers:
        # Full XᵀX per layer: three input sites of width hidden (q/k/v, o, gate/up), one of inter.
        flop = 2.0 * tokens * (3 * hidden ** 2 + inter ** 2) * layers
        secs = cov
        if secs:
            derived["covariance_tflops_including_forward"] = flop / secs / 1e12
            for k in ("fp32_xtx_tflops_d4096", "bf16_xtx_tflops_d4096"):
                r = get("matmul", k)
                if r:
                    derived[f"covariance_fraction_of_{k}"] = flop / secs / 1e12 / r
    res["derived"] = derived
    with open(os.path.join(d, "device_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# Device check", ""]
    envr = get("env") or {}
    lines.append(f"Machine: {envr.get('gpu', '?')} ({envr.get('nvidia_smi', '?')}), torch {envr.get('torch', '?')}, "
                 f"{envr.get('time_utc', '')}")
    lines += ["", "| step | rc | seconds | note |", "|---|---|---|---|"]
    for step, e in s.items():
        st = e.get("status", {"note": "(result only)"})
        lines.append(f"| {step} | {st.get('rc')} | {fmt(st.get('seconds'))} | {st.get('note', '')} |")
    lines += ["", "## Derived", ""]
    for k, v in derived.items():
        lines.append(f"- {k}: {fmt(v)}")
    for step in ("parity_pre_kpm", "parity_pre_ipm", "parity_pre_half", "parity_ft_f32", "parity_ft_bf16", "matmul"):
        r = get(step)
        if r:
            lines += ["", f"## {step}", "", "```", json.dumps(r, indent=1), "```"]
    with open(os.path.join(d, "device_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"env": cmd_env, "make-model": cmd_make_model, "matmul": cmd_matmul, "gpu-peak": cmd_gpu_peak,
     "compare-preprocess": cmd_compare_preprocess, "compare-losses": cmd_compare_losses,
     "summarize": cmd_summarize}[cmd](rest)


if __name__ == "__main__":
    main()
