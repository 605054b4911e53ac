#!/usr/bin/env python3
"""Summarise scripts/bench/run.sh output (OUT/runs/*) into markdown tables (standard library only).

    python3 scripts/bench/summarize.py scripts/bench/out > scripts/bench/out/results.md
"""
import glob
import json
import os
import re
import statistics
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "out")
RUNS = os.path.join(OUT, "runs")


def time_file(name):
    """(wall seconds, max RSS bytes, exit status) from /usr/bin/time -v, or None."""
    p = os.path.join(RUNS, name + ".time")
    if not os.path.exists(p):
        return None
    txt = open(p).read()
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", txt)
    parts = [float(x) for x in m.group(1).split(":")] if m else [0]
    wall = 0.0
    for x in parts:
        wall = wall * 60 + x
    mr = re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt)
    if not mr:  # still running
        return None
    rss = int(mr.group(1)) * 1024
    st = re.search(r"Exit status: (\d+)", txt)
    status = int(st.group(1)) if st else 0
    if "Command terminated by signal" in txt:
        status = -1
    return wall, rss, status


def load_json(name):
    p = os.path.join(RUNS, name + ".json")
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None


DISTURBED = []


def disturbed(n):
    p = os.path.join(RUNS, n + ".disturbed")
    return os.path.exists(p) and os.path.getsize(p) > 0


def names(prefix):
    """Successful runs named prefix_r<k>, in round order; runs during which cargo/rustc ran are
    left out when undisturbed ones exist."""
    out = []
    for p in sorted(glob.glob(os.path.join(RUNS, prefix + "_r*.time"))):
        n = os.path.basename(p)[:-5]
        t = time_file(n)
        if t and t[2] == 0:
            out.append(n)
    clean = [n for n in out if not disturbed(n)]
    if clean and len(clean) < len(out):
        DISTURBED.extend(n for n in out if disturbed(n))
        return clean
    return out


def cpu_of(ns):
    """The CPUs (runs/NAME.cpu, written by run.sh: model; family/model; flags) the runs ran on."""
    out = []
    for n in ns:
        p = os.path.join(RUNS, n + ".cpu")
        c = open(p).read().strip() if os.path.exists(p) else "(CPU not recorded)"
        if c not in out:
            out.append(c)
    return out


def cpu_note(*groups):
    """A line naming the CPU of every run in the groups; mixed CPUs are called out."""
    cs = cpu_of([n for g in groups for n in g])
    if not cs:
        return ""
    if len(cs) == 1:
        return f"CPU of every row: {cs[0]}\n"
    return "**Rows come from different CPUs** (compare only rows of one CPU): " + " | ".join(cs) + "\n"


def ft_ours(ns, seq, batch=4):
    """(tokens/s, s/step, peak RSS) per corda-finetune run: medians of the steps after warm-up."""
    tok, step, rss = [], [], []
    warm = int(os.environ.get("FT_WARMUP", "2"))
    for x in ns:
        st = load_json(x) or {}
        tps = [e["tokens_per_second"] for e in st.get("log_history", [])
               if "tokens_per_second" in e and "loss" in e and e["step"] > warm]
        if tps:
            tok.append(statistics.median(tps))
            step.append(batch * seq / statistics.median(tps))
            rss.append(time_file(x)[1])
    return tok, step, rss


def ft_peft(ns):
    """(tokens/s, s/step, peak RSS) per peft_train.py run."""
    js = [load_json(x) or {} for x in ns]
    return ([j.get("tokens_per_second") for j in js], [j.get("median_step_seconds") for j in js],
            [time_file(x)[1] for x in ns])


def rss_trace(n):
    """(max VmRSS, max RssAnon, max RssFile) in bytes from rss_trace.sh, or None."""
    p = os.path.join(RUNS, n + ".rss.tsv")
    if not os.path.exists(p):
        return None
    for line in open(p):
        if line.startswith("max"):
            return tuple(int(x) * 1048576 for x in line.split()[1:4])
    return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def gb(b):
    return f"{b / 1e9:.2f}" if b else "–"


