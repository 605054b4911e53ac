#!/usr/bin/env python3
"""Split a single-threaded corda-preprocess perf profile into phases (standard library only).

    perf script -F tid,time,ip,sym -i perf.data | python3 perf_phases.py > split.txt

With one thread, the samples are one time line, and corda-preprocess runs each layer's
calibration (forward + covariance) and then its decomposition, one after the other. The AVX-512
kernels of faer's matrix products (`gemm_v0_gemm_microkernel_*`, hand-written assembly) carry no
unwind information, so their callers are lost; every other sample has its call chain. Each
sample is assigned to a phase by its call chain, and a sample without one takes the phase of
the nearest samples in time that have one. Within the calibration phase, the covariance is the
samples under `CovarianceAccumulator::add_batch` plus faer's code and kernels (the forward pass
uses candle's `gemm_f32` kernels, not faer's). With two threads, rayon workers' samples have no
caller either: they take their phase from the time line and their side from their own symbols;
the seconds are then samples x the mean spacing, i.e. wall time while both threads are busy.
"""
import re
import sys
from collections import Counter

samples = []  # (time, top symbol, chain text)
cur = None
for line in sys.stdin:
    if not line.strip():
        if cur:
            samples.append(cur)
        cur = None
        continue
    if cur is None:
        m = re.match(r"\s*(\d+)\s+([\d.]+):", line)
        if m:
            cur = [float(m.group(2)), None, []]
        continue
    parts = line.strip().split(None, 1)
    sym = parts[1] if len(parts) > 1 else "?"
    if cur[1] is None:
        cur[1] = sym
    cur[2].append(sym)
if cur:
    samples.append(cur)


def phase_of(chain):
    text = " ".join(chain)
    if "CovarianceAccumulator::add_batch" in text or "CovObserver" in text:
        return "cov"
    if "corda_eigens" in text or "decompose::" in text:
        return "decomp"
    if "DecoderLayer::forward" in text:
        return "forward"
    if "ShardWriter" in text or "safetensors" in text:
        return "write"
    if "pipeline::preprocess" in text:
        return "other"
    return None


labels = [phase_of(c) for _, _, c in samples]
# Calibration (forward / cov) vs decomposition periods from the known samples, then fill.
period = [None if l is None else ("calib" if l in ("forward", "cov") else l) for l in labels]
known = [i for i, p in enumerate(period) if p is not None]
filled = list(period)
j = 0
for i in range(len(samples)):
    if filled[i] is None and known:
        while j + 1 < len(known) and known[j + 1] < i:
            j += 1
        prev_i = known[j] if known[j] < i else None
        next_i = known[j + 1] if j + 1 < len(known) else (known[j] if known[j] > i else None)
        cands = [k for k in (prev_i, next_i) if k is not None]
        if cands:
            k = min(cands, key=lambda k: abs(samples[k][0] - samples[i][0]))
            filled[i] = period[k]

counts = Counter()
for (_, top, chain), lab, per in zip(samples, labels, filled):
    faer_kernel = top.startswith("gemm_v0_gemm_microkernel")
    if per == "calib":
        text = " ".join(chain)
        if lab == "cov" or (lab is None and (faer_kernel or "faer::" in text or "private_gemm" in text)):
            counts["calibration: covariance"] += 1
        elif lab is None and ("candle" in text or "gemm_f32" in text or "gemm_common" in text):
            counts["calibration: forward"] += 1  # a rayon worker of candle's ops
        elif lab is None:
            counts["calibration: unattributed"] += 1
        else:
            counts["calibration: forward"] += 1
    elif per is None:
        counts["unknown"] += 1
    else:
        counts[per] += 1

n = len(samples)
if n == 0:
    sys.exit("no samples")
dt = (samples[-1][0] - samples[0][0]) / max(n - 1, 1)
print(f"samples: {n}, {dt * 1000:.2f} ms apart on average ({samples[-1][0] - samples[0][0]:.1f} s)")
for k in sorted(counts):
    print(f"{k:32s} {counts[k]:7d} {100 * counts[k] / n:6.1f}%  ≈ {counts[k] * dt:6.2f} s")