# Phase names of older binaries, read as today's.
PHASE_ALIASES = {"decomposition (damping, inverse, SVD)": ("decomposition (not overlapped)",)}


def phase(rep, key):
    if not rep:
        return None
    keys = (key,) + PHASE_ALIASES.get(key, ())
    return sum(p["seconds"] for p in rep.get("phases", []) if p["phase"] in keys) or 0.0


def ratio(a, b):
    return f"{a / b:.3f}x" if a and b else "–"


def verdict(r, limit, higher_better=False):
    if r is None:
        return "not measured"
    ok = r >= limit if higher_better else r <= limit
    return "**met**" if ok else "**not met**"


print("# Benchmark results\n")
mt = os.path.join(OUT, "machine.txt")
if os.path.exists(mt):
    print("Machine:\n")
    print("```\n" + open(mt).read().strip() + "\n```\n")

# ---------------------------------------------------------------- preprocess
sizes = sorted({int(m.group(1)) for p in glob.glob(os.path.join(RUNS, "pre_*_n*_r*.time"))
                for m in [re.search(r"_n(\d+)_r", p)] if m})
pre_summary = {}
if sizes:
    print("## Preprocess: 4 layers, hidden 1024, intermediate 2816, 16 heads, vocab 32000, float32, r 64, KPM\n")
    print("Medians over the A/B rounds (min–max in brackets). Wall and peak RSS are /usr/bin/time's for the "
          "whole process (interpreter start, imports, model load and writing the outputs included on both sides); "
          "PEFT's wall has the diagnostic hook-free forward pass of peft_preprocess.py (and its one-sample warm-up) "
          "taken off.\n")
    print(cpu_note(*[names(f"pre_{side}_n{n}") for n in sizes for side in ("ours", "peft")]))
    print("| samples x 256 | side | rounds | wall (s) | peak RSS (GB) | calibration fwd + cov (s) | decomposition (s) | of which inverse / SVD (s) | write / save (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        ours = names(f"pre_ours_n{n}")
        peft = names(f"pre_peft_n{n}")
        ow = [time_file(x)[0] for x in ours]
        orss = [time_file(x)[1] for x in ours]
        # peft_preprocess.py times a hook-free forward pass (after a one-sample warm-up) before
        # PEFT's own work, for the covariance split; that pass is not PEFT's cost: take it off.
        pw = [time_file(x)[0] - ((load_json(x) or {}).get("forward_only_seconds", 0.0) * (1 + 1 / n)) for x in peft]
        prss = [time_file(x)[1] for x in peft]
        oj = [load_json(x) for x in ours]
        pj = [load_json(x) for x in peft]
        print(f"| {n} | corda-preprocess | {len(ours)} | {spread(ow)} | {gb(med(orss))} | "
              f"{spread([phase(j, 'calibration forward + covariance') for j in oj])} | "
              f"{spread([phase(j, 'decomposition (damping, inverse, SVD)') for j in oj])} | (not split) | "
              f"{spread([phase(j, 'write') for j in oj])} |")
        print(f"| {n} | PEFT | {len(peft)} | {spread(pw)} | {gb(med(prss))} | "
              f"{spread([j and j.get('calibration_seconds') for j in pj])} | "
              f"{spread([j and j.get('decomposition_seconds') for j in pj])} | "
              f"{spread([j and j.get('inverse_seconds') for j in pj])} / {spread([j and j.get('svd_seconds') for j in pj])} | "
              f"{spread([j and j.get('save_seconds') for j in pj])} |")
        pre_summary[n] = dict(ow=med(ow), pw=med(pw), orss=med(orss), prss=med(prss),
                              owork=med([j and j.get("wall_seconds") for j in oj]),
                              pwork=med([j and (j.get("total_seconds", 0) + j.get("load_seconds", 0)) for j in pj]),
                              pfwd=med([j and j.get("forward_only_seconds") for j in pj]),
                              pcov=med([j and j.get("covariance_seconds") for j in pj]),
                              pinv_calls=med([j and j.get("inverse_calls") for j in pj]))
    print()
    print("| samples | wall ratio ours/PEFT (process) | target ≤ 0.25x | wall ratio (work: load + preprocess + write, no interpreter start/imports) | target ≤ 0.25x | peak RSS ratio | target ≤ 0.5x |")
    print("|---|---|---|---|---|---|---|")
    for n, s in pre_summary.items():
        rw = s["ow"] / s["pw"] if s["ow"] and s["pw"] else None
        rk = s["owork"] / s["pwork"] if s["owork"] and s["pwork"] else None
        rm = s["orss"] / s["prss"] if s["orss"] and s["prss"] else None
        print(f"| {n} | {ratio(s['ow'], s['pw'])} | {verdict(rw, 0.25)} | {ratio(s['owork'], s['pwork'])} | {verdict(rk, 0.25)} | "
              f"{ratio(s['orss'], s['prss'])} | {verdict(rm, 0.5)} |")
    print()
    for n, s in pre_summary.items():
        if s["pfwd"] is not None:
            print(f"- PEFT, {n} samples: hook-free forward pass {s['pfwd']:.1f} s, so its covariance hooks cost "
                  f"≈ {s['pcov']:.1f} s; {s['pinv_calls']:.0f} torch.linalg.inv calls (damping loop) for 28 modules.")
    print()

# ---------------------------------------------------------------- fine-tuning
ours = names("ft_ours")
peft = names("ft_peft")
if ours or peft:
    print("## Fine-tuning: same model, LoRA r 64 on all seven projections, batch 4 x 256 tokens, AdamW, float32\n")
    otok, ostep = [], []
    for x in ours:
        st = load_json(x) or {}
        steps = [e for e in st.get("log_history", []) if "tokens_per_second" in e and "loss" in e]
        warm = int(os.environ.get("FT_WARMUP", "2"))
        tps = [e["tokens_per_second"] for e in steps if e["step"] > warm]
        if tps:
            otok.append(statistics.median(tps))
            ostep.append(1024 / statistics.median(tps))
    ptok = [(load_json(x) or {}).get("tokens_per_second") for x in peft]
    pstep = [(load_json(x) or {}).get("median_step_seconds") for x in peft]
    orss = [time_file(x)[1] for x in ours]
    prss = [time_file(x)[1] for x in peft]
    pj = [load_json(x) or {} for x in peft]
    print("Steady-state steps only (the first steps are warm-up). Medians over rounds (min–max).\n")
    print(cpu_note(ours, peft))
    print("| side | rounds | s / step | tokens/s | peak RSS (GB) |")
    print("|---|---|---|---|---|")
    print(f"| corda-finetune | {len(ours)} | {spread(ostep)} | {spread(otok)} | {gb(med(orss))} |")
    print(f"| PyTorch + PEFT | {len(peft)} | {spread(pstep)} | {spread(ptok)} | {gb(med(prss))} |")
    print()
    rt = med(otok) / med(ptok) if med(otok) and med(ptok) else None
    rm = med(orss) / med(prss) if med(orss) and med(prss) else None
    print(f"- tokens/s ratio ours/PyTorch: {rt:.2f}x (target ≥ 1.2x, issue 16): {verdict(rt, 1.2, True)}" if rt else "- tokens/s ratio: –")
    print(f"- peak RSS ratio ours/PyTorch: {rm:.2f}x (target ≤ 1.0x): {verdict(rm, 1.0)}" if rm else "- peak RSS ratio: –")
    if pj and pj[0]:
        print(f"- PyTorch step split (median): forward {med([j.get('forward_seconds') for j in pj]):.2f} s, "
              f"backward {med([j.get('backward_seconds') for j in pj]):.2f} s, "
              f"optimizer {med([j.get('optimizer_seconds') for j in pj]):.2f} s")
    errs = [open(os.path.join(RUNS, x + ".err")).read() for x in ours]
    for e in errs[:1]:
        rows = [l for l in e.splitlines() if re.match(r"^(forward|backward|optimizer|load model|load data)\s", l)]
        if rows:
            print("- corda-finetune phase totals (one run, all steps incl. warm-up): " +
                  "; ".join(" ".join(r.split()[:-1]) + " s" for r in rows))
    print()

# ---------------------------------------------------------------- gradient checkpointing
gc = {k: names(f"gc_{k}") for k in ("ours_plain", "ours_ckpt", "peft_plain", "peft_ckpt")}
if any(gc.values()):
    seq = int(os.environ.get("GC_SEQ", "512"))
    print(f"## Gradient checkpointing: same model, LoRA r 64, batch 4 x {seq} tokens, float32\n")
    print(cpu_note(*gc.values()))
    print("| side | checkpointing | rounds | s / step | tokens/s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    st = {}
    for k, ns in gc.items():
        tok, step, rss = ft_ours(ns, seq) if k.startswith("ours") else ft_peft(ns)
        st[k] = (med(step), med(rss))
        side = "corda-finetune" if k.startswith("ours") else "PyTorch + PEFT"
        print(f"| {side} | {'on' if k.endswith('ckpt') else 'off'} | {len(ns)} | {spread(step)} | {spread(tok)} | {gb(med(rss))} |")
    print()
    for side, label in (("ours", "corda-finetune"), ("peft", "PyTorch + PEFT")):
        (s0, m0), (s1, m1) = st[f"{side}_plain"], st[f"{side}_ckpt"]
        if s0 and s1 and m0 and m1:
            extra = (f" (targets: memory ≤ 0.6x: {verdict(m1 / m0, 0.6)}, step time ≤ 1.35x: {verdict(s1 / s0, 1.35)})"
                     if side == "ours" else "")
            print(f"- {label}: checkpointing on/off peak RSS {m1 / m0:.2f}x, step time {s1 / s0:.2f}x{extra}")
    print()

# ---------------------------------------------------------------- tokens/s against sequence length
seqs = sorted({int(m.group(1)) for p in glob.glob(os.path.join(RUNS, "ftseq_*_s*_r*.time"))
               for m in [re.search(r"_s(\d+)_r", p)] if m})
if seqs:
    print("## Fine-tuning tokens/s against the sequence length (batch 4, LoRA r 64, float32)\n")
    print(cpu_note(*[names(f"ftseq_{side}_s{x}") for x in seqs for side in ("ours", "peft")]))
    print("| tokens per row | corda-finetune tokens/s | PyTorch + PEFT tokens/s | ratio | corda peak RSS (GB) | PyTorch peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for x in seqs:
        ot, _, orss = ft_ours(names(f"ftseq_ours_s{x}"), x)
        pt, _, prss = ft_peft(names(f"ftseq_peft_s{x}"))
        print(f"| {x} | {spread(ot)} | {spread(pt)} | {ratio(med(ot), med(pt))} | {gb(med(orss))} | {gb(med(prss))} |")
    print()

CAL, DEC = "calibration forward + covariance", "decomposition (damping, inverse, SVD)"

# ---------------------------------------------------------------- bfloat16 against float32
bp = {k: names(f"bf16pre_{k}") for k in ("f32", "bf16")}
bt = {k: names(f"bf16ft_{k}") for k in ("f32", "bf16")}
if any(bp.values()) or any(bt.values()):
    print("## bfloat16 frozen weights against float32 (corda only; 4 layers, hidden 1024)\n")
    print(cpu_note(*bp.values(), *bt.values()))
    print("| dtype | preprocess wall, 16 x 256 (s) | calibration fwd + cov (s) | fine-tuning tokens/s (batch 4 x 256) | fine-tuning peak RSS (GB) |")
    print("|---|---|---|---|---|")
    for k, label in (("f32", "float32"), ("bf16", "bfloat16")):
        tok, _, rss = ft_ours(bt[k], 256)
        print(f"| {label} | {spread([time_file(x)[0] for x in bp[k]])} | "
              f"{spread([phase(load_json(x), CAL) for x in bp[k]])} | {spread(tok)} | {gb(med(rss))} |")
    print()

# ---------------------------------------------------------------- preprocess scaling
hs = sorted({int(m.group(1)) for p in glob.glob(os.path.join(RUNS, "prescale_*_h*_r*.time"))
             for m in [re.search(r"_h(\d+)_r", p)] if m})


def pre_row(ours, peft, layers):
    """Per-layer seconds: ours (wall, calibration, decomposition) and PEFT's wall, medians."""
    oj = [load_json(x) for x in ours]
    ow = med([time_file(x)[0] for x in ours])
    pw = med([time_file(x)[0] - ((load_json(x) or {}).get("forward_only_seconds", 0.0)) for x in peft])
    per = lambda v: v / layers if v is not None else None
    return (per(ow), per(med([phase(j, CAL) for j in oj])), per(med([phase(j, DEC) for j in oj])), per(pw))


def f1(v):
    return f"{v:.2f}" if v is not None else "–"


if hs:
    print("## Preprocess time per layer against hidden size (one-layer models, KPM, r 64, float32)\n")
    print(cpu_note(*[names(f"prescale_{side}_h{h}") for h in hs for side in ("ours", "peft")]))
    print("Whole-process wall of a one-layer model (model load, embeddings and LM head included), and "
          "corda-preprocess's calibration and decomposition phases (the decomposition phase is only the part "
          "not overlapped with calibration).\n")
    print("| hidden | corda wall (s) | calibration (s) | decomposition (s) | PEFT wall (s) | ratio |")
    print("|---|---|---|---|---|---|")
    per_layer = {}
    for h in hs:
        w, c, d, p = pre_row(names(f"prescale_ours_h{h}"), names(f"prescale_peft_h{h}"), 1)
        per_layer[h] = (w, p)
        print(f"| {h} | {f1(w)} | {f1(c)} | {f1(d)} | {f1(p)} | {ratio(w, p)} |")
    print()
    if 4096 in per_layer and per_layer[4096][0]:
        w, p = per_layer[4096]
        print(f"- 7B projection (32 layers of the 4096 shape, same tokens): corda-preprocess ≈ {32 * w / 60:.0f} min"
              + (f", PEFT ≈ {32 * p / 60:.0f} min" if p else "") + " (an upper bound: the one-layer wall includes "
              "loading and the LM head once, which a 32-layer run pays once too).\n")
ns = sorted({int(m.group(1)) for p in glob.glob(os.path.join(RUNS, "prescalen_*_n*_r*.time"))
             for m in [re.search(r"_n(\d+)_r", p)] if m})
if ns:
    print("## Preprocess time per layer against calibration tokens (4 layers, hidden 1024, KPM, r 64, float32)\n")
    print(cpu_note(*[names(f"prescalen_{side}_n{n}") for n in ns for side in ("ours", "peft")]))
    print("| samples x 256 | tokens | corda wall / layer (s) | calibration / layer (s) | decomposition / layer (s) | PEFT wall / layer (s) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in ns:
        w, c, d, p = pre_row(names(f"prescalen_ours_n{n}"), names(f"prescalen_peft_n{n}"), 4)
        print(f"| {n} | {n * 256} | {f1(w)} | {f1(c)} | {f1(d)} | {f1(p)} | {ratio(w, p)} |")
    print()

# ---------------------------------------------------------------- real model
ro, rp = names("real_ours"), names("real_peft")
if ro or rp:
    print("## Preprocess on the real model (SmolLM2-135M-Instruct, float32, KPM r 16, one sample per question)\n")
    print(cpu_note(ro, rp))
    oj, pj = [load_json(x) for x in ro], [load_json(x) for x in rp]
    (ow, orss), (pw, prss) = ([[time_file(x)[i] for x in ns] for i in (0, 1)] for ns in (ro, rp))
    print("Whole-process wall and peak RSS (/usr/bin/time); corda's phases from its report, PEFT's from "
          "peft_preprocess.py (calibration hooks, then the damping loop and SVDs).\n")
    print("| side | rounds | wall (s) | peak RSS (GB) | calibration (s) | decomposition (s) | worst error estimate |")
    print("|---|---|---|---|---|---|---|")
    worst = [((j or {}).get("decomposition") or {}).get("max_error_estimate") for j in oj]
    worst = [w for w in worst if w is not None]
    print(f"| corda-preprocess | {len(ro)} | {spread(ow)} | {gb(med(orss))} | {spread([phase(j, CAL) for j in oj])} | "
          f"{spread([phase(j, DEC) for j in oj])} (not overlapped) | {f'{max(worst):.1e}' if worst else '–'} |")
    print(f"| PEFT | {len(rp)} | {spread(pw)} | {gb(med(prss))} | "
          f"{spread([(j or {}).get('calibration_seconds') for j in pj])} | "
          f"{spread([(j or {}).get('decomposition_seconds') for j in pj])} | – |")
    print()
    mo, mp = med(ow), med(pw)
    print(f"- wall ratio ours/PEFT: {ratio(mo, mp)} (target ≤ 0.25x): "
          f"{verdict(mo / mp if mo and mp else None, 0.25)}; peak RSS ratio: {ratio(med(orss), med(prss))}\n")

# ---------------------------------------------------------------- covariance throughput
cands = sorted(glob.glob(os.path.join(RUNS, "cov_q_n*_r*.time")))
if cands:
    n = int(re.search(r"_n(\d+)_r", cands[0]).group(1))
    cfg = json.load(open(os.path.join(OUT, "models", "l4_h1024", "model", "config.json")))
    L, h, i = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    tokens = n * 256
    extra = L * tokens * (2 * h * h + i * i)  # useful FLOP (one triangle) of the o, gate/up, down sites
    allsites = L * tokens * (3 * h * h + i * i)
    print(f"## Covariance accumulation ({n} samples x 256 tokens, {L} layers, corda-preprocess)\n")
    print("The forward pass is the same whichever projections are targeted; the calibration phase grows by the "
          "covariance work of the o_proj, gate/up_proj and down_proj inputs when they are targeted too.\n")
    print("| --calib_batch_size | --target_modules | rounds | calibration forward + covariance (s) |")
    print("|---|---|---|---|")
    rates = {}
    for pre, b in (("cov", 1), ("covb4", 4)):
        q = names(f"{pre}_q_n{n}")
        a4 = names(f"{pre}_all4_n{n}")
        cq = [phase(load_json(x), "calibration forward + covariance") for x in q]
        c4 = [phase(load_json(x), "calibration forward + covariance") for x in a4]
        if not (cq and c4):
            continue
        print(f"| {b} | q_proj (1 input site) | {len(q)} | {spread(cq)} |")
        print(f"| {b} | q_proj,o_proj,gate_proj,down_proj (4 sites) | {len(a4)} | {spread(c4)} |")
        if med(c4) > med(cq):
            rates[b] = (extra / (med(c4) - med(cq)) / 1e9, med(c4), med(c4) - med(cq))
    print()
    peak = 200.0
    try:
        pj = json.load(open(os.path.join(OUT, "peak_matmul.json")))
        peak = max(v for k, v in pj.items() if k.startswith("gflops_2t_") or (k.startswith("numpy_") and "_2t_" in k))
    except (OSError, ValueError, KeyError):
        pass
    for b, (rate, c4, d) in rates.items():
        note = ""
        if rate > peak:
            note = (f" This is above the machine's {peak:.0f} GFLOP/s peak, so the difference of the two runs "
                    f"under-counts the covariance time here (the runs differ by more than the covariance); "
                    f"read it only as 'at least {extra / 1e9 / (d + 1.0):.0f} GFLOP/s' if one second is missing.")
        print(f"- batch {b} (rank-{256 * b} updates): {extra / 1e9:.0f} GFLOP useful (tokens x (2·{h}² + {i}²) per "
              f"layer, one triangle) in {d:.2f} s = **{rate:.0f} GFLOP/s useful** ({2 * rate:.0f} GFLOP/s counted "
              f"as the full product); all four sites ≈ {allsites / 1e9 / rate:.1f} s of the {c4:.1f} s calibration "
              f"phase. Target ≥ 50% of the {peak:.0f} GFLOP/s measured peak: {verdict(rate / peak, 0.5, True)}.{note}")
    print()

# ---------------------------------------------------------------- 7B-shaped stack
big = sorted(glob.glob(os.path.join(RUNS, "big_ours_l*.time")), key=lambda p: int(re.search(r"_l(\d+)", p).group(1)))
if big:
    print("## 7B-shaped stack (hidden 4096, intermediate 11008, 32 heads, vocab 32000, float32): peak memory vs layers\n")
    print("| layers | samples x 256 | wall (s) | peak RSS (GB) | of which heap / mapped files, max (GB) | calibration (s) | decomposition (s) | write (s) | model size (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rss = []
    for p in big:
        nm = os.path.basename(p)[:-5]
        L = int(re.search(r"_l(\d+)", nm).group(1))
        t = time_file(nm)
        if t is None:
            continue
        j = load_json(nm)
        size = (L * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 2 * 32000 * 4096) * 4
        status = "" if t[2] == 0 else " (failed)"
        tr = rss_trace(nm)
        trs = f"{gb(tr[1])} / {gb(tr[2])}" if tr else "–"
        print(f"| {L}{status} | {j and j.get('samples')} | {t[0]:.1f} | {gb(t[1])} | {trs} | "
              f"{phase(j, 'calibration forward + covariance') or 0:.1f} | "
              f"{phase(j, 'decomposition (damping, inverse, SVD)') or 0:.1f} | {phase(j, 'write') or 0:.1f} | {size / 1e9:.2f} |")
        if t[2] == 0:
            rss.append((L, t[1]))
    if len(rss) >= 2:
        (l0, r0), (l1, r1) = rss[0], rss[-1]
        per = (r1 - r0) / (l1 - l0) / 1e9
        print(f"\n- Peak RSS grows {per:.3f} GB per added layer ({l0} → {l1} layers: {gb(r0)} → {gb(r1)} GB), "
              f"against {(4 * 4096 * 4096 + 3 * 4096 * 11008) * 4 / 1e9:.2f} GB of weights per layer.")
    print()

# ---------------------------------------------------------------- memory split
mem = sorted(glob.glob(os.path.join(RUNS, "mem_ours_n*_r1.time")))
if mem:
    print("## Where corda-preprocess's resident memory is (4-layer model, sampled every 0.2 s)\n")
    print("| samples | peak RSS (GB, /usr/bin/time) | max heap RssAnon (GB) | max mapped files RssFile (GB) | model file (GB) |")
    print("|---|---|---|---|---|")
    msize = sum(os.path.getsize(f) for f in glob.glob(os.path.join(OUT, "models", "l4_h1024", "model", "*.safetensors")))
    for p in mem:
        nm = os.path.basename(p)[:-5]
        t, tr = time_file(nm), rss_trace(nm)
        n = re.search(r"_n(\d+)_", nm).group(1)
        print(f"| {n} | {gb(t[1])} | {gb(tr[1]) if tr else '–'} | {gb(tr[2]) if tr else '–'} | {msize / 1e9:.2f} |")
    print()

if DISTURBED:
    print(f"Left out (cargo/rustc started during the run): {', '.join(sorted(set(DISTURBED)))}\n")

# ---------------------------------------------------------------- allocator experiment
groups = [("alloc_ours", "corda-finetune"), ("alloc_ourstuned", "corda-finetune, GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=16G"),
          ("alloc_peft", "PyTorch + PEFT")]
if any(names(g) for g, _ in groups):
    print("## Fine-tuning memory over time and the allocator (same shape as above, RSS sampled every 0.2 s)\n")
    print("| side | rounds | tokens/s | peak RSS (GB) | max heap RssAnon (GB) | max mapped files RssFile (GB) |")
    print("|---|---|---|---|---|---|")
    for g, label in groups:
        ns = names(g)
        if not ns:
            continue
        toks = []
        for x in ns:
            j = load_json(x) or {}
            if "tokens_per_second" in j:
                toks.append(j["tokens_per_second"])
            else:
                warm = int(os.environ.get("FT_WARMUP", "2"))
                tps = [e["tokens_per_second"] for e in j.get("log_history", []) if "loss" in e and e["step"] > warm]
                toks.append(statistics.median(tps) if tps else None)
        trs = [rss_trace(x) for x in ns]
        print(f"| {label} | {len(ns)} | {spread(toks)} | {gb(med([time_file(x)[1] for x in ns]))} | "
              f"{gb(med([t[1] for t in trs if t]))} | {gb(med([t[2] for t in trs if t]))} |")
    print()

# ---------------------------------------------------------------- peak and phase split
pk = os.path.join(OUT, "peak_matmul.json")
if os.path.exists(pk):
    try:
        j = json.load(open(pk))
        print("## The machine's float32 matmul peak (PyTorch " + j["torch"] + " with MKL; numpy with OpenBLAS; best of 5)\n")
        print("| threads | 2048² x 2048² | 4096² x 4096² | xᵀx, x 256 x 1024 | xᵀx, x 256 x 2816 |")
        print("|---|---|---|---|---|")
        for t in (1, 2):
            print(f"| {t} | {j[f'gflops_{t}t_n2048']} | {j[f'gflops_{t}t_n4096']} | {j[f'gflops_{t}t_xtx_256x1024']} | "
                  f"{j[f'gflops_{t}t_xtx_256x2816']} |")
        nps = {k: v for k, v in j.items() if k.startswith("numpy_openblas_")}
        if nps:
            print()
            print("| numpy / OpenBLAS kernel | 1 thread | 2 threads |")
            print("|---|---|---|")
            for core in ("Haswell", "SkylakeX"):
                print(f"| {core} ({'AVX2' if core == 'Haswell' else 'AVX-512'}) | {nps.get(f'numpy_openblas_{core}_1t_n4096', '–')} | "
                      f"{nps.get(f'numpy_openblas_{core}_2t_n4096', '–')} |")
        print("\n(GFLOP/s, 2mnk per product, 4096² x 4096² for numpy.)\n")
    except (ValueError, KeyError):
        pass
for f, title in [("perf_pre1_phases.txt", "one thread"), ("perf_pre2_b1_phases.txt", "two threads, --calib_batch_size 1"),
                 ("perf_pre2_b4_phases.txt", "two threads, --calib_batch_size 4")]:
    ph = os.path.join(OUT, f)
    if os.path.exists(ph):
        print(f"## corda-preprocess ({title}, the largest sample count): perf samples by phase (perf_phases.py)\n")
        print("With two threads the seconds are samples x mean spacing, not wall time; CPU-seconds = samples / 499 Hz.\n"
              if "pre2" in f else "", end="")
        print("```\n" + open(ph).read().strip() + "\n```\n")

# ---------------------------------------------------------------- profiles
for f, title in [("perf_pre_self.txt", "corda-preprocess, 16 samples: self time by symbol (perf, cpu-clock)"),
                 ("perf_ft_self.txt", "corda-finetune, 3 steps: self time by symbol (perf, cpu-clock)"),
                 ("perf_pre1_children.txt", "corda-preprocess on 1 thread (the largest sample count): time including callees (perf, cpu-clock)")]:
    p = os.path.join(OUT, f)
    if os.path.exists(p):
        lines = [l for l in open(p).read().splitlines() if not l.startswith("#")][:25 if "children" not in f else 60]
        if lines:
            print(f"## Profile: {title}\n")
            print("```\n" + "\n".join(l[:160] for l in lines) + "\n```\n")
